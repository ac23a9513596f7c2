"""Tests of the torchmetrics Metric classes: exact DDP sums, torchmetrics behaviour, class-conditional mode, errors."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import autograd_jacobian, free_port
from torch import nn

from lightning_mem import (
    ManifoldCrossMutualInformation,
    ManifoldEntropicMetrics,
    ManifoldEntropy,
    ManifoldPairwiseMutualInformation,
    ManifoldTotalCorrelation,
    decoder_jacobian,
)
from lightning_mem.functional import (
    STANDARD_NORMAL_ENTROPY,
    manifold_cross_mutual_information,
    manifold_entropy,
    manifold_pairwise_mutual_information,
    manifold_total_correlation,
)

LATENT, REFERENCE, OUTPUT, BATCH, NUM_BATCHES, NUM_CLASSES = 4, 3, 7, 8, 6, 3
STD = torch.linspace(0.5, 2.0, OUTPUT, dtype=torch.float64)
SIGMA = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64)


def _batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(NUM_BATCHES):
        batches.append(
            {
                "jacobian": torch.randn(BATCH, OUTPUT, LATENT, generator=generator, dtype=torch.float64),
                "reference": torch.randn(BATCH, OUTPUT, REFERENCE, generator=generator, dtype=torch.float64),
                # classes 0 and 1 only: class 2 is never seen and must not be averaged in as zero
                "labels": torch.randint(0, NUM_CLASSES - 1, (BATCH,), generator=generator),
            }
        )
    return batches


CASES = {
    "entropy": (lambda: ManifoldEntropy(LATENT), False),
    "entropy_scaled": (lambda: ManifoldEntropy(LATENT, std=STD, sigma=SIGMA), False),
    "total_correlation": (lambda: ManifoldTotalCorrelation(LATENT), False),
    "pairwise": (lambda: ManifoldPairwiseMutualInformation(LATENT), False),
    "all": (lambda: ManifoldEntropicMetrics(LATENT), False),
    "cross": (lambda: ManifoldCrossMutualInformation(LATENT, REFERENCE), False),
    "all_classes": (lambda: ManifoldEntropicMetrics(LATENT, num_classes=NUM_CLASSES), True),
    "entropy_classes": (lambda: ManifoldEntropy(LATENT, num_classes=NUM_CLASSES), True),
    "cross_classes": (lambda: ManifoldCrossMutualInformation(LATENT, REFERENCE, num_classes=NUM_CLASSES), True),
}


def _update(metric, batch, conditional: bool) -> None:
    labels = batch["labels"] if conditional else None
    if isinstance(metric, ManifoldCrossMutualInformation):
        metric.update(batch["jacobian"], batch["reference"], labels)
    else:
        metric.update(batch["jacobian"], labels)


def _run_all(batches) -> dict:
    results = {}
    for name, (make, conditional) in CASES.items():
        metric = make()
        for batch in batches:
            _update(metric, batch, conditional)
        with pytest.warns(UserWarning, match="classes had no samples") if conditional else _no_warning():
            results[name] = metric.compute()
        results[f"{name}/diagnostics"] = metric.diagnostics()
    return results


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _assert_close(actual, expected, atol=1e-10) -> None:
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            _assert_close(actual[key], expected[key], atol)
    else:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = {}
        for name, (make, conditional) in CASES.items():
            metric = make()
            for batch in _batches()[rank::world_size]:
                _update(metric, batch, conditional)
            results[name] = metric.compute()
            results[f"{name}/diagnostics"] = metric.diagnostics()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    """Rank r updates batches r, r+2, ...; compute() on every rank equals one process that saw every batch."""
    expected = _run_all(_batches())
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert results.keys() == expected.keys()
        for name in expected:
            _assert_close(results[name], expected[name])


def _cat(batches, key):
    return torch.cat([b[key] for b in batches])


def test_values_equal_functional_on_concatenated_batches():
    batches = _batches()
    jacobian, reference = _cat(batches, "jacobian"), _cat(batches, "reference")
    results = _run_all(batches)
    per_dim, total = manifold_entropy(jacobian)
    _assert_close(results["entropy"]["latent_entropy"], per_dim)
    _assert_close(results["entropy"]["entropy"], total)
    per_dim_scaled, total_scaled = manifold_entropy(jacobian, std=STD, sigma=SIGMA, per_dim=True)
    _assert_close(results["entropy_scaled"]["latent_entropy"], per_dim_scaled)
    _assert_close(results["entropy_scaled"]["entropy_per_dim"], total_scaled)
    assert int(results["entropy/diagnostics"]["num_samples"]) == jacobian.shape[0]
    _assert_close(results["total_correlation"], manifold_total_correlation(jacobian))
    _assert_close(results["pairwise"], manifold_pairwise_mutual_information(jacobian))
    _assert_close(results["cross"]["cross_mutual_information"], manifold_cross_mutual_information(jacobian, reference))
    everything = results["all"]
    _assert_close(everything["entropy"], total)
    _assert_close(everything["entropy_per_dim"], total / LATENT)
    _assert_close(everything["latent_entropy"], per_dim)
    _assert_close(everything["total_correlation"], manifold_total_correlation(jacobian))
    _assert_close(everything["total_correlation_per_dim"], manifold_total_correlation(jacobian) / LATENT)
    spectrum, order = per_dim.sort(descending=True)
    _assert_close(everything["spectrum"], spectrum)
    assert torch.equal(everything["spectrum_order"], order)
    pairwise = manifold_pairwise_mutual_information(jacobian)
    off_diagonal = [pairwise[i, j] for i in range(LATENT) for j in range(LATENT) if i != j]
    _assert_close(everything["pairwise_mutual_information_max"], max(off_diagonal))
    _assert_close(everything["pairwise_mutual_information_mean"], sum(off_diagonal) / len(off_diagonal))


def test_class_conditional_equals_mean_of_per_class_functional_results():
    batches = _batches()
    jacobian, reference, labels = _cat(batches, "jacobian"), _cat(batches, "reference"), _cat(batches, "labels")
    results = _run_all(batches)
    seen = sorted(set(labels.tolist()))
    assert seen == [0, 1]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    per_class = [manifold_entropy(jacobian[labels == k]) for k in seen]
    _assert_close(results["entropy_classes"]["latent_entropy"], mean([p for p, _ in per_class]))
    _assert_close(results["all_classes"]["entropy"], mean([t for _, t in per_class]))
    _assert_close(results["all_classes"]["total_correlation"], mean([manifold_total_correlation(jacobian[labels == k]) for k in seen]))
    _assert_close(
        results["all_classes"]["pairwise_mutual_information"],
        mean([manifold_pairwise_mutual_information(jacobian[labels == k]) for k in seen]),
    )
    _assert_close(
        results["cross_classes"]["cross_mutual_information"],
        mean([manifold_cross_mutual_information(jacobian[labels == k], reference[labels == k]) for k in seen]),
    )
    assert int(results["all_classes/diagnostics"]["num_classes_seen"]) == 2
    assert int(results["all_classes/diagnostics"]["num_samples"]) == labels.numel()


def test_forward_equals_update_plus_compute_and_accumulates():
    batches = _batches()
    metric = ManifoldEntropicMetrics(LATENT)
    for i, batch in enumerate(batches[:3]):
        batch_value = metric(batch["jacobian"])
        single = ManifoldEntropicMetrics(LATENT)
        single.update(batch["jacobian"])
        _assert_close(batch_value, single.compute())
        reference = ManifoldEntropicMetrics(LATENT)
        for previous in batches[: i + 1]:
            reference.update(previous["jacobian"])
        _assert_close(metric.compute(), reference.compute())


def test_reset_clone_pickle_merge_state_and_device_moves():
    batches = _batches()
    metric = ManifoldEntropy(LATENT)
    metric.update(batches[0]["jacobian"])
    expected = metric.compute()
    _assert_close(metric.clone().compute(), expected)
    _assert_close(pickle.loads(pickle.dumps(metric)).compute(), expected)
    # torchmetrics' float()/half() leave the states alone: the float64 sums survive a model's dtype change
    _assert_close(metric.to("cpu").float().compute(), expected)
    assert all(getattr(metric, name).dtype == torch.float64 for name in metric._defaults)

    other = ManifoldEntropy(LATENT)
    other.update(batches[1]["jacobian"])
    metric.merge_state(other)
    both = manifold_entropy(torch.cat([batches[0]["jacobian"], batches[1]["jacobian"]]))
    _assert_close(metric.compute()["latent_entropy"], both[0])

    metric.reset()
    assert float(metric.count.sum()) == 0
    with pytest.raises(ValueError, match="no update yet"):
        metric.compute()


def test_state_does_not_grow_with_batches():
    metric = ManifoldEntropicMetrics(LATENT)
    metric.update(_batches()[0]["jacobian"])
    sizes = {name: getattr(metric, name).shape for name in metric._defaults}
    for batch in _batches() * 5:
        metric.update(batch["jacobian"])
    assert {name: getattr(metric, name).shape for name in metric._defaults} == sizes
    assert all(isinstance(getattr(metric, name), torch.Tensor) for name in metric._defaults)


def test_gram_update_equals_jacobian_update():
    jacobian = _batches()[0]["jacobian"]
    from_jacobian, from_gram = ManifoldEntropicMetrics(LATENT, std=2.0), ManifoldEntropicMetrics(LATENT, std=2.0)
    from_jacobian.update(jacobian)
    from_gram.update(gram=jacobian.mT @ jacobian)
    _assert_close(from_gram.compute(), from_jacobian.compute())


def test_beta_vae_like_decoder_with_dead_latents():
    """Latents 1 and 3 are exactly ignored by the decoder: finite values, the floor, and two active latents."""
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    with torch.no_grad():
        decoder[0].weight[:, [1, 3]] = 0.0
    z = torch.randn(64, 4, dtype=torch.float64)
    metric = ManifoldEntropicMetrics(4)
    metric.update(decoder_jacobian(decoder, z))
    values = metric.compute()
    for key, value in values.items():
        assert torch.isfinite(value.double()).all(), key
    assert int(values["num_active"]) == 2
    assert set(values["spectrum_order"][:2].tolist()) == {0, 2}
    # the floor is relative: 1e-12 times each sample's largest squared column norm, averaged in log over samples
    jacobian = autograd_jacobian(decoder, z)  # float64 autograd, not the engine under test
    largest = jacobian.square().sum(1).amax(1)
    floor = STANDARD_NORMAL_ENTROPY + 0.5 * float(torch.log(1e-12 * largest).mean())
    torch.testing.assert_close(values["latent_entropy"][[1, 3]], torch.full((2,), floor, dtype=torch.float64))
    assert float(values["pairwise_mutual_information"][1].abs().max()) == 0.0
    assert float(values["total_correlation"]) >= -1e-12
    entropy = ManifoldEntropy(4)
    entropy.update(decoder_jacobian(decoder, z))
    assert entropy.diagnostics()["num_inactive_samples"].tolist() == [0, 64, 0, 64]


@pytest.mark.parametrize(
    ("make", "call", "match"),
    [
        (lambda: ManifoldEntropy(4), lambda m: m.update(torch.randn(5, 7, 3)), r"\(N, \*output_shape, d == 4\), but got \(5, 7, 3\)"),
        (lambda: ManifoldEntropy(4), lambda m: m.update(torch.randn(5, 4)), r"d == 4\), but got \(5, 4\)"),
        (lambda: ManifoldEntropy(4), lambda m: m.update(gram=torch.randn(5, 3, 3)), r"\(N, 4, 4\), but got \(5, 3, 3\)"),
        (
            lambda: ManifoldEntropy(4, num_classes=3),
            lambda m: m.update(torch.randn(5, 7, 4), torch.tensor([0, 1, 2, 3, 0])),
            r"`labels` in \[0, 2\].*from 0 to 3",
        ),
        (lambda: ManifoldEntropy(4, num_classes=3), lambda m: m.update(torch.randn(5, 7, 4)), "Expected `labels` of shape"),
        (lambda: ManifoldEntropy(4), lambda m: m.update(torch.randn(5, 7, 4), torch.zeros(5, dtype=torch.long)), "num_classes"),
        (
            lambda: ManifoldCrossMutualInformation(4, 2),
            lambda m: m.update(torch.randn(5, 7, 4), torch.randn(6, 7, 2)),
            r"same samples and output shape.*but got \(6, 7, 2\)",
        ),
        (
            lambda: ManifoldCrossMutualInformation(4, 2),
            lambda m: m.update(torch.randn(5, 7, 4), torch.randn(5, 7, 3)),
            r"`reference_jacobian` of shape \(N, \*output_shape, d == 2\)",
        ),
        (lambda: ManifoldEntropy(4), lambda m: m.compute(), "no update yet"),
    ],
)
def test_errors(make, call, match):
    metric = make()
    with pytest.raises(ValueError, match=match):
        call(metric)


def test_mismatched_latent_dims_between_updates():
    metric = ManifoldTotalCorrelation(4)
    metric.update(torch.randn(5, 7, 4))
    with pytest.raises(ValueError, match=r"d == 4\), but got \(5, 7, 5\)"):
        metric.update(torch.randn(5, 7, 5))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"latent_dim": 0}, "`latent_dim` to be a positive int"),
        ({"latent_dim": 3, "eps": -1.0}, "`eps` to be a positive finite float"),
        ({"latent_dim": 3, "num_classes": 0}, "`num_classes` to be a positive int or None"),
        ({"latent_dim": 3, "sigma": torch.ones(2)}, r"`sigma` with 3 entries"),
        ({"latent_dim": 3, "active_threshold": 0}, "`active_threshold`"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ManifoldEntropicMetrics(**kwargs)


def test_plot_every_class_draws_its_computed_values(tmp_path):
    batch = _batches()[0]
    for make, _ in CASES.values():
        metric = make()
        _update(metric, batch, metric.num_classes is not None)
        values = metric.compute()
        _, ax = metric.plot()
        if isinstance(values, dict) and "spectrum" in values:  # the spectrum, sorted latent by latent
            assert ax.lines[0].get_xdata().tolist() == list(range(1, LATENT + 1))
            torch.testing.assert_close(torch.as_tensor(ax.lines[0].get_ydata()), values["spectrum"])
        elif isinstance(values, dict) or values.ndim == 2:  # a heatmap of the (cross) mutual information matrix
            matrix = values["cross_mutual_information"] if isinstance(values, dict) else values
            torch.testing.assert_close(torch.as_tensor(ax.images[0].get_array().data), matrix)
        else:  # a scalar: torchmetrics' single-value plot, one point at the value
            assert ax.lines[0].get_ydata().tolist() == [float(values)]
    _, ax = ManifoldEntropy(LATENT).plot({"spectrum": torch.tensor([1.0, 0.5, -2.0, -9.0])}, log_x=True)
    assert ax.get_xscale() == "log"
