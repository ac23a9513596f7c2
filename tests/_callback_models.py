"""Tiny LightningModules shared by the callback tests and the DDP script (synthetic data, CPU, seconds to train)."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DATA_DIM", "LATENT_DIM", "RecordDecoder", "TinyVAE", "ground_truth_decoder", "loader"]

DATA_DIM, LATENT_DIM = 6, 3


def loader(num: int = 64, batch_size: int = 8, seed: int = 0, repeat: bool = False) -> DataLoader:
    """Synthetic data: a fixed non-linear 2-d manifold in R^6 plus noise; not shuffled (reproducible batches).

    ``repeat=True`` makes every batch the same ``batch_size`` rows, so a run resumed mid-epoch (Lightning replays
    the epoch's first batches with a plain DataLoader) sees the same data as an uninterrupted one.
    """
    generator = torch.Generator().manual_seed(seed)
    t = torch.randn(batch_size if repeat else num, 2, generator=generator)
    x = torch.cat([t, torch.tanh(t), t.prod(1, keepdim=True), t[:, :1] ** 2], dim=1) + 0.05 * torch.randn(
        t.shape[0], DATA_DIM, generator=generator
    )
    if repeat:
        x = x.repeat(num // batch_size, 1)
    return DataLoader(TensorDataset(x), batch_size=batch_size)


def ground_truth_decoder(reference_dim: int = 2) -> nn.Module:
    """A fixed random generator R^reference_dim -> R^6 (a stand-in for a known ground truth)."""
    generator = torch.Generator().manual_seed(99)
    decoder = nn.Sequential(nn.Linear(reference_dim, 8), nn.Tanh(), nn.Linear(8, DATA_DIM))
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return decoder


class TinyVAE(LightningModule):
    """A VAE whose decoder has BatchNorm and Dropout (both behave differently in train and eval mode)."""

    def __init__(
        self, latent_dim: int = LATENT_DIM, lr: float = 0.05, batch_norm: bool = True, dropout: float = 0.2, sample: bool = True
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.lr = lr
        self.sample = sample
        self.encoder = nn.Sequential(nn.Linear(DATA_DIM, 16), nn.Tanh(), nn.Linear(16, 2 * latent_dim))
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 16),
            nn.BatchNorm1d(16) if batch_norm else nn.Identity(),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(16, DATA_DIM),
        )

    def training_step(self, batch, batch_idx):
        (x,) = batch
        mean, log_var = self.encoder(x).chunk(2, dim=1)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp() if self.sample else mean  # global RNG, on purpose
        reconstruction = (self.decoder(z) - x).square().sum(1).mean()
        kl = 0.5 * (mean.square() + log_var.exp() - 1 - log_var).sum(1).mean()
        return reconstruction + kl

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class RecordDecoder(Callback):
    """The decoder's weights (parameters and buffers) at the start and after every optimizer step, by global step;
    placed after the callback under test, to re-evaluate those weights in one process."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def _record(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.weights[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.decoder.state_dict().items()}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        self._record(trainer, pl_module)
