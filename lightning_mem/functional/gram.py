"""Per-sample Gram matrices :math:`G = J^\\top J` in float64, with the data and latent scalings of the metrics."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_mem._checks import check_finite, check_gram, check_jacobian, check_scale
from lightning_mem.jacobian import JacobianMode, iter_decoder_jacobians

__all__ = ["batch_gram", "cache_block_size", "data_scale", "decoder_gram", "jacobian_gram", "scale_latents"]

_CACHE_BLOCK_BYTES = 2**22
"""On CPU, per-sample float64 work (the Gram product, the pairwise terms) is done about this many bytes at a time,
in a reused buffer that stays in cache."""


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
        samples at a time), so its products are accumulated in float64.

    Raises:
        TypeError, ValueError: for a Jacobian that is not a floating point ``(N, *output_shape, d)`` tensor, holds
            NaN or inf, or a bad ``std`` / ``sigma``.

    Example:
        >>> jacobian_gram(torch.tensor([[[1.0, 0.0], [1.0, 2.0]]]), std=2.0)
        tensor([[[ 8.,  8.],
                 [ 8., 16.]]], dtype=torch.float64)
    """
    flat = check_jacobian(jacobian, latent_dim=latent_dim, check_values=False)  # checked below, on the Gram diagonal
    scale = data_scale(std, tuple(jacobian.shape[1:-1]), flat.device)
    gram = _float64_gram(flat, scale if scale is not None and scale.ndim else None)
    # A NaN or inf entry of column i makes G_ii NaN or inf: one pass over the (N, d) diagonal instead of the Jacobian
    if not bool(torch.isfinite(gram.diagonal(dim1=-2, dim2=-1).detach().sum())):
        check_finite(jacobian, "jacobian")  # raises, naming the first bad sample
        raise ValueError("Expected the Gram matrices J^T J of `jacobian` to be finite, but they overflow float64.")
    if scale is not None and scale.ndim == 0:
        gram = gram * scale**2
    return scale_latents(gram, sigma)


def batch_gram(
    jacobian: Tensor | None = None,
    gram: Tensor | None = None,
    *,
    std: Tensor | float | None = None,
    sigma: Tensor | None = None,
    latent_dim: int | None = None,
) -> Tensor:
    """The checked float64 Gram matrices ``(N, d, d)`` of a batch given as Jacobians or as Gram matrices.

    Exactly one of ``jacobian`` and ``gram`` must be given. With ``gram``, ``std`` must be a scalar (a per-output data
    scale needs the Jacobian). ``std``, ``sigma`` and ``latent_dim`` as in :func:`jacobian_gram`.
    """
    if (jacobian is None) == (gram is None):
        raise ValueError("Expected exactly one of `jacobian` and `gram`, but got " + ("both." if gram is not None else "neither."))
    if jacobian is not None:
        return jacobian_gram(jacobian, std=std, sigma=sigma, latent_dim=latent_dim)
    gram = check_gram(gram, latent_dim=latent_dim).to(torch.float64)
    if std is not None:
        std = torch.as_tensor(std)
        if std.numel() != 1:
            raise ValueError(
                f"Expected a scalar `std` with `gram` (a per-output scale needs the Jacobian), but got shape {tuple(std.shape)}."
            )
        gram = gram * check_scale(std, "std").to(gram.device).reshape(()) ** 2
    return scale_latents(gram, sigma)


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
