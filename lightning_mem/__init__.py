"""lightning_mem: manifold entropic metrics of generative models' latent spaces, for PyTorch and Lightning."""

from lightning_mem import functional
from lightning_mem.jacobian import as_decoder, decoder_gram, decoder_jacobian, iter_decoder_jacobians
from lightning_mem.metrics import (
    ManifoldCrossMutualInformation,
    ManifoldEntropicMetrics,
    ManifoldEntropy,
    ManifoldPairwiseMutualInformation,
    ManifoldTotalCorrelation,
)

__version__ = "0.1.0"

__all__ = [
    "ManifoldCrossMutualInformation",
    "ManifoldEntropicMetrics",
    "ManifoldEntropy",
    "ManifoldPairwiseMutualInformation",
    "ManifoldTotalCorrelation",
    "__version__",
    "as_decoder",
    "decoder_gram",
    "decoder_jacobian",
    "functional",
    "iter_decoder_jacobians",
]
