"""Atomic writes: the permissions of a plain ``open``, no leftovers, the old file kept when writing fails."""

from __future__ import annotations

import os
import stat

import pytest

from lightning_mem.files import atomic_write


def test_a_written_file_has_the_permissions_open_gives_it(tmp_path):
    with open(tmp_path / "plain.txt", "w") as file:
        file.write("x")
    with atomic_write(tmp_path / "atomic.txt") as file:
        file.write("x")
    mode = stat.S_IMODE(os.stat(tmp_path / "atomic.txt").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_write(target) as file:
        file.write("half of the new")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["report.json"]


def test_a_killed_writes_leftover_is_removed_by_the_next_write_and_never_looks_like_the_file(tmp_path):
    leftover = tmp_path / ".spectrum.png.0123456789ab.partial"  # what SIGKILL during a write leaves
    leftover.write_bytes(b"\x89PNG truncated")
    other = tmp_path / ".other.png.0123456789ab.partial"
    other.write_bytes(b"")
    assert list(tmp_path.glob("*.png")) == []
    with atomic_write(tmp_path / "spectrum.png", "wb") as file:
        file.write(b"new")
    assert sorted(path.name for path in tmp_path.iterdir()) == [".other.png.0123456789ab.partial", "spectrum.png"]


def test_a_bad_mode_is_a_named_error(tmp_path):
    with pytest.raises(ValueError, match=r"`mode` to be 'w' or 'wb', but got 'a'"), atomic_write(tmp_path / "x", "a"):
        pass
