"""Command line: ``python -m lightning_mem demo`` and ``python -m lightning_mem evaluate`` (also ``lightning-mem ...``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]

_PROG = "lightning-mem"


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
    from lightning_mem._checks import JACOBIAN_MODES
    from lightning_mem.demo import MODELS
    from lightning_mem.functional import DEFAULT_ACTIVE_THRESHOLD

    parser = argparse.ArgumentParser(
        prog=_PROG, description="Manifold entropic metrics of generative models (Galperin & Köthe, AISTATS 2025)."
    )
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
    demo.add_argument("--no-progress-bar", action="store_true", help="hide Lightning's progress bar")

    evaluate = commands.add_parser(
        "evaluate",
        help="compute every metric of a LightningModule checkpoint and write a JSON report and figures",
        description="Load a LightningModule checkpoint, compute its manifold entropic metrics at prior samples, and write "
        "report.json, spectrum.png and pairwise_mutual_information.png.",
    )
    evaluate.add_argument("--module-class", required=True, help="import path of the LightningModule class, e.g. mypkg.models:VAE")
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint file (.ckpt)")
    evaluate.add_argument("--out", default=None, help="output folder (default: <checkpoint stem>_mem next to the checkpoint)")
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
        default=DEFAULT_ACTIVE_THRESHOLD,
        help=f"a latent is active when exp(H_i - h0), its geometric-mean column norm, exceeds this (default {DEFAULT_ACTIVE_THRESHOLD})",
    )
    evaluate.add_argument("--double", action="store_true", help="evaluate the decoder in float64")
    evaluate.add_argument("--no-progress-bar", action="store_true", help="hide the progress bar")
    return parser


def _demo(args: argparse.Namespace) -> int:
    from lightning_mem.demo import run_demo
    from lightning_mem.evaluate import format_metrics

    result = run_demo(steps=args.steps, out=args.out, seed=args.seed, model=args.model, progress_bar=not args.no_progress_bar)
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
    print(
        f"Evaluate it again:  {_PROG} evaluate --module-class {result['module_class']} --checkpoint {result['checkpoint']} "
        f"--active-threshold {result['active_threshold']}"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from lightning_mem.evaluate import evaluate_checkpoint, format_metrics

    if os.getcwd() not in sys.path:  # `--module-class ae_mod:AE` imports from the working directory, as `python -m` would
        sys.path.insert(0, os.getcwd())
    try:
        report = evaluate_checkpoint(
            args.checkpoint,
            args.module_class,
            out_dir=args.out,
            num_samples=args.num_samples,
            seed=args.seed,
            decoder=args.decoder,
            latent_dim=args.latent_dim,
            latent_shape=args.latent_shape,
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
    print(format_metrics(report, title=f"Manifold entropic metrics of {report['checkpoint']} ({report['num_samples']} prior samples):"))
    print()
    for name, path in report["files"].items():
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
