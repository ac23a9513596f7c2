"""Summable per-batch statistics of decoder Gram matrices, and the metric values finished from them.

Every manifold entropic metric is an average over samples of a few per-sample quantities of the Gram matrix
``G = J^T J``. :func:`gram_statistics` turns one batch into float64 *sums* of those quantities (plus a count), one
row per class; sums of batches, or of processes, finish into exactly the same values as one big batch.

Numerics, per sample (:func:`batch_statistics` documents them in full):

- Columns are measured against the sample's own scale: column ``i`` is *inactive* when
  :math:`G_{ii} \\le \\epsilon \\max_j G_{jj}`; its :math:`\\log G_{ii}` is floored there and it is left out of the
  dependence terms (as if it were orthogonal to the others). Scaling :math:`J` by any positive constant therefore
  shifts every entropy by the same amount and leaves the total correlation and the mutual information unchanged.
- :math:`\\log\\det G = \\sum_i \\log G_{ii} + \\log\\det C` with :math:`C` the correlation matrix of the active
  columns. Forming :math:`G` squares the condition number :math:`\\kappa` (of the unit-column Jacobian), so
  :math:`\\log\\det C` comes from the Cholesky factor of :math:`G` only where its estimated error is below 1e-8 nats;
  otherwise from :math:`J` itself: a QR factorisation (error about :math:`u\\kappa`, :math:`u` = 2.2e-16), refined
  with a twice-precision residual where that could exceed 1e-10 (then about :math:`(u\\kappa)^2`: 1e-8 nats at
  :math:`\\kappa = 10^{12}`; up to 256 latents), or, where the columns are numerically dependent, the singular values
  of the unit columns, each floored at the rank tolerance (the same in every latent order).
- :math:`1 - \\rho_{ij}^2` of nearly collinear columns comes from :math:`J` as
  :math:`\\|u_i - u_j\\|^2 \\|u_i + u_j\\|^2 / 4` (unit columns), free of the cancellation in :math:`1 - \\rho^2`.
- Samples whose squared entries would overflow or underflow float64 are rescaled by a power of two first.

Given Gram matrices instead of Jacobians, only the Gram route exists: where it is inaccurate the eigenvalues of
:math:`C` are used, resolved to about :math:`d\\,u` (condition numbers of :math:`J` up to about 1e7 stay accurate).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple, overload

import torch
from torch import Tensor

from lightning_mem._checks import check_jacobian, check_positive_float, check_scale
from lightning_mem.functional.gram import (
    GramBatch,
    cache_block_size,
    data_scale,
    exact_gram,
    gram_batch,
    gram_residual,
    normalized_columns,
    scaled_columns,
    unit_columns,
)

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
"""Relative floor on the squared column norms: column ``i`` of a sample is *inactive* when
:math:`G_{ii} \\le \\epsilon \\max_j G_{jj}` (a column norm at most 1e-6 times the sample's largest)."""

DEFAULT_ACTIVE_THRESHOLD = 1e-2
"""The absolute rule's conventional level: a latent is *active* when :math:`\\exp(H_i - h_0)`, the geometric-mean norm
of its decoder column, exceeds this. No longer the default, which reads the shape of the spectrum
(:func:`~lightning_mem.functional.active_latents`); pass ``threshold=DEFAULT_ACTIVE_THRESHOLD`` for the old count."""

_U = torch.finfo(torch.float64).eps
"""float64 machine epsilon, 2.2e-16."""

_TINY = torch.finfo(torch.float64).tiny
"""Smallest normal float64: floors never go below it (a user ``eps`` of 1e-300 stays finite)."""

_WELL_CONDITIONED_PIVOT = 1e-6
"""The Cholesky factor of :math:`G` gives :math:`\\log\\det G` for a sample only if every pivot :math:`L_{ii}^2 / G_{ii}` of
an active column (the squared sine of the angle between column ``i`` and the span of the columns before it) exceeds
this, and the estimated rounding error (:data:`_GRAM_ROUTE_ERROR`) is small. Other samples (counted in
``num_fallback``) take :math:`\\log\\det C` from :math:`J`."""

_GRAM_ROUTE_ERROR = 1e-8
"""Largest estimated error, in nats, of :math:`\\log\\det G` from its Cholesky factor: about
:math:`u\\sqrt{D}\\,\\|C^{-1}\\|`, with :math:`\\|C^{-1}\\|` estimated from below by two fixed probe vectors
:math:`x` (:math:`d\\,x^\\top C^{-1} x / x^\\top x`, one triangular solve each): pivots alone can miss an ill-conditioned
:math:`C` by orders of magnitude."""

_REFINE_ABOVE = 1e-10
"""A QR log-determinant whose error estimate :math:`u\\sqrt{D} / \\min_i (R_{ii}/\\|J_i\\|)` exceeds this is refined with
a twice-precision residual (cond(J) above about 1e6)."""

_REFINE_MAX_LATENTS = 256
"""The refinement costs about 36 float64 Gram products of the sample; beyond this many latents (large flows) the QR
value is kept (an error of about :math:`u\\kappa`: 1e-6 nats at :math:`\\kappa = 10^{10}`)."""

_SUSPICIOUS_PIVOT = 1e3
"""A QR pivot :math:`R_{ii}/\\|J_i\\|` within this factor of the rank tolerance sends the sample to the singular values,
which decide whether its columns are numerically dependent (QR pivots of dependent columns are rounding, a few
:math:`u\\sqrt{D}`, which may land on either side of the tolerance)."""

_NEAR_COLLINEAR = 1e-4
"""Pairs with :math:`1 - \\rho_{ij}^2` below this (columns within 0.6 degrees of each other) take it from :math:`J`:
computed from :math:`G` it carries an absolute rounding error of a few :math:`u`."""

_DECORRELATION_FLOOR = _U
"""Floor on :math:`1 - \\rho_{ij}^2` (and on the eigenvalues of :math:`C` where only :math:`G` is known): collinear columns
give a large but finite pairwise mutual information of :math:`-\\tfrac12 \\log u = 18.0` nats. Above it, the value is
exact whether it comes from :math:`G` or, for nearly collinear columns, from :math:`J`."""


def _rank_tolerance(big_d: int, d: int) -> float:
    """Singular values of a unit-column ``D x d`` Jacobian at or below this count as zero (numpy's ``matrix_rank``
    tolerance :math:`\\max(D, d)\\,u`) and are floored there."""
    return max(big_d, d) * _U


class GramStatistics(NamedTuple):
    """Float64 sums over samples, one row per class (a single row without classes)."""

    count: Tensor  # type: ignore[assignment]  # (K,) number of samples; shadows tuple.count, the metric state's name
    log_diag: Tensor  # (K, d) sum of log max(G_ii, eps * max_j G_jj)
    log_det: Tensor  # (K,) sum of log det G (inactive columns at their floor, orthogonal to the rest)
    pairwise: Tensor  # (K, d, d) sum of -1/2 log(1 - rho_ij^2) over active pairs, zero diagonal
    num_inactive: Tensor  # (K, d) samples whose G_ii <= eps * max_j G_jj
    num_fallback: Tensor  # (K,) samples whose log det was not taken from the Cholesky factor of G (ill-conditioned)


class CrossStatistics(NamedTuple):
    """Float64 sums over samples of the cross terms between a model and a reference decoder."""

    count: Tensor  # type: ignore[assignment]  # (K,); shadows tuple.count, the metric state's name
    pairwise: Tensor  # (K, d, d_ref) sum of -1/2 log(1 - rho_ij^2), rho between model column i and reference column j


def _class_rows(labels: Tensor | None, num_classes: int | None, n: int, device: torch.device) -> tuple[Tensor, int]:
    """Row index of every sample and the number of rows (1 without classes)."""
    if num_classes is None:
        if labels is not None:
            if isinstance(labels, Tensor) and labels.is_floating_point() and labels.ndim >= 2:
                raise TypeError(
                    f"Expected `labels` to be integer class labels (N,), but got a floating point tensor of shape "
                    f"{tuple(labels.shape)}: a reference Jacobian? In a MetricCollection that also holds "
                    "ManifoldCrossMutualInformation, pass the Jacobians by keyword: "
                    "`update(jacobian=J, reference_jacobian=J_ref)` (each metric takes the arguments it names)."
                )
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


def _column_floor(squared_norms: Tensor, eps: float) -> Tensor:
    """``(N, 1)``: :math:`\\epsilon \\max_j G_{jj}` per sample (``eps`` itself for an all-zero sample, never below the
    smallest normal float64)."""
    largest = squared_norms.amax(-1, keepdim=True)
    return torch.where(largest > 0, largest * eps, eps).clamp_min(_TINY)


def _inverse_norms(squared_norms: Tensor, active: Tensor) -> Tensor:
    """:math:`1/\\sqrt{G_{ii}}` for active columns, 0 for inactive ones (which drops them from every :math:`\\rho`)."""
    safe = torch.where(active, squared_norms, 1.0)
    return torch.where(active, safe.rsqrt(), 0.0)


def pairwise_terms(cross: Tensor, floored_a: Tensor, floored_b: Tensor) -> Tensor:
    """Per-sample :math:`-\\tfrac12 \\log(1 - \\rho_{ij}^2)` for ``cross[n, i, j] = <a_i, b_j>`` and squared norms already
    floored (``(N, d)``, ``(N, d_ref)``); :math:`1 - \\rho^2` is floored at :data:`_DECORRELATION_FLOOR`."""
    rho2 = cross.square() / (floored_a[:, :, None] * floored_b[:, None, :])
    return -0.5 * torch.log((1.0 - rho2).clamp_min(_DECORRELATION_FLOOR))


def _decorrelation_from_columns(units_a: Tensor, units_b: Tensor, floor: float) -> Tensor:
    """:math:`1 - \\rho^2 = \\|a - b\\|^2 \\|a + b\\|^2 / 4` of unit columns ``(P, D)``, floored: no cancellation."""
    value = (units_a - units_b).square().sum(-1) * (units_a + units_b).square().sum(-1) / 4.0
    return value.clamp_min(floor)


def _correct_near_collinear(
    sums: Tensor,
    near: Tensor,
    used: Tensor,
    units: Callable[[Tensor], tuple[Tensor, Tensor]],
    rows: Tensor,
) -> Tensor:
    """Replace, in the per-class ``sums``, the terms of the near-collinear entries ``near`` ``(P, 3)`` (sample, i, j) by
    their value from the unit columns.

    ``used`` ``(P,)`` is :math:`1 - \\rho^2` exactly as it went into ``sums`` (so the correction cancels it to the last
    bit, and its gradient too); ``units(samples)`` gives the unit columns ``(a, b)`` of those samples. Every entry is
    corrected with its own ``used`` (``(i, j)`` and ``(j, i)`` of a symmetric matrix may differ in the last bit, which
    matters at these values); the value from the columns is symmetric.
    """
    samples, inverse = near[:, 0].unique(return_inverse=True)
    units_a, units_b = units(samples)
    exact = _decorrelation_from_columns(units_a[inverse, :, near[:, 1]], units_b[inverse, :, near[:, 2]], _DECORRELATION_FLOOR)
    delta = -0.5 * (exact.log() - used.clamp_min(_DECORRELATION_FLOOR).log())
    return sums.index_put((rows[near[:, 0]], near[:, 1], near[:, 2]), delta, accumulate=True)


def _pairwise_sums(gram: Tensor, inverse_norms: Tensor, rows: Tensor, num_rows: int, batch: GramBatch | None) -> Tensor:
    """Sums over samples (one row per class) of :math:`-\\tfrac12\\log(1-\\rho_{ij}^2)` with
    :math:`\\rho_{ij} = G_{ij} r_i r_j`, zero diagonal; near-collinear pairs from :math:`J` when ``batch`` holds it.

    Without autograd the per-sample ``(N, d, d)`` terms are built in place, a cache-sized block of samples at a time
    in one reused buffer, and the factor :math:`-\\tfrac12` is applied to the ``(K, d, d)`` sums.
    """
    n, d, _ = gram.shape
    recompute = batch is not None and batch.jacobian is not None and d > 1
    squared = inverse_norms.square()

    def units(samples: Tensor) -> tuple[Tensor, Tensor]:
        assert batch is not None  # called only with `recompute`
        columns = unit_columns(batch, samples)
        return columns, columns

    if torch.is_grad_enabled() and (gram.requires_grad or inverse_norms.requires_grad):
        decorrelation = 1.0 - gram.square() * (squared[:, :, None] * squared[:, None, :])
        decorrelation = torch.diagonal_scatter(decorrelation, torch.ones_like(squared), dim1=-2, dim2=-1)
        sums = _sum_rows(-0.5 * decorrelation.clamp_min(_DECORRELATION_FLOOR).log(), rows, num_rows)
        if recompute:
            near = (decorrelation.detach() < _NEAR_COLLINEAR).nonzero()
            used = decorrelation[near[:, 0], near[:, 1], near[:, 2]]
            sums = _correct_near_collinear(sums, near, used, units, rows)
        return sums
    sums = gram.new_zeros((num_rows, d, d))
    near_blocks, used_blocks = [], []
    step = cache_block_size(n, 8 * d * d, gram.device)
    buffer = torch.empty((step, d, d), dtype=gram.dtype, device=gram.device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        block = torch.mul(gram[start:stop], gram[start:stop], out=buffer[: stop - start])
        block.mul_(squared[start:stop, :, None]).mul_(squared[start:stop, None, :])
        block.neg_().add_(1.0)
        block.diagonal(dim1=-2, dim2=-1).fill_(1.0)
        if recompute and float(block.amin()) < _NEAR_COLLINEAR:
            near = (block < _NEAR_COLLINEAR).nonzero()
            used_blocks.append(block[near[:, 0], near[:, 1], near[:, 2]])
            near[:, 0] += start
            near_blocks.append(near)
        block.clamp_min_(_DECORRELATION_FLOOR).log_()
        if num_rows == 1:
            sums[0] += block.sum(0)
        else:
            sums.index_add_(0, rows[start:stop], block)
    sums.mul_(-0.5)
    if near_blocks:
        sums = _correct_near_collinear(sums, torch.cat(near_blocks), torch.cat(used_blocks), units, rows)
    return sums


def _refined_log_det(block: Tensor, factor: Tensor, valid: Tensor, gram: tuple[Tensor, Tensor]) -> Tensor:
    """:math:`\\log\\det(X^\\top X)` ``(k,)`` to about :math:`(u\\kappa)^2`, from a float64 QR factor ``R`` of ``X``.

    One step of iterative refinement: :math:`X^\\top X = R^\\top R + E` with the residual :math:`E` from twice-precision
    Gram matrices (:func:`~lightning_mem.functional.gram.exact_gram`), and
    :math:`\\log\\det(X^\\top X) = \\log\\det R^\\top R + \\log\\det(I + R^{-\\top} E R^{-1})`, the last term small
    (:math:`\\approx u\\kappa`) and so accurate in float64. Columns past ``valid`` (zero) are replaced by unit ones.
    Gives NaN for a sample whose correction is not small (left to the float64 value). ``gram``: :func:`exact_gram` of ``X``.
    """
    d = block.shape[-1]
    pad = torch.diag_embed((~valid).to(block.dtype))
    residual = gram_residual(block, factor, gram)
    factor = factor + pad  # zero columns at the end: R = blockdiag(R_AA, 0) -> blockdiag(R_AA, I), E unchanged
    lower = factor.mT
    half = torch.linalg.solve_triangular(lower, residual, upper=False)
    correction = torch.linalg.solve_triangular(lower, half.mT, upper=False)
    correction = 0.5 * (correction + correction.mT)
    cholesky, info = torch.linalg.cholesky_ex(torch.eye(d, dtype=block.dtype, device=block.device) + correction)
    log_det = 2.0 * torch.where(valid, factor.diagonal(dim1=-2, dim2=-1).abs(), 1.0).log().sum(-1)
    log_det = log_det + 2.0 * cholesky.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return torch.where(info == 0, log_det, torch.nan)


def _log_det_from_jacobian(batch: GramBatch, index: Tensor, active: Tensor) -> Tensor:
    """:math:`\\log\\det C` ``(k,)`` of the active columns of samples ``index``, from their Jacobians.

    The active columns go first (a zero column in between would take a coordinate of the QR factorisation from the
    columns after it). The QR factor :math:`R` gives :math:`\\log\\det C = \\sum_i \\log(R_{ii}^2 / G_{ii})`, backward
    stable (an error of about :math:`u\\kappa`), refined to about :math:`(u\\kappa)^2` (:func:`_refined_log_det`) where
    :math:`u\\kappa` could exceed :data:`_REFINE_ABOVE`. Samples with a pivot :math:`R_{ii}/\\|J_i\\|` near the rank
    tolerance get the singular values of their unit columns: if the smallest is at or below the tolerance the columns
    are numerically dependent, the pivots would depend on the latent order and on rounding, and the singular values,
    each floored at the tolerance, give :math:`\\log\\det C` instead (the same in every latent order).
    """
    block = scaled_columns(batch, index)
    k, big_d, d = block.shape
    order = torch.argsort((~active).to(torch.int8), dim=-1, stable=True)
    kept = active.gather(1, order)
    block = block.gather(2, order[:, None, :].expand(k, big_d, d)) * kept[:, None, :]
    squared = block.square().sum(1)
    num_active = active.sum(-1)
    tolerance = _rank_tolerance(big_d, d)
    rank = min(big_d, d)  # a D x d block with D < d has D pivots; more than D active columns are dependent
    grad = torch.is_grad_enabled() and block.requires_grad
    log_det = block.new_zeros(k)
    with torch.no_grad():
        factor = torch.linalg.qr(block.detach(), mode="r").R  # (k, min(D, d), d)
        kept_pivots = kept[:, :rank]
        ratio = factor.diagonal(dim1=-2, dim2=-1).abs() / torch.where(kept_pivots, squared[:, :rank].detach(), 1.0).sqrt()
        ratio = torch.where(kept_pivots, ratio, 1.0)
        suspicious = (ratio <= _SUSPICIOUS_PIVOT * tolerance).any(-1) | (num_active > rank)
    singular = suspicious.clone()
    candidates = suspicious.nonzero().squeeze(1)
    if candidates.numel():
        units = block[candidates] * torch.where(kept[candidates], squared[candidates], 1.0).rsqrt()[:, None, :]
        values = torch.linalg.svdvals(units)  # (m, min(D, d)) descending; the zero columns add zeros
        rank_bound = torch.clamp(num_active[candidates], max=min(big_d, d))
        smallest = values.gather(1, (rank_bound - 1).clamp_min(0)[:, None]).squeeze(1)
        dependent = (num_active[candidates] > rank_bound) | (smallest <= tolerance)
        singular = singular.index_put((candidates,), dependent)
        keep = torch.arange(values.shape[-1], device=values.device) < rank_bound[:, None]
        floored = torch.where(keep, 2.0 * values.clamp_min(tolerance).log(), 0.0).sum(-1)
        missing = (num_active[candidates] - rank_bound).to(values.dtype)  # d_active > D: exact zeros, at the floor
        log_det = log_det.index_put((candidates,), floored + missing * 2.0 * math.log(tolerance))
    regular = (~singular).nonzero().squeeze(1)
    if regular.numel():
        valid = kept[regular, :rank]
        if grad:
            pivots = torch.linalg.qr(block[regular]).R.diagonal(dim1=-2, dim2=-1).square()
        else:
            pivots = factor[regular].diagonal(dim1=-2, dim2=-1).square()
        values = torch.where(valid, pivots / torch.where(valid, squared[regular, :rank], 1.0), 1.0).log().sum(-1)
        refine = (_U * math.sqrt(big_d) / ratio[regular].amin(-1) > _REFINE_ABOVE).nonzero().squeeze(1)
        if refine.numel() and not grad and big_d >= d and d <= _REFINE_MAX_LATENTS:
            rows = regular[refine]
            exact = exact_gram(block[rows])  # once: for the residual and the squared column norms
            refined = _refined_log_det(block[rows], factor[rows], valid[refine], exact)
            exact_squared = exact[0].diagonal(dim1=-2, dim2=-1)
            refined = refined - torch.where(valid[refine], exact_squared, 1.0).log().sum(-1)
            values = values.index_put((refine,), torch.where(torch.isnan(refined), values[refine], refined))
        log_det = log_det.index_put((regular,), values)
    return log_det


def _probes(d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Two fixed unit probe vectors ``(d, 2)``: all ones, and the Thue-Morse signs (no periodic pattern to miss)."""
    thue_morse = torch.tensor([bin(i).count("1") % 2 for i in range(d)], dtype=dtype)
    probes = torch.stack([torch.ones(d, dtype=dtype), 1.0 - 2.0 * thue_morse], dim=1) / math.sqrt(d)
    return probes.to(device)


def _gram_route_inaccurate(factor: Tensor, inverse_norms: Tensor, active: Tensor, batch: GramBatch) -> Tensor:
    """``(N,)``: where the estimated error of :math:`\\log\\det C` from the Cholesky factor ``factor`` of the (masked) Gram
    matrix exceeds :data:`_GRAM_ROUTE_ERROR` (see there). ``NaN`` factors (failed factorisations) count as inaccurate."""
    d = factor.shape[-1]
    big_d = batch.jacobian.shape[1] if batch.jacobian is not None else d
    column_norms = torch.where(active, inverse_norms.detach(), 1.0).reciprocal()  # sqrt(G_ii); 1 for the identity rows
    probes = _probes(d, factor.dtype, factor.device) * column_norms[:, :, None]  # L_C^{-1} x = L^{-1} D^{1/2} x
    solved = torch.linalg.solve_triangular(factor, probes, upper=False)
    inverse_estimate = d * solved.square().sum(1).amax(-1)
    return ~(_U * math.sqrt(big_d) * inverse_estimate <= _GRAM_ROUTE_ERROR)


def _log_det_from_gram(gram: Tensor, inverse_norms: Tensor, active: Tensor) -> Tensor:
    """:math:`\\log\\det C` ``(k,)`` from the eigenvalues of the correlation matrices of Gram input (no Jacobian).

    Raises:
        ValueError: if a matrix is not positive semi-definite beyond rounding (not a Gram matrix).
    """
    d = gram.shape[-1]
    correlation = gram * (inverse_norms[:, :, None] * inverse_norms[:, None, :])
    correlation = torch.diagonal_scatter(correlation, torch.ones_like(inverse_norms), dim1=-2, dim2=-1)  # inactive: identity
    eigenvalues = torch.linalg.eigvalsh(correlation)
    largest = eigenvalues[:, -1:]
    if bool((eigenvalues[:, :1] < -1e-6 * d * largest).any()):
        sample = int((eigenvalues[:, 0] < -1e-6 * d * largest[:, 0]).nonzero()[0])
        raise ValueError(
            "Expected `gram` to be positive semi-definite (a Gram matrix J^T J), but one sample's correlation matrix has "
            f"the eigenvalue {float(eigenvalues[sample, 0]):.3g} (largest {float(largest[sample, 0]):.3g})."
        )
    floor = (largest * (d * _DECORRELATION_FLOOR)).clamp_min(_DECORRELATION_FLOOR)
    return torch.maximum(eigenvalues, floor).log().sum(-1)


def _gram_statistics(batch: GramBatch, *, eps: float, labels: Tensor | None, num_classes: int | None) -> GramStatistics:
    """:func:`gram_statistics` of a checked :class:`~lightning_mem.functional.gram.GramBatch`."""
    gram = batch.gram
    n, d, _ = gram.shape
    rows, num_rows = _class_rows(labels, num_classes, n, gram.device)
    grad = torch.is_grad_enabled() and gram.requires_grad

    diag = gram.diagonal(dim1=-2, dim2=-1)
    floor = _column_floor(diag, eps)
    active = diag > floor
    log_diag = torch.maximum(diag, floor).log()
    log_scale = batch.log_scale()
    if log_scale is not None:
        log_diag = log_diag + log_scale[:, None]
    inverse_norms = _inverse_norms(diag, active)

    # log det C of the active columns from the Cholesky factor of G: inactive rows and columns replaced by the identity
    all_active = bool(active.all())
    masked = gram
    if not all_active:
        keep = active.to(gram.dtype)
        masked = gram * (keep[:, :, None] * keep[:, None, :]) + torch.diag_embed(1.0 - keep)
    factor, info = torch.linalg.cholesky_ex(masked)
    pivots = factor.diagonal(dim1=-2, dim2=-1).square() * torch.where(active, inverse_norms.square(), 1.0)
    fallback = (info > 0) | (pivots <= _WELL_CONDITIONED_PIVOT).any(-1)
    fallback = fallback | _gram_route_inaccurate(factor.detach(), inverse_norms, active, batch)
    any_fallback = bool(fallback.any())
    if any_fallback and grad:
        # The derivative of a failed factor is NaN and would poison the gradient: factorise again with those samples
        # replaced by the identity (their value comes from the fallback below).
        eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
        factor = torch.linalg.cholesky_ex(torch.where(fallback[:, None, None], eye, masked))[0]
        pivots = factor.diagonal(dim1=-2, dim2=-1).square() * torch.where(active, inverse_norms.square(), 1.0)
    log_det_correlation = torch.where(fallback[:, None], 1.0, pivots).log().sum(-1)
    if any_fallback:
        index = fallback.nonzero().squeeze(1)
        if batch.jacobian is not None:
            values = _log_det_from_jacobian(batch, index, active[index])
        else:
            values = _log_det_from_gram(gram[index], inverse_norms[index], active[index])
        log_det_correlation = log_det_correlation.index_put((index,), values)
    # Hadamard's inequality det C <= 1, kept through rounding: MTC >= 0 for every sample
    log_det = log_diag.sum(-1) + log_det_correlation.clamp_max(0.0)

    pairwise = _pairwise_sums(gram, inverse_norms, rows, num_rows, batch)

    ones = torch.ones(n, dtype=torch.float64, device=gram.device)
    return GramStatistics(
        count=_sum_rows(ones, rows, num_rows),
        log_diag=_sum_rows(log_diag, rows, num_rows),
        log_det=_sum_rows(log_det, rows, num_rows),
        pairwise=pairwise,
        num_inactive=_sum_rows((~active).to(torch.float64), rows, num_rows),
        num_fallback=_sum_rows(fallback.to(torch.float64), rows, num_rows),
    )


def gram_statistics(
    gram: Tensor,
    *,
    eps: float = DEFAULT_EPS,
    labels: Tensor | None = None,
    num_classes: int | None = None,
) -> GramStatistics:
    r"""Summable statistics of a batch of Gram matrices (the Gram route only; see :func:`batch_statistics`).

    Args:
        gram: ``(N, d, d)`` Gram matrices (converted to float64): symmetric, non-negative diagonal,
            :math:`|G_{ij}| \le \sqrt{G_{ii}G_{jj}}`, all up to rounding.
        eps: relative floor: column ``i`` is inactive when :math:`G_{ii} \le \epsilon \max_j G_{jj}`.
        labels: optional ``(N,)`` class labels in ``[0, num_classes)``; each class gets its own row of sums.
        num_classes: number of classes ``K`` (required with ``labels``).

    Returns:
        :class:`GramStatistics` with ``K`` rows (``K = 1`` without classes).

    Raises:
        ValueError: for a batch that is not one of Gram matrices (asymmetric, a negative diagonal, :math:`|\rho| > 1`,
            an eigenvalue below zero), beyond rounding.
    """
    check_positive_float(eps, "eps")
    return _gram_statistics(gram_batch(gram=gram), eps=eps, labels=labels, num_classes=num_classes)


@overload
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
    pairwise_only: Literal[False] = False,
) -> GramStatistics: ...


@overload
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
    pairwise_only: Literal[True],
) -> CrossStatistics: ...


@overload
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
) -> GramStatistics | CrossStatistics: ...


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
    r"""Summable statistics of a batch given as Jacobians ``(N, *output_shape, d)`` or as Gram matrices ``(N, d, d)``.

    Per sample, with :math:`f = \epsilon \max_j G_{jj}` (:math:`\epsilon` itself for an all-zero Jacobian) and the
    active columns :math:`A = \{i : G_{ii} > f\}`:

    - :math:`\log \max(G_{ii}, f)`, and whether column ``i`` is inactive;
    - :math:`\log\det G = \sum_i \log\max(G_{ii}, f) + \log\det C_{AA}`, :math:`C` the correlation matrix
      :math:`G_{ij}/\sqrt{G_{ii}G_{jj}}` of the active columns (an inactive column counts as orthogonal at the floor).
      :math:`\log\det C_{AA}` is the sum of the log Cholesky pivots of :math:`G` when every pivot
      :math:`L_{ii}^2/G_{ii}` exceeds 1e-6; otherwise (``num_fallback``) it is taken from the Jacobian: the
      log squared diagonal of the QR factor of its unit columns, or, where those columns are numerically dependent
      (a diagonal entry at the rank tolerance :math:`\max(D, d)\,u`), the sum of the log squared singular values,
      each floored at that tolerance (independent of the latent order). From Gram input it is the sum of the log
      eigenvalues of :math:`C`, floored at :math:`d\,u\,\lambda_{\max}`. Capped at 0 (Hadamard), so the total
      correlation of every sample is :math:`\ge 0`;
    - :math:`-\tfrac12\log(1-\rho_{ij}^2)` for active pairs (0 when either column is inactive), :math:`1 - \rho^2`
      from the unit columns of :math:`J` below 1e-4 (floored at the squared rank tolerance), from :math:`G` otherwise
      (floored at :math:`u`). For ``d = 2`` the pairwise term equals the sample's total correlation.

    Accuracy: for a float64 Jacobian, :math:`\log\det G` is within about 1e-8 nats of the exact value for the
    Jacobian given up to :math:`\kappa = 10^{12}` (:math:`\kappa` the condition number of the unit-column Jacobian;
    with more than 256 latents, or a Jacobian that requires grad (a training penalty), the unrefined QR value,
    about :math:`u\,\kappa`: 5e-6 nats at :math:`\kappa = 10^{12}`). A float32 Jacobian is used exactly as
    given, but relative to its float64 original it is off by up to about :math:`u_{32} \kappa`,
    :math:`u_{32} = 6\cdot10^{-8}` (measured 2e-5 nats at :math:`\kappa = 10^4`; from :math:`\kappa \approx 10^7` on its
    smallest singular direction is rounding). Entries from 1e-300 to 1e300 give finite, correct values. Gram input has
    the Gram route only: accurate while :math:`\kappa^2 u` is small (about 1e-6 nats at :math:`\kappa = 10^5`).

    Arguments as in :func:`~lightning_mem.functional.gram.gram_batch` and :func:`gram_statistics`; ``pairwise_only``
    leaves out the log-determinants (no Cholesky factorisation), for the pairwise mutual information alone.
    """
    check_positive_float(eps, "eps")
    batch = gram_batch(jacobian, gram, std=std, sigma=sigma, latent_dim=latent_dim)
    if pairwise_only:
        return _pairwise_statistics(batch, eps=eps, labels=labels, num_classes=num_classes)
    return _gram_statistics(batch, eps=eps, labels=labels, num_classes=num_classes)


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
    return _pairwise_statistics(gram_batch(gram=gram), eps=eps, labels=labels, num_classes=num_classes)


def _pairwise_statistics(batch: GramBatch, *, eps: float, labels: Tensor | None, num_classes: int | None) -> CrossStatistics:
    """:func:`pairwise_statistics` of a checked :class:`~lightning_mem.functional.gram.GramBatch`."""
    gram = batch.gram
    n = gram.shape[0]
    rows, num_rows = _class_rows(labels, num_classes, n, gram.device)
    diag = gram.diagonal(dim1=-2, dim2=-1)
    inverse_norms = _inverse_norms(diag, diag > _column_floor(diag, eps))
    ones = torch.ones(n, dtype=torch.float64, device=gram.device)
    return CrossStatistics(count=_sum_rows(ones, rows, num_rows), pairwise=_pairwise_sums(gram, inverse_norms, rows, num_rows, batch))


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
    Each decoder's columns are measured against its own largest column (``eps`` as in :func:`batch_statistics`): a
    pair with an inactive column contributes 0. :math:`1 - \rho^2` below 1e-4 is taken from the unit columns as
    :math:`\|a - b\|^2\|a + b\|^2/4`. Sigma and a scalar ``std`` cancel in :math:`\rho`.
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
    d_ref = flat_b.shape[-1]
    rows, num_rows = _class_rows(labels, num_classes, n, jacobian.device)
    a = flat_a.to(torch.float64)
    b = flat_b.to(torch.float64)
    scale = data_scale(std, tuple(jacobian.shape[1:-1]), a.device)
    if scale is not None and scale.ndim:  # a scalar data scale cancels in rho
        a, b = a * scale, b * scale
    units_a, squared_a = normalized_columns(a)
    units_b, squared_b = normalized_columns(b)
    # sigma cancels in rho but decides, with the other columns, which columns are inactive
    if sigma is not None:
        squared_a = squared_a * check_scale(sigma, "sigma", d).to(a.device).reshape(1, d) ** 2
    if reference_sigma is not None:
        squared_b = squared_b * check_scale(reference_sigma, "reference_sigma", d_ref).to(b.device).reshape(1, d_ref) ** 2
    units_a = units_a * (squared_a > _column_floor(squared_a, eps))[:, None, :]
    units_b = units_b * (squared_b > _column_floor(squared_b, eps))[:, None, :]
    decorrelation = 1.0 - (units_a.mT @ units_b).square()
    sums = _sum_rows(-0.5 * decorrelation.clamp_min(_DECORRELATION_FLOOR).log(), rows, num_rows)
    near = (decorrelation.detach() < _NEAR_COLLINEAR).nonzero()
    if near.shape[0]:
        used = decorrelation[near[:, 0], near[:, 1], near[:, 2]]
        sums = _correct_near_collinear(sums, near, used, lambda samples: (units_a[samples], units_b[samples]), rows)
    ones = torch.ones(n, dtype=torch.float64, device=a.device)
    return CrossStatistics(count=_sum_rows(ones, rows, num_rows), pairwise=sums)


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
