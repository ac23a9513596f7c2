"""Regression tests for the reproductions of issue 12 (ill-conditioned Jacobians, extreme scales, invalid Gram input,
Metric state integrity, named errors) and issue 14 item 4 (dict metrics in a MetricCollection and in a LightningModule).

Every truth here is computed without the code under test: exact rational arithmetic (``fractions.Fraction``) on the
float64 entries of a Jacobian, closed forms from the factors a Jacobian was built from, a normalizing flow's own
log-determinant, or a second metric fed the same data alone.
"""

from __future__ import annotations

import math
from fractions import Fraction

import lightning as L
import pytest
import torch
from conftest import H0, freia_flow
from torch import Tensor, nn
from torchmetrics import MetricCollection

from lightning_mem import (
    ManifoldCrossMutualInformation,
    ManifoldEntropicMetrics,
    ManifoldEntropy,
    ManifoldTotalCorrelation,
    as_decoder,
    decoder_jacobian,
)
from lightning_mem.functional import (
    manifold_cross_mutual_information,
    manifold_entropy,
    manifold_pairwise_mutual_information,
    manifold_total_correlation,
    num_active_latents,
)

F64 = torch.float64


# ------------------------------------------------------------------------------------------------------- truths


def exact_log_det(jacobian: Tensor) -> tuple[float, list[float]]:
    """``log det(J^T J)`` and ``log |J_i|^2`` of one float64 ``(D, d)`` Jacobian, in exact rational arithmetic on its
    float64 entries (Gaussian elimination over ``Fraction``), rounded once at the end."""
    rows = [[Fraction(value) for value in row] for row in jacobian.tolist()]
    d = len(rows[0])
    gram = [[sum(row[i] * row[j] for row in rows) for j in range(d)] for i in range(d)]
    log_diag = [math.log(gram[i][i]) for i in range(d)]
    matrix, determinant = [row[:] for row in gram], Fraction(1)
    for i in range(d):
        pivot = matrix[i][i]
        determinant *= pivot
        for r in range(i + 1, d):
            factor = matrix[r][i] / pivot
            for c in range(i, d):
                matrix[r][c] -= factor * matrix[i][c]
    return math.log(determinant), log_diag


def issue_jacobian(s1: float, s2: float, seed: int = 0) -> Tensor:
    """Issue 12's S1 reproduction: ``J = U diag(s1, s2) R``, ``U`` a random 4x2 orthonormal matrix, ``R`` a 30 degree
    rotation, as one float64 sample ``(1, 4, 2)``."""
    u, _ = torch.linalg.qr(torch.randn(4, 2, generator=torch.Generator().manual_seed(seed), dtype=F64))
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    rotation = torch.tensor([[c, -s], [s, c]], dtype=F64)
    return (u @ torch.diag(torch.tensor([s1, s2], dtype=F64)) @ rotation)[None]


def relative_error(value: Tensor | float, truth: float) -> float:
    return abs(float(value) - truth) / abs(truth)


ILL_CONDITIONED = [(1e4, 1e-4), (1e7, 1e-5), (1e9, 1e-3)]
"""Issue 12's singular value pairs: condition numbers 1e8, 1e12 and 1e12."""


# --------------------------------------------------------------------------------- 1. accurate log-determinants


@pytest.mark.parametrize(("s1", "s2"), ILL_CONDITIONED)
@pytest.mark.parametrize("eps", [None, 1e-300])
def test_ill_conditioned_jacobian_entropy_and_total_correlation_are_exact(s1, s2, eps):
    """Was H -1.767 (exact 2.838) and MTC 22.19 (17.58) at (1e4, 1e-4); ~330 nats off with eps=1e-300.

    The truth is the exact log-determinant of the float64 Jacobian as stored (its entries carry the rounding of the
    product U S R, which shifts log det by up to 3e-5 at condition number 1e12: no float64 input knows better).
    """
    jacobian = issue_jacobian(s1, s2)
    log_det, log_diag = exact_log_det(jacobian[0])
    options = {} if eps is None else {"eps": eps}
    _, entropy = manifold_entropy(jacobian, **options)
    assert relative_error(entropy, 2 * H0 + 0.5 * log_det) < 1e-6
    assert relative_error(manifold_total_correlation(jacobian, **options), 0.5 * (sum(log_diag) - log_det)) < 1e-6


@pytest.mark.parametrize(("s1", "s2"), [(1e4, 1e-4), (1e7, 1e-5), (1e9, 1e-3), (2.0**20, 2.0**-20)])
def test_ill_conditioned_jacobian_matches_the_closed_form_of_its_factors(s1, s2):
    """An exactly representable ``J = U S R`` (U picks rows, so no entry mixes the two singular directions): H and MTC
    from the factors, ``H = 2 h0 + log(s1 s2 |det R|)``, ``|J_i|^2 = (s1 R_1i)^2 + (s2 R_2i)^2``."""
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    jacobian = torch.tensor([[[s1 * c, -s1 * s], [0.0, 0.0], [s2 * s, s2 * c], [0.0, 0.0]]], dtype=F64)
    det_r = c * c + s * s
    entropy_truth = 2 * H0 + math.log(s1) + math.log(s2) + math.log(det_r)
    norms = [math.hypot(s1 * c, s2 * s), math.hypot(s1 * s, s2 * c)]
    total_correlation_truth = sum(math.log(v) for v in norms) - math.log(s1 * s2 * det_r)
    latent_entropy, entropy = manifold_entropy(jacobian)
    assert relative_error(entropy, entropy_truth) < 1e-6
    assert relative_error(manifold_total_correlation(jacobian), total_correlation_truth) < 1e-6
    torch.testing.assert_close(latent_entropy, H0 + torch.tensor(norms, dtype=F64).log(), rtol=1e-12, atol=0)


def hadamard_mixed_jacobian(d: int, n: int, log2_smallest: int) -> tuple[Tensor, float, Tensor]:
    """An exactly stored ill-conditioned ``(1, n, d)`` Jacobian ``J = H S T`` with its exact log-determinant:
    ``S = diag(2^0 ... 2^log2_smallest)``, ``T`` unit upper triangular with a first row of ones (det 1, every column
    about as long as the others), ``H`` the ``n x n`` Sylvester-Hadamard matrix (``H^T H = n I``). Every entry is a
    sum of at most ``n`` signed powers of two within 34 binary orders: exact in float64. So
    ``log det G = d log n + 2 sum log s_i`` and ``log G_ii = log n + log |(S T)_i|^2``."""
    scales = torch.pow(2.0, torch.linspace(0, log2_smallest, d).round()).to(F64)
    triangular = torch.eye(d, dtype=F64)
    triangular[0] = 1.0
    factor = torch.zeros(n, d, dtype=F64)
    factor[:d] = scales[:, None] * triangular
    hadamard = torch.ones(1, 1, dtype=F64)
    while hadamard.shape[0] < n:
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
    log_det = d * math.log(n) + 2 * float(scales.log().sum())
    return (hadamard @ factor)[None], log_det, math.log(n) + factor.square().sum(0).log()


@pytest.mark.parametrize(
    ("d", "n", "requires_grad", "bound"),
    [
        (256, 512, False, 1e-8),  # refined: about (u kappa)^2, "1e-8 nats at kappa = 1e12"
        (257, 512, False, None),  # beyond 256 latents: the unrefined QR value, about u kappa
        (8, 64, True, None),  # under autograd: the unrefined QR value too
        (8, 64, False, 1e-8),
    ],
)
def test_refinement_up_to_256_latents_and_the_documented_error_beyond_it_or_under_autograd(d, n, requires_grad, bound):
    """Condition number about 1e11 (singular values 2^0 ... 2^-33, non-orthogonal columns of similar length)."""
    jacobian, log_det, log_diag = hadamard_mixed_jacobian(d, n, -33)
    condition = float(torch.linalg.cond(jacobian[0]))
    assert condition > 1e10
    _, entropy = manifold_entropy(jacobian.clone().requires_grad_(requires_grad))
    total_correlation = manifold_total_correlation(jacobian.clone().requires_grad_(requires_grad))
    entropy, total_correlation = entropy.detach(), total_correlation.detach()
    error = abs(float(entropy) - (d * H0 + 0.5 * log_det))
    assert error < (torch.finfo(F64).eps * condition if bound is None else bound)
    assert relative_error(entropy, d * H0 + 0.5 * log_det) < 1e-6
    assert abs(float(total_correlation) - 0.5 * (float(log_diag.sum()) - log_det)) == pytest.approx(error, abs=1e-9)


@pytest.mark.parametrize(("big_d", "d", "log_smallest"), [(50, 6, -12), (8, 8, -11), (784, 3, -12), (3, 3, -10)])
def test_ill_conditioned_wider_and_square_jacobians_have_the_exact_log_det(big_d, d, log_smallest):
    """Singular values from 1e3 down to 1e3 * 10^log_smallest, random singular vectors; square ones included."""
    generator = torch.Generator().manual_seed(big_d + d)
    u, _ = torch.linalg.qr(torch.randn(big_d, d, generator=generator, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=F64))
    jacobian = ((u * torch.logspace(3, 3 + log_smallest, d, dtype=F64)) @ v.T)[None]
    log_det, log_diag = exact_log_det(jacobian[0])
    _, entropy = manifold_entropy(jacobian)
    assert abs(float(entropy) - (d * H0 + 0.5 * log_det)) < 1e-6
    assert abs(float(manifold_total_correlation(jacobian)) - 0.5 * (sum(log_diag) - log_det)) < 1e-6


def test_flow_entropy_equals_its_own_log_det_on_ill_conditioned_samples():
    """A FrEIA GLOW flow d = D = 4 whose Jacobians reach condition number 3e11 (most samples ill-conditioned): H from
    the Gram statistics equals d h0 + E[log |det J|] from the flow itself (was 0.34 nats off)."""
    inn = freia_flow(4, "GLOWCouplingBlock", 6, seed=0, permute_seeds=range(6))
    with torch.no_grad():
        for module in inn.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(4.0)
    inn.eval()
    z = torch.randn(300, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        log_abs_det = inn(z, rev=True)[1]
    jacobian = decoder_jacobian(as_decoder(inn), z)
    assert float(torch.linalg.cond(jacobian).max()) > 1e10  # the case the Gram route cannot do
    metric = ManifoldEntropy(4)
    metric.update(jacobian)
    entropy = metric.compute()["entropy"]
    diagnostics = metric.diagnostics()
    assert int(diagnostics["num_inactive_samples"].sum()) == 0
    assert int(diagnostics["num_fallback"]) > 100
    truth = 4 * H0 + float(log_abs_det.mean())
    assert abs(float(entropy) - truth) < 1e-8
    per_sample = torch.stack([manifold_entropy(jacobian[n : n + 1])[1] for n in range(0, 300, 15)])
    torch.testing.assert_close(per_sample, 4 * H0 + log_abs_det[::15], rtol=0, atol=1e-7)


@pytest.mark.parametrize("condition", [1e2, 1e4])
def test_float32_jacobian_accuracy_is_as_documented(condition):
    """The docs: a float32 Jacobian is off by about 6e-8 * condition number nats against its float64 original."""
    generator = torch.Generator().manual_seed(5)
    u, _ = torch.linalg.qr(torch.randn(20, 4, generator=generator, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(4, 4, generator=generator, dtype=F64))
    jacobian = ((u * torch.logspace(0, -math.log10(condition), 4, dtype=F64)) @ v.T).expand(8, 20, 4)
    _, exact = manifold_entropy(jacobian)
    _, single = manifold_entropy(jacobian.float())
    assert abs(float(single) - float(exact)) < 10 * 6e-8 * condition


def test_square_rank_deficient_and_zero_column_samples_are_finite_and_ordered_alike():
    """Numerically dependent columns: the floored log-determinant is the same in every latent order, MTC >= 0."""
    generator = torch.Generator().manual_seed(3)
    jacobian = torch.randn(5, 6, 2, generator=generator, dtype=F64) @ torch.randn(5, 2, 4, generator=generator, dtype=F64)
    jacobian[0, :, 3] = 0.0
    values = manifold_entropy(jacobian)[1], manifold_total_correlation(jacobian)
    for perm in ([3, 1, 0, 2], [1, 2, 3, 0], [2, 3, 1, 0]):
        permuted = jacobian[..., perm]
        assert abs(float(manifold_entropy(permuted)[1]) - float(values[0])) < 1e-9
        assert abs(float(manifold_total_correlation(permuted)) - float(values[1])) < 1e-9
    assert torch.isfinite(values[0]) and float(values[1]) >= 0


# -------------------------------------------------------------------------------------------- 2. scale invariance


SCALES = [1e-150, 1e-7, 1e7, 1e78, 1e150]


@pytest.mark.parametrize("scale", SCALES)
def test_scaling_the_jacobian_shifts_entropy_and_leaves_dependence_unchanged(scale):
    """Was: J * 1e-7 gives MTC 0.0 (0.487) and MPMI max 0.0009 (0.202); J * 1e78 gives an all-NaN MPMI."""
    jacobian = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    scaled = jacobian * scale
    latent, entropy = manifold_entropy(jacobian)
    scaled_latent, scaled_entropy = manifold_entropy(scaled)
    torch.testing.assert_close(scaled_latent, latent + math.log(scale), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(scaled_entropy, entropy + 3 * math.log(scale), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(manifold_total_correlation(scaled), manifold_total_correlation(jacobian), rtol=0, atol=1e-9)
    mpmi = manifold_pairwise_mutual_information(scaled)
    assert torch.isfinite(mpmi).all()
    torch.testing.assert_close(mpmi, manifold_pairwise_mutual_information(jacobian), rtol=0, atol=1e-9)
    cross = manifold_cross_mutual_information(scaled, scaled[..., :2] + scale * 0.5)
    torch.testing.assert_close(cross, manifold_cross_mutual_information(jacobian, jacobian[..., :2] + 0.5), rtol=0, atol=1e-9)


def test_huge_batch_does_not_poison_a_metric():
    """Was: once a batch with entries 1e78 reached a Metric, every later MPMI was NaN."""
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randn(4, 6, 3, generator=generator, dtype=F64) for _ in range(3)]
    metric, reference = ManifoldEntropicMetrics(3), ManifoldEntropicMetrics(3)
    for k, batch in enumerate(batches):
        metric.update(batch * (1e78 if k == 1 else 1.0))
        reference.update(batch)
    got, expected = metric.compute(), reference.compute()
    for key in ("total_correlation", "pairwise_mutual_information"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-9)
    # a third of the samples moved by log 1e78 per latent: H by 1/3 * 3 log 1e78
    torch.testing.assert_close(got["entropy"], expected["entropy"] + math.log(1e78), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("eps", [1e-12, 1e-8])
@pytest.mark.parametrize("scale", [1e-7, 1.0, 1e7])
def test_a_collapsed_column_is_inactive_at_any_scale(scale, eps):
    """The floor is relative: a zero column is inactive and floored at eps * max_j |J_j|^2 whatever the scale, and drops
    out of MTC and MPMI (not a fallback: it is set aside, not factorised); the other columns keep their closed form."""
    a = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=F64) * scale
    jacobian = a.expand(3, 3, 3)
    latent, entropy = manifold_entropy(jacobian, eps=eps)
    norms2 = a.square().sum(0)
    floor = math.log(eps * float(norms2.max()))
    torch.testing.assert_close(latent[1], torch.tensor(H0 + 0.5 * floor, dtype=F64), rtol=0, atol=1e-12)
    active = a[:, [0, 2]]
    log_det = math.log(float(torch.det(active.T @ active)))
    torch.testing.assert_close(entropy, torch.tensor(3 * H0 + 0.5 * (log_det + floor), dtype=F64))
    cos2 = float((active[:, 0] @ active[:, 1]) ** 2 / (norms2[0] * norms2[2]))
    torch.testing.assert_close(manifold_total_correlation(jacobian, eps=eps), torch.tensor(-0.5 * math.log(1 - cos2), dtype=F64))
    mpmi = manifold_pairwise_mutual_information(jacobian, eps=eps)
    assert float(mpmi[1].abs().max()) == 0.0 and float(mpmi[:, 1].abs().max()) == 0.0
    metric = ManifoldEntropy(3, eps=eps)
    metric.update(jacobian)
    diagnostics = metric.diagnostics()
    assert diagnostics["num_inactive_samples"].tolist() == [0, 3, 0]
    assert int(diagnostics["num_fallback"]) == 0


RANK_DEFICIENT = {"rank2": [2.0, 0.7, 0.0], "rank1": [300.0, 0.0, 0.0], "rank2of4": [1e3, 5.0, 0.0, 0.0]}


@pytest.mark.parametrize("big_d", [2, 6])
@pytest.mark.parametrize("singular_values", list(RANK_DEFICIENT.values()), ids=list(RANK_DEFICIENT))
def test_rank_deficient_jacobian_entropy_is_the_floored_singular_values_in_every_latent_order(big_d, singular_values):
    """Non-zero columns spanning fewer dimensions than there are latents: log det C is the sum of the log squared
    singular values of the unit columns, each floored at max(D, d) u (numpy's rank tolerance), the same in every
    latent order; truth from numpy's SVD."""
    import itertools

    import numpy as np

    d, n = len(singular_values), 10
    generator = torch.Generator().manual_seed(8)
    rank = min(d, big_d)
    u, _ = torch.linalg.qr(torch.randn(n, big_d, rank, generator=generator, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, d, d, generator=generator, dtype=F64))
    jacobian = u * torch.tensor(singular_values[:rank], dtype=F64) @ v[..., :rank].mT
    tolerance = max(big_d, d) * np.finfo(np.float64).eps
    truth = 0.0
    for sample in jacobian.numpy():
        norms = np.linalg.norm(sample, axis=0)
        values = np.linalg.svd(sample / norms, compute_uv=False)
        floored = np.concatenate([np.maximum(values, tolerance), np.full(d - values.size, tolerance)])
        truth += 2 * np.log(norms).sum() + 2 * np.log(floored).sum()
    truth = d * H0 + 0.5 * truth / n
    for perm in itertools.permutations(range(d)):
        _, entropy = manifold_entropy(jacobian[..., list(perm)])
        assert abs(float(entropy) - truth) < 1e-9
        assert float(manifold_total_correlation(jacobian[..., list(perm)])) >= 0
    metric = ManifoldEntropy(d)
    metric.update(jacobian)
    assert int(metric.diagnostics()["num_fallback"]) == n


def test_near_collinear_unit_columns_give_the_exact_entropy_and_equal_total_correlation_and_mutual_information():
    """Unit columns with 1 - cos = 1e-13: H was -10.631 (exact -11.782), MTC 13.469 but MPMI 14.620 (d = 2: equal)."""
    cos = 1.0 - 1e-13
    sin = math.sqrt((1.0 - cos) * (1.0 + cos))
    jacobian = torch.tensor([[[1.0, cos], [0.0, sin], [0.0, 0.0]]], dtype=F64)
    log_det, log_diag = exact_log_det(jacobian[0])
    _, entropy = manifold_entropy(jacobian)
    assert relative_error(entropy, 2 * H0 + 0.5 * log_det) < 1e-9
    assert abs(float(entropy) - (-11.782)) < 1e-3
    total_correlation = manifold_total_correlation(jacobian)
    mpmi = manifold_pairwise_mutual_information(jacobian)[0, 1]
    truth = 0.5 * (sum(log_diag) - log_det)
    assert relative_error(total_correlation, truth) < 1e-9
    assert relative_error(mpmi, truth) < 1e-9
    assert abs(float(total_correlation) - float(mpmi)) < 1e-6
    # the cross MI of the decoder with itself agrees off the diagonal
    cross = manifold_cross_mutual_information(jacobian, jacobian)
    assert relative_error(cross[0, 1], truth) < 1e-9


# ------------------------------------------------------------------------------------- 3. invalid Gram input


@pytest.mark.parametrize(
    ("gram", "message"),
    [
        ([[1.0, 0.9], [0.0, 1.0]], r"Expected `gram` to be symmetric \(G = J\^T J\), but sample 0 has G\[0, 1\] = 0.9 and G\[1, 0\] = 0"),
        ([[-1.0, 0.0], [0.0, 1.0]], r"Expected `gram` to have a non-negative diagonal .*, but sample 0 has G\[0, 0\] = -1"),
        ([[1.0, 2.0], [2.0, 1.0]], r"Expected \|G_ij\| <= sqrt\(G_ii G_jj\) in `gram`.*sample 0 has G\[0, 1\] = 2 with sqrt.* = 1"),
    ],
    ids=["asymmetric", "negative_diagonal", "rho_beyond_one"],
)
@pytest.mark.parametrize("function", [manifold_entropy, manifold_total_correlation, manifold_pairwise_mutual_information])
def test_invalid_gram_input_gets_a_named_error(gram, message, function):
    """Was accepted: an asymmetric Gram gave an asymmetric MPMI, a negative diagonal an inactive latent, |rho| > 1 18.02."""
    with pytest.raises(ValueError, match=message):
        function(gram=torch.tensor([gram], dtype=F64))


@pytest.mark.parametrize("function", [manifold_entropy, manifold_total_correlation])
def test_gram_input_that_is_not_positive_semidefinite_gets_a_named_error(function):
    """Every |rho| < 1, yet no three vectors have these cosines; checked where a log-determinant is taken."""
    gram = torch.tensor([[[1.0, 0.9, 0.9], [0.9, 1.0, -0.9], [0.9, -0.9, 1.0]]], dtype=F64)
    with pytest.raises(ValueError, match=r"Expected `gram` to be positive semi-definite \(a Gram matrix J\^T J\)"):
        function(gram=gram)


def test_float32_gram_of_a_real_jacobian_passes_the_checks():
    """Rounding of a float32 product is not an error: the tolerance is relative, sqrt(float32 epsilon)."""
    jacobian = torch.randn(16, 784, 8, generator=torch.Generator().manual_seed(4))
    gram = jacobian.mT @ jacobian
    torch.testing.assert_close(manifold_entropy(gram=gram)[1], manifold_entropy(jacobian)[1], rtol=1e-5, atol=1e-5)
    metric = ManifoldEntropicMetrics(8)
    metric.update(gram=gram)
    torch.testing.assert_close(metric.compute()["entropy"], manifold_entropy(jacobian.double())[1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- 4. metric state integrity


def _jacobians(d: int = 4, n: int = 40, seed: int = 0) -> Tensor:
    return torch.randn(n, 6, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize(
    ("target", "incoming", "message"),
    [
        (lambda: ManifoldEntropy(1), lambda: ManifoldEntropy(4), r"latent_dim \(1 here, 4 incoming\)"),
        (lambda: ManifoldEntropy(4), lambda: ManifoldEntropy(4, num_classes=3), r"num_classes \(None here, 3 incoming\)"),
        (lambda: ManifoldEntropy(4), lambda: ManifoldEntropy(4, eps=1e-2), r"eps \(1e-12 here, 0.01 incoming\)"),
        (lambda: ManifoldEntropy(4), lambda: ManifoldEntropy(4, std=2.0), r"std \(None here, \[2.0\] incoming\)"),
        (lambda: ManifoldTotalCorrelation(4), lambda: ManifoldTotalCorrelation(4, sigma=torch.ones(4) * 2), r"sigma"),
        (
            lambda: ManifoldCrossMutualInformation(4, 3),
            lambda: ManifoldCrossMutualInformation(4, 2),
            r"reference_dim \(3 here, 2 incoming\)",
        ),
        (lambda: ManifoldEntropy(4), lambda: ManifoldEntropicMetrics(4), r"Expected a ManifoldEntropy to merge"),
    ],
    ids=["latent_dim", "num_classes", "eps", "std", "sigma", "reference_dim", "class"],
)
def test_merge_state_of_another_configuration_raises(target, incoming, message):
    """Was: ManifoldEntropy(4) merged into ManifoldEntropy(1) kept latent_dim=1 and computed 4 entropies; other
    classes or eps were pooled (total 8.609 against the true 8.711)."""
    with pytest.raises(ValueError, match=message):
        target().merge_state(incoming())


def test_merge_state_of_the_same_configuration_adds_and_a_state_dict_is_checked():
    first, second = _jacobians(seed=1), _jacobians(seed=2)
    metric, other, both = ManifoldEntropy(4, eps=1e-6), ManifoldEntropy(4, eps=1e-6), ManifoldEntropy(4, eps=1e-6)
    metric.update(first)
    other.update(second)
    both.update(torch.cat([first, second]))
    metric.merge_state(other)
    torch.testing.assert_close(metric.compute()["latent_entropy"], both.compute()["latent_entropy"])
    states = dict(ManifoldEntropy(3).metric_state)
    with pytest.raises(ValueError, match=r"differs in latent_dim \(4 here, 3 in the incoming state\)"):
        metric.merge_state(states)
    states.pop("configuration")
    with pytest.raises(ValueError, match=r"Expected state `pairwise` of shape \(1, 4, 4\) in the incoming state.*got \(1, 3, 3\)"):
        metric.merge_state(states)


def test_metrics_of_different_configuration_never_share_a_compute_group():
    """Issue 12 S6: after a first batch with no small column, 'loose' and 'strict' had equal states and were grouped;
    'strict' then reported the loose floor (H_1 1.176 and 7 inactive samples, alone 0.897 and 0)."""
    generator = torch.Generator().manual_seed(6)
    first = torch.randn(20, 5, 2, generator=generator, dtype=F64)
    second = torch.randn(20, 5, 2, generator=generator, dtype=F64)
    second[:7, :, 1] *= 1e-2  # G_11 / G_00 ~ 1e-4: inactive under eps=1e-2, active under eps=1e-12
    collection = MetricCollection(
        {"loose": ManifoldEntropy(2, eps=1e-2), "strict": ManifoldEntropy(2, eps=1e-12), "same": ManifoldTotalCorrelation(2)}
    )
    alone = ManifoldEntropy(2, eps=1e-12)
    for batch in (first, second):
        collection.update(batch)
        alone.update(batch)
    groups = sorted(sorted(group) for group in collection.compute_groups.values())
    assert groups == [["loose"], ["same", "strict"]]  # equal settings still share one update
    values = collection.compute()
    torch.testing.assert_close(values["strict_latent_entropy"], alone.compute()["latent_entropy"])
    assert int(collection["strict"].diagnostics()["num_inactive_samples"].sum()) == 0
    assert int(collection["loose"].diagnostics()["num_inactive_samples"].sum()) == 7


def test_metrics_with_another_data_scale_never_share_a_compute_group():
    """``std`` is configuration too: each metric's values are those it gives alone."""
    jacobian = torch.randn(10, 5, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    collection = MetricCollection({"unit": ManifoldEntropy(2), "scaled": ManifoldEntropy(2, std=3.0)})
    collection.update(jacobian)
    assert sorted(sorted(group) for group in collection.compute_groups.values()) == [["scaled"], ["unit"]]
    values = collection.compute()
    torch.testing.assert_close(values["scaled_latent_entropy"], manifold_entropy(jacobian * 3.0)[0])
    torch.testing.assert_close(values["unit_latent_entropy"], manifold_entropy(jacobian)[0])


@pytest.mark.parametrize(
    "convert",
    [
        lambda m: m.to(torch.float16),
        lambda m: m.to(torch.bfloat16),
        lambda m: m.half(),
        lambda m: m.bfloat16(),
        lambda m: m.float(),
        lambda m: m.double(),
        lambda m: m.set_dtype(torch.float16),
        lambda m: m.set_dtype(torch.bfloat16),
        lambda m: m.to("cpu", torch.float16),
    ],
    ids=["to_float16", "to_bfloat16", "half", "bfloat16", "float", "double", "set_dtype_float16", "set_dtype_bfloat16", "to_cpu_float16"],
)
def test_dtype_conversions_keep_the_float64_sums(convert):
    """Was: .to(torch.float16) counted 3001 samples as 3000, bfloat16 as 3008."""
    jacobian = torch.randn(3001, 3, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    metric = ManifoldEntropicMetrics(2)
    metric.update(jacobian)
    expected = metric.compute()
    metric = convert(metric)
    assert all(getattr(metric, name).dtype == F64 for name in metric._defaults)
    assert float(metric.count.sum()) == 3001.0
    metric.update(jacobian[:1])
    assert float(metric.diagnostics()["num_samples"]) == 3002.0
    metric.reset()
    metric.update(jacobian)
    torch.testing.assert_close(metric.compute()["entropy"], expected["entropy"], rtol=0, atol=0)


def test_load_state_dict_of_another_shape_or_configuration_raises_at_load():
    """Was: a d=4 state dict loaded into a d=3 metric, then compute() raised an IndexError about mask shapes."""
    source = ManifoldEntropy(4)
    source.persistent(True)
    source.update(_jacobians())
    state = source.state_dict()
    target = ManifoldEntropy(3)
    with pytest.raises(ValueError, match=r"differs in latent_dim \(3 here, 4 in the state dict\)"):
        target.load_state_dict(state)
    without_configuration = {name: value for name, value in state.items() if name != "configuration"}
    with pytest.raises(ValueError, match=r"Expected state `pairwise` of shape \(1, 3, 3\) in the state dict.*got \(1, 4, 4\)"):
        target.load_state_dict(without_configuration)
    with pytest.raises(ValueError, match=r"differs in eps"):
        ManifoldEntropy(4, eps=1e-3).load_state_dict(state)
    same = ManifoldEntropy(4)
    same.load_state_dict({name: value.float() for name, value in state.items()})  # loaded back as float64
    assert same.count.dtype == F64
    torch.testing.assert_close(same.compute()["entropy"], source.compute()["entropy"], rtol=1e-6, atol=1e-6)
    older = ManifoldEntropy(4)
    older.load_state_dict(without_configuration)  # a state dict from before the configuration state
    torch.testing.assert_close(older.compute()["entropy"], source.compute()["entropy"])


# ------------------------------------------------------------------------------------------- 5. named errors


@pytest.mark.parametrize(
    "call",
    [
        lambda: manifold_entropy(torch.empty(3, 4, 2, device="meta")),
        lambda: manifold_pairwise_mutual_information(gram=torch.empty(3, 2, 2, device="meta")),
        lambda: ManifoldEntropy(2).update(torch.empty(3, 4, 2, device="meta")),
        lambda: manifold_cross_mutual_information(torch.ones(3, 4, 2, dtype=F64), torch.empty(3, 4, 2, device="meta")),
        lambda: decoder_jacobian(nn.Linear(2, 3), torch.empty(3, 2, device="meta")),
    ],
    ids=["functional", "gram", "metric", "reference", "decoder_jacobian"],
)
def test_meta_tensors_get_a_named_error(call):
    """Was: "Tensor.item() cannot be called on meta tensors"."""
    with pytest.raises(ValueError, match=r"to hold values, but got a tensor on the meta device"):
        call()


@pytest.mark.parametrize("threshold", [0, -1.0, math.inf, math.nan])
def test_non_positive_active_threshold_gets_a_named_error(threshold):
    with pytest.raises(ValueError, match=r"Expected `threshold` to be a positive finite float"):
        num_active_latents(torch.zeros(3, dtype=F64), threshold=threshold)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ManifoldEntropy(2).update(gram=[[[1.0, 0.0], [0.0, 1.0]]]), r"Expected `gram` to be a torch.Tensor, but got list"),
        (lambda: ManifoldEntropy(2).update([[[1.0, 0.0], [0.0, 1.0]]]), r"Expected `jacobian` to be a torch.Tensor, but got list"),
        (lambda: manifold_total_correlation([[[1.0, 0.0]]]), r"Expected `jacobian` to be a torch.Tensor, but got list"),
    ],
)
def test_lists_instead_of_tensors_get_a_named_type_error(call, message):
    with pytest.raises(TypeError, match=message):
        call()


def test_cross_metric_in_a_collection_takes_keyword_arguments():
    """Was: MetricCollection([ManifoldEntropy(4), ManifoldCrossMutualInformation(4, 3)]).update(J, R) raised
    "Expected `num_classes` to be set when `labels` are given". Positional: a named TypeError saying what to do;
    by keyword: each metric gets what it names, and equals the metric fed alone."""
    jacobian, reference = _jacobians(), _jacobians(d=3, seed=9)
    collection = MetricCollection([ManifoldEntropy(4), ManifoldCrossMutualInformation(4, 3)])
    with pytest.raises(TypeError, match=r"pass the Jacobians by keyword: `update\(jacobian=J, reference_jacobian=J_ref\)`"):
        collection.update(jacobian, reference)
    collection = MetricCollection([ManifoldEntropy(4), ManifoldCrossMutualInformation(4, 3)])
    collection.update(jacobian=jacobian, reference_jacobian=reference)
    values = collection.compute()
    torch.testing.assert_close(values["entropy"], manifold_entropy(jacobian)[1])
    torch.testing.assert_close(values["cross_mutual_information"], manifold_cross_mutual_information(jacobian, reference))


# --------------------------------------------------------------- 6. dict metrics in a collection and in Lightning


def test_collection_keys_of_dict_metrics_are_unique_and_prefixed_by_the_metric_name():
    jacobian = _jacobians()
    collection = MetricCollection({"entropy": ManifoldEntropy(4), "all": ManifoldEntropicMetrics(4)})
    collection.update(jacobian)
    values = collection.compute()
    entropy, everything = ManifoldEntropy(4), ManifoldEntropicMetrics(4)
    entropy.update(jacobian)
    everything.update(jacobian)
    expected = {**{f"entropy_{k}": v for k, v in entropy.compute().items()}, **{f"all_{k}": v for k, v in everything.compute().items()}}
    assert sorted(values) == sorted(expected)
    assert len(values) == len(entropy.compute()) + len(everything.compute())
    for key, value in expected.items():
        torch.testing.assert_close(values[key], value)


class _Autoencoder(L.LightningModule):
    """The pattern of :class:`ManifoldEntropicMetrics`' docstring, verbatim in its metric parts."""

    def __init__(self, latent_dim: int = 3, data_dim: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Linear(data_dim, latent_dim).double()
        self.decoder = nn.Sequential(nn.Linear(latent_dim, 16), nn.Tanh(), nn.Linear(16, data_dim)).double()
        self.val_mem = ManifoldEntropicMetrics(latent_dim)
        self.val_total_correlation = ManifoldTotalCorrelation(latent_dim)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return (self.decoder(self.encoder(batch[0])) - batch[0]).square().mean()

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        jacobian = decoder_jacobian(self.decoder, self.encoder(batch[0]))
        self.val_mem.update(jacobian)
        self.val_total_correlation.update(jacobian)
        self.log("val/total_correlation", self.val_total_correlation)

    def on_validation_epoch_end(self) -> None:
        values = self.val_mem.compute()
        self.log_dict({f"val/mem/{key}": value.double() for key, value in values.items() if value.ndim == 0})
        self.val_mem.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_validation_step_pattern_logs_dict_and_scalar_metrics(tmp_path):
    data = torch.randn(48, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=16)
    torch.manual_seed(0)
    module = _Autoencoder()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        limit_train_batches=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    trainer.fit(module, loader, loader)
    logged = trainer.callback_metrics
    with torch.no_grad():
        z = module.encoder(data)
    jacobian = torch.autograd.functional.jacobian(lambda v: module.decoder(v).sum(0), z).permute(1, 0, 2)  # (N, D, d)
    latent_entropy, entropy = manifold_entropy(jacobian)
    total_correlation = manifold_total_correlation(jacobian)
    expected = {
        "val/total_correlation": total_correlation,
        "val/mem/total_correlation": total_correlation,
        "val/mem/entropy": entropy,
        "val/mem/entropy_per_dim": entropy / 3,
        "val/mem/num_active": num_active_latents(latent_entropy).double(),
        "val/mem/pairwise_mutual_information_max": manifold_pairwise_mutual_information(jacobian)[~torch.eye(3, dtype=torch.bool)].max(),
    }
    for key, value in expected.items():
        torch.testing.assert_close(logged[key].double(), value.double(), rtol=1e-9, atol=1e-9, msg=key)
    assert not any(key.startswith("val/mem/latent_entropy") or key.startswith("val/mem/spectrum") for key in logged)
