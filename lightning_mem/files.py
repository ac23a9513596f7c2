"""Files written whole or not at all: a temporary file beside the target, renamed over it when complete."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write"]

_TEMPORARY_SUFFIX = ".partial"
"""Suffix of the temporary files: never a final file's extension, so ``glob("*.png")`` never finds a half-written one."""


def _create_temporary(folder: Path, prefix: str) -> tuple[int, Path]:
    """A new file ``folder/<prefix><random>.partial``, opened for writing, with the permissions ``open`` would give it
    (mode 0666 less the umask; ``tempfile.mkstemp`` would make it 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temporary = folder / f"{prefix}{secrets.token_hex(6)}{_TEMPORARY_SUFFIX}"
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on a clean exit rename it over ``path``, else delete it.

    A process killed at any moment leaves the old file or the new one, never half of one: ``os.replace`` is atomic
    on POSIX and Windows. The file gets the permissions a plain ``open`` would give it.
    A kill can leave the temporary file (``.<name>.<random>.partial``); the next write to the same ``path`` removes
    such leftovers (so two processes must not write the same file at once). Parent folders are created. There is no
    ``fsync``: a power loss is not covered.

    Args:
        path: the file to write.
        mode: ``"w"`` (text) or ``"wb"`` (bytes).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     with atomic_write(Path(folder) / "report.json") as file:
        ...         _ = file.write("{}")
        ...     sorted(p.name for p in Path(folder).iterdir())
        ['report.json']
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"Expected `mode` to be 'w' or 'wb', but got {mode!r}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    for leftover in path.parent.glob(f"{glob.escape(prefix)}*{_TEMPORARY_SUFFIX}"):  # a killed earlier write's temporary file
        leftover.unlink(missing_ok=True)
    descriptor, temporary = _create_temporary(path.parent, prefix)
    try:
        with os.fdopen(descriptor, mode) as file:
            yield file
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
