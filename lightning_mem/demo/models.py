"""Small LightningModules for the demo and the examples: a beta-VAE and a FrEIA coupling flow, each exposing a decoder."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from lightning_mem._checks import check_non_negative_float, check_positive_float, check_positive_int
from lightning_mem.decoders import as_decoder
from lightning_mem.functional import manifold_total_correlation
from lightning_mem.jacobian import decoder_jacobian

__all__ = ["BetaVAE", "CouplingFlow"]


def _mlp(sizes: list[int], activation: type[nn.Module] = nn.SiLU) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, (size_in, size_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(size_in, size_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return layers


def _first(batch: Tensor | tuple | list) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class BetaVAE(LightningModule):
    r"""A small beta-VAE for flattened images in ``[0, 1]`` (Bernoulli likelihood, standard-normal prior).

    .. math::
        \mathcal{L} = \mathbb{E}_{q(z|x)}[-\log p(x|z)] + \beta\, \mathrm{KL}(q(z|x)\,\|\,N(0, I))

    The decoder ``self.decoder`` maps ``z (N, latent_dim)`` to pixel means ``(N, data_dim)`` in ``(0, 1)``; it is
    what the manifold entropic metrics differentiate. Large ``beta`` switches latents off (their decoder
    columns vanish): the number of active latents falls as ``beta`` grows.

    Args:
        data_dim: flattened image size (64 for the 8x8 digits).
        latent_dim: number of latents ``d``.
        hidden_dim: width of the two hidden layers of encoder and decoder.
        beta: weight of the KL term (``beta = 1`` is the plain VAE).
        learning_rate: Adam learning rate.

    Raises:
        ValueError: for non-positive sizes or learning rate, or a negative ``beta``.

    Example:
        >>> model = BetaVAE(latent_dim=4, hidden_dim=8)
        >>> model.decoder(torch.zeros(3, 4)).shape
        torch.Size([3, 64])

    References:
        I. Higgins et al., *beta-VAE: Learning Basic Visual Concepts with a Constrained Variational Framework*, ICLR 2017.
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
    """

    def __init__(
        self,
        data_dim: int = 64,
        latent_dim: int = 16,
        hidden_dim: int = 256,
        beta: float = 1.0,
        learning_rate: float = 2e-3,
    ) -> None:
        super().__init__()
        for name, value in (("data_dim", data_dim), ("latent_dim", latent_dim), ("hidden_dim", hidden_dim)):
            check_positive_int(value, name)
        check_non_negative_float(beta, "beta")
        check_positive_float(learning_rate, "learning_rate")
        self.save_hyperparameters()
        self.latent_dim = latent_dim
        self.beta = float(beta)
        self.encoder = nn.Sequential(*_mlp([data_dim, hidden_dim, hidden_dim, 2 * latent_dim]))
        self.decoder = nn.Sequential(*_mlp([latent_dim, hidden_dim, hidden_dim, data_dim]), nn.Sigmoid())

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance, each ``(N, latent_dim)``."""
        mean, log_var = self.encoder(x).chunk(2, dim=-1)
        return mean, log_var

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction (pixel means) of ``x`` through the posterior mean, ``(N, data_dim)``."""
        return self.decoder(self.encode(x)[0])

    def kl_per_dim(self, x: Tensor) -> Tensor:
        r"""Average KL divergence of each latent's posterior from the prior, ``(latent_dim,)`` nats.

        .. math:: \mathrm{KL}_i = \tfrac12\,\mathbb{E}_x[\mu_i^2 + \sigma_i^2 - 1 - \log\sigma_i^2]

        The classic "active units" criterion: a latent the encoder ignores has :math:`\mathrm{KL}_i \approx 0`.
        """
        mean, log_var = self.encode(x)
        return 0.5 * (mean.square() + log_var.exp() - 1.0 - log_var).mean(0)

    def losses(self, x: Tensor) -> dict[str, Tensor]:
        """Negative ELBO terms (per image, averaged over the batch): ``loss``, ``reconstruction``, ``kl``."""
        mean, log_var = self.encode(x)
        z = mean + (0.5 * log_var).exp() * torch.randn_like(mean)
        logits = self.decoder[:-1](z)
        reconstruction = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]
        kl = 0.5 * (mean.square() + log_var.exp() - 1.0 - log_var).sum(-1).mean()
        return {"loss": reconstruction + self.beta * kl, "reconstruction": reconstruction, "kl": kl}

    def training_step(self, batch: Tensor | tuple, batch_idx: int) -> Tensor:
        losses = self.losses(_first(batch))
        self.log("train/loss", losses["loss"], prog_bar=True)
        self.log("train/reconstruction", losses["reconstruction"])
        self.log("train/kl", losses["kl"], prog_bar=True)
        return losses["loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["learning_rate"])


@contextmanager
def _numpy_seed(seed: int) -> Iterator[None]:
    """Seed numpy's global RNG inside the block and restore its state afterwards (FrEIA draws permutations from it)."""
    state = np.random.get_state()  # noqa: NPY002 (FrEIA's AllInOneBlock draws from the legacy global RNG)
    np.random.seed(seed)  # noqa: NPY002
    try:
        yield
    finally:
        np.random.set_state(state)  # noqa: NPY002


class CouplingFlow(LightningModule):
    r"""A FrEIA coupling flow trained by maximum likelihood, with optional alignment/disentanglement losses.

    .. math::
        \mathcal{L} = \tfrac1D\,\mathbb{E}_x\big[\tfrac12\|f(x)\|^2 - \log|\det J_f(x)|\big]
        + \lambda_{\mathrm{TC}}\,\mathrm{MTC}(g) + \lambda_{\mathrm{rec}}\,\mathbb{E}_x\|x - g(m \odot f(x))\|^2

    with encoder :math:`f`, decoder :math:`g = f^{-1}` (the property :attr:`decoder`), the manifold total
    correlation of :math:`g` at the encoded batch (differentiable: its Jacobian is built with
    ``create_graph=True``), and a mask :math:`m` keeping only the first ``core_dims`` latents.

    Args:
        dim: data and latent dimension ``D = d``.
        num_blocks: number of coupling blocks.
        hidden_dim: width of the coupling subnetworks.
        block: ``"allinone"`` (FrEIA ``AllInOneBlock``: affine coupling, global affine, permutation) or
            ``"glow"`` (``GLOWCouplingBlock`` followed by ``PermuteRandom``).
        learning_rate: Adam learning rate.
        total_correlation_weight: :math:`\lambda_{\mathrm{TC}}`, weight of the manifold total correlation penalty.
        reconstruction_weight: :math:`\lambda_{\mathrm{rec}}`, weight of the reconstruction from the first
            ``core_dims`` latents alone.
        core_dims: latents kept by the reconstruction loss.
        penalty_samples: encoded samples of each batch at which the total correlation penalty is evaluated.
        seed: seed of the blocks' fixed random permutations (numpy's global RNG is restored afterwards).

    Raises:
        ValueError: for an unknown ``block`` or out-of-range sizes and weights.

    Example:
        >>> flow = CouplingFlow(dim=2, num_blocks=2, hidden_dim=8)
        >>> z = torch.randn(5, 2)
        >>> x = flow.decoder(z)
        >>> torch.allclose(flow.encode(x), z, atol=1e-5)
        True

    References:
        L. Ardizzone et al., *Framework for Easily Invertible Architectures (FrEIA)*, 2018-2022.
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
    """

    def __init__(
        self,
        dim: int = 2,
        num_blocks: int = 8,
        hidden_dim: int = 64,
        block: Literal["allinone", "glow"] = "allinone",
        learning_rate: float = 1e-3,
        total_correlation_weight: float = 0.0,
        reconstruction_weight: float = 0.0,
        core_dims: int = 1,
        penalty_samples: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        import FrEIA.framework as Ff
        import FrEIA.modules as Fm

        for name, value in (("dim", dim), ("num_blocks", num_blocks), ("hidden_dim", hidden_dim), ("penalty_samples", penalty_samples)):
            check_positive_int(value, name)
        check_non_negative_float(total_correlation_weight, "total_correlation_weight")
        check_non_negative_float(reconstruction_weight, "reconstruction_weight")
        if block not in ("allinone", "glow"):
            raise ValueError(f"Expected `block` to be 'allinone' or 'glow', but got {block!r}.")
        if dim < 2:
            raise ValueError(f"Expected `dim` >= 2 (a coupling block splits the dimensions), but got {dim}.")
        if isinstance(core_dims, bool) or not isinstance(core_dims, int) or not 1 <= core_dims <= dim:
            raise ValueError(f"Expected `core_dims` to be an int in [1, {dim}], but got {core_dims!r}.")
        self.save_hyperparameters()
        self.latent_dim = dim

        def subnet(channels_in: int, channels_out: int) -> nn.Module:
            net = nn.Sequential(*_mlp([channels_in, hidden_dim, hidden_dim, channels_out]))
            last = cast(nn.Linear, net[-1])  # (`_mlp` ends with a linear layer)
            nn.init.zeros_(last.weight)  # every block starts as the identity
            nn.init.zeros_(last.bias)
            return net

        self.inn = Ff.SequenceINN(dim)
        with _numpy_seed(seed):
            for k in range(num_blocks):
                if block == "glow":
                    self.inn.append(Fm.GLOWCouplingBlock, subnet_constructor=subnet)
                    self.inn.append(Fm.PermuteRandom, seed=seed + k)
                else:
                    self.inn.append(Fm.AllInOneBlock, subnet_constructor=subnet, permute_soft=False)

    @property
    def decoder(self) -> nn.Module:
        """The generative direction ``z -> x`` (the flow's reverse pass), via :func:`lightning_mem.as_decoder`."""
        return as_decoder(self.inn)

    def encode(self, x: Tensor) -> Tensor:
        """Latent code ``z = f(x)``, ``(N, dim)``."""
        return self.inn(x)[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.encode(x)

    def losses(self, x: Tensor) -> dict[str, Tensor]:
        """Training loss and its terms: ``nll`` (nats per dim, without the constant), ``total_correlation``, ``reconstruction``."""
        z, log_det = self.inn(x)
        nll = (0.5 * z.square().sum(-1) - log_det).mean() / self.latent_dim
        loss = nll
        out = {"nll": nll}
        hparams = self.hparams
        if hparams["total_correlation_weight"] > 0:
            points = z[: hparams["penalty_samples"]].detach()
            jacobian = decoder_jacobian(self.decoder, points, create_graph=True)
            total_correlation = manifold_total_correlation(jacobian).to(loss.dtype)
            loss = loss + hparams["total_correlation_weight"] * total_correlation
            out["total_correlation"] = total_correlation
        if hparams["reconstruction_weight"] > 0:
            mask = torch.zeros(self.latent_dim, dtype=z.dtype, device=z.device)
            mask[: hparams["core_dims"]] = 1.0
            reconstruction = (self.decoder(z * mask) - x).square().sum(-1).mean()
            loss = loss + hparams["reconstruction_weight"] * reconstruction
            out["reconstruction"] = reconstruction
        out["loss"] = loss
        return out

    def training_step(self, batch: Tensor | tuple, batch_idx: int) -> Tensor:
        losses = self.losses(_first(batch))
        self.log("train/loss", losses["loss"], prog_bar=True)
        for name in ("nll", "total_correlation", "reconstruction"):
            if name in losses:
                self.log(f"train/{name}", losses[name])
        return losses["loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["learning_rate"])
