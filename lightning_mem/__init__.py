"""lightning_mem: manifold entropic metrics of generative models' latent spaces, for PyTorch and Lightning."""

from lightning_mem import functional
from lightning_mem.jacobian import as_decoder, decoder_gram, decoder_jacobian, iter_decoder_jacobians

__version__ = "0.1.0"

__all__ = ["__version__", "as_decoder", "decoder_gram", "decoder_jacobian", "functional", "iter_decoder_jacobians"]
