"""Tests of the sampled-column estimators against exact values from naive float64 formulas and a flow's own log-det."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import autograd_jacobian, freia_flow, naive_metrics
from torch import nn

import lightning_mem as lm
from lightning_mem.functional import (
    STANDARD_NORMAL_ENTROPY,
    manifold_entropy,
    manifold_pairwise_mutual_information,
    manifold_total_correlation,
)
from lightning_mem.functional.estimators import (
    estimate_manifold_entropy,
    estimate_manifold_pairwise_mutual_information,
    estimate_manifold_total_correlation,
    finish_sampled_entropy,
    finish_sampled_pairwise_mutual_information,
    finish_sampled_total_correlation,
    sample_latent_columns,
    sampled_gram_statistics,
)

H0 = STANDARD_NORMAL_ENTROPY
NUM_SEEDS = 200
MAX_Z_SCORE = 4.5  # deterministic seeds: a fixed draw, checked once, not a flaky bound


def _flow(d: int = 6) -> nn.Module:
    inn = freia_flow(d, "GLOWCouplingBlock", 3, seed=0, permute_seeds=[0, 0, 0]).eval()
    with torch.no_grad():  # stronger couplings: correlated columns, MTC of several nats
        for module in inn.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(2.0)
    return inn


def _mlp(d: int = 5, big_d: int = 10) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, big_d)).double().eval()


def _z_scores(samples: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(mean - truth) / standard error over the first axis, ignoring NaN (pairs not drawn in a run)."""
    drawn = ~samples.isnan()
    count = drawn.sum(0)
    mean = torch.nanmean(samples, 0)
    variance = torch.nansum((samples - mean) ** 2, 0) / (count - 1)
    return (mean - truth) / (variance / count).sqrt()


def test_design_rows_distinct_all_latents_drawn_and_reproducible():
    generator = torch.Generator().manual_seed(3)
    columns = sample_latent_columns(50, 13, 4, generator=generator)
    assert columns.shape == (50, 4)
    assert all(len(set(row)) == 4 for row in columns.tolist())
    # 50 samples hold 12 complete sweeps of ceil(13 / 4) = 4 samples, each drawing every latent at least once
    assert torch.bincount(columns.flatten(), minlength=13).min() >= 12
    again = sample_latent_columns(50, 13, 4, generator=torch.Generator().manual_seed(3))
    other = sample_latent_columns(50, 13, 4, generator=torch.Generator().manual_seed(4))
    assert torch.equal(columns, again) and not torch.equal(columns, other)


def test_design_is_uniform_over_latents_and_pairs():
    # every latent (pair) equally likely in every row: counts over many rows within a few standard deviations
    columns = sample_latent_columns(6000, 7, 3, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(columns.flatten(), minlength=7).double()
    p = 3 / 7
    assert ((counts - 6000 * p).abs() / math.sqrt(6000 * p * (1 - p))).max() < 4
    first_row_latent = torch.bincount(columns[:, 0], minlength=7).double()  # slot order is random too
    assert ((first_row_latent - 6000 / 7).abs() / math.sqrt(6000 / 7 * 6 / 7)).max() < 4


def test_all_columns_equal_the_exact_functions():
    decoder = _mlp()
    z = torch.randn(30, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    jacobian = lm.decoder_jacobian(decoder, z)
    per_latent, total = estimate_manifold_entropy(decoder, z)
    exact_per_latent, exact_total = manifold_entropy(jacobian)
    torch.testing.assert_close(per_latent, exact_per_latent, rtol=0, atol=1e-12)
    torch.testing.assert_close(total, exact_total, rtol=0, atol=1e-12)
    torch.testing.assert_close(estimate_manifold_total_correlation(decoder, z), manifold_total_correlation(jacobian), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        estimate_manifold_pairwise_mutual_information(decoder, z, num_columns=5),
        manifold_pairwise_mutual_information(jacobian),
        rtol=0,
        atol=1e-12,
    )


def test_total_entropy_from_the_flows_log_det_equals_the_gram_determinant():
    inn = _flow()
    decoder = lm.as_decoder(inn)
    z = torch.randn(20, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    truth = naive_metrics(autograd_jacobian(decoder, z))
    for log_abs_det in (True, lambda z_: inn(z_, rev=True)[1], inn(z, rev=True)[1].detach()):
        _, total = estimate_manifold_entropy(decoder, z, num_columns=2, log_abs_det=log_abs_det)
        torch.testing.assert_close(total, truth["entropy"], rtol=0, atol=1e-9)


@pytest.mark.slow
def test_flow_estimates_are_unbiased():
    inn = _flow()
    decoder = lm.as_decoder(inn)
    z = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    truth = naive_metrics(autograd_jacobian(decoder, z))
    assert truth["total_correlation"] > 1.0 and truth["pairwise_mutual_information"].max() > 0.3  # a non-trivial target
    per_latent, mtc, mpmi = [], [], []
    for seed in range(NUM_SEEDS):
        statistics = sampled_gram_statistics(decoder, z, num_columns=2, generator=torch.Generator().manual_seed(seed), log_abs_det=True)
        per_latent.append(finish_sampled_entropy(statistics)[0])
        mtc.append(finish_sampled_total_correlation(statistics))
        mpmi.append(finish_sampled_pairwise_mutual_information(statistics))
    per_latent, mtc, mpmi = torch.stack(per_latent), torch.stack(mtc), torch.stack(mpmi)
    assert _z_scores(per_latent, truth["entropy_per_dim"]).abs().max() < MAX_Z_SCORE
    assert _z_scores(mtc, truth["total_correlation"]).abs() < MAX_Z_SCORE
    off_diagonal = ~torch.eye(6, dtype=torch.bool)
    pair_scores = _z_scores(mpmi, truth["pairwise_mutual_information"])[off_diagonal]
    assert pair_scores.abs().max() < MAX_Z_SCORE
    assert (pair_scores**2).mean() < 2.5  # and no systematic drift: about chi-square with mean 1
    # the estimates vary from seed to seed (the test has power): a single run is off by many standard errors
    assert per_latent.std(0).min() > 1e-3


@pytest.mark.slow
def test_non_square_decoder_estimates_are_unbiased():
    decoder = _mlp()
    z = torch.randn(30, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    truth = naive_metrics(autograd_jacobian(decoder, z))
    runs = [
        sampled_gram_statistics(decoder, z, num_columns=2, generator=torch.Generator().manual_seed(seed), chunk_size=7)
        for seed in range(NUM_SEEDS)
    ]
    per_latent = torch.stack([finish_sampled_entropy(run)[0] for run in runs])
    mpmi = torch.stack([finish_sampled_pairwise_mutual_information(run) for run in runs])
    assert _z_scores(per_latent, truth["entropy_per_dim"]).abs().max() < MAX_Z_SCORE
    off_diagonal = ~torch.eye(5, dtype=torch.bool)
    assert _z_scores(mpmi, truth["pairwise_mutual_information"])[off_diagonal].abs().max() < MAX_Z_SCORE
    assert torch.isnan(finish_sampled_entropy(runs[0])[1])  # no log-det: the total is not estimable


def test_linear_decoder_is_exact_for_any_number_of_columns():
    a = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    decoder = nn.Linear(3, 4, bias=False).double()
    with torch.no_grad():
        decoder.weight.copy_(a)
    z = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    norms = a.norm(dim=0)
    for k in (1, 2, 3):
        per_latent, _ = estimate_manifold_entropy(decoder, z, num_columns=k, generator=torch.Generator().manual_seed(k))
        torch.testing.assert_close(per_latent, H0 + norms.log(), rtol=0, atol=1e-12)
    mpmi = estimate_manifold_pairwise_mutual_information(decoder, z, num_columns=2)
    cos2 = (a[:, 0] @ a[:, 1]) ** 2 / (norms[0] * norms[1]) ** 2
    assert math.isclose(float(mpmi[0, 1]), float(-0.5 * torch.log(1 - cos2)), abs_tol=1e-12)
    assert float(mpmi[0, 2]) == pytest.approx(0.0, abs=1e-12) and float(mpmi[1, 2]) == pytest.approx(0.0, abs=1e-12)


def test_scales_shift_entropies_and_leave_total_correlation():
    inn = _flow(4)
    decoder = lm.as_decoder(inn)
    z = torch.randn(10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    std = 2.5
    args = {"num_columns": 2, "generator": torch.Generator().manual_seed(0), "log_abs_det": True}
    per_latent, total = estimate_manifold_entropy(decoder, z, **args)
    args["generator"] = torch.Generator().manual_seed(0)
    scaled_per_latent, scaled_total = estimate_manifold_entropy(decoder, z, std=std, sigma=sigma, **args)
    torch.testing.assert_close(scaled_per_latent, per_latent + math.log(std) + sigma.log(), rtol=0, atol=1e-12)
    torch.testing.assert_close(scaled_total, total + 4 * math.log(std) + sigma.log().sum(), rtol=0, atol=1e-12)
    exact_total = manifold_entropy(lm.decoder_jacobian(decoder, z), std=std, sigma=sigma)[1]
    torch.testing.assert_close(scaled_total, exact_total, rtol=0, atol=1e-9)


def test_undrawn_latents_are_nan_with_a_warning():
    decoder = _mlp(d=8)
    z = torch.randn(2, 8, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="never drawn"):
        per_latent, _ = estimate_manifold_entropy(decoder, z, num_columns=1)
    assert int(per_latent.isnan().sum()) == 6 and bool(torch.isfinite(per_latent).sum() == 2)


def test_bad_arguments_raise():
    decoder = _mlp()
    z = torch.randn(4, 5, dtype=torch.float64)
    for bad in (0, 6, True, 2.0):
        with pytest.raises(ValueError, match="num_columns"):
            estimate_manifold_entropy(decoder, z, num_columns=bad)
    with pytest.raises(ValueError, match="square"):
        estimate_manifold_entropy(decoder, z, num_columns=2, log_abs_det=torch.zeros(4))
    with pytest.raises(ValueError, match="log_abs_det"):
        estimate_manifold_total_correlation(decoder, z, num_columns=2)
    square = nn.Linear(5, 5).double()
    with pytest.raises(TypeError, match="as_decoder"):
        estimate_manifold_entropy(square, z, num_columns=2, log_abs_det=True)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        estimate_manifold_entropy(square, z, num_columns=2, log_abs_det=torch.zeros(3))
    with pytest.raises(ValueError, match="eps"):
        estimate_manifold_entropy(decoder, z, num_columns=2, eps=0.0)
    with pytest.raises(ValueError, match="num_columns"):
        sample_latent_columns(4, 3, 4)


def test_sampled_pairs_with_a_dead_latent_add_no_dependence_as_on_the_exact_path():
    """A latent the decoder all but ignores (|J_2|^2 ~ 1e-14, below the floor) is inactive: its MPMI with every other
    latent is 0 on both paths (the sampled path used to add -1/2 log(1 - rho^2) with the floored norm)."""
    decoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6)).double()
    with torch.no_grad():
        decoder[0].weight[:, 2] *= 1e-7
    z = torch.randn(40, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sampled = estimate_manifold_pairwise_mutual_information(decoder, z, num_columns=2)
    exact = lm.functional.manifold_pairwise_mutual_information(autograd_jacobian(decoder, z))
    assert torch.equal(sampled[2], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(sampled[:, 2], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(exact[2], sampled[2])
    assert float(sampled.abs().sum()) > 0  # the live pairs still carry dependence


def test_the_sampled_floor_is_absolute_and_the_exact_one_relative():
    """As documented: a decoder scaled by 1e-7 (every |J_i|^2 about 1e-14) has every latent inactive under the sampled
    estimators' absolute floor eps = 1e-12, and none under the exact path's relative one."""
    decoder = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 6)).double()
    with torch.no_grad():
        decoder[2].weight *= 1e-7
        decoder[2].bias.zero_()
    z = torch.randn(12, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    norms = autograd_jacobian(decoder, z).square().sum(1)
    assert float(norms.max()) < 1e-12 and float(norms.min()) > 0
    sampled = sampled_gram_statistics(decoder, z, num_columns=2)
    torch.testing.assert_close(sampled.num_inactive, sampled.column_count)
    exact = sampled_gram_statistics(decoder, z)
    assert float(exact.num_inactive.sum()) == 0.0
