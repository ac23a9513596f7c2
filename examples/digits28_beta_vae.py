"""beta-VAEs on 28x28 digits (the PyTorch examples' VAE): active latents from the entropy spectrum against the KL count.

The 1797 handwritten 8x8 digits of scikit-learn are upsampled to 28x28 (784 pixels, as MNIST and EMNIST) with
``torch.nn.functional.interpolate``. The model is laid out like the VAE of the PyTorch examples
(``pytorch/examples/vae``): a 784-400-(2 x 20) encoder and a 20-400-784 decoder with ReLU hidden layers, a sigmoid
output and a Bernoulli likelihood, ``d = 20`` latents, trained with the beta-VAE loss for each beta.

For each beta the script counts the active latents three ways and prints them side by side:

- the KL count: latents whose posterior KL from the prior, averaged over the data, exceeds 0.1 nats (the encoder's
  view, independent of the decoder Jacobian);
- the manifold count: :func:`lightning_mem.functional.active.active_latents` on the entropy spectrum (the latents
  above the plateau of switched-off ones), with the data's spread as the reference for a fully collapsed decoder;
- the old absolute threshold: geometric-mean column norm above 0.01, which counts the collapsed latents too (their
  784-pixel columns stay longer than 0.01).

It also reports the gap between active and inactive latents and the manifold total correlation of the active
latents alone (the Jacobian restricted to the active columns).

Run ``python examples/digits28_beta_vae.py`` (7 runs of 4000 steps, about 10 minutes on 2 CPU cores) or ``--fast``
(2 runs of 1500 steps, the test suite's size).
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
from torch import Tensor, nn

from lightning_mem import decoder_jacobian
from lightning_mem.demo import fit, intra_op_threads
from lightning_mem.demo.datasets import DIGITS_SHAPE, load_digits, tensor_dataloader
from lightning_mem.demo.models import BetaVAE
from lightning_mem.functional import STANDARD_NORMAL_ENTROPY, manifold_entropy, manifold_total_correlation, num_active_latents
from lightning_mem.functional.active import active_latents

IMAGE_SIZE = 28
LATENT_DIM = 20
HIDDEN_DIM = 400
LEARNING_RATE = 3e-3
"""Adam learning rate (the PyTorch example uses 1e-3 for 10 MNIST epochs; 3e-3 lets switched-off latents settle sooner)."""

BATCH_SIZE = 128
FULL_BETAS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
FULL_STEPS = 4000
FAST_BETAS = (2.0, 8.0)
FAST_STEPS = 1500
KL_ACTIVE_THRESHOLD = 0.1
"""A latent is an "active unit" when its average posterior KL from the prior exceeds this (nats)."""

OLD_ACTIVE_THRESHOLD = 0.01
"""The package's former default: a latent is active when its geometric-mean decoder column is longer than this."""

PAPER_EMNIST = {0.01: "~100", 1.0: "~25", 10.0: "~6", 20.0: "~2", 30.0: "0"}
"""Active latents of the paper's EMNIST beta-VAEs (28x28 pixels, 784 Bernoulli outputs), by beta."""


def upsampled_digits(size: int = IMAGE_SIZE) -> Tensor:
    """The 8x8 digits bilinearly upsampled to ``size x size`` and flattened: ``(1797, size**2)`` in ``[0, 1]``."""
    images, _ = load_digits()
    grid = images.view(-1, 1, *DIGITS_SHAPE)
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0).flatten(1)


def data_scale(images: Tensor) -> float:
    r"""The data's spread :math:`\sqrt{\mathbb{E}\|x - \mathbb{E}x\|^2}` (root total variance), in pixel units."""
    return float(images.flatten(1).double().var(0).sum().sqrt())


class ExamplesVAE(BetaVAE):
    r"""The PyTorch examples' VAE as a beta-VAE: 784-400-(2 x 20) encoder, 20-400-784 decoder, ReLU, sigmoid output.

    Inherits the loss (Bernoulli reconstruction + :math:`\beta` KL), :meth:`kl_per_dim` and the training step of
    :class:`lightning_mem.demo.models.BetaVAE`; only the networks differ (one hidden layer each, ReLU).

    Example:
        >>> model = ExamplesVAE(beta=4.0)
        >>> model.decoder(torch.zeros(2, 20)).shape, model.encode(torch.zeros(2, 784))[0].shape
        (torch.Size([2, 784]), torch.Size([2, 20]))
    """

    def __init__(
        self,
        data_dim: int = IMAGE_SIZE * IMAGE_SIZE,
        latent_dim: int = LATENT_DIM,
        hidden_dim: int = HIDDEN_DIM,
        beta: float = 1.0,
        learning_rate: float = LEARNING_RATE,
    ) -> None:
        super().__init__(data_dim=data_dim, latent_dim=latent_dim, hidden_dim=hidden_dim, beta=beta, learning_rate=learning_rate)
        self.encoder = nn.Sequential(nn.Linear(data_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, data_dim), nn.Sigmoid())


def train_vae(images: Tensor, beta: float, *, steps: int, learning_rate: float, seed: int, progress_bar: bool = False) -> ExamplesVAE:
    """Train one beta-VAE with Lightning (seeded: initialisation, data order, sampling); returned in eval mode."""
    seed_everything(seed, verbose=False)
    model = ExamplesVAE(data_dim=images.shape[1], beta=beta, learning_rate=learning_rate)
    fit(model, tensor_dataloader(images, batch_size=BATCH_SIZE, seed=seed), steps=steps, progress_bar=progress_bar)
    return model.eval()


def evaluate_run(model: BetaVAE, images: Tensor, *, num_samples: int, seed: int) -> dict[str, object]:
    """The three active counts, the gap, the total correlation of the active latents, and the fit on all digits."""
    z = torch.randn(num_samples, model.latent_dim, generator=torch.Generator().manual_seed(seed))
    jacobian = decoder_jacobian(model.decoder, z, chunk_size=256)
    latent_entropy, entropy = manifold_entropy(jacobian)
    active = active_latents(latent_entropy, data_scale=data_scale(images))
    num_active = int(active.num_active)
    with torch.no_grad():
        kl_per_dim = model.kl_per_dim(images)
        reconstruction = F.binary_cross_entropy(model(images), images, reduction="sum") / images.shape[0]
    spectrum = latent_entropy.sort(descending=True).values
    return {
        "beta": model.beta,
        "num_active_kl": int((kl_per_dim > KL_ACTIVE_THRESHOLD).sum()),
        "num_active": num_active,
        "num_active_old_threshold": int(num_active_latents(latent_entropy, threshold=OLD_ACTIVE_THRESHOLD)),
        "active_gap": float(active.gap) if 0 < num_active < model.latent_dim else None,
        "active_level": float(active.level) if 0 < num_active < model.latent_dim else None,
        "total_correlation_active": float(manifold_total_correlation(jacobian[..., active.mask])) if num_active > 1 else 0.0,
        "total_correlation": float(manifold_total_correlation(jacobian)),
        "entropy": float(entropy),
        "spectrum": spectrum.tolist(),
        "latent_entropy": latent_entropy.tolist(),
        "active": active.mask.tolist(),
        "kl_per_dim": kl_per_dim.tolist(),
        "reconstruction": float(reconstruction),
        "kl": float(kl_per_dim.sum()),
    }


def table(runs: Sequence[dict[str, object]]) -> str:
    """The sweep as a plain-text table, one row per beta."""
    columns = ("KL count", "manifold", "old 0.01", "gap", "MTC act.", "MTC all", "top H_i", "rec", "KL")
    widths = (8, 8, 8, 5, 8, 8, 7, 7, 6)
    lines = [f"{'beta':>5} " + " ".join(f"{name:>{width}}" for name, width in zip(columns, widths, strict=True))]
    for run in runs:
        gap = "-" if run["active_gap"] is None else f"{run['active_gap']:.2f}"
        lines.append(
            f"{run['beta']:>5g} {run['num_active_kl']:>8d} {run['num_active']:>8d} {run['num_active_old_threshold']:>8d} {gap:>5} "
            f"{run['total_correlation_active']:>8.2f} {run['total_correlation']:>8.2f} {run['spectrum'][0]:>7.2f} "
            f"{run['reconstruction']:>7.1f} {run['kl']:>6.2f}"
        )
    return "\n".join(lines)


def save_sweep_figure(runs: Sequence[dict[str, object]], path: Path, *, title: str) -> Path:
    """Left: each beta's entropy spectrum, active latents filled, its level dotted. Right: the counts against beta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from lightning_mem.plotting import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 3.8), dpi=100, layout="constrained")
    cmap = plt.get_cmap("viridis")
    log_betas = [math.log2(run["beta"]) for run in runs]
    low, high = min(log_betas), max(log_betas)
    for run, log_beta in zip(runs, log_betas, strict=True):
        color = cmap(0.5 if high == low else (log_beta - low) / (high - low))
        spectrum = torch.tensor(run["spectrum"])
        ranks = torch.arange(1, spectrum.numel() + 1)
        num_active = run["num_active"]
        left.plot(ranks, spectrum, color=color, linewidth=1.2, label=f"beta={run['beta']:g}: {num_active} active")
        left.plot(ranks[:num_active], spectrum[:num_active], "o", color=color, markersize=4)
        left.plot(ranks[num_active:], spectrum[num_active:], "o", color=color, markersize=4, markerfacecolor="none")
        if run["active_level"] is not None:
            left.plot([num_active, num_active + 1], [run["active_level"]] * 2, ":", color=color, linewidth=2.0)
    left.set_xlabel("latent (sorted by entropy)")
    left.set_ylabel("$H_i$ (nats)")
    left.set_title("entropy spectra (filled: active)", fontsize=9)
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.legend(fontsize=7)
    betas = [run["beta"] for run in runs]
    right.plot(betas, [run["num_active_kl"] for run in runs], "s-", label="KL count (KL > 0.1 nats)", markersize=7, color="0.6")
    right.plot(betas, [run["num_active"] for run in runs], "o--", label="manifold count (plateau rule)", color="C3")
    right.plot(betas, [run["num_active_old_threshold"] for run in runs], "^:", label=f"column norm > {OLD_ACTIVE_THRESHOLD}", color="C0")
    right.set_xscale("log", base=2)
    right.set_xlabel("beta")
    right.set_ylabel("active latents")
    right.set_ylim(-0.5, max(run["num_active_old_threshold"] for run in runs) + 1.5)
    right.yaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_title("active latents against beta", fontsize=9)
    right.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help=f"betas {FAST_BETAS}, {FAST_STEPS} steps each (the test suite's size)")
    parser.add_argument("--betas", type=float, nargs="+", default=None, help=f"betas to sweep (default {FULL_BETAS})")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps per beta (default {FULL_STEPS})")
    parser.add_argument("--learning-rate", type=float, default=None, help=f"Adam learning rate (default {LEARNING_RATE})")
    parser.add_argument("--num-samples", type=int, default=512, help="prior samples for the metrics (default 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for digits28_beta_vae.png and digits28_beta_vae.json")
    parser.add_argument("--progress-bar", action="store_true", help="show Lightning's progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Run the sweep; return ``{"runs": [...], "betas": [...], "num_active": [...], "num_active_kl": [...], ...}``."""
    args = _parser().parse_args(argv)
    betas = tuple(args.betas) if args.betas else (FAST_BETAS if args.fast else FULL_BETAS)
    steps = args.steps or (FAST_STEPS if args.fast else FULL_STEPS)
    learning_rate = args.learning_rate or LEARNING_RATE
    start = time.perf_counter()
    images = upsampled_digits()
    runs = []
    with intra_op_threads(1):
        for beta in sorted(betas):
            model = train_vae(images, beta, steps=steps, learning_rate=learning_rate, seed=args.seed, progress_bar=args.progress_bar)
            runs.append(evaluate_run(model, images, num_samples=args.num_samples, seed=args.seed))
    title = f"beta-VAEs on 28x28 digits: {LATENT_DIM} latents, {steps} steps"
    print(f"{title} (learning rate {learning_rate}); data spread {data_scale(images):.2f}; h0 = {STANDARD_NORMAL_ENTROPY:.4f}")
    print(table(runs))
    figure = None
    if args.out is not None:
        figure = save_sweep_figure(runs, Path(args.out) / "digits28_beta_vae.png", title=title)
        print(f"figure: {figure}")
    results = {
        "betas": [run["beta"] for run in runs],
        "num_active": [run["num_active"] for run in runs],
        "num_active_kl": [run["num_active_kl"] for run in runs],
        "num_active_old_threshold": [run["num_active_old_threshold"] for run in runs],
        "runs": runs,
        "steps": steps,
        "learning_rate": learning_rate,
        "data_scale": data_scale(images),
        "paper_emnist": {str(beta): count for beta, count in PAPER_EMNIST.items()},
        "figure": None if figure is None else str(figure),
        "wall_time_s": time.perf_counter() - start,
    }
    if args.out is not None:
        (Path(args.out) / "digits28_beta_vae.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
