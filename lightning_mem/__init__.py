"""lightning_mem: manifold entropic metrics of generative models' latent spaces, for PyTorch and Lightning."""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from lightning_mem import functional
from lightning_mem.decoders import as_decoder
from lightning_mem.functional.gram import decoder_gram
from lightning_mem.jacobian import DecoderStateError, decoder_jacobian, iter_decoder_jacobian_columns, iter_decoder_jacobians
from lightning_mem.metrics import (
    ManifoldCrossMutualInformation,
    ManifoldEntropicMetrics,
    ManifoldEntropy,
    ManifoldPairwiseMutualInformation,
    ManifoldTotalCorrelation,
)

try:
    __version__ = _version("lightning_mem")  # the one place it is written is pyproject.toml
except _PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> object:
    # The callback imports Lightning (seconds); users of the functions and Metric classes do not pay for it.
    if name == "ManifoldEntropicMetricsCallback":
        from lightning_mem.callback import ManifoldEntropicMetricsCallback

        return ManifoldEntropicMetricsCallback
    raise AttributeError(f"module 'lightning_mem' has no attribute {name!r}")


__all__ = [
    "DecoderStateError",
    "ManifoldCrossMutualInformation",
    "ManifoldEntropicMetrics",
    "ManifoldEntropicMetricsCallback",
    "ManifoldEntropy",
    "ManifoldPairwiseMutualInformation",
    "ManifoldTotalCorrelation",
    "__version__",
    "as_decoder",
    "decoder_gram",
    "decoder_jacobian",
    "functional",
    "iter_decoder_jacobian_columns",
    "iter_decoder_jacobians",
]
