"""Alignment of one decoder's latents with another's, read off their manifold cross-pairwise mutual information."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["alignment_summary", "informational_correlation"]


def informational_correlation(cross_mutual_information: Tensor) -> Tensor:
    r"""Linfoot's informational correlation :math:`r_{ij} = \sqrt{1 - e^{-2\,\mathrm{MCPMI}_{ij}}} \in [0, 1)`.

    For a single sample it is :math:`|\rho_{ij}|`, the absolute cosine between the two latents' decoder columns.

    Example:
        >>> informational_correlation(torch.tensor([[0.0, 0.5 * torch.log(torch.tensor(2.0))]]))  # cos 45 deg
        tensor([[0.0000, 0.7071]])

    References:
        E. H. Linfoot, *An informational measure of correlation*, Information and Control 1(1), 1957.
    """
    return torch.sqrt(-torch.expm1(-2.0 * cross_mutual_information))


def alignment_summary(cross_mutual_information: Tensor) -> dict[str, Tensor]:
    r"""How the latents of a model match those of a reference, from their ``(d, d_ref)`` MCPMI matrix.

    With :math:`r_{ij}` the :func:`informational_correlation`:

    - ``informational_correlation`` ``(d, d_ref)``: :math:`r_{ij}`;
    - ``best_match`` ``(d,)`` long: :math:`\arg\max_j r_{ij}`, and ``best_match_score`` ``(d,)`` its :math:`r`;
    - ``alignment`` ``()``: the mean best score (1 when every model latent moves the data exactly like some
      reference latent);
    - ``num_matched`` ``()``: distinct reference latents that are some model latent's best match;
    - for ``d == d_ref`` only (e.g. a model against itself earlier in training): ``self_correlation`` ``()``, the mean
      of :math:`r_{ii}` (latent ``i`` kept its meaning); ``cross_mutual_information_diag`` ``()``, the mean of
      :math:`\mathrm{MCPMI}_{ii}` in nats; ``num_rematched`` ``()``, the latents whose best match is another latent
      (swapped roles lower ``self_correlation`` but not ``alignment``).

    Example:
        >>> cross = torch.tensor([[0.0, 3.0], [3.0, 0.0]])  # the two latents swapped roles
        >>> summary = alignment_summary(cross)
        >>> summary["best_match"], int(summary["num_rematched"]), round(float(summary["self_correlation"]), 4)
        (tensor([1, 0]), 2, 0.0)

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
    """
    if not isinstance(cross_mutual_information, Tensor) or cross_mutual_information.ndim != 2:
        shape = tuple(getattr(cross_mutual_information, "shape", ()))
        raise ValueError(f"Expected `cross_mutual_information` of shape (d, d_ref), but got {shape}.")
    correlation = informational_correlation(cross_mutual_information)
    score, match = correlation.max(dim=1)
    summary = {
        "informational_correlation": correlation,
        "best_match": match,
        "best_match_score": score,
        "alignment": score.mean(),
        "num_matched": torch.tensor(match.unique().numel(), device=match.device),
    }
    d, d_ref = cross_mutual_information.shape
    if d == d_ref:
        summary["self_correlation"] = correlation.diagonal().mean()
        summary["cross_mutual_information_diag"] = cross_mutual_information.diagonal().mean()
        summary["num_rematched"] = (match != torch.arange(d, device=match.device)).sum()
    return summary
