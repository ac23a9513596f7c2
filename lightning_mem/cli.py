"""Command line: ``python -m lightning_mem demo`` and ``python -m lightning_mem evaluate`` (also ``lightning-mem ...``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

_PROG = "lightning-mem"

_DEMO_PACKAGES = {"sklearn": "scikit-learn", "FrEIA": "FrEIA"}
"""The import names of the demo's optional packages (the ``demo`` extra) and the names pip knows them by."""

_EVALUATE_DESCRIPTION = """\
Load a LightningModule checkpoint, compute its manifold entropic metrics at prior samples, and write report.json,
spectrum.png and pairwise_mutual_information.png into --out (default: <checkpoint stem>_mem next to the checkpoint).

--checkpoint may also be a folder of checkpoints (*.ckpt: a run's checkpoints/ folder, or the run folder above it):
every checkpoint is evaluated at the same prior samples (--num-samples, --seed), in the order of the global_step
stored in it (not of its name), with its report and figures in OUT/<checkpoint stem>/; then OUT (default: <folder
name>_mem next to the folder) gets the metric-vs-step curves:
  curves.csv   a row per checkpoint: step, epoch, checkpoint, entropy, entropy_per_dim, total_correlation,
               total_correlation_per_dim, num_active, pairwise_mutual_information_max,
               pairwise_mutual_information_mean, active/total_correlation,
               active/pairwise_mutual_information_max, active/pairwise_mutual_information_mean (on the
               active latents only), spectrum_1 .. spectrum_d (the sorted H_i),
               latent_entropy_0 .. latent_entropy_<d-1> (H_i by latent)
  curves.png   entropy, total correlation, active latents and MPMI against the step
  spectra.png  the entropy spectra of all checkpoints, coloured by step
Every checkpoint file is read and the output folder checked before any Jacobian is computed; every file is
written atomically.

Progress goes to stderr: a bar on a terminal; in a log or pipe a line per tenth of the Jacobian chunks (one
checkpoint) or per checkpoint (a folder)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(size) for size in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, such as 100,1,1, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, such as 100,1,1, got {text!r}")
    return shape


def _output_key(text: str) -> str | int:
    """An integer selects from a tuple output, anything else is a mapping key."""
    try:
        return int(text)
    except ValueError:
        return text


def _parser() -> argparse.ArgumentParser:
    from lightning_mem import __version__
    from lightning_mem._checks import JACOBIAN_MODES
    from lightning_mem.demo import MODELS

    parser = argparse.ArgumentParser(
        prog=_PROG, description="Manifold entropic metrics of generative models (Galperin & Köthe, AISTATS 2025)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,evaluate}")

    demo = commands.add_parser(
        "demo",
        help="train a small model on embedded data with the metrics callback and write TensorBoard logs",
        description="Train a small model on embedded data (no download) with the metrics callback attached, write TensorBoard "
        "logs, and print its entropy spectrum summary.",
    )
    demo.add_argument("--steps", type=_positive_int, default=None, help="training steps (default: 3000 for vae, 2000 for flow)")
    demo.add_argument("--out", default="runs", help="root folder of the TensorBoard runs (default: runs)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--model", choices=MODELS, default="vae", help="vae: beta-VAE on 8x8 digits; flow: coupling flow on two moons")
    demo.add_argument(
        "--no-progress-bar",
        action="store_true",
        help="no training progress (by default Lightning's progress bar on a terminal, else a line per tenth of the steps)",
    )

    evaluate = commands.add_parser(
        "evaluate",
        help="compute every metric of a LightningModule checkpoint (or of a folder of them) and write reports and figures",
        description=_EVALUATE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("--module-class", required=True, help="import path of the LightningModule class, e.g. mypkg.models:VAE")
    evaluate.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint file (.ckpt), or a folder of them (see above)")
    evaluate.add_argument(
        "--out", default=None, help="output folder (default: <checkpoint stem>_mem, or <folder name>_mem, next to --checkpoint)"
    )
    evaluate.add_argument("--num-samples", type=_positive_int, default=1024, help="prior samples (default: 1024)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the latent samples (default: 0)")
    evaluate.add_argument(
        "--decoder",
        default=None,
        help="decoder attribute or method path, dotted paths allowed, e.g. model.decode (default: decoder, decode, generator, dec, "
        "model.decoder, model.decode, ..., then a FrEIA, zuko or normflows flow at flow, inn, model)",
    )
    evaluate.add_argument("--latent-dim", type=_positive_int, default=None, help="latent size (default: module.latent_dim and similar)")
    evaluate.add_argument(
        "--latent-shape", type=_shape, default=None, help="shape of one latent as the decoder takes it, e.g. 100,1,1 for a DCGAN generator"
    )
    evaluate.add_argument(
        "--image-shape",
        type=_shape,
        default=None,
        help="image shape H,W or H,W,C of a flattened output (e.g. 28,28): latent pictures",
    )
    evaluate.add_argument(
        "--output-key",
        type=_output_key,
        default=None,
        help="key of the decoder's mapping output to measure (e.g. reconstruction), or index of its tuple output (e.g. 0)",
    )
    evaluate.add_argument(
        "--num-classes",
        type=_positive_int,
        default=None,
        help="conditional decoder (z, labels) -> x: latent n gets label n %% K, metrics averaged over the K classes",
    )
    evaluate.add_argument("--mode", choices=JACOBIAN_MODES, default="auto", help="Jacobian mode (default: auto)")
    evaluate.add_argument("--chunk-size", type=_positive_int, default=64, help="samples differentiated at once (default: 64)")
    evaluate.add_argument(
        "--active-threshold",
        type=float,
        default=None,
        help="count a latent as active when exp(H_i - h0), its geometric-mean column norm in data units, exceeds this (e.g. 0.01); "
        "default: the latents above the plateau of switched-off latents at the bottom of the entropy spectrum",
    )
    evaluate.add_argument("--double", action="store_true", help="evaluate the decoder in float64")
    evaluate.add_argument("--no-progress-bar", action="store_true", help="no progress on stderr")
    return parser


def _demo(args: argparse.Namespace) -> int:
    from lightning_mem.demo import run_demo
    from lightning_mem.evaluate import format_metrics

    try:
        result = run_demo(steps=args.steps, out=args.out, seed=args.seed, model=args.model, progress_bar=not args.no_progress_bar)
    except ModuleNotFoundError as error:
        package = _DEMO_PACKAGES.get((error.name or "").partition(".")[0])
        if package is None:
            raise
        which = "the demo" if args.model == "vae" else f"the {args.model} demo"
        print(f'{_PROG} demo: error: {which} needs {package}: pip install "lightning_mem[demo]"', file=sys.stderr)
        return 2
    print()
    print(
        format_metrics(result["metrics"], title=f"Manifold entropic metrics of the demo {result['model']} after {result['steps']} steps:")
    )
    print()
    print(f"spectrum figure   {result['spectrum_png']}")
    print(f"MPMI figure       {result['mutual_information_png']}")
    print(f"TensorBoard logs  {result['log_dir']}")
    print(f"checkpoint        {result['checkpoint']}")
    print(f"wall time         {result['wall_time_s']:.1f} s (training {result['train_time_s']:.1f} s)")
    print()
    print("View the run:       " + result["tensorboard_command"])
    print(f"Evaluate it again:  {_PROG} evaluate --module-class {result['module_class']} --checkpoint {result['checkpoint']}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from lightning_mem.evaluate import evaluate_checkpoint, evaluate_checkpoints, format_curves, format_metrics

    if os.getcwd() not in sys.path:  # `--module-class ae_mod:AE` imports from the working directory, as `python -m` would
        sys.path.insert(0, os.getcwd())
    folder = Path(args.checkpoint).is_dir()
    try:
        result = (evaluate_checkpoints if folder else evaluate_checkpoint)(
            args.checkpoint,
            args.module_class,
            out_dir=args.out,
            num_samples=args.num_samples,
            seed=args.seed,
            decoder=args.decoder,
            latent_dim=args.latent_dim,
            latent_shape=args.latent_shape,
            image_shape=args.image_shape,
            output_key=args.output_key,
            num_classes=args.num_classes,
            mode=args.mode,
            chunk_size=args.chunk_size,
            double=args.double,
            active_threshold=args.active_threshold,
            progress=not args.no_progress_bar,
        )
    except (FileNotFoundError, ImportError, TypeError, ValueError, RuntimeError) as error:
        message = " ".join(str(error).split())  # one line
        print(f"{_PROG} evaluate: error: {message}", file=sys.stderr)
        return 2
    if folder:
        reports = result["checkpoints"]
        title = f"Manifold entropic metrics of {len(reports)} checkpoints in {result['folder']} ({args.num_samples} prior samples):"
        print(format_curves(reports, title=title))
        files = {**result["files"], "reports": str(Path(result["files"]["curves"]).parent / "<checkpoint stem>" / "report.json")}
    else:
        print(format_metrics(result, title=f"Manifold entropic metrics of {result['checkpoint']} ({result['num_samples']} prior samples):"))
        files = result["files"]
    print()
    for name, path in files.items():
        print(f"{name:<28} {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status (0 success, 2 usage or input error).

    Example:
        >>> main(["evaluate", "--module-class", "lightning_mem.demo.models:BetaVAE", "--checkpoint", "missing.ckpt"])
        2
    """
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    return _evaluate(args)
