"""``python -m lightning_mem``: the command line of :mod:`lightning_mem.cli`."""

import sys

from lightning_mem.cli import main

if __name__ == "__main__":
    sys.exit(main())
