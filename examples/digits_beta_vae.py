"""beta-VAEs on scikit-learn's 8x8 digits: the number of active latents falls as beta grows.

Reproduces the beta-VAE finding of Galperin & Köthe (AISTATS 2025, EMNIST): the entropy spectrum splits into
active latents (high manifold entropy) and switched-off ones (a plateau far below), and the number of active
latents is non-increasing in beta. Each run's active count from the manifold entropy (by default
:func:`lightning_mem.functional.active_latents`: the latents above the plateau, with the data's spread to tell a
fully collapsed decoder; ``--threshold`` for the absolute rule) is checked against the classic, independent "active
units" count from the encoder's KL divergence per latent.

Run ``python examples/digits_beta_vae.py`` (about 3 minutes on 2 CPU cores) or ``--fast`` (the test suite's size).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import seed_everything

from lightning_mem.demo import fit, intra_op_threads
from lightning_mem.demo.datasets import load_digits, tensor_dataloader
from lightning_mem.demo.models import BetaVAE
from lightning_mem.evaluate import decoder_metrics
from lightning_mem.functional import active_latents
from lightning_mem.plotting import save_spectrum_figure

FULL_BETAS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 8.0)
FAST_BETAS = (0.5, 1.0, 2.0, 8.0)
FULL_STEPS = 4000
FAST_STEPS = 1000
KL_ACTIVE_THRESHOLD = 0.01
"""A latent is an "active unit" when its average posterior KL from the prior exceeds this (nats)."""

PAPER_EMNIST = {0.01: "~100", 1.0: "~25", 10.0: "~6", 20.0: "~2", 30.0: "0"}
"""Active latents of the paper's EMNIST beta-VAEs (28x28 pixels, 784 Bernoulli outputs), by beta."""


def train_beta_vae(beta: float, *, steps: int, latent_dim: int, seed: int, progress_bar: bool) -> BetaVAE:
    """Train one beta-VAE on the digits with Lightning (seeded: data order, initialisation, sampling)."""
    seed_everything(seed, verbose=False)
    images, _ = load_digits()
    model = BetaVAE(latent_dim=latent_dim, beta=beta)
    fit(model, tensor_dataloader(images, batch_size=128, seed=seed), steps=steps, progress_bar=progress_bar)
    return model.eval()


def data_scale(images: torch.Tensor) -> float:
    r"""The data's spread :math:`\sqrt{\mathbb{E}\|x - \mathbb{E}x\|^2}` (root total variance), in pixel units."""
    return float(images.flatten(1).double().var(0).sum().sqrt())


def evaluate_run(model: BetaVAE, *, num_samples: int, seed: int, threshold: float | None = None) -> dict[str, object]:
    """Manifold entropic metrics at prior samples, the KL-based active count, and the reconstruction error (BCE at the
    posterior mean) and KL on all digits."""
    z = torch.randn(num_samples, model.latent_dim, generator=torch.Generator().manual_seed(seed))
    metrics = decoder_metrics(model.decoder, z, chunk_size=256, active_threshold=threshold)
    images, _ = load_digits()
    with torch.no_grad():
        kl_per_dim = model.kl_per_dim(images)
        reconstruction = F.binary_cross_entropy(model(images), images, reduction="sum") / images.shape[0]
    spectrum = metrics["spectrum"]
    # the data's spread tells a fully collapsed decoder (no latent active) from one whose latents are all alike
    active = active_latents(metrics["latent_entropy"], threshold=threshold, data_scale=data_scale(images))
    num_active = int(active.num_active)
    return {
        "beta": model.beta,
        "num_active": num_active,
        "num_active_kl": int((kl_per_dim > KL_ACTIVE_THRESHOLD).sum()),
        "entropy": float(metrics["entropy"]),
        "total_correlation": float(metrics["total_correlation"]),
        # (the metrics' own mask, without the data's spread, counts a collapsed decoder's latents as all active)
        "total_correlation_active": float(metrics["active/total_correlation"]) if num_active > 1 else 0.0,
        "active_level": float(active.level),
        "spectrum": spectrum.tolist(),
        "latent_entropy": metrics["latent_entropy"].tolist(),
        "kl_per_dim": kl_per_dim.tolist(),
        "active_gap": float(active.gap) if 0 < num_active < spectrum.numel() else None,
        "reconstruction": float(reconstruction),
        "kl": float(kl_per_dim.sum()),
    }


def _table(runs: list[dict[str, object]]) -> str:
    header = f"{'beta':>6} {'active (MEM)':>12} {'active (KL)':>11} {'H':>9} {'MTC':>7} {'MTC act':>7} {'gap':>6} {'top H_i':>8}"
    lines = [f"{header} {'rec':>7} {'KL':>6}"]
    for run in runs:
        gap = "-" if run["active_gap"] is None else f"{run['active_gap']:.2f}"
        lines.append(
            f"{run['beta']:>6.2f} {run['num_active']:>12d} {run['num_active_kl']:>11d} {run['entropy']:>9.2f} "
            f"{run['total_correlation']:>7.2f} {run['total_correlation_active']:>7.2f} {gap:>6} {run['spectrum'][0]:>8.2f} "
            f"{run['reconstruction']:>7.2f} {run['kl']:>6.2f}"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help=f"betas {FAST_BETAS}, {FAST_STEPS} steps each (the test suite's size)")
    parser.add_argument("--betas", type=float, nargs="+", default=None, help=f"betas to sweep (default {FULL_BETAS})")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps per beta (default {FULL_STEPS})")
    parser.add_argument("--latent-dim", type=int, default=16, help="latents per VAE (default 16)")
    parser.add_argument("--num-samples", type=int, default=1024, help="prior samples for the metrics (default 1024)")
    parser.add_argument(
        "--threshold", type=float, default=None, help="absolute active-latent column-norm threshold (default: the spectrum's plateau)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for spectra.png and results.json")
    parser.add_argument("--progress-bar", action="store_true", help="show Lightning's progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Run the sweep; return ``{"runs": [...], "betas": [...], "num_active": [...], "figure": path | None, ...}``."""
    args = _parser().parse_args(argv)
    betas = tuple(args.betas) if args.betas else (FAST_BETAS if args.fast else FULL_BETAS)
    steps = args.steps or (FAST_STEPS if args.fast else FULL_STEPS)
    start = time.perf_counter()
    runs = []
    with intra_op_threads(1):
        for beta in sorted(betas):
            model = train_beta_vae(beta, steps=steps, latent_dim=args.latent_dim, seed=args.seed, progress_bar=args.progress_bar)
            runs.append(evaluate_run(model, num_samples=args.num_samples, seed=args.seed, threshold=args.threshold))
    rule = "above the spectrum's plateau" if args.threshold is None else f"column norm > {args.threshold}"
    print(f"beta-VAEs on 8x8 digits, {steps} steps, {args.latent_dim} latents, active = {rule}")
    print(_table(runs))
    figure = None
    if args.out is not None:
        out = Path(args.out)
        figure = save_spectrum_figure(
            {f"beta={run['beta']:g}": torch.tensor(run["latent_entropy"]) for run in runs},
            out / "digits_beta_vae_spectra.png",
            title="beta-VAE entropy spectra on 8x8 digits",
            threshold=None if args.threshold is None else runs[0]["active_level"],
            color_values=[math.log10(run["beta"]) for run in runs],
            color_label="log10 beta",
        )
        print(f"figure: {figure}")
    results = {
        "betas": [run["beta"] for run in runs],
        "num_active": [run["num_active"] for run in runs],
        "num_active_kl": [run["num_active_kl"] for run in runs],
        "runs": runs,
        "steps": steps,
        "threshold": args.threshold,
        "paper_emnist": PAPER_EMNIST,
        "figure": None if figure is None else str(figure),
        "wall_time_s": time.perf_counter() - start,
    }
    if args.out is not None:
        (Path(args.out) / "digits_beta_vae.json").write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
