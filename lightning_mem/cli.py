"""Command line: ``python -m lightning_mem demo`` (and ``lightning-mem demo``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-mem", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="train a small model on an embedded dataset and log its manifold entropic metrics")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        print("lightning-mem demo: not implemented yet (the demo lands with the callback).", file=sys.stderr)
        return 0
    return 2
