"""GLOW flows on the paper's rotated torus: compare the learned latents with a known ground-truth generator.

The data are ``k`` circles in ``R^{2k}`` under a random rotation (:class:`lightning_mem.demo.datasets.TorusGenerator`):
``d = D = 2k`` standard-normal latents with known scales ``sigma_i`` and orthogonal decoder columns, so the
ground truth has entropy spectrum ``h0 + log sigma_i`` (plus ``E[log r_k]`` for the angles), zero total
correlation and zero pairwise mutual information.

Two GLOW flows (FrEIA ``GLOWCouplingBlock`` + ``PermuteRandom``, float64) are trained on the same samples:
maximum likelihood (ML) only, and ML plus the differentiable manifold total-correlation penalty. For each we
compare the learned entropy spectrum with the ground truth, the MPMI matrix with the ground truth's zero matrix,
and the MCPMI matrix between learned and true latents at *corresponding points*: a true latent ``z_true`` gives
``x = g(z_true)``, the flow encodes ``x`` to ``z_model``, and both decoders are differentiated there, at the same
``x``. One dominant entry per row of the informational correlation ``sqrt(1 - exp(-2 MCPMI))`` means alignment.

Run ``python examples/torus_alignment.py`` (the paper's 20-D torus, about 8 minutes on 2 CPU cores) or
``--fast`` (a 6-D torus, the test suite's size).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch import seed_everything

from lightning_mem import decoder_jacobian
from lightning_mem.demo import fit, intra_op_threads
from lightning_mem.demo.datasets import TorusGenerator, tensor_dataloader
from lightning_mem.demo.models import CouplingFlow
from lightning_mem.functional import (
    manifold_cross_mutual_information,
    manifold_entropy,
    manifold_pairwise_mutual_information,
    manifold_total_correlation,
)

TOTAL_CORRELATION_WEIGHT = 0.1
PENALTY_SAMPLES = 16
VARIANTS = {
    "GLOW (ML)": {},
    "GLOW (ML + TC)": {"total_correlation_weight": TOTAL_CORRELATION_WEIGHT, "penalty_samples": PENALTY_SAMPLES},
}
FULL = {"num_circles": 10, "steps": 3000, "num_blocks": 8, "hidden_dim": 128, "num_points": 16384}
FAST = {"num_circles": 3, "steps": 700, "num_blocks": 6, "hidden_dim": 64, "num_points": 8192}


def train_glow(variant: str, points: torch.Tensor, size: dict, *, steps: int, seed: int, progress_bar: bool) -> CouplingFlow:
    """Train one GLOW flow (float64) on the centred torus points with the losses of ``variant``."""
    seed_everything(seed, verbose=False)
    model = CouplingFlow(
        dim=points.shape[1],
        num_blocks=size["num_blocks"],
        hidden_dim=size["hidden_dim"],
        block="glow",
        learning_rate=2e-3,
        seed=seed,
        **VARIANTS[variant],
    )
    fit(model, tensor_dataloader(points, batch_size=256, seed=seed), steps=steps, progress_bar=progress_bar, precision="64-true")
    return model.eval()


def informational_correlation(mutual_information: torch.Tensor) -> torch.Tensor:
    """``sqrt(1 - exp(-2 I))``: mutual information of a Gaussian pair mapped back to a correlation in ``[0, 1]``."""
    return (1.0 - torch.exp(-2.0 * mutual_information)).clamp_min(0.0).sqrt()


def analyse(
    model: CouplingFlow, torus: TorusGenerator, z_true: torch.Tensor, offset: torch.Tensor, *, num_samples: int, seed: int
) -> dict[str, object]:
    """Metrics at prior samples, and the MCPMI alignment with the ground truth at corresponding points."""
    d = torus.latent_dim
    z = torch.randn(num_samples, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    jacobian = decoder_jacobian(model.decoder, z, chunk_size=256)
    latent_entropy, entropy = manifold_entropy(jacobian)
    pairwise = manifold_pairwise_mutual_information(jacobian)

    with torch.no_grad():
        z_model = model.encode(torus(z_true) - offset)  # the flow's latents of the same data points
    model_jacobian = decoder_jacobian(model.decoder, z_model, chunk_size=256)
    true_jacobian = decoder_jacobian(torus, z_true)
    cross = manifold_cross_mutual_information(model_jacobian, true_jacobian)
    correlation = informational_correlation(cross)
    best_score, best_match = correlation.max(dim=1)

    truth = torus.entropy_per_dim()
    spectrum = latent_entropy.sort(descending=True).values
    true_spectrum = truth.sort(descending=True).values
    error = spectrum - true_spectrum
    return {
        "latent_entropy": latent_entropy.tolist(),
        "spectrum": spectrum.tolist(),
        "entropy": float(entropy),
        "total_correlation": float(manifold_total_correlation(jacobian)),
        "pairwise_mutual_information_max": float(pairwise.max()),
        "pairwise_mutual_information": pairwise.tolist(),
        "cross_mutual_information": cross.tolist(),
        "informational_correlation": correlation.tolist(),
        "best_match": best_match.tolist(),
        "best_match_score": best_score.tolist(),
        "alignment": float(best_score.mean()),
        "num_true_latents_matched": int(best_match.unique().numel()),
        "spectrum_error_mean": float(error.abs().mean()),
        "spectrum_error_max": float(error.abs().max()),
        "entropy_error": float(entropy - truth.sum()),
    }


def save_figure(results: dict[str, dict], truth: torch.Tensor, path: Path) -> Path:
    """Spectra against the ground truth, and each model's informational-correlation matrix with the true latents."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 1 + len(results), figsize=(4.2 * (1 + len(results)), 3.6), dpi=90, layout="constrained")
    ranks = torch.arange(1, truth.numel() + 1)
    axes[0].plot(ranks, truth.sort(descending=True).values, "k--", label="ground truth")
    for name, row in results.items():
        axes[0].plot(ranks, row["spectrum"], marker="o", markersize=3, label=name)
    axes[0].set_xlabel("rank")
    axes[0].set_ylabel("$H_i$ (nats)")
    axes[0].set_title("entropy spectrum", fontsize=9)
    axes[0].legend(fontsize=7)
    true_order = truth.argsort(descending=True)
    for ax, (name, row) in zip(axes[1:], results.items(), strict=True):
        model_order = torch.tensor(row["latent_entropy"]).argsort(descending=True)
        matrix = torch.tensor(row["informational_correlation"])[model_order][:, true_order]
        image = ax.imshow(matrix.numpy(), vmin=0.0, vmax=1.0, cmap="magma")
        ax.set_title(f"{name}: MCPMI as correlation\n(alignment {row['alignment']:.2f})", fontsize=8)
        ax.set_xlabel("true latent (by entropy)")
        ax.set_ylabel("learned latent (by entropy)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=axes[1:].tolist(), shrink=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _table(results: dict[str, dict], truth: torch.Tensor) -> str:
    lines = [f"{'model':<16} {'H':>8} {'H err':>6} {'MTC':>6} {'MPMI max':>8} {'spec err':>8} {'alignment':>9} {'matched':>7}"]
    d = truth.numel()
    lines.append(f"{'ground truth':<16} {float(truth.sum()):>8.3f} {0.0:>6.2f} {0.0:>6.2f} {0.0:>8.2f} {0.0:>8.2f} {1.0:>9.2f} {d:>4d}/{d}")
    for name, row in results.items():
        lines.append(
            f"{name:<16} {row['entropy']:>8.3f} {row['entropy_error']:>6.2f} {row['total_correlation']:>6.2f} "
            f"{row['pairwise_mutual_information_max']:>8.2f} {row['spectrum_error_mean']:>8.2f} {row['alignment']:>9.2f} "
            f"{row['num_true_latents_matched']:>4d}/{d}"
        )
    lines.append("spectra (sorted, nats):")
    lines.append(f"  {'ground truth':<16} " + " ".join(f"{v:6.2f}" for v in truth.sort(descending=True).values.tolist()))
    for name, row in results.items():
        lines.append(f"  {name:<16} " + " ".join(f"{v:6.2f}" for v in row["spectrum"]))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a 6-D torus (3 circles), fewer steps: the test suite's size")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps per flow (default {FULL['steps']})")
    parser.add_argument("--num-samples", type=int, default=1024, help="prior samples and corresponding points (default 1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for torus_alignment.png and torus_alignment.json")
    parser.add_argument("--progress-bar", action="store_true", help="show Lightning's progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Train both flows and return ``{"models": {name: {...}}, "ground_truth": {...}, "figure": ..., ...}``."""
    args = _parser().parse_args(argv)
    size = FAST if args.fast else FULL
    steps = args.steps or size["steps"]
    start = time.perf_counter()
    torus = TorusGenerator(size["num_circles"], seed=args.seed)
    _, points = torus.sample(size["num_points"], generator=torch.Generator().manual_seed(args.seed))
    offset = points.mean(0)
    points = points - offset
    z_true, _ = torus.sample(args.num_samples, generator=torch.Generator().manual_seed(args.seed + 1))
    results = {}
    with intra_op_threads(1):
        for variant in VARIANTS:
            model = train_glow(variant, points, size, steps=steps, seed=args.seed, progress_bar=args.progress_bar)
            results[variant] = analyse(model, torus, z_true, offset, num_samples=args.num_samples, seed=args.seed)
    truth = torus.entropy_per_dim()
    print(f"Rotated {torus.latent_dim}-D torus ({torus.num_circles} circles), GLOW flows, {steps} steps each (nats)")
    print(_table(results, truth))
    figure = None
    if args.out is not None:
        figure = save_figure(results, truth, Path(args.out) / "torus_alignment.png")
        print(f"figure: {figure}")
    output = {
        "models": results,
        "ground_truth": {
            "latent_entropy": truth.tolist(),
            "spectrum": truth.sort(descending=True).values.tolist(),
            "entropy": float(truth.sum()),
            "paper_spectrum": torus.entropy_per_dim(exact=False).sort(descending=True).values.tolist(),
            "sigma": torus.sigma.tolist(),
        },
        "num_circles": torus.num_circles,
        "steps": steps,
        "figure": None if figure is None else str(figure),
        "wall_time_s": time.perf_counter() - start,
    }
    if args.out is not None:
        (Path(args.out) / "torus_alignment.json").write_text(json.dumps(output, indent=2))
    return output


if __name__ == "__main__":
    main()
