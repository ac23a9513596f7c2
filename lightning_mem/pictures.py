"""What each latent does, as pictures: the mean absolute Jacobian column and a traversal, for image decoders."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_mem._checks import check_latents
from lightning_mem.jacobian import call_decoder, iter_decoder_jacobians

__all__ = ["TRAVERSAL_STEPS", "LatentPictures", "image_shape_of", "latent_pictures"]

TRAVERSAL_STEPS = (-2.0, -1.0, 0.0, 1.0, 2.0)
"""Offsets, in prior standard deviations, at which a traversal decodes ``z + t e_i``."""


class LatentPictures(NamedTuple):
    """Pictures of the ``k`` latents ``latents`` (most important first), each image of shape ``(H, W)`` or ``(H, W, C)``."""

    latents: Tensor  # (k,) long
    columns: Tensor  # (k, *image) mean over samples of |dg/dz_i|
    traversals: Tensor  # (k, len(steps), *image) g(z0 + t e_i)
    steps: tuple[float, ...]


def image_shape_of(output_shape: Sequence[int], image_shape: Sequence[int] | None = None) -> tuple[int, ...] | None:
    """The image shape ``(H, W)`` or ``(H, W, C)`` of a decoder output, or ``None`` for an output that is no image.

    An output of shape ``(H, W)``, ``(1, H, W)`` or ``(3, H, W)`` (channels first, as torch's convolutions make them)
    is an image; any other (e.g. a flattened vector) only with a declared ``image_shape`` (``(H, W)``, ``(H, W, C)``
    with ``C`` in 1 or 3) of as many entries.

    Example:
        >>> image_shape_of((3, 64, 64)), image_shape_of((784,)), image_shape_of((784,), (28, 28))
        ((64, 64, 3), None, (28, 28))
    """
    output_shape = tuple(output_shape)
    numel = 1
    for size in output_shape:
        numel *= size
    if image_shape is not None:
        image_shape = tuple(image_shape)
        count = 1
        for size in image_shape:
            count *= size
        if len(image_shape) not in (2, 3) or count != numel or (len(image_shape) == 3 and image_shape[2] not in (1, 3)):
            raise ValueError(
                f"Expected `image_shape` (H, W) or (H, W, C) with C in (1, 3) and {numel} entries (the decoder's output "
                f"shape is {output_shape}), but got {image_shape}."
            )
        return image_shape
    if len(output_shape) == 2:
        return output_shape
    if len(output_shape) == 3 and output_shape[0] in (1, 3):
        return output_shape[1:] if output_shape[0] == 1 else (*output_shape[1:], 3)
    return None


def _as_images(batch: Tensor, image_shape: tuple[int, ...]) -> Tensor:
    """``(n, *output_shape)`` -> ``(n, *image_shape)`` (channels moved last for a channels-first output)."""
    n = batch.shape[0]
    if batch.ndim == 4 and len(image_shape) == 3 and batch.shape[1] == image_shape[2]:
        return batch.movedim(1, -1)
    return batch.reshape(n, *image_shape)


def latent_pictures(
    decoder: Callable[..., Any],
    z: Tensor,
    latents: Sequence[int] | Tensor,
    *,
    image_shape: Sequence[int] | None = None,
    condition: Tensor | None = None,
    steps: Sequence[float] = TRAVERSAL_STEPS,
    sigma: Tensor | None = None,
) -> LatentPictures | None:
    r"""Per-latent pictures of an image decoder: :math:`\mathbb{E}_z |\partial g / \partial z_i|` and a traversal.

    For each latent ``i`` of ``latents`` (e.g. the top ones of the entropy spectrum): the mean absolute decoder
    Jacobian column over the samples ``z``, shown as an image (where latent ``i`` moves the picture), and the strip
    :math:`g(z_0 + t\,\sigma_i e_i)`, :math:`t \in` ``steps``, with :math:`z_0` the first sample.

    Args:
        decoder: ``z -> x`` (or ``(z, condition) -> x``), in eval mode.
        z: ``(N, d)`` latents (a few suffice: the columns are averaged over them).
        latents: the latents to picture, most important first.
        image_shape: the image shape of a flattened output, see :func:`image_shape_of`.
        condition: per-sample condition, for conditional decoders.
        steps: traversal offsets in prior standard deviations.
        sigma: ``(d,)`` latent scale (a prior :math:`N(\mu, \mathrm{diag}(\sigma^2))`).

    Returns:
        :class:`LatentPictures` (float64, on the CPU), or ``None`` when the output is no image.

    Example:
        >>> decoder = torch.nn.Linear(2, 16, bias=False)
        >>> pictures = latent_pictures(decoder, torch.zeros(3, 2), [1, 0], image_shape=(4, 4))
        >>> tuple(pictures.columns.shape), tuple(pictures.traversals.shape)
        ((2, 4, 4), (2, 5, 4, 4))
    """
    check_latents(z, condition)
    latents = torch.as_tensor(latents, dtype=torch.long).flatten()
    with torch.no_grad():
        first = call_decoder(decoder, z[:1], None if condition is None else condition[:1])
    shape = image_shape_of(first.shape[1:], image_shape)
    if shape is None or latents.numel() == 0:
        return None
    total: Tensor | None = None
    for jacobian in iter_decoder_jacobians(decoder, z, condition=condition):
        part = jacobian[..., latents].abs().to(torch.float64).sum(0)  # (*output_shape, k)
        total = part if total is None else total + part
    assert total is not None  # z has at least one sample (check_latents), so at least one chunk
    columns = _as_images((total / z.shape[0]).movedim(-1, 0), shape)
    scale = torch.ones(z.shape[1], dtype=z.dtype, device=z.device) if sigma is None else torch.as_tensor(sigma).to(z)
    offsets = torch.tensor(list(steps), dtype=z.dtype, device=z.device)
    k, m = latents.numel(), offsets.numel()
    moved = z[:1].repeat(k * m, 1)
    rows = torch.arange(k * m, device=z.device)
    moved[rows, latents.to(z.device).repeat_interleave(m)] += offsets.repeat(k) * scale[latents.to(z.device)].repeat_interleave(m)
    with torch.no_grad():
        decoded = call_decoder(decoder, moved, None if condition is None else condition[:1].expand(k * m, *condition.shape[1:]))
    traversals = _as_images(decoded.to(torch.float64), shape).reshape(k, m, *shape)
    return LatentPictures(latents.cpu(), columns.detach().cpu(), traversals.detach().cpu(), tuple(float(t) for t in steps))
