"""A 2-process DDP fit (gloo, CPU) with the callback; run by tests/test_callback.py in its own subprocess.

Usage: ``MASTER_PORT=<free port> python tests/_callback_ddp.py OUT_DIR``. Lightning's "ddp" strategy re-runs this
script for rank 1. Every rank saves what its callback computed, rank 0 also the decoder weights at each evaluation.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _callback_models import RecordDecoder, TinyVAE, ground_truth_decoder, loader

from lightning_mem import ManifoldEntropicMetricsCallback

NUM_SAMPLES, REFERENCE_DIM, SEED = 37, 2, 5  # 37: the ranks get unequal shards (19 and 18 latents)


def main(out: Path) -> None:
    warnings.filterwarnings("ignore")
    seed_everything(0, verbose=False)
    reference_latents = torch.randn(NUM_SAMPLES, REFERENCE_DIM, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    callback = ManifoldEntropicMetricsCallback(
        num_samples=NUM_SAMPLES,
        seed=SEED,
        num_evaluations=2,  # the default schedule: steps 2 and 4 of the 4, from rank zero's estimated_stepping_batches
        chunk_size=8,
        reference_decoder=ground_truth_decoder(REFERENCE_DIM).double(),
        reference_latents=reference_latents,
        log_figures=False,
    )
    recorder = RecordDecoder()
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        precision="64-true",
        max_steps=4,
        logger=TensorBoardLogger(str(out), name="tb", version=0),
        callbacks=[callback, recorder],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(TinyVAE(), loader())
    torch.save(
        {
            "world_size": trainer.world_size,
            "last_metrics": callback.last_metrics,
            "history": callback.history,
            "weights": recorder.weights,
            "reference_latents": reference_latents,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
