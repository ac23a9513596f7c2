"""Summable per-batch statistics of decoder Gram matrices, and the metric values finished from them.

Every manifold entropic metric is an average over samples of a few per-sample quantities of the Gram matrix
``G = J^T J``. :func:`gram_statistics` turns one batch into float64 *sums* of those quantities (plus a count), one
row per class; sums of batches, or of processes, finish into exactly the same values as one big batch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_mem._checks import check_gram, check_jacobian, check_positive_float, check_scale
from lightning_mem.functional.gram import batch_gram, cache_block_size, data_scale

__all__ = [
    "DEFAULT_ACTIVE_THRESHOLD",
    "DEFAULT_EPS",
    "STANDARD_NORMAL_ENTROPY",
    "CrossStatistics",
    "GramStatistics",
    "batch_statistics",
    "cross_statistics",
    "finish_entropy",
    "finish_mutual_information",
    "finish_total_correlation",
    "gram_statistics",
    "pairwise_statistics",
    "pairwise_terms",
]

STANDARD_NORMAL_ENTROPY = 0.5 * (1.0 + math.log(2.0 * math.pi))
"""Differential entropy of a standard normal latent, :math:`h_0 = (1 + \\log 2\\pi)/2` nats per dimension."""

DEFAULT_EPS = 1e-12
"""Floor on the squared column norm :math:`G_{ii}` (column norm 1e-6): below it a latent counts as inactive."""

DEFAULT_ACTIVE_THRESHOLD = 1e-2
"""A latent is *active* when :math:`\\exp(H_i - h_0)`, the geometric-mean norm of its decoder column, exceeds this."""

_MIN_DECORRELATION = torch.finfo(torch.float64).eps
"""Floor on :math:`1 - \\rho_{ij}^2`: collinear columns give a large but finite pairwise mutual information."""


_SINGULAR_PIVOT = 1e-6
"""A Cholesky pivot :math:`L_{ii}^2 \\le` this times :math:`G_{ii}` (column ``i`` within 1e-3 rad of the span of the
columns before it) marks ``G`` as numerically singular: its log-determinant is then taken from the eigenvalues.
Above :math:`\\sqrt{u}` (float64 rounding), so that rounding amplified by earlier relative pivots larger than this
cannot lift the pivot of a dependent column over it."""


class GramStatistics(NamedTuple):
    """Float64 sums over samples, one row per class (a single row without classes)."""

    count: Tensor  # (K,) number of samples
    log_diag: Tensor  # (K, d) sum of log max(G_ii, eps)
    log_det: Tensor  # (K,) sum of log det G (eigenvalues floored at eps where G is singular)
    pairwise: Tensor  # (K, d, d) sum of -1/2 log(1 - rho_ij^2), zero diagonal
    num_inactive: Tensor  # (K, d) samples whose G_ii <= eps
    num_fallback: Tensor  # (K,) samples whose Cholesky factorisation failed or hit the floor (eigenvalue fallback)


class CrossStatistics(NamedTuple):
    """Float64 sums over samples of the cross terms between a model and a reference decoder."""

    count: Tensor  # (K,)
    pairwise: Tensor  # (K, d, d_ref) sum of -1/2 log(1 - rho_ij^2), rho between model column i and reference column j


def _class_rows(labels: Tensor | None, num_classes: int | None, n: int, device: torch.device) -> tuple[Tensor, int]:
    """Row index of every sample and the number of rows (1 without classes)."""
    if num_classes is None:
        if labels is not None:
            raise ValueError("Expected `num_classes` to be set when `labels` are given, but got num_classes=None.")
        return torch.zeros(n, dtype=torch.long, device=device), 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"Expected `num_classes` to be a positive int, but got {num_classes!r}.")
    if labels is None:
        raise ValueError(f"Expected `labels` of shape ({n},) with num_classes={num_classes}, but got labels=None.")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"Expected `labels` to be an integer tensor, but got {getattr(labels, 'dtype', type(labels).__name__)}.")
    if labels.shape != (n,):
        raise ValueError(f"Expected `labels` of shape ({n},) (one per sample), but got {tuple(labels.shape)}.")
    if ((labels < 0) | (labels >= num_classes)).any():
        raise ValueError(
            f"Expected `labels` in [0, {num_classes - 1}] (num_classes={num_classes}), "
            f"but got values from {int(labels.min())} to {int(labels.max())}."
        )
    return labels.to(device=device, dtype=torch.long), num_classes


def _sum_rows(values: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    if num_rows == 1:
        return values.sum(0, keepdim=True)
    out = values.new_zeros((num_rows, *values.shape[1:]))
    return out.index_add(0, rows, values)


def pairwise_terms(cross: Tensor, floored_a: Tensor, floored_b: Tensor) -> Tensor:
    """Per-sample :math:`-\\tfrac12 \\log(1 - \\rho_{ij}^2)` for ``cross[n, i, j] = <a_i, b_j>``."""
    rho2 = cross.square() / (floored_a[:, :, None] * floored_b[:, None, :])
    return -0.5 * torch.log((1.0 - rho2).clamp_min(_MIN_DECORRELATION))


def _pairwise_sums(gram: Tensor, floored: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """Sums over samples (one row per class) of :func:`pairwise_terms` of ``gram`` with itself, zero diagonal.

    Without autograd the per-sample ``(N, d, d)`` terms are built in place, a cache-sized block of samples at a time
    in one reused buffer, and the factor :math:`-\\tfrac12` and the zero diagonal are applied to the ``(K, d, d)``
    sums (the same numbers, fewer passes over memory).
    """
    n, d, _ = gram.shape
    off_diagonal = 1.0 - torch.eye(d, dtype=gram.dtype, device=gram.device)
    if torch.is_grad_enabled() and (gram.requires_grad or floored.requires_grad):
        return _sum_rows(pairwise_terms(gram, floored, floored) * off_diagonal, rows, num_rows)
    sums = gram.new_zeros((num_rows, d, d))
    step = cache_block_size(n, 8 * d * d, gram.device)
    buffer = torch.empty((step, d, d), dtype=gram.dtype, device=gram.device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        log_decorrelation = torch.mul(gram[start:stop], gram[start:stop], out=buffer[: stop - start])
        log_decorrelation.div_(floored[start:stop, :, None] * floored[start:stop, None, :])
        log_decorrelation.neg_().add_(1.0).clamp_min_(_MIN_DECORRELATION).log_()
        if num_rows == 1:
            sums[0] += log_decorrelation.sum(0)
        else:
            sums.index_add_(0, rows[start:stop], log_decorrelation)
    return sums.mul_(-0.5).mul_(off_diagonal)


def gram_statistics(
    gram: Tensor,
    *,
    eps: float = DEFAULT_EPS,
    labels: Tensor | None = None,
    num_classes: int | None = None,
) -> GramStatistics:
    r"""Summable statistics of a batch of Gram matrices.

    Per sample: :math:`\log \max(G_{ii}, \epsilon)`; :math:`\log\det G` from the Cholesky factor
    :math:`G = LL^\top` as :math:`\sum_i \log L_{ii}^2`, or, where the factorisation fails or a pivot
    :math:`L_{ii}^2` is at or below :math:`\max(\epsilon, 10^{-6} G_{ii})` (a numerically singular ``G``, whose
    pivots would depend on the latent order and on rounding), :math:`\sum_k \log\max(\lambda_k, \epsilon)` over the
    eigenvalues (counted in ``num_fallback``; those within rounding of zero, :math:`\lambda_k \le d\,u\,\lambda_{\max}`,
    count as zero), capped at :math:`\sum_i \log \max(G_{ii}, \epsilon)` so that
    Hadamard's inequality, and with it :math:`\mathrm{MTC} \ge 0`, holds with the floors too; and
    :math:`-\tfrac12\log(1-\rho_{ij}^2)`, :math:`\rho_{ij} = G_{ij}/\sqrt{G_{ii}G_{jj}}`.

    Args:
        gram: ``(N, d, d)`` Gram matrices (converted to float64).
        eps: floor on :math:`G_{ii}` and on the eigenvalues of ``G``; columns at or below it are counted as inactive.
        labels: optional ``(N,)`` class labels in ``[0, num_classes)``; each class gets its own row of sums.
        num_classes: number of classes ``K`` (required with ``labels``).

    Returns:
        :class:`GramStatistics` with ``K`` rows (``K = 1`` without classes).
    """
    check_positive_float(eps, "eps")
    return _gram_statistics(check_gram(gram).to(torch.float64), eps=eps, labels=labels, num_classes=num_classes)


def _gram_statistics(gram: Tensor, *, eps: float, labels: Tensor | None, num_classes: int | None) -> GramStatistics:
    """:func:`gram_statistics` of a float64 Gram batch already checked (shape, finite, ``eps``)."""
    n, d, _ = gram.shape
    rows, num_rows = _class_rows(labels, num_classes, n, gram.device)

    diag = gram.diagonal(dim1=-2, dim2=-1)
    floored = diag.clamp_min(eps)
    log_diag = floored.log()

    factor, info = torch.linalg.cholesky_ex(gram)
    pivots = factor.diagonal(dim1=-2, dim2=-1).square()
    # A pivot at the floor, or a tiny fraction of its diagonal entry, means G is (numerically) singular: its pivots
    # would depend on the latent order and on rounding, so such samples take the eigenvalue clamp, which does not.
    failed = (info > 0) | (pivots <= (diag * _SINGULAR_PIVOT).clamp_min(eps)).any(-1)
    if failed.any() and gram.requires_grad:
        # The derivative of a failed factor is NaN and would poison the gradient: factorise again with those
        # samples replaced by the identity (their value comes from the eigenvalues below).
        safe = torch.where(failed[:, None, None], torch.eye(d, dtype=gram.dtype, device=gram.device), gram)
        pivots = torch.linalg.cholesky_ex(safe)[0].diagonal(dim1=-2, dim2=-1).square()
    log_det = pivots.clamp_min(eps).log().sum(-1)
    if failed.any():
        index = failed.nonzero().squeeze(1)
        eigenvalues = torch.linalg.eigvalsh(gram[index])
        # Eigenvalues within rounding of zero (numpy's matrix_rank tolerance) are zero, floored like exact zeros.
        tolerance = eigenvalues[:, -1:] * (d * torch.finfo(torch.float64).eps)
        eigenvalues = torch.where(eigenvalues <= tolerance, 0.0, eigenvalues)
        log_det = log_det.index_put((index,), eigenvalues.clamp_min(eps).log().sum(-1))
    # Hadamard's inequality log det G <= sum_i log G_ii, kept with the floors: MTC >= 0 for every sample.
    log_det = torch.minimum(log_det, log_diag.sum(-1))

    pairwise = _pairwise_sums(gram, floored, rows, num_rows)

    ones = torch.ones(n, dtype=torch.float64, device=gram.device)
    return GramStatistics(
        count=_sum_rows(ones, rows, num_rows),
        log_diag=_sum_rows(log_diag, rows, num_rows),
        log_det=_sum_rows(log_det, rows, num_rows),
        pairwise=pairwise,
        num_inactive=_sum_rows((diag <= eps).to(torch.float64), rows, num_rows),
        num_fallback=_sum_rows(failed.to(torch.float64), rows, num_rows),
    )


def batch_statistics(
    jacobian: Tensor | None = None,
    gram: Tensor | None = None,
    *,
    std: Tensor | float | None = None,
    sigma: Tensor | None = None,
    eps: float = DEFAULT_EPS,
    labels: Tensor | None = None,
    num_classes: int | None = None,
    latent_dim: int | None = None,
    pairwise_only: bool = False,
) -> GramStatistics | CrossStatistics:
    """:func:`gram_statistics` of a batch given as Jacobians ``(N, *output_shape, d)`` or as Gram matrices ``(N, d, d)``.

    Arguments as in :func:`~lightning_mem.functional.gram.batch_gram` and :func:`gram_statistics`; ``pairwise_only``
    leaves out the log-determinants (no Cholesky factorisation), for the pairwise mutual information alone.
    """
    check_positive_float(eps, "eps")
    gram = batch_gram(jacobian, gram, std=std, sigma=sigma, latent_dim=latent_dim)
    if pairwise_only:
        return _pairwise_statistics(gram, eps=eps, labels=labels, num_classes=num_classes)
    return _gram_statistics(gram, eps=eps, labels=labels, num_classes=num_classes)


def pairwise_statistics(
    gram: Tensor,
    *,
    eps: float = DEFAULT_EPS,
    labels: Tensor | None = None,
    num_classes: int | None = None,
) -> CrossStatistics:
    r"""Only the pairwise sums of :func:`gram_statistics`: :math:`-\tfrac12\log(1-\rho_{ij}^2)`, zero diagonal.

    The cross terms of the decoder with itself, without the log-determinants (no Cholesky factorisation): what the
    pairwise mutual information alone needs. Arguments as in :func:`gram_statistics`.

    Example:
        >>> statistics = pairwise_statistics(torch.tensor([[[1.0, 0.6], [0.6, 1.0]]]))
        >>> finish_mutual_information(statistics)  # -1/2 log(1 - 0.36)
        tensor([[0.0000, 0.2231],
                [0.2231, 0.0000]], dtype=torch.float64)
    """
    check_positive_float(eps, "eps")
    return _pairwise_statistics(check_gram(gram).to(torch.float64), eps=eps, labels=labels, num_classes=num_classes)


def _pairwise_statistics(gram: Tensor, *, eps: float, labels: Tensor | None, num_classes: int | None) -> CrossStatistics:
    """:func:`pairwise_statistics` of a float64 Gram batch already checked (shape, finite, ``eps``)."""
    n = gram.shape[0]
    rows, num_rows = _class_rows(labels, num_classes, n, gram.device)
    floored = gram.diagonal(dim1=-2, dim2=-1).clamp_min(eps)
    ones = torch.ones(n, dtype=torch.float64, device=gram.device)
    return CrossStatistics(count=_sum_rows(ones, rows, num_rows), pairwise=_pairwise_sums(gram, floored, rows, num_rows))


def cross_statistics(
    jacobian: Tensor,
    reference_jacobian: Tensor,
    *,
    std: Tensor | float | None = None,
    sigma: Tensor | None = None,
    reference_sigma: Tensor | None = None,
    eps: float = DEFAULT_EPS,
    labels: Tensor | None = None,
    num_classes: int | None = None,
    latent_dim: int | None = None,
    reference_dim: int | None = None,
) -> CrossStatistics:
    r"""Summable cross terms :math:`-\tfrac12\log(1-\rho_{ij}^2)`, :math:`\rho_{ij} = \langle a_i, b_j\rangle / (\|a_i\|\|b_j\|)`.

    ``a_i`` are the columns of ``jacobian`` and ``b_j`` those of ``reference_jacobian``, both taken at the same
    data point (so both must have the same ``N`` and output shape). Options as in
    :func:`~lightning_mem.functional.gram.jacobian_gram`; ``latent_dim`` and ``reference_dim`` are checked when given.
    """
    flat_a = check_jacobian(jacobian, "jacobian", latent_dim)
    flat_b = check_jacobian(reference_jacobian, "reference_jacobian", reference_dim)
    if flat_a.shape[:2] != flat_b.shape[:2] or jacobian.shape[1:-1] != reference_jacobian.shape[1:-1]:
        raise ValueError(
            f"Expected `reference_jacobian` with the same samples and output shape as `jacobian`, "
            f"i.e. ({', '.join(map(str, jacobian.shape[:-1]))}, d_ref), but got {tuple(reference_jacobian.shape)}."
        )
    check_positive_float(eps, "eps")
    n, _, d = flat_a.shape
    rows, num_rows = _class_rows(labels, num_classes, n, jacobian.device)
    a = flat_a.to(torch.float64)
    b = flat_b.to(torch.float64)
    scale = data_scale(std, tuple(jacobian.shape[1:-1]), a.device)
    if scale is not None:
        scale = scale if scale.ndim else scale.reshape(1, 1, 1)
        a, b = a * scale, b * scale
    if sigma is not None:
        a = a * check_scale(sigma, "sigma", d).to(a.device).reshape(1, 1, d)
    if reference_sigma is not None:
        b = b * check_scale(reference_sigma, "reference_sigma", b.shape[-1]).to(b.device).reshape(1, 1, -1)
    cross = a.mT @ b
    floored_a = a.square().sum(1).clamp_min(eps)
    floored_b = b.square().sum(1).clamp_min(eps)
    ones = torch.ones(n, dtype=torch.float64, device=a.device)
    return CrossStatistics(
        count=_sum_rows(ones, rows, num_rows),
        pairwise=_sum_rows(pairwise_terms(cross, floored_a, floored_b), rows, num_rows),
    )


def _class_mean(total: Tensor, count: Tensor) -> Tensor:
    """Mean over the classes that have samples of the per-class means ``total[k] / count[k]``."""
    seen = count > 0
    if not seen.any():
        raise ValueError("Expected statistics of at least one sample, but the count is zero (no update yet?).")
    shape = (-1,) + (1,) * (total.ndim - 1)
    return (total[seen] / count[seen].reshape(shape)).mean(0)


def finish_entropy(statistics: GramStatistics, *, per_dim: bool = False) -> tuple[Tensor, Tensor]:
    """Per-dim manifold entropies ``(d,)`` and the total manifold entropy ``()`` from summed statistics."""
    d = statistics.log_diag.shape[-1]
    entropy_per_dim = STANDARD_NORMAL_ENTROPY + 0.5 * _class_mean(statistics.log_diag, statistics.count)
    total = d * STANDARD_NORMAL_ENTROPY + 0.5 * _class_mean(statistics.log_det, statistics.count)
    return entropy_per_dim, total / d if per_dim else total


def finish_total_correlation(statistics: GramStatistics, *, per_dim: bool = False) -> Tensor:
    """Manifold total correlation ``()`` from summed statistics."""
    d = statistics.log_diag.shape[-1]
    total_correlation = 0.5 * (_class_mean(statistics.log_diag, statistics.count).sum() - _class_mean(statistics.log_det, statistics.count))
    return total_correlation / d if per_dim else total_correlation


def finish_mutual_information(statistics: GramStatistics | CrossStatistics) -> Tensor:
    """Manifold pairwise ``(d, d)`` or cross-pairwise ``(d, d_ref)`` mutual information matrix from summed statistics."""
    return _class_mean(statistics.pairwise, statistics.count)
