"""torchmetrics ``Metric`` classes for the manifold entropic metrics."""

from lightning_mem.metrics.manifold import (
    ManifoldCrossMutualInformation,
    ManifoldEntropicMetrics,
    ManifoldEntropy,
    ManifoldPairwiseMutualInformation,
    ManifoldTotalCorrelation,
)

__all__ = [
    "ManifoldCrossMutualInformation",
    "ManifoldEntropicMetrics",
    "ManifoldEntropy",
    "ManifoldPairwiseMutualInformation",
    "ManifoldTotalCorrelation",
]
