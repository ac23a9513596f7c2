"""Manifold entropic metrics as pure functions of decoder Jacobians (or their Gram matrices)."""

from lightning_mem.functional.active import ActiveLatents, active_alignment, active_latents, pairwise_summary
from lightning_mem.functional.alignment import alignment_summary, informational_correlation
from lightning_mem.functional.gram import decoder_gram, jacobian_gram
from lightning_mem.functional.manifold import (
    entropy_spectrum,
    manifold_cross_mutual_information,
    manifold_entropy,
    manifold_pairwise_mutual_information,
    manifold_total_correlation,
    num_active_latents,
)
from lightning_mem.functional.statistics import DEFAULT_ACTIVE_THRESHOLD, DEFAULT_EPS, STANDARD_NORMAL_ENTROPY

__all__ = [
    "DEFAULT_ACTIVE_THRESHOLD",
    "DEFAULT_EPS",
    "STANDARD_NORMAL_ENTROPY",
    "ActiveLatents",
    "active_alignment",
    "active_latents",
    "alignment_summary",
    "decoder_gram",
    "entropy_spectrum",
    "informational_correlation",
    "jacobian_gram",
    "manifold_cross_mutual_information",
    "manifold_entropy",
    "manifold_pairwise_mutual_information",
    "manifold_total_correlation",
    "num_active_latents",
    "pairwise_summary",
]
