"""Which latents a decoder uses, read off the shape of its entropy spectrum (free of pixel count and data scale)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_mem._checks import check_positive_float
from lightning_mem.functional.alignment import alignment_summary
from lightning_mem.functional.statistics import DEFAULT_EPS, STANDARD_NORMAL_ENTROPY

__all__ = [
    "DEFAULT_COLLAPSE_FRACTION",
    "DEFAULT_GAP_RATIO",
    "DEFAULT_MIN_GAP",
    "DEFAULT_PLATEAU_RATIO",
    "ActiveLatents",
    "active_alignment",
    "active_latents",
    "pairwise_summary",
]

DEFAULT_GAP_RATIO = 5.0
"""A plateau's gap must be at least this many times the mean of the spectrum's other gaps and of the gaps inside the
plateau (it stands out)."""

DEFAULT_PLATEAU_RATIO = 1.0
"""A plateau's gap must be at least this many times the plateau's own width (the latents below it are bunched)."""

DEFAULT_MIN_GAP = 0.5
"""A plateau's gap must be at least this many nats: the switched-off latents' columns are at least
:math:`e^{0.5} = 1.65` times shorter than the lowest active latent's. Gaps of a few tenths of a nat are the spread of
latents that are all in use (three random Gaussian decoder columns over three outputs: 0.28 nats); the switched-off
latents of the trained beta-VAEs lie 0.9 to 3.4 nats below. A difference of entropies, so free of data scale and
pixel count like the ratios."""

DEFAULT_COLLAPSE_FRACTION = 0.1
"""With a ``data_scale``: no latent is active when the top latent's geometric-mean column norm is below this fraction
of the data's spread (one prior standard deviation of the most important latent moves the output by less than 10% of
the data's root total variance: the decoder draws about the same output for every latent)."""

_FLOOR_MARGIN = 2.0
"""Nats above the metric's floor, :math:`\\tfrac12\\log\\epsilon` below the top latent, within which a latent counts as
dead: its column sat at the floor (at most :math:`\\sqrt{\\epsilon}` of the largest column) at (nearly) every sample."""


class ActiveLatents(NamedTuple):
    r"""The active latents of an entropy spectrum and the boundary that separates them from the inactive ones.

    ``mask == latent_entropy > level`` holds exactly: ``level`` is ``-inf`` when every latent is active, ``+inf``
    when none is, and otherwise the midpoint of ``gap``, the distance in nats between the lowest active and the
    highest inactive latent (``0`` when all or none are active). With an absolute ``threshold``, ``level`` is
    :math:`h_0 + \log(\mathrm{threshold})` (finite) and ``gap`` the same distance.
    """

    mask: Tensor  # (d,) bool, in the latents' own order
    num_active: Tensor  # () long
    level: Tensor  # () float64, nats
    gap: Tensor  # () float64, nats


def _plateau_split(spectrum: Tensor, gap_ratio: float, plateau_ratio: float, min_gap: float) -> int | None:
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
        & (candidates >= min_gap)
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
    threshold: float | None = None,
    data_scale: float | Tensor | None = None,
    gap_ratio: float = DEFAULT_GAP_RATIO,
    plateau_ratio: float = DEFAULT_PLATEAU_RATIO,
    min_gap: float = DEFAULT_MIN_GAP,
    collapse_fraction: float = DEFAULT_COLLAPSE_FRACTION,
    eps: float = DEFAULT_EPS,
) -> ActiveLatents:
    r"""The latents a decoder uses: those above the plateau of switched-off latents at the bottom of its entropy spectrum.

    .. math::
        s_1 \ge \dots \ge s_d \text{ (the sorted } H_i), \quad g_k = s_k - s_{k+1}, \quad
        w_k = s_{k+1} - s_d, \quad m = d - k \ge 2: \qquad
        g_k \ge r \, \frac{s_1 - s_d - g_k}{d - 2}, \quad g_k \ge r \, \frac{w_k}{m - 1}, \quad g_k \ge p \, w_k,
        \quad g_k \ge g_{\min}

    Switched-off latents (posterior collapse in a VAE) form a *plateau*: a group of at least two latents bunched
    together far below the rest. The spectrum is split below the ``k``-th latent at the widest gap :math:`g_k` that
    stands out ``r = gap_ratio`` times over both the mean of the spectrum's other gaps and the mean gap inside the
    group below it, and that is at least ``p = plateau_ratio`` times that group's width :math:`w_k` (the group is
    bunched: a long, evenly falling tail, as in a power-law or a flow's log-spaced spectrum, is no plateau) and at
    least :math:`g_{\min}` = ``min_gap`` nats wide (far below: not the spread of latents in use). The
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
    KL count included, depends on its threshold. Random spectra show plateau shapes by chance: without ``min_gap``,
    3-17% of spectra of 3 to 100 i.i.d. uniform entropies lose their lowest few latents to one (with it, for
    entropies spread over 1 nat: 7% at 3 latents, 1% at 10, none at 100; over 10 nats it changes little), while
    log-spaced spectra with noise as large as their gaps (the torus flows' shape) do so in under 0.2% at 20
    latents, 4% at 100.

    Args:
        latent_entropy: ``(d,)`` per-latent entropies :math:`H_i` in nats, e.g. the first output of
            :func:`~lightning_mem.functional.manifold_entropy`; any order.
        threshold: the absolute rule instead (the package's earlier default): a latent is active when
            :math:`\exp(H_i - h_0)`, the geometric-mean norm of its decoder column in data units, exceeds this
            (e.g. :data:`~lightning_mem.functional.DEFAULT_ACTIVE_THRESHOLD`, 0.01); ``level`` is then
            :math:`h_0 + \log(\mathrm{threshold})` and the other options are not used. It depends on the number of
            output dims and on the data scale.
        data_scale: optional positive spread of the data in the decoder's output units, the root of its total
            variance :math:`\sqrt{\mathbb{E}\|x - \mathbb{E}x\|^2}` (``x.flatten(1).var(0).sum().sqrt()``); it only
            decides whether the decoder has collapsed altogether.
        gap_ratio: :math:`r`, how far the gap must stand out of the other gaps and of the plateau's.
        plateau_ratio: :math:`p`, how much wider than the plateau the gap must be.
        min_gap: :math:`g_{\min}`, the narrowest gap in nats that can separate a plateau.
        collapse_fraction: fraction of ``data_scale`` below which the top latent means a collapsed decoder.
        eps: the floor the entropies were computed with (``eps`` of :func:`~lightning_mem.functional.manifold_entropy`).

    Returns:
        :class:`ActiveLatents` ``(mask, num_active, level, gap)``: ``mask`` ``(d,)`` bool in the order of
        ``latent_entropy``, ``num_active`` ``()`` long, ``level`` and ``gap`` ``()`` float64 nats, with
        ``mask == (latent_entropy > level)``.

    Raises:
        ValueError: if ``latent_entropy`` is not a non-empty 1-D tensor of finite values, or for a non-positive
            ``threshold``, ``data_scale``, ratio, ``min_gap``, ``collapse_fraction`` or ``eps``.
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
        >>> active_latents(vae, threshold=0.1).mask.tolist()  # the absolute rule: exp(H_i - h0) > 0.1
        [True, False, True, False, True, False]

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025 (the
        entropy spectrum of beta-VAEs: active latents above a plateau of switched-off ones).
        Y. Burda, R. Grosse, R. Salakhutdinov, *Importance Weighted Autoencoders*, ICLR 2016 (the KL-based
        "active units" count this rule is checked against).
    """
    _check_latent_entropy(latent_entropy)
    ratios = ((gap_ratio, "gap_ratio"), (plateau_ratio, "plateau_ratio"), (min_gap, "min_gap"), (collapse_fraction, "collapse_fraction"))
    for value, name in (*ratios, (eps, "eps")):
        check_positive_float(value, name)
    scale = _check_data_scale(data_scale)
    if threshold is not None:
        check_positive_float(threshold, "threshold")
        return _above(latent_entropy, STANDARD_NORMAL_ENTROPY + math.log(threshold))

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
        split = _plateau_split(spectrum[:num_live], gap_ratio, plateau_ratio, min_gap)
        num_active = num_live if split is None else split

    if num_active == d:
        level = -math.inf
    elif num_active == 0:
        level = math.inf
    else:
        level = 0.5 * float(spectrum[num_active - 1] + spectrum[num_active])
    return _above(latent_entropy, level)


def _above(latent_entropy: Tensor, level: float) -> ActiveLatents:
    """The latents above ``level`` (nats), with ``gap`` between the lowest of them and the highest of the others."""
    entropy = latent_entropy.detach().to(torch.float64)
    level_tensor = torch.tensor(level, dtype=torch.float64, device=latent_entropy.device)
    mask = entropy > level_tensor
    num_active = int(mask.sum())
    gap = float(entropy[mask].min() - entropy[~mask].max()) if 0 < num_active < entropy.numel() else 0.0
    return ActiveLatents(
        mask=mask,
        num_active=mask.sum(),
        level=level_tensor,
        gap=torch.tensor(gap, dtype=torch.float64, device=latent_entropy.device),
    )


def pairwise_summary(pairwise_mutual_information: Tensor, active: Tensor | None = None) -> dict[str, Tensor]:
    r"""The largest and the mean pairwise mutual information over the off-diagonal pairs of the ``active`` latents.

    .. math::
        \max_{i \ne j \in A} \mathrm{MPMI}_{ij}, \qquad \frac{1}{|A|(|A| - 1)} \sum_{i \ne j \in A} \mathrm{MPMI}_{ij}

    :math:`\mathrm{MPMI}_{ij}` depends on latents ``i`` and ``j`` alone, so the values on a subset ``A`` of the
    latents are those of the sub-block ``A x A`` of the full matrix. With fewer than two latents in ``A`` there is no
    pair, and both are 0.

    Args:
        pairwise_mutual_information: ``(d, d)`` MPMI matrix (e.g. of
            :func:`~lightning_mem.functional.manifold_pairwise_mutual_information`).
        active: ``(d,)`` bool mask of the latents ``A`` (e.g. ``active_latents(...).mask``); ``None``: all of them.

    Returns:
        ``{"pairwise_mutual_information_max": (), "pairwise_mutual_information_mean": ()}``, of the matrix's dtype.

    Example:
        >>> mpmi = torch.tensor([[0.0, 0.9, 0.1], [0.9, 0.0, 0.3], [0.1, 0.3, 0.0]])
        >>> summary = pairwise_summary(mpmi, torch.tensor([True, False, True]))
        >>> float(summary["pairwise_mutual_information_max"]), float(summary["pairwise_mutual_information_mean"])
        (0.10000000149011612, 0.10000000149011612)
    """
    d = pairwise_mutual_information.shape[0]
    if active is not None:
        pairwise_mutual_information = pairwise_mutual_information[active][:, active]
        d = pairwise_mutual_information.shape[0]
    off_diagonal = pairwise_mutual_information[~torch.eye(d, dtype=torch.bool, device=pairwise_mutual_information.device)]
    zero = pairwise_mutual_information.new_zeros(())
    return {
        "pairwise_mutual_information_max": off_diagonal.max() if d > 1 else zero,
        "pairwise_mutual_information_mean": off_diagonal.mean() if d > 1 else zero,
    }


def active_alignment(cross_mutual_information: Tensor, active: Tensor, reference_active: Tensor | None = None) -> dict[str, Tensor]:
    r"""The scalars of :func:`~lightning_mem.functional.alignment_summary` on the active latents only.

    The rows of the ``(d, d_ref)`` MCPMI matrix are restricted to the model's ``active`` latents, its columns to
    ``reference_active`` (all reference latents when ``None``): e.g. ``alignment`` is then the mean, over the active
    latents, of their best informational correlation with a reference latent, free of the random directions of
    switched-off latents. For the drift (a model against itself earlier) pass the same mask twice: the square
    sub-block keeps ``self_correlation``, ``cross_mutual_information_diag`` and ``num_rematched`` (among the active
    latents).

    Args:
        cross_mutual_information: ``(d, d_ref)`` MCPMI matrix.
        active: ``(d,)`` bool mask of the model latents.
        reference_active: ``(d_ref,)`` bool mask of the reference latents, or ``None`` (all).

    Returns:
        The 0-dim entries of :func:`~lightning_mem.functional.alignment_summary` of the sub-block (``alignment``,
        ``num_matched``, and for a square sub-block ``self_correlation``, ``cross_mutual_information_diag``,
        ``num_rematched``); an empty dict when no latent is active, or no reference latent is (``best_match``
        indices, which would count within the sub-block, are left out).

    Example:
        >>> cross = torch.tensor([[3.0, 0.0, 0.1], [0.0, 3.0, 0.1], [0.1, 0.2, 0.0]])  # latent 2 is switched off
        >>> mask = torch.tensor([True, True, False])
        >>> summary = active_alignment(cross, mask, mask)
        >>> round(float(summary["alignment"]), 4), int(summary["num_rematched"])
        (0.9988, 0)
    """
    block = cross_mutual_information[active]
    if reference_active is not None:
        block = block[:, reference_active]
    if block.numel() == 0:
        return {}
    return {name: value for name, value in alignment_summary(block).items() if value.ndim == 0}


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
