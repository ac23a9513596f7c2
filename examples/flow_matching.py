r"""Flow matching on two moons and on the paper's torus: entropy spectrum, total correlation and alignment of an ODE decoder.

A flow-matching model (Lipman et al. 2023) is a velocity field ``v(t, x)``, an MLP here, trained with the
conditional flow-matching loss on straight paths from noise ``x0 ~ N(0, I)`` to data ``x1``:

    x_t = (1 - t) x0 + t x1,   loss = || v(t, x_t) - (x1 - x0) ||^2,   t ~ U[0, 1].

Its decoder is the ODE ``dx/dt = v(t, x)`` from ``x(0) = z`` to ``x(1)``: :class:`lightning_mem.ode.ODEDecoder`
(dopri5), whose Jacobian integrates the tangent ODE. Its encoder solves the ODE backwards. With those:

- two moons (2-D): the entropies of the two latents, their mutual information, the total entropy ``H`` and the
  data's negative log-likelihood (from the encoder and the Jacobian's log-determinant), as in
  ``examples/two_moons_flow.py``;
- the rotated torus of ``examples/torus_alignment.py`` (known generator, orthogonal columns, known spectrum): the
  learned spectrum against the truth, the total correlation, and the MCPMI alignment with the true generator at
  corresponding points (a true latent gives ``x``; the flow encodes ``x``; both decoders are differentiated there).

Next to the truth stands what flow matching does to a Gaussian with the data's covariance :math:`\Sigma`
(:func:`gaussian_prediction`): on straight paths every intermediate covariance :math:`(1-t)^2 I + t^2\Sigma` shares
the eigenvectors of :math:`\Sigma`, so the decoder is its symmetric square root :math:`x = \Sigma^{1/2} z`, with
:math:`H_i = h_0 + \tfrac12\log\Sigma_{ii}` (the data's per-coordinate spread) and a total correlation
:math:`\tfrac12(\sum_i\log\Sigma_{ii} - \log\det\Sigma)`. The trained model follows that prediction, not the
generator: its latents are the data axes.

Run ``python examples/flow_matching.py`` (the 20-D torus; about 4 minutes on 2 CPU cores) or ``--fast`` (a 6-D
torus, the test suite's size). ``--compare torus_alignment.json`` (written by ``examples/torus_alignment.py --out``)
adds the GLOW flows' spectra to the figure and their rows to the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_mem import decoder_jacobian
from lightning_mem.demo import intra_op_threads
from lightning_mem.demo.datasets import TorusGenerator, make_two_moons
from lightning_mem.functional import (
    STANDARD_NORMAL_ENTROPY,
    alignment_summary,
    entropy_spectrum,
    manifold_cross_mutual_information,
    manifold_entropy,
    manifold_pairwise_mutual_information,
    manifold_total_correlation,
)
from lightning_mem.ode import ODEDecoder

NOISE = 0.1
"""Noise of the two moons (as in ``examples/two_moons_flow.py``)."""

SOLVER = {"method": "dopri5", "rtol": 1e-6, "atol": 1e-6}
"""The ODE decoder's solver for evaluation (float64)."""

FULL = {
    "moons": {"steps": 8000, "num_points": 4000, "hidden_dim": 128},
    "torus": {"num_circles": 10, "steps": 8000, "num_points": 16384, "hidden_dim": 256},
    "num_samples": 1024,
}
FAST = {
    "moons": {"steps": 800, "num_points": 2000, "hidden_dim": 64},
    "torus": {"num_circles": 3, "steps": 1500, "num_points": 8192, "hidden_dim": 128},
    "num_samples": 256,
}


CHUNK_SIZE = 512
"""Samples whose tangent ODE is integrated at once (memory ``CHUNK_SIZE * d * d``)."""


def ode_jacobian(decoder: ODEDecoder, z: Tensor) -> Tensor:
    """The ODE decoder's Jacobians at ``z`` by its tangent ODE, ``CHUNK_SIZE`` samples at a time."""
    return torch.cat([decoder.decoder_jacobian(chunk) for chunk in z.split(CHUNK_SIZE)])


class Velocity(nn.Module):
    """``v(t, x)``: an MLP on ``(x, t, sin 2 pi t, cos 2 pi t)`` with SiLU activations."""

    def __init__(self, dim: int, hidden_dim: int, num_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(dim + 3, hidden_dim), nn.SiLU()]
        for _ in range(num_layers - 1):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden_dim, dim))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        features = torch.cat([x, t, torch.sin(2 * math.pi * t), torch.cos(2 * math.pi * t)], dim=1)
        return self.net(features)


def train_flow_matching(points: Tensor, *, hidden_dim: int, steps: int, seed: int, batch_size: int = 256) -> Velocity:
    """Train a velocity field with the conditional flow-matching loss (straight paths, float32, Adam + cosine decay)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the initial weights
    data = points.float()
    velocity = Velocity(data.shape[1], hidden_dim)
    optimizer = torch.optim.Adam(velocity.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        x1 = data[torch.randint(0, data.shape[0], (batch_size,), generator=generator)]
        x0 = torch.randn(x1.shape, generator=generator)
        t = torch.rand(batch_size, 1, generator=generator)
        x_t = (1 - t) * x0 + t * x1
        loss = (velocity(t, x_t) - (x1 - x0)).square().sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return velocity.double().eval()


def negative_log_likelihood(z: Tensor, jacobian: Tensor) -> float:
    """``E_x[-log p(x)]`` in nats per point, from the encoded points ``z = f(x)`` and the decoder Jacobians there:
    ``-log N(z) + log |det J_g(z)|``."""
    _, log_det = torch.linalg.slogdet(jacobian)
    log_prior = -0.5 * z.square().sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)
    return float((-log_prior + log_det).mean())


def gaussian_prediction(points: Tensor) -> dict[str, object]:
    r"""What flow matching gives on a Gaussian with the data's covariance :math:`\Sigma`: the decoder
    :math:`x = \Sigma^{1/2} z` (symmetric square root: on straight paths every intermediate covariance
    :math:`(1-t)^2 I + t^2 \Sigma` shares :math:`\Sigma`'s eigenvectors), so :math:`G = \Sigma`,
    :math:`H_i = h_0 + \tfrac12 \log \Sigma_{ii}` and :math:`\mathrm{MTC} = \tfrac12 (\sum_i \log \Sigma_{ii} - \log\det \Sigma)`.
    """
    covariance = torch.cov(points.double().T)
    latent_entropy = STANDARD_NORMAL_ENTROPY + 0.5 * covariance.diagonal().log()
    entropy = points.shape[1] * STANDARD_NORMAL_ENTROPY + 0.5 * torch.logdet(covariance)
    return {
        "latent_entropy": latent_entropy.tolist(),
        "spectrum": latent_entropy.sort(descending=True).values.tolist(),
        "entropy": float(entropy),
        "total_correlation": float(latent_entropy.sum() - entropy),
    }


def analyse_moons(decoder: ODEDecoder, points: Tensor, *, num_samples: int, seed: int) -> dict[str, object]:
    """Entropies of both latents, their mutual information, ``H``, MTC and the data's NLL."""
    z = torch.randn(num_samples, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    jacobian = ode_jacobian(decoder, z)
    latent_entropy, entropy = manifold_entropy(jacobian)
    spectrum, order = entropy_spectrum(latent_entropy)
    with torch.no_grad():
        subset = torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(seed))[:num_samples]
        encoded = decoder.encode(points[subset].double())
    with torch.no_grad():
        grid = torch.linspace(-2.0, 2.0, 81, dtype=torch.float64)
        lines = {
            f"z{i} varies": [
                decoder(torch.stack([grid, torch.full_like(grid, level)], 1).roll(i, dims=1)).tolist() for level in (-1.0, 0.0, 1.0)
            ]
            for i in range(2)
        }
        samples = decoder(torch.randn(1000, 2, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64))
    return {
        "latent_entropy": latent_entropy.tolist(),
        "H_core": float(spectrum[0]),
        "H_detail": float(spectrum[1]),
        "core_latent": int(order[0]),
        "MI": float(manifold_pairwise_mutual_information(jacobian)[0, 1]),
        "H": float(entropy),
        "MTC": float(manifold_total_correlation(jacobian)),
        "NLL": negative_log_likelihood(encoded, ode_jacobian(decoder, encoded)),
        "samples": samples.tolist(),
        "latent_lines": lines,
    }


def analyse_torus(
    decoder: ODEDecoder, torus: TorusGenerator, z_true: Tensor, offset: Tensor, *, num_samples: int, seed: int
) -> dict[str, object]:
    """Metrics at prior samples, and the alignment with the true generator at corresponding points."""
    d = torus.latent_dim
    z = torch.randn(num_samples, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    jacobian = ode_jacobian(decoder, z)
    latent_entropy, entropy = manifold_entropy(jacobian)
    pairwise = manifold_pairwise_mutual_information(jacobian)

    x = torus(z_true) - offset
    with torch.no_grad():
        z_model = decoder.encode(x)  # the flow's latents of the true generator's points
    model_jacobian = ode_jacobian(decoder, z_model)
    true_jacobian = decoder_jacobian(torus, z_true)
    cross = manifold_cross_mutual_information(model_jacobian, true_jacobian)
    summary = alignment_summary(cross)

    truth = torus.entropy_per_dim()
    spectrum = latent_entropy.sort(descending=True).values
    error = spectrum - truth.sort(descending=True).values
    return {
        "latent_entropy": latent_entropy.tolist(),
        "spectrum": spectrum.tolist(),
        "entropy": float(entropy),
        "entropy_error": float(entropy - truth.sum()),
        "total_correlation": float(manifold_total_correlation(jacobian)),
        "pairwise_mutual_information_max": float(pairwise.max()),
        "informational_correlation": summary["informational_correlation"].tolist(),
        "best_match": summary["best_match"].tolist(),
        "alignment": float(summary["alignment"]),
        "num_true_latents_matched": int(summary["num_matched"]),
        "spectrum_error_mean": float(error.abs().mean()),
        "spectrum_error_max": float(error.abs().max()),
        "NLL": negative_log_likelihood(z_model, model_jacobian),
    }


def save_figure(moons: dict, points: Tensor, torus: dict, truth: Tensor, gaussian: dict, glow: dict[str, dict], path: Path) -> Path:
    """Two moons with the images of the latent axes; torus spectra against the truth; the flow's MCPMI with the truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.9), dpi=90, layout="constrained")
    ax = axes[0]
    ax.scatter(*points[:1500].T.tolist(), s=2, c="0.75", label="data")
    samples = torch.tensor(moons["samples"])
    ax.scatter(*samples.T.tolist(), s=2, c="C2", alpha=0.5, label="flow matching samples")
    core = moons["core_latent"]
    for i, color in ((0, "C0"), (1, "C3")):
        for k, line in enumerate(moons["latent_lines"][f"z{i} varies"]):
            role = "core" if i == core else "detail"
            ax.plot(
                *torch.tensor(line).T.tolist(),
                color=color,
                lw=1.2,
                label=f"z{i} varies ({role}, H={moons['latent_entropy'][i]:.2f})" if k == 0 else None,
            )
    ax.set_title(f"two moons: MI = {moons['MI']:.2f} nats, H = {moons['H']:.2f}", fontsize=9)
    ax.legend(fontsize=6, loc="lower left")
    ax.set_aspect("equal")

    ax = axes[1]
    ranks = torch.arange(1, truth.numel() + 1)
    ax.plot(ranks, truth.sort(descending=True).values, "k--", label="ground truth")
    ax.plot(
        ranks, gaussian["spectrum"], ":", color="k", lw=2, zorder=3, label=f"Gaussian prediction (MTC {gaussian['total_correlation']:.1f})"
    )
    ax.plot(ranks, torus["spectrum"], marker="o", markersize=3, label=f"flow matching (MTC {torus['total_correlation']:.1f})")
    for name, row in glow.items():
        ax.plot(ranks, row["spectrum"], marker=".", markersize=3, lw=0.8, label=f"{name} (MTC {row['total_correlation']:.1f})")
    ax.set_xlabel("rank")
    ax.set_ylabel("$H_i$ (nats)")
    ax.set_title(f"rotated {truth.numel()}-D torus: entropy spectrum", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)

    ax = axes[2]
    model_order = torch.tensor(torus["latent_entropy"]).argsort(descending=True)
    matrix = torch.tensor(torus["informational_correlation"])[model_order][:, truth.argsort(descending=True)]
    image = ax.imshow(matrix.numpy(), vmin=0.0, vmax=1.0, cmap="magma")
    ax.set_title(f"flow matching vs truth: MCPMI as correlation\n(alignment {torus['alignment']:.2f})", fontsize=8)
    ax.set_xlabel("true latent (by entropy)")
    ax.set_ylabel("learned latent (by entropy)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=ax, shrink=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as handle:
        fig.savefig(handle, format="png")
    os.replace(handle.name, path)
    plt.close(fig)
    return path


def _torus_table(torus: dict, truth: Tensor, gaussian: dict, glow: dict[str, dict]) -> str:
    d = truth.numel()
    header = f"{'model':<22} {'H':>8} {'H err':>6} {'NLL':>8} {'MTC':>6} {'MPMI max':>8} {'spec err':>8} {'alignment':>9} {'matched':>7}"
    blank = f"{'':>8}"
    lines = [
        header,
        f"{'ground truth':<22} {float(truth.sum()):>8.3f} {0.0:>6.2f} {blank} {0.0:>6.2f} {0.0:>8.2f} {0.0:>8.2f} {1.0:>9.2f} {d:>4d}/{d}",
        f"{'Gaussian prediction':<22} {gaussian['entropy']:>8.3f} {gaussian['entropy'] - float(truth.sum()):>6.2f} {blank} "
        f"{gaussian['total_correlation']:>6.2f}",
    ]
    rows = {"flow matching": torus, **glow}
    for name, row in rows.items():
        nll = f"{row['NLL']:>8.3f}" if "NLL" in row else blank
        lines.append(
            f"{name:<22} {row['entropy']:>8.3f} {row['entropy_error']:>6.2f} {nll} {row['total_correlation']:>6.2f} "
            f"{row['pairwise_mutual_information_max']:>8.2f} {row['spectrum_error_mean']:>8.2f} {row['alignment']:>9.2f} "
            f"{row['num_true_latents_matched']:>4d}/{d}"
        )
    lines.append("spectra (sorted, nats):")
    lines.append(f"  {'ground truth':<22} " + " ".join(f"{v:6.2f}" for v in truth.sort(descending=True).values.tolist()))
    for name, row in {"Gaussian prediction": gaussian, **rows}.items():
        lines.append(f"  {name:<22} " + " ".join(f"{v:6.2f}" for v in row["spectrum"]))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a 6-D torus (3 circles), fewer steps: the test suite's size")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default: 8000 each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for flow_matching.png and flow_matching.json")
    parser.add_argument("--compare", default=None, help="torus_alignment.json of examples/torus_alignment.py (same torus size)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Train both models and return ``{"moons": {...}, "torus": {...}, "ground_truth": {...}, "figure": ...}``."""
    args = _parser().parse_args(argv)
    size = FAST if args.fast else FULL
    start = time.perf_counter()
    num_samples = size["num_samples"]
    with intra_op_threads(1):
        # two moons
        moons_size = size["moons"]
        points, _ = make_two_moons(
            moons_size["num_points"], noise=NOISE, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64
        )
        velocity = train_flow_matching(points, hidden_dim=moons_size["hidden_dim"], steps=args.steps or moons_size["steps"], seed=args.seed)
        moons = analyse_moons(ODEDecoder(velocity, **SOLVER), points, num_samples=num_samples, seed=args.seed)

        # torus
        torus_size = size["torus"]
        torus = TorusGenerator(torus_size["num_circles"], seed=args.seed)
        _, torus_points = torus.sample(torus_size["num_points"], generator=torch.Generator().manual_seed(args.seed))
        offset = torus_points.mean(0)
        torus_points = torus_points - offset
        z_true, _ = torus.sample(num_samples, generator=torch.Generator().manual_seed(args.seed + 1))
        velocity = train_flow_matching(
            torus_points, hidden_dim=torus_size["hidden_dim"], steps=args.steps or torus_size["steps"], seed=args.seed
        )
        torus_result = analyse_torus(ODEDecoder(velocity, **SOLVER), torus, z_true, offset, num_samples=num_samples, seed=args.seed)

    truth = torus.entropy_per_dim()
    gaussian = gaussian_prediction(torus_points)
    glow: dict[str, dict] = {}
    if args.compare is not None:
        compared = json.loads(Path(args.compare).read_text())
        if len(compared["ground_truth"]["spectrum"]) != truth.numel():
            raise ValueError(
                f"Expected `--compare` results of a {truth.numel()}-D torus, but got {len(compared['ground_truth']['spectrum'])}-D."
            )
        glow = compared["models"]

    print(f"Two moons (noise {NOISE}), flow matching, ODE decoder ({SOLVER['method']}), nats")
    print(
        f"  H_core {moons['H_core']:.3f}  H_detail {moons['H_detail']:.3f}  MI {moons['MI']:.3f}  "
        f"H {moons['H']:.3f}  NLL {moons['NLL']:.3f}"
    )
    print(f"Rotated {truth.numel()}-D torus ({torus.num_circles} circles), flow matching vs ground truth (nats)")
    print(_torus_table(torus_result, truth, gaussian, glow))
    figure = None
    if args.out is not None:
        figure = save_figure(moons, points, torus_result, truth, gaussian, glow, Path(args.out) / "flow_matching.png")
        print(f"figure: {figure}")
    output = {
        "moons": {key: value for key, value in moons.items() if key not in ("samples", "latent_lines")},
        "torus": torus_result,
        "gaussian_prediction": gaussian,
        "ground_truth": {
            "latent_entropy": truth.tolist(),
            "spectrum": truth.sort(descending=True).values.tolist(),
            "entropy": float(truth.sum()),
            "h0": STANDARD_NORMAL_ENTROPY,
        },
        "num_circles": torus.num_circles,
        "figure": None if figure is None else str(figure),
        "wall_time_s": time.perf_counter() - start,
    }
    if args.out is not None:
        report = Path(args.out) / "flow_matching.json"
        with tempfile.NamedTemporaryFile("w", dir=report.parent, suffix=".json", delete=False) as handle:
            json.dump(output, handle, indent=2)
        os.replace(handle.name, report)
    return output


if __name__ == "__main__":
    main()
