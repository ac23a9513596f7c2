"""Tests of the manifold entropic metrics against closed forms, a naive implementation and flows' own log-determinants."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import H0, autograd_jacobian, freia_flow, linear_closed_form, naive_cross, naive_metrics
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_mem import as_decoder, decoder_gram, decoder_jacobian
from lightning_mem.functional import (
    DEFAULT_ACTIVE_THRESHOLD,
    DEFAULT_EPS,
    STANDARD_NORMAL_ENTROPY,
    active_latents,
    entropy_spectrum,
    jacobian_gram,
    manifold_cross_mutual_information,
    manifold_entropy,
    manifold_pairwise_mutual_information,
    manifold_total_correlation,
    num_active_latents,
)
from lightning_mem.functional.statistics import cross_statistics, gram_statistics

ATOL = 1e-10
F64 = torch.float64


def close(actual: Tensor, expected: Tensor | float, atol: float = ATOL) -> None:
    expected = torch.as_tensor(expected, dtype=F64)
    assert actual.dtype == F64
    torch.testing.assert_close(actual, expected.expand_as(actual) if expected.ndim == 0 else expected, atol=atol, rtol=0)


def all_metrics(jacobian: Tensor | None = None, **options) -> dict[str, Tensor]:
    """Every metric of one batch, with the same options."""
    per_dim, total = manifold_entropy(jacobian, **options)
    return {
        "entropy_per_dim": per_dim,
        "entropy": total,
        "total_correlation": manifold_total_correlation(jacobian, **options),
        "pairwise_mutual_information": manifold_pairwise_mutual_information(jacobian, **options),
    }


def test_standard_normal_entropy_constant():
    assert STANDARD_NORMAL_ENTROPY == pytest.approx(H0, abs=1e-15)
    # the entropy of N(0, 1) by numerical integration of -p log p
    x = torch.linspace(-12, 12, 200_001, dtype=F64)
    p = torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
    assert float(torch.trapezoid(-p * torch.log(p), x)) == pytest.approx(H0, abs=1e-9)


# ------------------------------------------------------------------------------------------- closed forms: x = A z


def linear_jacobian(a: Tensor, n: int = 3) -> Tensor:
    """The Jacobian of ``x = A z`` at ``n`` latent points: ``A`` everywhere."""
    return a.expand(n, *a.shape).clone()


def random_matrix(rows: int, cols: int, seed: int) -> Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=F64)


def orthonormal_columns(rows: int, cols: int, seed: int) -> Tensor:
    q, _ = torch.linalg.qr(random_matrix(rows, cols, seed))
    return q


LINEAR_CASES = {
    "random": lambda: random_matrix(7, 4, 0),
    "square": lambda: random_matrix(4, 4, 1),
    "orthogonal": lambda: orthonormal_columns(7, 4, 2),
    "column_scaled_orthogonal": lambda: orthonormal_columns(7, 4, 3) * torch.tensor([3.0, 0.5, 1e-3, 20.0], dtype=F64),
    "column_scaled_random": lambda: random_matrix(6, 3, 4) * torch.tensor([0.1, 1.0, 7.0], dtype=F64),
}


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_linear_decoder_closed_form(case):
    a = LINEAR_CASES[case]()
    jacobian = linear_jacobian(a)
    expected = linear_closed_form(a)
    got = all_metrics(jacobian)
    for key, value in expected.items():
        close(got[key], value)
    # per_dim divides the totals by d; the per-dim entropies are untouched
    d = a.shape[1]
    per_dim, total = manifold_entropy(jacobian, per_dim=True)
    close(per_dim, expected["entropy_per_dim"])
    close(total, expected["entropy"] / d)
    close(manifold_total_correlation(jacobian, per_dim=True), expected["total_correlation"] / d)
    # spectrum: the closed-form entropies sorted
    spectrum, order = entropy_spectrum(got["entropy_per_dim"])
    expected_order = torch.argsort(expected["entropy_per_dim"], descending=True)
    assert torch.equal(order, expected_order)
    close(spectrum, expected["entropy_per_dim"][expected_order])


@pytest.mark.parametrize("case", ["orthogonal", "column_scaled_orthogonal"])
def test_orthogonal_columns_have_zero_total_correlation_and_mutual_information(case):
    a = LINEAR_CASES[case]()
    got = all_metrics(linear_jacobian(a))
    close(got["total_correlation"], 0.0)
    close(got["pairwise_mutual_information"], torch.zeros(4, 4, dtype=F64))
    close(got["entropy_per_dim"], H0 + torch.log(a.norm(dim=0)))


def test_column_scaled_orthogonal_entropies_are_h0_plus_log_scale():
    scales = torch.tensor([3.0, 0.5, 1e-3, 20.0], dtype=F64)
    a = orthonormal_columns(7, 4, 3) * scales
    per_dim, total = manifold_entropy(linear_jacobian(a))
    close(per_dim, H0 + torch.log(scales))
    close(total, 4 * H0 + torch.log(scales).sum())


def test_mutual_information_of_two_columns_at_known_angle():
    """Columns at angle theta: MPMI = -1/2 log(sin^2 theta); also MTC, as d = 2."""
    for theta in (0.1, math.pi / 6, math.pi / 3, math.pi / 2):
        a = torch.tensor([[1.0, 2 * math.cos(theta)], [0.0, 2 * math.sin(theta)], [0.0, 0.0]], dtype=F64)
        expected = -0.5 * math.log(math.sin(theta) ** 2)
        got = all_metrics(linear_jacobian(a))
        close(got["pairwise_mutual_information"], torch.tensor([[0.0, expected], [expected, 0.0]], dtype=F64))
        close(got["total_correlation"], expected)


@pytest.mark.parametrize("eps", [DEFAULT_EPS, 1e-8])
@pytest.mark.parametrize("zero_column", [0, 2, 3])
def test_linear_decoder_with_a_zero_column(zero_column, eps):
    a = random_matrix(7, 4, 5)
    a[:, zero_column] = 0
    n = 3
    jacobian = linear_jacobian(a, n)
    active = [i for i in range(4) if i != zero_column]
    sub = linear_closed_form(a[:, active])

    got = all_metrics(jacobian, eps=eps)
    for value in got.values():
        assert torch.isfinite(value).all()
    # the floor is relative to the sample's own scale: eps times its largest squared column norm
    floor = H0 + 0.5 * math.log(eps * float(a.square().sum(0).max()))
    expected_per_dim = torch.full((4,), floor, dtype=F64)
    expected_per_dim[active] = sub["entropy_per_dim"]
    close(got["entropy_per_dim"], expected_per_dim)
    # the zero column contributes its floored entropy to the total, and nothing to the total correlation
    close(got["entropy"], sub["entropy"] + floor)
    close(got["total_correlation"], sub["total_correlation"])
    expected_mi = torch.zeros(4, 4, dtype=F64)
    expected_mi[torch.tensor(active)[:, None], torch.tensor(active)[None, :]] = sub["pairwise_mutual_information"]
    close(got["pairwise_mutual_information"], expected_mi)

    statistics = gram_statistics(jacobian_gram(jacobian), eps=eps)
    expected_inactive = torch.zeros(1, 4, dtype=F64)
    expected_inactive[0, zero_column] = n
    assert torch.equal(statistics.num_inactive, expected_inactive)
    assert torch.equal(statistics.count, torch.tensor([float(n)], dtype=F64))
    assert int(num_active_latents(got["entropy_per_dim"], eps=eps)) == 3  # the zero column is dead: at the floor
    _, order = entropy_spectrum(got["entropy_per_dim"])
    assert int(order[-1]) == zero_column
    # cross MI against a reference with a zero column: finite, and zero in that column
    reference = linear_jacobian(random_matrix(7, 2, 6), n)
    cross = manifold_cross_mutual_information(reference, jacobian, eps=eps)
    assert torch.isfinite(cross).all()
    close(cross[:, zero_column], torch.zeros(2, dtype=F64))


def rank_deficient_jacobian(n: int, big_d: int, singular_values: list[float], seed: int) -> Tensor:
    """``J = U diag(s) V^T`` with some ``s`` exactly zero: non-zero, non-orthogonal columns spanning fewer dims."""
    generator = torch.Generator().manual_seed(seed)
    d, rank = len(singular_values), min(len(singular_values), big_d)
    u, _ = torch.linalg.qr(torch.randn(n, big_d, rank, generator=generator, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, d, d, generator=generator, dtype=F64))
    return u * torch.tensor(singular_values[:rank], dtype=F64) @ v[..., :rank].mT


@pytest.mark.parametrize("big_d", [2, 6])
@pytest.mark.parametrize(
    "singular_values", [[2.0, 0.7, 0.0], [300.0, 0.0, 0.0], [1e3, 5.0, 0.0, 0.0]], ids=["rank2", "rank1_large", "rank2_large"]
)
def test_rank_deficient_jacobian_total_entropy_is_the_rank_tolerance_in_every_latent_order(big_d, singular_values):
    """Dependent columns: log det G = sum_i log G_ii + sum_k log max(s_k, tol)^2, with s_k the singular values of the
    unit-column Jacobian (numpy's rank tolerance tol = max(D, d) u), whatever the latent order.

    The large cases have rounding-sized singular values (|G| ~ 1e5): they must still count as zero.
    """
    d, n = len(singular_values), 20
    jacobian = rank_deficient_jacobian(n, big_d, singular_values, seed=8)
    tolerance = max(big_d, d) * torch.finfo(F64).eps
    units = jacobian / jacobian.norm(dim=1, keepdim=True)
    # the naive formula: the exact singular values of the unit columns (the rank-deficient ones are rounding), floored
    unit_singular = torch.linalg.svdvals(units).clamp_min(tolerance)
    if d > big_d:  # a D x d Jacobian with D < d has d - D more zero singular values
        unit_singular = torch.cat([unit_singular, torch.full((n, d - big_d), tolerance, dtype=F64)], dim=1)
    log_det = jacobian.square().sum(1).log().sum(1) + 2 * unit_singular.log().sum(1)
    expected = d * H0 + 0.5 * float(log_det.mean())
    for perm in itertools.permutations(range(d)):
        permuted = jacobian[..., list(perm)]
        per_dim, total = manifold_entropy(permuted)
        close(total, expected, atol=1e-9)
        close(manifold_total_correlation(permuted), per_dim.sum() - expected, atol=1e-9)
        assert float(manifold_total_correlation(permuted)) >= 0
    statistics = gram_statistics(jacobian_gram(jacobian))
    assert torch.equal(statistics.num_fallback, torch.tensor([float(n)], dtype=F64))
    assert torch.equal(statistics.num_inactive, torch.zeros(1, d, dtype=F64))  # no column is zero


def test_full_rank_jacobian_takes_no_fallback():
    statistics = gram_statistics(jacobian_gram(rank_deficient_jacobian(20, 6, [2.0, 0.7, 1e-3], seed=9)))
    assert torch.equal(statistics.num_fallback, torch.zeros(1, dtype=F64))


def test_zero_column_counts_as_inactive_not_as_fallback():
    """An inactive column is left out of the determinant (orthogonal at its floor): the rest is well conditioned."""
    a = random_matrix(5, 3, 12)
    a[:, 1] = 0
    statistics = gram_statistics(jacobian_gram(linear_jacobian(a, 4)))
    assert torch.equal(statistics.num_fallback, torch.zeros(1, dtype=F64))
    assert torch.equal(statistics.num_inactive, torch.tensor([[0.0, 4.0, 0.0]], dtype=F64))


def test_tiny_collinear_columns_keep_total_correlation_nonnegative():
    """Two equal columns with eps < |a|^2 < 2 eps: the eigenvalue clamp alone would give MTC = 1/2 log(|a|^2 / 2 eps) < 0."""
    column = torch.zeros(4, dtype=F64)
    column[0] = math.sqrt(1.5 * DEFAULT_EPS)
    jacobian = torch.stack([column, column], dim=1).expand(3, 4, 2)
    assert float(manifold_total_correlation(jacobian)) >= 0


def test_gradient_through_a_singular_sample_is_finite():
    """A batch with a zero column in one sample: the gradient stays finite, and the other sample's is the closed form."""
    a = random_matrix(6, 3, 13)
    singular = a.clone()
    singular[:, 0] = 0
    jacobian = torch.stack([a, singular]).requires_grad_(True)
    per_dim, total = manifold_entropy(jacobian)
    (total + per_dim.sum() + manifold_total_correlation(jacobian) + manifold_pairwise_mutual_information(jacobian).sum()).backward()
    assert torch.isfinite(jacobian.grad).all()

    jacobian.grad = None
    manifold_entropy(jacobian)[1].backward()
    # H = 3 h0 + 1/2 mean_n log det(J_n^T J_n): dH/dJ_0 = J_0 (J_0^T J_0)^{-1} / 2
    close(jacobian.grad[0], a @ torch.linalg.inv(a.T @ a) / 2)
    close(jacobian.grad[1][:, 0], torch.zeros(6, dtype=F64))


def test_num_active_latents_threshold():
    scales = torch.tensor([2.0, 0.5, 0.02, 0.005, 0.0], dtype=F64)
    a = torch.cat([torch.diag(scales), torch.zeros(1, 5, dtype=F64)])
    per_dim, _ = manifold_entropy(linear_jacobian(a))
    # by default the spectrum's shape: log column norms 0.69, -0.69, -3.9, -5.3 fall evenly (no plateau), the zero
    # column is dead at the floor
    assert int(num_active_latents(per_dim)) == int(active_latents(per_dim).num_active) == 4
    assert int(num_active_latents(per_dim, threshold=DEFAULT_ACTIVE_THRESHOLD)) == int((scales > DEFAULT_ACTIVE_THRESHOLD).sum()) == 3
    assert int(num_active_latents(per_dim, threshold=0.03)) == 2
    assert int(num_active_latents(per_dim, threshold=0.001)) == 4
    assert int(num_active_latents(per_dim, threshold=10.0)) == 0


def cross_closed_form(a: Tensor, b: Tensor) -> Tensor:
    cos = (a.T @ b) / (a.norm(dim=0)[:, None] * b.norm(dim=0)[None, :])
    return -0.5 * torch.log(1 - cos**2)


@pytest.mark.parametrize("seed", [0, 1])
def test_cross_mutual_information_closed_form(seed):
    a = random_matrix(8, 4, 10 + seed)
    b = random_matrix(8, 3, 20 + seed)
    got = manifold_cross_mutual_information(linear_jacobian(a), linear_jacobian(b))
    assert got.shape == (4, 3)
    close(got, cross_closed_form(a, b))


def test_cross_mutual_information_of_a_decoder_with_itself_is_its_pairwise_mutual_information_off_the_diagonal():
    a = random_matrix(8, 4, 30)
    # a column-rescaled copy: the same directions, so the same cosines
    b = a * torch.tensor([2.0, 0.3, 1.0, 5.0], dtype=F64)
    got = manifold_cross_mutual_information(linear_jacobian(a), linear_jacobian(b))
    mpmi = manifold_pairwise_mutual_information(linear_jacobian(a))
    off = ~torch.eye(4, dtype=torch.bool)
    close(got[off], mpmi[off])
    # identical directions: rho = 1, finite but large: 1 - rho^2 is floored at the float64 machine epsilon
    ceiling = -0.5 * math.log(torch.finfo(F64).eps)
    assert ((got.diagonal() > 10) & (got.diagonal() <= ceiling + 1e-12)).all()


def test_cross_mutual_information_orthogonal_reference_is_zero():
    q = orthonormal_columns(9, 5, 40)
    got = manifold_cross_mutual_information(linear_jacobian(q[:, :3]), linear_jacobian(q[:, 3:] * 4.0))
    close(got, torch.zeros(3, 2, dtype=F64))


# ------------------------------------------------------------------ naive implementation on a non-linear decoder


LATENT, OUTPUT, NUM = 4, 10, 50


def tanh_mlp(latent_dim: int, output_dim: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(latent_dim, 16), nn.Tanh(), nn.Linear(16, output_dim), nn.Tanh()).double()


def class_mean(values: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {key: torch.stack([v[key] for v in values]).mean(0) for key in values[0]}


@pytest.fixture(scope="module")
def nonlinear():
    generator = torch.Generator().manual_seed(123)
    decoder = tanh_mlp(LATENT, OUTPUT, 1)
    z = torch.randn(NUM, LATENT, generator=generator, dtype=F64)
    reference = tanh_mlp(3, OUTPUT, 2)
    z_reference = torch.randn(NUM, 3, generator=generator, dtype=F64)
    return {
        "decoder": decoder,
        "z": z,
        "jacobians": autograd_jacobian(decoder, z),
        "jacobian": decoder_jacobian(decoder, z),
        "reference_jacobians": autograd_jacobian(reference, z_reference),
        "reference_jacobian": decoder_jacobian(reference, z_reference),
        "std": torch.rand(OUTPUT, generator=generator, dtype=F64) * 2 + 0.1,
        "sigma": torch.rand(LATENT, generator=generator, dtype=F64) * 2 + 0.1,
        "reference_sigma": torch.rand(3, generator=generator, dtype=F64) + 0.5,
        "labels": torch.randint(0, 3, (NUM,), generator=generator),
    }


@pytest.mark.parametrize("scaling", ["none", "scalar_std", "per_output_std", "sigma", "both"])
def test_metrics_equal_naive_implementation(nonlinear, scaling):
    std = {"scalar_std": 2.5, "per_output_std": nonlinear["std"], "both": nonlinear["std"]}.get(scaling)
    sigma = nonlinear["sigma"] if scaling in ("sigma", "both") else None
    expected = naive_metrics(nonlinear["jacobians"], std=std, sigma=sigma)
    got = all_metrics(nonlinear["jacobian"], std=std, sigma=sigma)
    for key, value in expected.items():
        close(got[key], value)
    _, total = manifold_entropy(nonlinear["jacobian"], std=std, sigma=sigma, per_dim=True)
    close(total, expected["entropy"] / LATENT)
    close(manifold_total_correlation(nonlinear["jacobian"], std=std, sigma=sigma, per_dim=True), expected["total_correlation"] / LATENT)


def test_scalar_std_shifts_entropies_and_leaves_dependence_unchanged(nonlinear):
    base = naive_metrics(nonlinear["jacobians"])
    got = all_metrics(nonlinear["jacobian"], std=3.0)
    close(got["entropy_per_dim"], base["entropy_per_dim"] + math.log(3.0))
    close(got["entropy"], base["entropy"] + LATENT * math.log(3.0))
    close(got["total_correlation"], base["total_correlation"])
    close(got["pairwise_mutual_information"], base["pairwise_mutual_information"])


def test_class_conditional_metrics_are_the_mean_over_classes_of_the_naive_metrics(nonlinear):
    labels = nonlinear["labels"]
    per_class = [naive_metrics([j for j, label in zip(nonlinear["jacobians"], labels, strict=True) if label == k]) for k in range(3)]
    expected = class_mean(per_class)
    got = all_metrics(nonlinear["jacobian"], labels=labels, num_classes=3)
    for key, value in expected.items():
        close(got[key], value)
    # a class without samples is left out of the mean (equal weight per class present)
    got = all_metrics(nonlinear["jacobian"], labels=labels + 2, num_classes=6)
    for key, value in expected.items():
        close(got[key], value)


def test_cross_mutual_information_equals_naive_implementation(nonlinear):
    expected = naive_cross(nonlinear["jacobians"], nonlinear["reference_jacobians"])
    close(manifold_cross_mutual_information(nonlinear["jacobian"], nonlinear["reference_jacobian"]), expected)
    # a scalar data scale cancels; latent scales cancel in the cosine too
    scaled = manifold_cross_mutual_information(
        nonlinear["jacobian"],
        nonlinear["reference_jacobian"],
        std=2.0,
        sigma=nonlinear["sigma"],
        reference_sigma=nonlinear["reference_sigma"],
    )
    close(scaled, expected)


def test_cross_mutual_information_with_per_output_std_equals_naive(nonlinear):
    std = nonlinear["std"]
    scale = [j * std[:, None] for j in nonlinear["jacobians"]]
    scale_reference = [j * std[:, None] for j in nonlinear["reference_jacobians"]]
    expected = naive_cross(scale, scale_reference)
    got = manifold_cross_mutual_information(nonlinear["jacobian"], nonlinear["reference_jacobian"], std=std)
    close(got, expected)
    assert not torch.allclose(got, naive_cross(nonlinear["jacobians"], nonlinear["reference_jacobians"]), atol=1e-3)


def test_class_conditional_cross_mutual_information(nonlinear):
    labels = nonlinear["labels"]
    expected = torch.stack(
        [
            naive_cross(
                [j for j, label in zip(nonlinear["jacobians"], labels, strict=True) if label == k],
                [j for j, label in zip(nonlinear["reference_jacobians"], labels, strict=True) if label == k],
            )
            for k in range(3)
        ]
    ).mean(0)
    got = manifold_cross_mutual_information(nonlinear["jacobian"], nonlinear["reference_jacobian"], labels=labels, num_classes=3)
    close(got, expected)


# ---------------------------------------------------------------------------------------------------- Gram path


def test_gram_path_equals_jacobian_path(nonlinear):
    decoder, z = nonlinear["decoder"], nonlinear["z"]
    flat = nonlinear["jacobians"]
    gram = decoder_gram(decoder, z, chunk_size=16)
    close(gram, flat.mT @ flat)
    close(jacobian_gram(nonlinear["jacobian"]), flat.mT @ flat)
    for options in ({}, {"std": 1.7}, {"sigma": nonlinear["sigma"]}, {"std": torch.tensor(0.4, dtype=F64), "sigma": nonlinear["sigma"]}):
        for extra in ({}, {"labels": nonlinear["labels"], "num_classes": 3}, {"eps": 1e-6}):
            from_jacobian = all_metrics(nonlinear["jacobian"], **options, **extra)
            from_gram = all_metrics(gram=gram, **options, **extra)
            for key, value in from_jacobian.items():
                close(from_gram[key], value)
    _, total = manifold_entropy(gram=gram, per_dim=True)
    close(total, manifold_entropy(nonlinear["jacobian"], per_dim=True)[1])


def test_gram_with_per_output_std_is_refused(nonlinear):
    gram = jacobian_gram(nonlinear["jacobian"])
    with pytest.raises(ValueError, match=r"Expected a scalar `std` with `gram` .*but got shape \(10,\)"):
        manifold_entropy(gram=gram, std=nonlinear["std"])


def test_image_shaped_jacobian_and_std():
    generator = torch.Generator().manual_seed(7)
    jacobian = torch.randn(6, 3, 4, 4, 5, generator=generator, dtype=F64)
    std = torch.rand(3, 4, 4, generator=generator, dtype=F64) + 0.5
    flat = jacobian.reshape(6, 48, 5)
    expected = naive_metrics(list(flat), std=std.reshape(-1))
    for std_arg in (std, std.reshape(-1)):
        got = all_metrics(jacobian, std=std_arg)
        for key, value in expected.items():
            close(got[key], value)
    assert torch.equal(all_metrics(jacobian)["entropy"], all_metrics(flat)["entropy"])


def test_float32_jacobian_is_accumulated_in_float64(nonlinear):
    jacobian32 = nonlinear["jacobian"].float()
    expected = naive_metrics([j.double() for j in jacobian32])
    got = all_metrics(jacobian32)
    for key, value in expected.items():
        close(got[key], value, atol=1e-9)


@pytest.mark.parametrize("classes", [False, True])
def test_cache_sized_blocks_change_nothing(nonlinear, monkeypatch, classes):
    """On CPU the float64 Gram product and the pairwise terms are built a few samples at a time in reused buffers:
    with blocks of one or two samples (an odd N leaves a short last block) every metric still equals the formulas."""
    from lightning_mem.functional import gram as gram_module

    monkeypatch.setattr(gram_module, "_CACHE_BLOCK_BYTES", 1)
    jacobian32 = nonlinear["jacobian"][:-1].float()  # 49 samples
    std = nonlinear["std"]
    labels = nonlinear["labels"][:-1]
    options = {"labels": labels, "num_classes": 3} if classes else {}
    if classes:
        samples = [[j.double() for j, label in zip(jacobian32, labels, strict=True) if label == k] for k in range(3)]
        expected = class_mean([naive_metrics(part, std=std) for part in samples])
    else:
        expected = naive_metrics([j.double() for j in jacobian32], std=std)
    got = all_metrics(jacobian32, std=std, **options)
    for key, value in expected.items():
        close(got[key], value, atol=1e-9)
    gram = gram_module.jacobian_gram(jacobian32, std=std)
    scaled = jacobian32.double() * std.reshape(1, -1, 1)
    torch.testing.assert_close(gram, scaled.mT @ scaled, atol=1e-12, rtol=1e-14)


# ------------------------------------------------------------------------------------------------- the torus


def test_torus_ground_truth():
    """SPEC 3: angles t_k = pi/2 + s_k e_k, radii r_k = 1 + u_k e'_k, k planar points, randomly rotated."""
    k, n = 3, 200
    generator = torch.Generator().manual_seed(11)
    s = torch.rand(k, generator=generator, dtype=F64) * 1.5 + 0.2
    u = torch.rand(k, generator=generator, dtype=F64) * 0.15 + 0.05
    rotation, _ = torch.linalg.qr(torch.randn(2 * k, 2 * k, generator=generator, dtype=F64))
    eps = torch.randn(n, 2 * k, generator=generator, dtype=F64)

    def torus(e: Tensor) -> Tensor:
        angles = math.pi / 2 + s * e[:, :k]
        radii = 1 + u * e[:, k:]
        points = torch.stack([radii * torch.cos(angles), radii * torch.sin(angles)], dim=-1)  # (N, k, 2)
        return points.reshape(e.shape[0], 2 * k) @ rotation.T

    radii = 1 + u * eps[:, k:]
    assert (radii > 0).all()
    jacobian = decoder_jacobian(torus, eps)
    per_dim, total = manifold_entropy(jacobian)
    expected = torch.cat([H0 + torch.log(s) + torch.log(radii).mean(0), H0 + torch.log(u)])
    close(per_dim, expected)
    close(total, expected.sum())
    close(manifold_total_correlation(jacobian), 0.0)
    close(manifold_pairwise_mutual_information(jacobian), torch.zeros(2 * k, 2 * k, dtype=F64))
    spectrum, order = entropy_spectrum(per_dim)
    assert torch.equal(order, torch.argsort(expected, descending=True))
    close(spectrum, expected.sort(descending=True).values)


# ------------------------------------------------------------------------------------------------------ flows


FLOW_BLOCKS = {
    "GLOW": ("GLOWCouplingBlock", {}),
    "NICE": ("NICECouplingBlock", {}),
    "GIN": ("GINCouplingBlock", {}),
    "AllInOne": ("AllInOneBlock", {"global_affine_init": 0.7}),
    "RNVP": ("RNVPCouplingBlock", {}),
}
VOLUME_PRESERVING = {"NICE", "GIN"}


def make_flow(name: str, dim: int = 6, num_blocks: int = 3) -> nn.Module:
    block, options = FLOW_BLOCKS[name]
    return freia_flow(dim, block, num_blocks, seed=17, permute_seeds=range(num_blocks), **options)


@pytest.mark.parametrize("name", FLOW_BLOCKS)
def test_flow_entropy_equals_its_own_log_det(name):
    dim, n = 6, 40
    inn = make_flow(name, dim)
    z = torch.randn(n, dim, generator=torch.Generator().manual_seed(3), dtype=F64)
    with torch.no_grad():
        _, log_det = inn(z, rev=True)
    log_det = torch.as_tensor(log_det, dtype=F64).expand(n)  # NICE and GIN return a plain float 0
    expected = dim * H0 + log_det.mean()

    decoder = as_decoder(inn)
    _, from_jacobian = manifold_entropy(decoder_jacobian(decoder, z))
    _, from_gram = manifold_entropy(gram=decoder_gram(decoder, z, chunk_size=16))
    close(from_jacobian, expected)
    close(from_gram, expected)

    # the block's own log-determinant agrees with autodiff (report it here if it ever does not)
    autodiff = torch.linalg.slogdet(autograd_jacobian(lambda v: inn(v, rev=True)[0], z))[1]
    close(log_det, autodiff)
    if name in VOLUME_PRESERVING:
        close(from_jacobian, dim * H0)
    else:
        assert abs(float(from_jacobian) - dim * H0) > 1e-3  # the test would notice a missing log-det


# ------------------------------------------------------------------------------------------- property tests


PROPERTY_SETTINGS = settings(max_examples=25, deadline=None)


def well_conditioned_jacobians(generator: torch.Generator, n: int, big_d: int, d: int) -> Tensor:
    """``J = U diag(s) V^T`` per sample with singular values in [0.5, 2]: non-orthogonal columns, cond(G) <= 16."""
    u, _ = torch.linalg.qr(torch.randn(n, big_d, d, generator=generator, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, d, d, generator=generator, dtype=F64))
    s = torch.rand(n, d, generator=generator, dtype=F64) * 1.5 + 0.5
    return u * s[:, None, :] @ v.mT


dims = st.tuples(st.integers(1, 6), st.integers(2, 5), st.integers(0, 4))  # (N, d, D - d)


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**32 - 1), shape=dims)
def test_output_rotation_changes_nothing(seed, shape):
    n, d, extra = shape
    generator = torch.Generator().manual_seed(seed)
    jacobian = well_conditioned_jacobians(generator, n, d + extra, d)
    reference = torch.randn(n, d + extra, 2, generator=generator, dtype=F64)
    rotation, _ = torch.linalg.qr(torch.randn(d + extra, d + extra, generator=generator, dtype=F64))
    before, after = all_metrics(jacobian), all_metrics(rotation @ jacobian)
    for key, value in before.items():
        close(after[key], value)
    close(
        manifold_cross_mutual_information(rotation @ jacobian, rotation @ reference),
        manifold_cross_mutual_information(jacobian, reference),
        atol=1e-8,
    )


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**32 - 1), shape=dims, log_scale=st.floats(-5, 5))
def test_column_scaling_shifts_entropy_by_log_scale(seed, shape, log_scale):
    n, d, extra = shape
    generator = torch.Generator().manual_seed(seed)
    jacobian = well_conditioned_jacobians(generator, n, d + extra, d)
    column = int(torch.randint(0, d, (1,), generator=generator))
    scale = torch.ones(d, dtype=F64)
    scale[column] = math.exp(log_scale)
    before, after = all_metrics(jacobian), all_metrics(jacobian * scale)
    shift = torch.zeros(d, dtype=F64)
    shift[column] = log_scale
    close(after["entropy_per_dim"], before["entropy_per_dim"] + shift)
    close(after["entropy"], before["entropy"] + log_scale)
    close(after["total_correlation"], before["total_correlation"])
    close(after["pairwise_mutual_information"], before["pairwise_mutual_information"])
    # the same through sigma
    via_sigma = all_metrics(jacobian, sigma=scale)
    for key, value in after.items():
        close(via_sigma[key], value)


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**32 - 1), shape=dims)
def test_latent_permutation_permutes_every_output(seed, shape):
    n, d, extra = shape
    generator = torch.Generator().manual_seed(seed)
    jacobian = well_conditioned_jacobians(generator, n, d + extra, d)
    reference = torch.randn(n, d + extra, 3, generator=generator, dtype=F64)
    perm = torch.randperm(d, generator=generator)
    perm_reference = torch.randperm(3, generator=generator)
    before, after = all_metrics(jacobian), all_metrics(jacobian[..., perm])
    close(after["entropy_per_dim"], before["entropy_per_dim"][perm])
    close(after["entropy"], before["entropy"])
    close(after["total_correlation"], before["total_correlation"])
    close(after["pairwise_mutual_information"], before["pairwise_mutual_information"][perm][:, perm])
    cross = manifold_cross_mutual_information(jacobian, reference)
    permuted = manifold_cross_mutual_information(jacobian[..., perm], reference[..., perm_reference])
    close(permuted, cross[perm][:, perm_reference], atol=1e-8)


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 6), d=st.integers(1, 6), big_d=st.integers(1, 8), spread=st.floats(0, 4))
def test_total_correlation_nonnegative_and_mutual_information_symmetric_nonnegative(seed, n, d, big_d, spread):
    """Any Jacobian, rank-deficient (D < d) and badly scaled columns included."""
    generator = torch.Generator().manual_seed(seed)
    log_scales = (torch.rand(d, generator=generator, dtype=F64) * 2 - 1) * spread
    jacobian = torch.randn(n, big_d, d, generator=generator, dtype=F64) * torch.exp(log_scales)
    got = all_metrics(jacobian)
    for value in got.values():
        assert torch.isfinite(value).all()
    assert float(got["total_correlation"]) >= -1e-12
    mpmi = got["pairwise_mutual_information"]
    torch.testing.assert_close(mpmi, mpmi.T, atol=1e-12, rtol=1e-12)
    assert (mpmi >= 0).all()
    assert torch.equal(mpmi.diagonal(), torch.zeros(d, dtype=F64))
    assert (manifold_cross_mutual_information(jacobian, jacobian[..., :1]) >= 0).all()


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 4), d=st.integers(3, 6), rank=st.integers(1, 2), big_d=st.integers(2, 8))
def test_latent_permutation_invariance_of_rank_deficient_jacobians(seed, n, d, rank, big_d):
    """D < d or collinear columns: G is singular and the floored log det must not depend on the latent order."""
    generator = torch.Generator().manual_seed(seed)
    rank = min(rank, big_d)
    jacobian = torch.randn(n, big_d, rank, generator=generator, dtype=F64) @ torch.randn(n, rank, d, generator=generator, dtype=F64)
    perm = torch.randperm(d, generator=generator)
    before, after = all_metrics(jacobian), all_metrics(jacobian[..., perm])
    close(after["entropy_per_dim"], before["entropy_per_dim"][perm])
    close(after["entropy"], before["entropy"], atol=1e-8)
    close(after["total_correlation"], before["total_correlation"], atol=1e-8)
    close(after["pairwise_mutual_information"], before["pairwise_mutual_information"][perm][:, perm], atol=1e-8)
    assert float(before["total_correlation"]) >= 0


# ------------------------------------------------------------------------------------------------------ errors


GOOD = torch.ones(2, 3, 2, dtype=F64)

JACOBIAN_FUNCTIONS = {
    "entropy": lambda j, **kw: manifold_entropy(j, **kw),
    "total_correlation": lambda j, **kw: manifold_total_correlation(j, **kw),
    "pairwise": lambda j, **kw: manifold_pairwise_mutual_information(j, **kw),
    "cross": lambda j, **kw: manifold_cross_mutual_information(j, GOOD, **kw),
    "cross_reference": lambda j, **kw: manifold_cross_mutual_information(GOOD, j, **kw),
    "gram": lambda j, **kw: jacobian_gram(j, **kw),
}


def argument_name(function: str) -> str:
    return "reference_jacobian" if function == "cross_reference" else "jacobian"


@pytest.mark.parametrize("function", JACOBIAN_FUNCTIONS)
@pytest.mark.parametrize("shape", [(3,), (2, 3)])
def test_wrong_rank(function, shape):
    name = argument_name(function)
    with pytest.raises(ValueError, match=rf"Expected `{name}` of shape \(N, \*output_shape, d\), but got {re_shape(shape)}"):
        JACOBIAN_FUNCTIONS[function](torch.ones(shape, dtype=F64))


def re_shape(shape: tuple[int, ...]) -> str:
    return rf"\({', '.join(map(str, shape))}{',' if len(shape) == 1 else ''}\)"


@pytest.mark.parametrize("function", JACOBIAN_FUNCTIONS)
@pytest.mark.parametrize("shape", [(0, 3, 2), (2, 0, 2), (2, 3, 0)])
def test_empty(function, shape):
    name = argument_name(function)
    with pytest.raises(
        ValueError, match=rf"Expected `{name}` with at least one sample, output and latent dim, but got shape {re_shape(shape)}"
    ):
        JACOBIAN_FUNCTIONS[function](torch.ones(shape, dtype=F64))


@pytest.mark.parametrize("function", JACOBIAN_FUNCTIONS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_dtype(function, dtype):
    name = argument_name(function)
    with pytest.raises(TypeError, match=rf"Expected `{name}` to be a floating point tensor, but got dtype {dtype}"):
        JACOBIAN_FUNCTIONS[function](torch.ones(2, 3, 2, dtype=dtype))


@pytest.mark.parametrize("function", JACOBIAN_FUNCTIONS)
def test_not_a_tensor(function):
    name = argument_name(function)
    with pytest.raises(TypeError, match=rf"Expected `{name}` to be a torch.Tensor, but got list"):
        JACOBIAN_FUNCTIONS[function]([[[1.0]]])


@pytest.mark.parametrize("function", JACOBIAN_FUNCTIONS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite(function, bad):
    name = argument_name(function)
    jacobian = torch.ones(5, 3, 2, dtype=F64)
    jacobian[1, 0, 1] = bad
    jacobian[3, 2, 0] = bad
    jacobian[3, 1, 0] = bad
    function_of = JACOBIAN_FUNCTIONS[function]
    if function.startswith("cross"):  # the other argument must match in N
        other = torch.ones(5, 3, 2, dtype=F64)

        def function_of(j):
            return manifold_cross_mutual_information(*((j, other) if function == "cross" else (other, j)))

    with pytest.raises(ValueError, match=rf"Expected `{name}` to be finite, but 2 of 5 samples hold NaN or inf \(first at sample 1\)"):
        function_of(jacobian)


@pytest.mark.parametrize(
    "reference_shape",
    [(3, 3, 2), (2, 4, 2), (2, 3, 1, 2)],
    ids=["different_N", "different_D", "different_output_shape"],
)
def test_reference_mismatch(reference_shape):
    with pytest.raises(
        ValueError,
        match=rf"Expected `reference_jacobian` with the same samples and output shape as `jacobian`, i.e. \(2, 3, d_ref\), "
        rf"but got {re_shape(reference_shape)}",
    ):
        manifold_cross_mutual_information(torch.ones(2, 3, 2, dtype=F64), torch.ones(reference_shape, dtype=F64))


def test_image_reference_mismatch_in_output_shape_with_equal_size():
    with pytest.raises(ValueError, match=r"i.e. \(2, 3, 4, d_ref\), but got \(2, 4, 3, 1\)"):
        manifold_cross_mutual_information(torch.ones(2, 3, 4, 2, dtype=F64), torch.ones(2, 4, 3, 1, dtype=F64))


METRIC_FUNCTIONS = {
    "entropy": manifold_entropy,
    "total_correlation": manifold_total_correlation,
    "pairwise": manifold_pairwise_mutual_information,
    "cross": lambda j, **kw: manifold_cross_mutual_information(j, j, **kw),
}


@pytest.mark.parametrize("function", METRIC_FUNCTIONS)
@pytest.mark.parametrize(
    ("labels", "num_classes", "error", "message"),
    [
        (torch.tensor([0, 3]), 3, ValueError, r"Expected `labels` in \[0, 2\] \(num_classes=3\), but got values from 0 to 3"),
        (torch.tensor([-1, 1]), 3, ValueError, r"Expected `labels` in \[0, 2\] \(num_classes=3\), but got values from -1 to 1"),
        (torch.tensor([0, 1]), None, ValueError, r"Expected `num_classes` to be set when `labels` are given, but got num_classes=None"),
        (None, 3, ValueError, r"Expected `labels` of shape \(2,\) with num_classes=3, but got labels=None"),
        (torch.tensor([0, 1, 1]), 3, ValueError, r"Expected `labels` of shape \(2,\) \(one per sample\), but got \(3,\)"),
        (torch.tensor([0.0, 1.0]), 3, TypeError, r"Expected `labels` to be an integer tensor, but got torch.float32"),
        (torch.tensor([0, 1]), 0, ValueError, r"Expected `num_classes` to be a positive int, but got 0"),
        (torch.tensor([0, 1]), 2.0, ValueError, r"Expected `num_classes` to be a positive int, but got 2.0"),
    ],
)
def test_bad_labels(function, labels, num_classes, error, message):
    with pytest.raises(error, match=message):
        METRIC_FUNCTIONS[function](GOOD, labels=labels, num_classes=num_classes)


@pytest.mark.parametrize("function", METRIC_FUNCTIONS)
@pytest.mark.parametrize("eps", [0, -1e-12, 0.0, math.nan, math.inf, True, "1e-12", None])
def test_bad_eps(function, eps):
    with pytest.raises(ValueError, match=rf"Expected `eps` to be a positive finite float, but got {re_escape(repr(eps))}"):
        METRIC_FUNCTIONS[function](GOOD, eps=eps)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.parametrize("function", ["entropy", "total_correlation", "pairwise"])
def test_both_or_neither_jacobian_and_gram(function):
    gram = torch.eye(2, dtype=F64).expand(2, 2, 2)
    with pytest.raises(ValueError, match=r"Expected exactly one of `jacobian` and `gram`, but got both"):
        METRIC_FUNCTIONS[function](GOOD, gram=gram)
    with pytest.raises(ValueError, match=r"Expected exactly one of `jacobian` and `gram`, but got neither"):
        METRIC_FUNCTIONS[function]()


@pytest.mark.parametrize("function", ["entropy", "total_correlation", "pairwise"])
@pytest.mark.parametrize(
    ("gram", "error", "message"),
    [
        (torch.ones(2, 2, 3, dtype=F64), ValueError, r"Expected `gram` of shape \(N, d, d\), but got \(2, 2, 3\)"),
        (torch.ones(2, 2, dtype=F64), ValueError, r"Expected `gram` of shape \(N, d, d\), but got \(2, 2\)"),
        (
            torch.ones(0, 2, 2, dtype=F64),
            ValueError,
            r"Expected `gram` with at least one sample and one latent dim, but got shape \(0, 2, 2\)",
        ),
        (torch.ones(2, 2, 2, dtype=torch.long), TypeError, r"Expected `gram` to be a floating point tensor, but got dtype torch.int64"),
        (torch.full((3, 2, 2), math.nan, dtype=F64), ValueError, r"Expected `gram` to be finite, but 3 of 3 samples hold NaN or inf"),
    ],
)
def test_bad_gram(function, gram, error, message):
    with pytest.raises(error, match=message):
        METRIC_FUNCTIONS[function](gram=gram)


@pytest.mark.parametrize("function", METRIC_FUNCTIONS)
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"std": 0.0}, r"Expected `std` to be positive and finite, but got"),
        ({"std": -1.0}, r"Expected `std` to be positive and finite, but got"),
        ({"std": math.inf}, r"Expected `std` to be positive and finite, but got"),
        ({"std": torch.ones(4)}, r"Expected `std` to be a scalar or of shape \(3,\) \(the output shape\) or \(3,\), but got \(4,\)"),
        ({"std": torch.tensor([1.0, 0.0, 1.0])}, r"Expected `std` to be positive and finite, but got"),
        ({"sigma": torch.ones(3)}, r"Expected `sigma` with 2 entries, but got shape \(3,\)"),
        ({"sigma": torch.tensor([1.0, -1.0])}, r"Expected `sigma` to be positive and finite, but got"),
        ({"sigma": torch.tensor([1.0, math.nan])}, r"Expected `sigma` to be positive and finite, but got"),
    ],
)
def test_bad_scales(function, options, message):
    with pytest.raises(ValueError, match=message):
        METRIC_FUNCTIONS[function](GOOD, **options)


def test_bad_reference_sigma():
    with pytest.raises(ValueError, match=r"Expected `reference_sigma` with 1 entries, but got shape \(2,\)"):
        manifold_cross_mutual_information(GOOD, GOOD[..., :1], reference_sigma=torch.ones(2))


def test_entropy_spectrum_wrong_shape():
    with pytest.raises(ValueError, match=r"Expected `entropy_per_dim` of shape \(d,\), but got \(2, 2\)"):
        entropy_spectrum(torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"Expected `entropy_per_dim` of shape \(d,\), but got \(\)"):
        entropy_spectrum([1.0, 2.0])


def test_cross_statistics_counts_and_rows(nonlinear):
    labels = nonlinear["labels"]
    statistics = cross_statistics(nonlinear["jacobian"], nonlinear["reference_jacobian"], labels=labels, num_classes=4)
    assert torch.equal(statistics.count, torch.bincount(labels, minlength=4).to(F64))
    assert statistics.pairwise.shape == (4, LATENT, 3)
