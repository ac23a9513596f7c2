"""A decoder with known active and switched-off latents, and a 2-process DDP fit of it (gloo, CPU) with the callback.

Imported by tests/test_active_subspace.py for the models; run as a script for the DDP fit:
``MASTER_PORT=<free port> python tests/_active_ddp.py OUT_DIR [KEEP_BYTES]``. Lightning's "ddp" strategy re-runs this
script for rank 1. Every rank saves what its callback computed, rank 0 also the decoder weights at each evaluation.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

LATENT_DIM, HIDDEN_DIM, DATA_DIM = 6, 16, 10
INACTIVE = (1, 3, 4)
"""Latents whose decoder columns are scaled by :data:`SWITCHED_OFF`: a plateau about 7 nats below the others."""
ACTIVE = tuple(i for i in range(LATENT_DIM) if i not in INACTIVE)
SWITCHED_OFF = 1e-3
NUM_SAMPLES, SEED = 37, 5  # 37: the ranks get unequal shards (19 and 18 latents)


class PlateauDecoder(nn.Module):
    r""":math:`x = W_2 \tanh(W_1 (s \odot z) + b_1) + b_2`, with :math:`s_i` = :data:`SWITCHED_OFF` for the
    :data:`INACTIVE` latents and 1 for the others: their columns are that much shorter, and stay so in training (the
    gradient of their weights is scaled alike)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.first, self.second = nn.Linear(LATENT_DIM, HIDDEN_DIM), nn.Linear(HIDDEN_DIM, DATA_DIM)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[-1] ** 0.5)
        scale = torch.ones(LATENT_DIM)
        scale[list(INACTIVE)] = SWITCHED_OFF
        self.register_buffer("scale", scale)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(z * self.scale)))


class PlateauModule(LightningModule):
    """An autoencoder around :class:`PlateauDecoder` (plain SGD on the reconstruction)."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.latent_dim, self.lr = LATENT_DIM, lr
        self.encoder = nn.Linear(DATA_DIM, LATENT_DIM)
        self.decoder = PlateauDecoder()

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (self.decoder(self.encoder(x)) - x).square().sum(1).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class RecordWeights(Callback):
    """The decoder's weights at the start and after every optimizer step, by global step (placed after the callback)."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def _record(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.weights[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.decoder.state_dict().items()}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        self._record(trainer, pl_module)


def plateau_loader(num: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """Random data in R^10 (not shuffled)."""
    return DataLoader(TensorDataset(torch.randn(num, DATA_DIM, generator=torch.Generator().manual_seed(seed))), batch_size=batch_size)


def decoder_at(weights: dict[str, torch.Tensor]) -> PlateauDecoder:
    """A float64 :class:`PlateauDecoder` with the given weights, in eval mode."""
    decoder = PlateauDecoder().double()
    decoder.load_state_dict({name: value.double() for name, value in weights.items()})
    return decoder.eval()


def main(out: Path, keep_bytes: int | None) -> None:
    from lightning_mem import ManifoldEntropicMetricsCallback

    warnings.filterwarnings("ignore")
    if keep_bytes is not None:
        import lightning_mem.tracking

        lightning_mem.tracking.MAX_KEPT_JACOBIAN_BYTES = keep_bytes
    seed_everything(0, verbose=False)
    callback = ManifoldEntropicMetricsCallback(
        num_samples=NUM_SAMPLES,
        seed=SEED,
        every_n_train_steps=2,
        every_n_epochs=None,
        chunk_size=8,
        reference_decoder=decoder_at(PlateauDecoder().state_dict()),
        log_figures=False,
    )
    recorder = RecordWeights()
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        precision="64-true",
        max_steps=4,
        logger=False,
        callbacks=[callback, recorder],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(PlateauModule(), plateau_loader())
    torch.save(
        {"world_size": trainer.world_size, "last_metrics": callback.last_metrics, "weights": recorder.weights},
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None)
