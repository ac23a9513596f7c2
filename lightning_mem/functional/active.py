"""Which latents a decoder uses, read off the shape of its entropy spectrum (free of pixel count and data scale)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_mem._checks import check_positive_float
from lightning_mem.functional.statistics import DEFAULT_EPS, STANDARD_NORMAL_ENTROPY

__all__ = [
    "DEFAULT_COLLAPSE_FRACTION",
    "DEFAULT_GAP_RATIO",
    "DEFAULT_PLATEAU_RATIO",
    "ActiveLatents",
    "active_latents",
]

DEFAULT_GAP_RATIO = 5.0
"""A plateau's gap must be at least this many times the mean of the spectrum's other gaps and of the gaps inside the
plateau (it stands out)."""

DEFAULT_PLATEAU_RATIO = 1.0
"""A plateau's gap must be at least this many times the plateau's own width (the latents below it are bunched)."""

DEFAULT_COLLAPSE_FRACTION = 0.1
"""With a ``data_scale``: no latent is active when the top latent's geometric-mean column norm is below this fraction
of the data's spread (one prior standard deviation of the most important latent moves the output by less than 10% of
the data's root total variance: the decoder draws about the same output for every latent)."""

_FLOOR_MARGIN = 2.0
"""Nats above the metric's floor, :math:`\\tfrac12\\log\\epsilon` below the top latent, within which a latent counts as
dead: its column sat at the floor (at most :math:`\\sqrt{\\epsilon}` of the largest column) at (nearly) every sample."""


class ActiveLatents(NamedTuple):
    """The active latents of an entropy spectrum and the boundary that separates them from the inactive ones.

    ``mask == latent_entropy > level`` holds exactly: ``level`` is ``-inf`` when every latent is active, ``+inf``
    when none is, and otherwise the midpoint of ``gap``, the distance in nats between the lowest active and the
    highest inactive latent (``0`` when all or none are active).
    """

    mask: Tensor  # (d,) bool, in the latents' own order
    num_active: Tensor  # () long
    level: Tensor  # () float64, nats
    gap: Tensor  # () float64, nats


def _plateau_split(spectrum: Tensor, gap_ratio: float, plateau_ratio: float) -> int | None:
    """Number of latents above the plateau of a descending ``spectrum``, or ``None`` when it has no plateau."""
    d = spectrum.numel()
    if d < 3:  # a plateau needs at least two latents below the gap and one above it
        return None
    gaps = spectrum[:-1] - spectrum[1:]  # gaps[k - 1] lies below the k-th latent
    candidates = gaps[: d - 2]  # k = 1 .. d - 2: at least two latents below
    mean_other_gaps = (spectrum[0] - spectrum[-1] - candidates) / (d - 2)
    plateau_width = spectrum[1 : d - 1] - spectrum[-1]
    plateau_size = torch.arange(d - 1, 1, -1, dtype=spectrum.dtype, device=spectrum.device)  # d - k latents below
    qualifies = (
        (candidates > 0)
        & (candidates >= gap_ratio * mean_other_gaps)
        & (candidates >= gap_ratio * plateau_width / (plateau_size - 1))
        & (candidates >= plateau_ratio * plateau_width)
    )
    if not bool(qualifies.any()):
        return None
    # the widest qualifying gap; among equal ones the lowest (more latents counted as active)
    best = torch.where(qualifies, candidates, -math.inf)
    return int(torch.nonzero(best == best.max()).max()) + 1


def active_latents(
    latent_entropy: Tensor,
    *,
    data_scale: float | Tensor | None = None,
    gap_ratio: float = DEFAULT_GAP_RATIO,
    plateau_ratio: float = DEFAULT_PLATEAU_RATIO,
    collapse_fraction: float = DEFAULT_COLLAPSE_FRACTION,
    eps: float = DEFAULT_EPS,
) -> ActiveLatents:
    r"""The latents a decoder uses: those above the plateau of switched-off latents at the bottom of its entropy spectrum.

    .. math::
        s_1 \ge \dots \ge s_d \text{ (the sorted } H_i), \quad g_k = s_k - s_{k+1}, \quad
        w_k = s_{k+1} - s_d, \quad m = d - k \ge 2: \qquad
        g_k \ge r \, \frac{s_1 - s_d - g_k}{d - 2}, \quad g_k \ge r \, \frac{w_k}{m - 1}, \quad g_k \ge p \, w_k

    Switched-off latents (posterior collapse in a VAE) form a *plateau*: a group of at least two latents bunched
    together far below the rest. The spectrum is split below the ``k``-th latent at the widest gap :math:`g_k` that
    stands out ``r = gap_ratio`` times over both the mean of the spectrum's other gaps and the mean gap inside the
    group below it, and that is at least ``p = plateau_ratio`` times that group's width :math:`w_k` (the group is
    bunched: a long, evenly falling tail, as in a power-law or a flow's log-spaced spectrum, is no plateau). The
    ``k`` latents above the gap are active; without such a gap all are. Two rules come first: a latent at the
    metric's floor (within 2 nats of :math:`s_1 + \tfrac12\log\epsilon`: its column was at most
    :math:`\sqrt{\epsilon}` of the largest at every sample) is *dead*, never active, and only the live latents are
    split; and, when ``data_scale`` is given, no latent is active when the top latent's geometric-mean column norm
    :math:`e^{s_1 - h_0}` is below ``collapse_fraction * data_scale`` (a collapsed decoder).

    Only differences of entropies enter the split, so it is unchanged when the data are scaled by ``c`` (every
    :math:`H_i` shifts by :math:`\log c`) or upsampled (every column norm grows by about the same factor), unlike an
    absolute threshold on column norms, which depends on both.

    Limits, by design: the spectrum's shape cannot tell "none active" from "all equally active" (a fully collapsed
    VAE's latents are bunched like an isotropic flow's): pass ``data_scale`` to tell them apart. A single switched-off
    latent is no plateau (a two-latent flow's spectrum ``(2.31, -0.39)`` has the same shape with both latents
    active) unless it is dead. Latents still switching off during training sit in between, where any count, the
    KL count included, depends on its threshold. Random spectra show plateau shapes by chance: 3-17% of spectra of
    3 to 100 i.i.d. uniform entropies lose their lowest few latents to one, while log-spaced spectra with noise as
    large as their gaps (the torus flows' shape) do so in under 0.2% at 20 latents, 4% at 100.

    Args:
        latent_entropy: ``(d,)`` per-latent entropies :math:`H_i` in nats, e.g. the first output of
            :func:`~lightning_mem.functional.manifold_entropy`; any order.
        data_scale: optional positive spread of the data in the decoder's output units, the root of its total
            variance :math:`\sqrt{\mathbb{E}\|x - \mathbb{E}x\|^2}` (``x.flatten(1).var(0).sum().sqrt()``); it only
            decides whether the decoder has collapsed altogether.
        gap_ratio: :math:`r_{\mathrm{gap}}` of rule (i).
        plateau_ratio: :math:`r_{\mathrm{plateau}}` of rule (ii).
        collapse_fraction: fraction of ``data_scale`` below which the top latent means a collapsed decoder.
        eps: the floor the entropies were computed with (``eps`` of :func:`~lightning_mem.functional.manifold_entropy`).

    Returns:
        :class:`ActiveLatents` ``(mask, num_active, level, gap)``: ``mask`` ``(d,)`` bool in the order of
        ``latent_entropy``, ``num_active`` ``()`` long, ``level`` and ``gap`` ``()`` float64 nats, with
        ``mask == (latent_entropy > level)``.

    Raises:
        ValueError: if ``latent_entropy`` is not a non-empty 1-D tensor of finite values, or for a non-positive
            ``data_scale``, ratio, ``collapse_fraction`` or ``eps``.
        TypeError: if ``latent_entropy`` is not a floating point tensor.

    Example:
        >>> import torch
        >>> vae = torch.tensor([1.6, -1.9, 1.2, -2.0, 0.8, -2.1])  # three latents on a plateau near -2 nats
        >>> active = active_latents(vae)
        >>> active.mask.tolist(), int(active.num_active), round(float(active.level), 2), round(float(active.gap), 2)
        ([True, False, True, False, True, False], 3, -0.55, 2.7)
        >>> int(active_latents(torch.tensor([2.31, -0.39])).num_active)  # two latents: no plateau
        2
        >>> int(active_latents(torch.linspace(0.7, -3.5, 20)).num_active)  # a smooth spectrum: all active
        20
        >>> collapsed = torch.tensor([-2.2, -2.3, -2.5, -2.6])  # columns ~0.03 long, data spread 2.2: collapsed
        >>> int(active_latents(collapsed).num_active), int(active_latents(collapsed, data_scale=2.2).num_active)
        (4, 0)

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025 (the
        entropy spectrum of beta-VAEs: active latents above a plateau of switched-off ones).
        Y. Burda, R. Grosse, R. Salakhutdinov, *Importance Weighted Autoencoders*, ICLR 2016 (the KL-based
        "active units" count this rule is checked against).
    """
    _check_latent_entropy(latent_entropy)
    for value, name in ((gap_ratio, "gap_ratio"), (plateau_ratio, "plateau_ratio"), (collapse_fraction, "collapse_fraction"), (eps, "eps")):
        check_positive_float(value, name)
    scale = _check_data_scale(data_scale)

    entropy = latent_entropy.detach().to(torch.float64)
    d = entropy.numel()
    spectrum = entropy.sort(descending=True).values
    top = spectrum[0]
    live = spectrum > top + 0.5 * math.log(eps) + _FLOOR_MARGIN
    live[0] = True  # the top latent is measured against itself
    num_live = int(live.sum())
    if scale is not None and float(top) - STANDARD_NORMAL_ENTROPY < math.log(collapse_fraction * scale):
        num_active = 0
    else:
        split = _plateau_split(spectrum[:num_live], gap_ratio, plateau_ratio)
        num_active = num_live if split is None else split

    if num_active == d:
        level, gap = -math.inf, 0.0
    elif num_active == 0:
        level, gap = math.inf, 0.0
    else:
        upper, lower = float(spectrum[num_active - 1]), float(spectrum[num_active])
        level, gap = 0.5 * (upper + lower), upper - lower
    level_tensor = torch.tensor(level, dtype=torch.float64, device=latent_entropy.device)
    mask = entropy > level_tensor
    return ActiveLatents(
        mask=mask,
        num_active=mask.sum(),
        level=level_tensor,
        gap=torch.tensor(gap, dtype=torch.float64, device=latent_entropy.device),
    )


def _check_latent_entropy(latent_entropy: object) -> None:
    if not isinstance(latent_entropy, Tensor):
        raise TypeError(f"Expected `latent_entropy` to be a torch.Tensor, but got {type(latent_entropy).__name__}.")
    if not latent_entropy.dtype.is_floating_point:
        raise TypeError(f"Expected `latent_entropy` of a floating point dtype, but got {latent_entropy.dtype}.")
    if latent_entropy.ndim != 1 or latent_entropy.numel() == 0:
        raise ValueError(f"Expected `latent_entropy` of shape (d,) with d >= 1, but got {tuple(latent_entropy.shape)}.")
    if not bool(torch.isfinite(latent_entropy).all()):
        raise ValueError(f"Expected `latent_entropy` to be finite, but got {latent_entropy.tolist()}.")


def _check_data_scale(data_scale: float | Tensor | None) -> float | None:
    if data_scale is None:
        return None
    value = data_scale
    if isinstance(data_scale, Tensor):
        if data_scale.numel() != 1:
            raise ValueError(f"Expected `data_scale` to be a positive scalar, but got a tensor of shape {tuple(data_scale.shape)}.")
        value = data_scale.item()
    check_positive_float(value, "data_scale")
    return float(value)
