"""Per-sample Gram matrices :math:`G = J^\\top J` in float64, with the data and latent scalings of the metrics.

:func:`gram_batch` is what the statistics are computed from: the Gram matrices of a batch, each sample rescaled by a
power of two where its squared entries would overflow or underflow float64, kept together with the Jacobian they came
from (when there is one), so that the statistics can go back to :math:`J` where the Gram matrix alone is inaccurate
(:func:`unit_columns`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_mem._checks import check_finite, check_gram, check_gram_values, check_jacobian, check_scale
from lightning_mem.jacobian import JacobianMode, iter_decoder_jacobians

__all__ = [
    "GramBatch",
    "batch_gram",
    "cache_block_size",
    "data_scale",
    "decoder_gram",
    "exact_gram",
    "gram_batch",
    "gram_residual",
    "jacobian_gram",
    "normalized_columns",
    "scale_latents",
    "scaled_columns",
    "unit_columns",
]

_CACHE_BLOCK_BYTES = 2**22
"""On CPU, per-sample float64 work (the Gram product, the pairwise terms) is done about this many bytes at a time,
in a reused buffer that stays in cache."""

_SAFE_SQUARED_NORM = (2.0**-500, 2.0**1000)
"""A sample whose largest :math:`G_{ii}` lies outside this range is recomputed from its Jacobian divided by a power
of two near its largest entry: squares of entries beyond about 1e154 overflow float64, and below about 1e-154 they
lose digits to underflow (the product of such a sample is then exact up to that power of two, kept separately)."""


class GramBatch(NamedTuple):
    """A batch's float64 Gram matrices and what the accurate routes of the statistics need.

    ``gram[n]`` is the Gram matrix of :math:`2^{-k_n} J_n` (data and latent scalings applied), with ``k_n`` in
    ``exponent`` (``None`` when every ``k_n`` is zero): :math:`G_n = 4^{k_n}` ``gram[n]``.
    """

    gram: Tensor  # (N, d, d) float64
    exponent: Tensor | None  # (N,) float64 powers of two taken out of each sample's Jacobian, or None (all zero)
    jacobian: Tensor | None  # (N, D, d) the Jacobian as given (any floating dtype), None for Gram input
    output_scale: Tensor | None  # (1, D, 1) float64 per-output data scale applied to the Jacobian, or None

    def log_scale(self) -> Tensor | None:
        """:math:`\\log 4^{k_n}` ``(N,)``: what ``log G_ii`` and each log-determinant factor lose to the rescaling."""
        return None if self.exponent is None else self.exponent * (2.0 * math.log(2.0))


def cache_block_size(n: int, bytes_per_sample: int, device: torch.device) -> int:
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
    step = cache_block_size(n, 8 * big_d * d, flat.device)
    buffer = torch.empty((step, big_d, d), dtype=torch.float64)
    for start in range(0, n, step):
        block = buffer[: min(step, n - start)]
        block.copy_(flat[start : start + step])
        if scale is not None:
            block.mul_(scale)
        torch.matmul(block.mT, block, out=gram[start : start + step])
    return gram


def _power_of_two_scaled(block: Tensor) -> tuple[Tensor, Tensor]:
    """``block`` ``(k, D, d)`` float64 divided, per sample, by the power of two nearest above its largest entry, and
    those exponents ``(k,)`` (0 for an all-zero sample). Dividing by a power of two is exact."""
    largest = block.detach().abs().amax(dim=(1, 2))
    # largest = m * 2^e with m in [0.5, 1), e = 0 for zeros; 2^-e stays a normal float64 within +-1000
    exponent = torch.frexp(largest).exponent.to(torch.float64).clamp(-1000.0, 1000.0)
    return torch.ldexp(block, -exponent[:, None, None]), exponent


def data_scale(std: Tensor | float | None, output_shape: tuple[int, ...], device: torch.device) -> Tensor | None:
    """``std`` as a float64 scale: ``()`` for a scalar, ``(1, D, 1)`` per output entry; ``None`` stays ``None``."""
    if std is None:
        return None
    std = torch.as_tensor(std)
    if std.numel() == 1:
        return check_scale(std, "std").reshape(()).to(device)
    big_d = 1
    for size in output_shape:
        big_d *= size
    if tuple(std.shape) not in (tuple(output_shape), (big_d,)):
        raise ValueError(
            f"Expected `std` to be a scalar or of shape {tuple(output_shape)} (the output shape) or ({big_d},), but got {tuple(std.shape)}."
        )
    return check_scale(std, "std").to(device).reshape(1, big_d, 1)


def scale_latents(gram: Tensor, sigma: Tensor | None, name: str = "sigma") -> Tensor:
    """``gram`` with row and column ``i`` multiplied by ``sigma[i]`` (a latent prior :math:`N(\\mu, \\mathrm{diag}(\\sigma^2))`)."""
    if sigma is None:
        return gram
    sigma = check_scale(sigma, name, gram.shape[-1]).to(gram.device).reshape(-1)
    return gram * (sigma[:, None] * sigma[None, :])


def _jacobian_batch(jacobian: Tensor, std: Tensor | float | None, sigma: Tensor | None, latent_dim: int | None) -> GramBatch:
    """:func:`gram_batch` of a Jacobian."""
    flat = check_jacobian(jacobian, latent_dim=latent_dim, check_values=False)  # checked below, on the Gram diagonal
    scale = data_scale(std, tuple(jacobian.shape[1:-1]), flat.device)
    output_scale = scale if scale is not None and scale.ndim else None
    gram = _float64_gram(flat, output_scale)
    if scale is not None and scale.ndim == 0:
        gram = gram * scale**2
    diag = gram.diagonal(dim1=-2, dim2=-1).detach()
    # A NaN or inf entry of column i makes G_ii NaN or inf: one pass over the (N, d) diagonal instead of the Jacobian
    if not bool(torch.isfinite(diag.sum())):
        check_finite(jacobian, "jacobian")  # raises, naming the first bad sample; finite entries whose squares overflow pass
    largest = diag.amax(-1)
    low, high = _SAFE_SQUARED_NORM
    rescale = ~((largest >= low) & (largest <= high))  # NaN (inf - inf) counts as out of range too
    exponent = None
    if bool(rescale.any()):
        index = rescale.nonzero().squeeze(1)
        block = flat[index].to(torch.float64)
        if scale is not None:
            block = block * (scale if scale.ndim else scale.reshape(1, 1, 1))
        block, block_exponent = _power_of_two_scaled(block)
        gram = gram.index_put((index,), block.mT @ block)
        exponent = torch.zeros(flat.shape[0], dtype=torch.float64, device=flat.device).index_put((index,), block_exponent)
    return GramBatch(scale_latents(gram, sigma), exponent, flat, output_scale)


def gram_batch(
    jacobian: Tensor | None = None,
    gram: Tensor | None = None,
    *,
    std: Tensor | float | None = None,
    sigma: Tensor | None = None,
    latent_dim: int | None = None,
) -> GramBatch:
    """The checked float64 Gram matrices of a batch given as Jacobians or as Gram matrices, as a :class:`GramBatch`.

    Exactly one of ``jacobian`` and ``gram`` must be given. A Jacobian is kept (not copied) in the result, so that the
    statistics can take ill-conditioned samples from it. ``gram`` must be a batch of valid Gram matrices (symmetric,
    non-negative diagonal, :math:`|G_{ij}| \\le \\sqrt{G_{ii}G_{jj}}`, all up to rounding); ``std`` must then be a
    scalar (a per-output data scale needs the Jacobian). ``std``, ``sigma`` and ``latent_dim`` as in
    :func:`jacobian_gram`.
    """
    if (jacobian is None) == (gram is None):
        raise ValueError("Expected exactly one of `jacobian` and `gram`, but got " + ("both." if gram is not None else "neither."))
    if jacobian is not None:
        return _jacobian_batch(jacobian, std, sigma, latent_dim)
    gram = check_gram_values(check_gram(gram, latent_dim=latent_dim)).to(torch.float64)
    gram = 0.5 * (gram + gram.mT)  # symmetric within rounding (checked): both triangles now agree exactly
    if std is not None:
        std = torch.as_tensor(std)
        if std.numel() != 1:
            raise ValueError(
                f"Expected a scalar `std` with `gram` (a per-output scale needs the Jacobian), but got shape {tuple(std.shape)}."
            )
        gram = gram * check_scale(std, "std").to(gram.device).reshape(()) ** 2
    return GramBatch(scale_latents(gram, sigma), None, None, None)


def _materialize(batch: GramBatch) -> Tensor:
    """The Gram matrices :math:`G` of a :class:`GramBatch` (the powers of two multiplied back in)."""
    if batch.exponent is None:
        return batch.gram
    gram = torch.ldexp(batch.gram, 2.0 * batch.exponent[:, None, None])
    if not bool(torch.isfinite(gram.detach()).all()):
        raise ValueError(
            "Expected the Gram matrices J^T J of `jacobian` to be finite, but they overflow float64 (the metric functions "
            "and classes rescale such samples and stay finite; only the Gram matrices themselves cannot be returned)."
        )
    return gram


def normalized_columns(block: Tensor) -> tuple[Tensor, Tensor]:
    """Unit columns of a float64 ``(k, D, d)`` block (zero columns stay zero) and the squared column norms ``(k, d)``
    of the block divided, per sample, by a power of two near its largest entry (free of overflow and underflow)."""
    block, _ = _power_of_two_scaled(block)
    squared_norms = block.square().sum(1)
    safe = torch.where(squared_norms > 0, squared_norms, 1.0)
    return block * safe.rsqrt()[:, None, :], squared_norms


def scaled_columns(batch: GramBatch, index: Tensor) -> Tensor:
    """The Jacobians of samples ``index`` as float64 ``(k, D, d)``, per-output data scale applied, each divided by the
    power of two nearest above its largest entry (exactly: entries in ``(-1, 1)``). A scalar data scale and the latent
    scale ``sigma`` are left out: they do not change the angles between columns. Needs a batch built from a Jacobian.
    """
    if batch.jacobian is None:
        raise ValueError("Expected a GramBatch built from a Jacobian, but it holds Gram matrices only.")
    block = batch.jacobian[index].to(torch.float64)
    if batch.output_scale is not None:
        block = block * batch.output_scale
    return _power_of_two_scaled(block)[0]


def unit_columns(batch: GramBatch, index: Tensor) -> Tensor:
    """The columns of the Jacobians of samples ``index`` scaled to unit norm, float64 ``(k, D, d)``; zero columns stay
    zero. As :func:`scaled_columns`."""
    return normalized_columns(scaled_columns(batch, index))[0]


def _two_sum(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Knuth's error-free sum: ``a + b = s + e`` exactly, ``s = fl(a + b)``."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


_EXACT_GRAM_ELEMENTS = 2**24
""":func:`exact_gram` works on a few samples at a time, about this many float64 entries (128 MiB) of slices and products."""

_EXACT_GRAM_BITS = 107
"""Significant bits, relative to each column's largest entry, that :func:`exact_gram` keeps of every entry."""


def exact_gram(block: Tensor) -> tuple[Tensor, Tensor]:
    """:math:`X^\\top X` of a float64 ``(k, n, d)`` block to twice float64's precision, as ``hi + lo`` (each ``(k, d, d)``).

    Ozaki's error-free splitting: every column is cut into slices of ``b`` bits below its largest entry's exponent,
    with :math:`2b + \\log_2 n \\le 53`, so that every product of two slices, and every sum of ``n`` of them, is a
    float64 integer multiple of one power of two: one float64 matrix product computes all slice products exactly.
    Their sum, accumulated error-free, is :math:`X^\\top X` up to :math:`2^{-106} \\|x_i\\|\\|x_j\\|` (entries
    beyond 107 bits below a column's largest are dropped). The cost is that of about :math:`(107/b)^2` float64 Gram
    products; used only for the few samples whose log-determinant needs it.
    """
    k, n, d = block.shape
    bits = (53 - math.ceil(math.log2(max(n, 2)))) // 2
    num_slices = math.ceil(_EXACT_GRAM_BITS / bits)
    per_sample = (num_slices * d) ** 2 + num_slices * n * d
    if k > 1 and k * per_sample > _EXACT_GRAM_ELEMENTS:  # a few samples at a time: the slice products are large
        step = max(1, _EXACT_GRAM_ELEMENTS // per_sample)
        parts = [exact_gram(block[start : start + step]) for start in range(0, k, step)]
        return torch.cat([hi for hi, _ in parts]), torch.cat([lo for _, lo in parts])
    exponent = torch.frexp(block.abs().amax(dim=1, keepdim=True)).exponent.to(torch.float64)  # (k, 1, d)
    rest, slices = block, []
    for level in range(1, num_slices + 1):
        unit = torch.ldexp(torch.ones_like(exponent), exponent - level * bits)
        part = torch.round(rest / unit) * unit
        rest = rest - part
        slices.append(part)
    stacked = torch.cat(slices, dim=-1)  # (k, n, s d)
    products = (stacked.mT @ stacked).reshape(k, num_slices, d, num_slices, d)
    # Add the exact slice products from the largest (level 1 x level 1) down: error-free sums, the rounding errors kept
    order = sorted(((p, q) for p in range(num_slices) for q in range(num_slices)), key=lambda pq: pq[0] + pq[1])
    hi = torch.zeros((k, d, d), dtype=torch.float64, device=block.device)
    lo = torch.zeros_like(hi)
    for p, q in order:
        hi, error = _two_sum(hi, products[:, p, :, q, :])
        lo = lo + error
    top = hi + lo
    return top, lo - (top - hi)


def gram_residual(block: Tensor, factor: Tensor, gram: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """:math:`X^\\top X - R^\\top R` ``(k, d, d)`` for float64 ``X`` ``(k, n, d)`` and ``R`` ``(k, d, d)`` (e.g. its QR factor),
    from twice-precision Gram matrices (:func:`exact_gram`) and rounded once: accurate even where the two nearly cancel.
    ``gram``: :func:`exact_gram` of ``X`` when the caller has it already."""
    gram_hi, gram_lo = exact_gram(block) if gram is None else gram
    product_hi, product_lo = exact_gram(factor)
    difference, error = _two_sum(gram_hi, -product_hi)
    return difference + (error + (gram_lo - product_lo))


def batch_gram(
    jacobian: Tensor | None = None,
    gram: Tensor | None = None,
    *,
    std: Tensor | float | None = None,
    sigma: Tensor | None = None,
    latent_dim: int | None = None,
) -> Tensor:
    """The checked float64 Gram matrices ``(N, d, d)`` of a batch given as Jacobians or as Gram matrices.

    Arguments as in :func:`gram_batch`.
    """
    return _materialize(gram_batch(jacobian, gram, std=std, sigma=sigma, latent_dim=latent_dim))


def jacobian_gram(
    jacobian: Tensor, *, std: Tensor | float | None = None, sigma: Tensor | None = None, latent_dim: int | None = None
) -> Tensor:
    r"""Per-sample Gram matrices :math:`G = J^\top J` in float64, with optional data and latent scaling.

    Args:
        jacobian: ``(N, *output_shape, d)``.
        std: data scale, so that the metrics are in original data units when the decoder outputs standardized
            data ``x' = (x - mean) / std``: a scalar, or per output entry (shape ``output_shape`` or ``(D,)``).
            Column :math:`J_i` becomes :math:`\mathrm{std} \odot J_i`.
        sigma: latent scale, shape ``(d,)``: for a prior :math:`N(\mu, \mathrm{diag}(\sigma^2))`, column ``i`` is
            multiplied by ``sigma[i]`` (metrics w.r.t. the standard-normal noise).
        latent_dim: the expected ``d``, checked when given.

    Returns:
        ``(N, d, d)`` float64: a float32 Jacobian is converted to float64 before it is multiplied (on CPU a few
        samples at a time), so its products are accumulated in float64. The Gram matrices themselves cannot
        hold what float64 cannot: entries below about 1e-154 underflow in them (the metric functions and classes
        rescale such samples by a power of two and stay exact), and above about 1e154 they raise.

    Raises:
        TypeError, ValueError: for a Jacobian that is not a floating point ``(N, *output_shape, d)`` tensor, holds
            NaN or inf, has a Gram matrix beyond float64 (entries above about 1e154), or a bad ``std`` / ``sigma``.

    Example:
        >>> jacobian_gram(torch.tensor([[[1.0, 0.0], [1.0, 2.0]]]), std=2.0)
        tensor([[[ 8.,  8.],
                 [ 8., 16.]]], dtype=torch.float64)
    """
    return _materialize(_jacobian_batch(jacobian, std, sigma, latent_dim))


def decoder_gram(
    decoder: Callable,
    z: Tensor,
    *,
    condition: Tensor | None = None,
    mode: JacobianMode = "auto",
    chunk_size: int | None = None,
    std: Tensor | float | None = None,
    sigma: Tensor | None = None,
) -> Tensor:
    r"""Per-sample Gram matrices :math:`G = J^\top J` of a decoder in float64, computed ``chunk_size`` samples at a time.

    Only ``chunk_size x D x d`` Jacobian entries exist at once; the result is ``N x d x d``.

    Args:
        decoder, z, condition, mode, chunk_size: as for :func:`lightning_mem.decoder_jacobian`.
        std: data scale (scalar, or per output entry with the decoder's output shape or flattened); see
            :func:`jacobian_gram`.
        sigma: latent scale per latent dim, shape ``(d,)``.

    Returns:
        Tensor of shape ``(N, d, d)``, float64, symmetric positive semi-definite.

    Example:
        >>> decoder = torch.nn.Linear(2, 3, bias=False)
        >>> with torch.no_grad():
        ...     _ = decoder.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
        >>> decoder_gram(decoder, torch.zeros(1, 2))
        tensor([[[2., 1.],
                 [1., 5.]]], dtype=torch.float64)
    """
    chunks = iter_decoder_jacobians(decoder, z, condition=condition, mode=mode, chunk_size=chunk_size)
    return torch.cat([jacobian_gram(jacobian, std=std, sigma=sigma) for jacobian in chunks], dim=0)
