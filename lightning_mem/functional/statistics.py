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

__all__ = [
    "DEFAULT_ACTIVE_THRESHOLD",
    "DEFAULT_EPS",
    "STANDARD_NORMAL_ENTROPY",
    "CrossStatistics",
    "GramStatistics",
    "batch_gram",
    "batch_statistics",
    "check_gram",
    "check_jacobian",
    "cross_statistics",
    "finish_cross_mutual_information",
    "finish_entropy",
    "finish_pairwise_mutual_information",
    "finish_total_correlation",
    "gram_statistics",
    "jacobian_gram",
    "num_active_latents",
    "pairwise_statistics",
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


def check_jacobian(jacobian: Tensor, name: str = "jacobian", latent_dim: int | None = None, *, check_finite: bool = True) -> Tensor:
    """Validate a ``(N, *output_shape, d)`` Jacobian and return it flattened to ``(N, D, d)``.

    ``check_finite=False`` skips the pass over every entry, for callers that check a cheaper quantity derived from
    all of them (:func:`jacobian_gram` checks the diagonal of :math:`J^\\top J`).
    """
    if not isinstance(jacobian, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(jacobian).__name__}.")
    if not jacobian.is_floating_point():
        raise TypeError(f"Expected `{name}` to be a floating point tensor, but got dtype {jacobian.dtype}.")
    expected_d = "d" if latent_dim is None else f"d == {latent_dim}"
    if jacobian.ndim < 3:
        raise ValueError(f"Expected `{name}` of shape (N, *output_shape, {expected_d}), but got {tuple(jacobian.shape)}.")
    if latent_dim is not None and jacobian.shape[-1] != latent_dim:
        raise ValueError(f"Expected `{name}` of shape (N, *output_shape, {expected_d}), but got {tuple(jacobian.shape)}.")
    if jacobian.shape[0] == 0 or jacobian.shape[-1] == 0 or jacobian[0].numel() == 0:
        raise ValueError(f"Expected `{name}` with at least one sample, output and latent dim, but got shape {tuple(jacobian.shape)}.")
    if check_finite:
        _check_finite(jacobian, name)
    return jacobian.reshape(jacobian.shape[0], -1, jacobian.shape[-1])


def check_gram(gram: Tensor, name: str = "gram", latent_dim: int | None = None) -> Tensor:
    """Validate a ``(N, d, d)`` batch of Gram matrices."""
    if not isinstance(gram, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(gram).__name__}.")
    if not gram.is_floating_point():
        raise TypeError(f"Expected `{name}` to be a floating point tensor, but got dtype {gram.dtype}.")
    d = gram.shape[-1] if gram.ndim else 0
    ok = gram.ndim == 3 and gram.shape[1] == d and (latent_dim is None or d == latent_dim)
    if not ok:
        expected = "d, d" if latent_dim is None else f"{latent_dim}, {latent_dim}"
        raise ValueError(f"Expected `{name}` of shape (N, {expected}), but got {tuple(gram.shape)}.")
    if gram.shape[0] == 0 or d == 0:
        raise ValueError(f"Expected `{name}` with at least one sample and one latent dim, but got shape {tuple(gram.shape)}.")
    _check_finite(gram, name)
    return gram


def _check_finite(tensor: Tensor, name: str) -> None:
    # Fast path: a finite sum proves every entry finite (NaN and inf propagate through a sum); only a non-finite sum
    # (a bad entry, or an overflowing sum of finite entries) pays for the per-sample search below.
    if bool(torch.isfinite(tensor.detach().sum())):
        return
    bad = ~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
    if bad.any():
        raise ValueError(
            f"Expected `{name}` to be finite, but {int(bad.sum())} of {tensor.shape[0]} samples hold NaN or inf "
            f"(first at sample {int(bad.nonzero()[0])})."
        )


def _check_eps(eps: float) -> None:
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < math.inf):
        raise ValueError(f"Expected `eps` to be a positive finite float, but got {eps!r}.")


def _check_scale(scale: Tensor | float, name: str, numel: int | None = None) -> Tensor:
    scale = torch.as_tensor(scale, dtype=torch.float64)
    if numel is not None and scale.numel() != numel:
        raise ValueError(f"Expected `{name}` with {numel} entries, but got shape {tuple(scale.shape)}.")
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError(
            f"Expected `{name}` to be positive and finite, but got {scale if scale.numel() < 8 else 'entries outside (0, inf)'}."
        )
    return scale


def jacobian_gram(jacobian: Tensor, *, std: Tensor | float | None = None, sigma: Tensor | None = None) -> Tensor:
    r"""Per-sample Gram matrices :math:`G = J^\top J` in float64, with optional data and latent scaling.

    Args:
        jacobian: ``(N, *output_shape, d)``.
        std: data scale, so that the metrics are in original data units when the decoder outputs standardized
            data ``x' = (x - mean) / std``: a scalar, or per output entry (shape ``output_shape`` or ``(D,)``).
            Column :math:`J_i` becomes :math:`\mathrm{std} \odot J_i`.
        sigma: latent scale, shape ``(d,)``: for a prior :math:`N(\mu, \mathrm{diag}(\sigma^2))`, column ``i`` is
            multiplied by ``sigma[i]`` (metrics w.r.t. the standard-normal noise).

    Returns:
        ``(N, d, d)`` float64: a float32 Jacobian is converted to float64 before it is multiplied (on CPU a few
        samples at a time), so its products are accumulated in float64.

    Example:
        >>> jacobian_gram(torch.tensor([[[1.0, 0.0], [1.0, 2.0]]]), std=2.0)
        tensor([[[ 8.,  8.],
                 [ 8., 16.]]], dtype=torch.float64)
    """
    flat = check_jacobian(jacobian, check_finite=False)  # checked below, on the Gram diagonal
    big_d = flat.shape[1]
    scale = None
    scalar_std = None
    if std is not None:
        std = torch.as_tensor(std)
        if std.numel() == 1:
            scalar_std = _check_scale(std, "std").reshape(())
        else:
            if tuple(std.shape) not in (tuple(jacobian.shape[1:-1]), (big_d,)):
                raise ValueError(
                    f"Expected `std` to be a scalar or of shape {tuple(jacobian.shape[1:-1])} (the output shape) or ({big_d},), "
                    f"but got {tuple(std.shape)}."
                )
            scale = _check_scale(std, "std").to(flat.device).reshape(1, big_d, 1)
    gram = _float64_gram(flat, scale)
    # A NaN or inf entry of column i makes G_ii NaN or inf: one pass over the (N, d) diagonal instead of the Jacobian
    if not bool(torch.isfinite(gram.diagonal(dim1=-2, dim2=-1).detach().sum())):
        _check_finite(jacobian, "jacobian")  # raises, naming the first bad sample
        raise ValueError("Expected the Gram matrices J^T J of `jacobian` to be finite, but they overflow float64.")
    if scalar_std is not None:
        gram = gram * scalar_std.to(gram.device) ** 2
    return _scale_latents(gram, sigma)


_CACHE_BLOCK_BYTES = 2**22
"""On CPU, per-sample float64 work (the Gram product, the pairwise terms) is done about this many bytes at a time,
in a reused buffer that stays in cache."""


def _block_size(n: int, bytes_per_sample: int, device: torch.device) -> int:
    """Samples per block: about :data:`_CACHE_BLOCK_BYTES` on CPU, a multiple of the intra-op threads (a batched
    product shares whole samples among them, so an odd block of 3 on 2 threads took as long as 4), all on a GPU."""
    if device.type != "cpu":
        return n
    threads = max(1, torch.get_num_threads())
    step = max(threads, _CACHE_BLOCK_BYTES // bytes_per_sample // threads * threads)
    return min(n, step)


def _float64_gram(flat: Tensor, scale: Tensor | None) -> Tensor:
    """``(scale * flat)^T (scale * flat)`` in float64 for a ``(N, D, d)`` Jacobian and a float64 ``(1, D, 1)`` scale.

    A lower-precision Jacobian on CPU is converted a few samples at a time into one reused buffer: the same float64
    products as converting it all at once, without writing and re-reading a float64 copy of the whole batch.
    """
    if flat.dtype == torch.float64 or flat.device.type != "cpu" or flat.requires_grad:
        flat = flat.to(torch.float64) if scale is None else flat.to(torch.float64) * scale
        return flat.mT @ flat
    n, big_d, d = flat.shape
    gram = torch.empty((n, d, d), dtype=torch.float64)
    step = _block_size(n, 8 * big_d * d, flat.device)
    buffer = torch.empty((step, big_d, d), dtype=torch.float64)
    for start in range(0, n, step):
        block = buffer[: min(step, n - start)]
        block.copy_(flat[start : start + step])
        if scale is not None:
            block.mul_(scale)
        torch.matmul(block.mT, block, out=gram[start : start + step])
    return gram


def _scale_latents(gram: Tensor, sigma: Tensor | None, name: str = "sigma") -> Tensor:
    if sigma is None:
        return gram
    sigma = _check_scale(sigma, name, gram.shape[-1]).to(gram.device).reshape(-1)
    return gram * (sigma[:, None] * sigma[None, :])


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


def _pairwise_terms(cross: Tensor, floored_a: Tensor, floored_b: Tensor) -> Tensor:
    """Per-sample :math:`-\\tfrac12 \\log(1 - \\rho_{ij}^2)` for ``cross[n, i, j] = <a_i, b_j>``."""
    rho2 = cross.square() / (floored_a[:, :, None] * floored_b[:, None, :])
    return -0.5 * torch.log((1.0 - rho2).clamp_min(_MIN_DECORRELATION))


def _pairwise_sums(gram: Tensor, floored: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """Sums over samples (one row per class) of :func:`_pairwise_terms` of ``gram`` with itself, zero diagonal.

    Without autograd the per-sample ``(N, d, d)`` terms are built in place, a cache-sized block of samples at a time
    in one reused buffer, and the factor :math:`-\\tfrac12` and the zero diagonal are applied to the ``(K, d, d)``
    sums (the same numbers, fewer passes over memory).
    """
    n, d, _ = gram.shape
    off_diagonal = 1.0 - torch.eye(d, dtype=gram.dtype, device=gram.device)
    if torch.is_grad_enabled() and (gram.requires_grad or floored.requires_grad):
        return _sum_rows(_pairwise_terms(gram, floored, floored) * off_diagonal, rows, num_rows)
    sums = gram.new_zeros((num_rows, d, d))
    step = _block_size(n, 8 * d * d, gram.device)
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
    return _gram_statistics(check_gram(gram).to(torch.float64), eps=eps, labels=labels, num_classes=num_classes)


def _gram_statistics(gram: Tensor, *, eps: float, labels: Tensor | None, num_classes: int | None) -> GramStatistics:
    """:func:`gram_statistics` of a float64 Gram batch already checked (shape, finite)."""
    _check_eps(eps)
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


def batch_gram(
    jacobian: Tensor | None = None,
    gram: Tensor | None = None,
    *,
    std: Tensor | float | None = None,
    sigma: Tensor | None = None,
) -> Tensor:
    """The checked float64 Gram matrices ``(N, d, d)`` of a batch given as Jacobians or as Gram matrices.

    Exactly one of ``jacobian`` and ``gram`` must be given. With ``gram``, ``std`` must be a scalar (a per-output data
    scale needs the Jacobian). ``std`` and ``sigma`` as in :func:`jacobian_gram`.
    """
    if (jacobian is None) == (gram is None):
        raise ValueError("Expected exactly one of `jacobian` and `gram`, but got " + ("both." if gram is not None else "neither."))
    if jacobian is not None:
        return jacobian_gram(jacobian, std=std, sigma=sigma)
    gram = check_gram(gram)
    if std is not None:
        std = torch.as_tensor(std)
        if std.numel() != 1:
            raise ValueError(
                f"Expected a scalar `std` with `gram` (a per-output scale needs the Jacobian), but got shape {tuple(std.shape)}."
            )
        gram = gram.to(torch.float64) * _check_scale(std, "std").to(gram.device).reshape(()) ** 2
    return _scale_latents(gram.to(torch.float64), sigma)


def batch_statistics(
    jacobian: Tensor | None = None,
    gram: Tensor | None = None,
    *,
    std: Tensor | float | None = None,
    sigma: Tensor | None = None,
    eps: float = DEFAULT_EPS,
    labels: Tensor | None = None,
    num_classes: int | None = None,
) -> GramStatistics:
    """:func:`gram_statistics` of a batch given as Jacobians ``(N, *output_shape, d)`` or as Gram matrices ``(N, d, d)``.

    Arguments as in :func:`batch_gram` and :func:`gram_statistics`.
    """
    _check_eps(eps)
    gram = batch_gram(jacobian, gram, std=std, sigma=sigma)
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
        >>> finish_cross_mutual_information(statistics)  # -1/2 log(1 - 0.36)
        tensor([[0.0000, 0.2231],
                [0.2231, 0.0000]], dtype=torch.float64)
    """
    return _pairwise_statistics(check_gram(gram).to(torch.float64), eps=eps, labels=labels, num_classes=num_classes)


def _pairwise_statistics(gram: Tensor, *, eps: float, labels: Tensor | None, num_classes: int | None) -> CrossStatistics:
    """:func:`pairwise_statistics` of a float64 Gram batch already checked (shape, finite)."""
    _check_eps(eps)
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
) -> CrossStatistics:
    r"""Summable cross terms :math:`-\tfrac12\log(1-\rho_{ij}^2)`, :math:`\rho_{ij} = \langle a_i, b_j\rangle / (\|a_i\|\|b_j\|)`.

    ``a_i`` are the columns of ``jacobian`` and ``b_j`` those of ``reference_jacobian``, both taken at the same
    data point (so both must have the same ``N`` and output shape). Options as in :func:`jacobian_gram`.
    """
    flat_a = check_jacobian(jacobian, "jacobian")
    flat_b = check_jacobian(reference_jacobian, "reference_jacobian")
    if flat_a.shape[:2] != flat_b.shape[:2] or jacobian.shape[1:-1] != reference_jacobian.shape[1:-1]:
        raise ValueError(
            f"Expected `reference_jacobian` with the same samples and output shape as `jacobian`, "
            f"i.e. ({', '.join(map(str, jacobian.shape[:-1]))}, d_ref), but got {tuple(reference_jacobian.shape)}."
        )
    _check_eps(eps)
    n, big_d, d = flat_a.shape
    rows, num_rows = _class_rows(labels, num_classes, n, jacobian.device)
    a = flat_a.to(torch.float64)
    b = flat_b.to(torch.float64)
    if std is not None:
        std = torch.as_tensor(std)
        if std.numel() != 1 and tuple(std.shape) not in (tuple(jacobian.shape[1:-1]), (big_d,)):
            raise ValueError(
                f"Expected `std` to be a scalar or of shape {tuple(jacobian.shape[1:-1])} (the output shape) or ({big_d},), "
                f"but got {tuple(std.shape)}."
            )
        scale = _check_scale(std, "std").to(a.device).reshape(1, -1, 1)
        a, b = a * scale, b * scale
    if sigma is not None:
        a = a * _check_scale(sigma, "sigma", d).to(a.device).reshape(1, 1, d)
    if reference_sigma is not None:
        b = b * _check_scale(reference_sigma, "reference_sigma", b.shape[-1]).to(b.device).reshape(1, 1, -1)
    cross = a.mT @ b
    floored_a = a.square().sum(1).clamp_min(eps)
    floored_b = b.square().sum(1).clamp_min(eps)
    ones = torch.ones(n, dtype=torch.float64, device=a.device)
    return CrossStatistics(
        count=_sum_rows(ones, rows, num_rows),
        pairwise=_sum_rows(_pairwise_terms(cross, floored_a, floored_b), rows, num_rows),
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


def finish_pairwise_mutual_information(statistics: GramStatistics) -> Tensor:
    """Manifold pairwise mutual information matrix ``(d, d)`` from summed statistics."""
    return _class_mean(statistics.pairwise, statistics.count)


def finish_cross_mutual_information(statistics: CrossStatistics) -> Tensor:
    """Manifold cross-pairwise mutual information matrix ``(d, d_ref)`` from summed statistics."""
    return _class_mean(statistics.pairwise, statistics.count)


def num_active_latents(entropy_per_dim: Tensor, threshold: float = DEFAULT_ACTIVE_THRESHOLD) -> Tensor:
    r"""Number of latents with :math:`\exp(H_i - h_0) > \mathrm{threshold}` (geometric-mean column norm, data units)."""
    return (entropy_per_dim > STANDARD_NORMAL_ENTROPY + math.log(threshold)).sum()
