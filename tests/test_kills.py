"""``lightning-mem evaluate`` killed with SIGKILL at any moment: no truncated file, no stale report beside new figures.

A second process (the "zygote") imports the package once, then forks one child per run; each child runs the command
line, ``lightning_mem.cli.main(["evaluate", ...])``, unmodified, and this process kills it with SIGKILL after a delay.
Only two library calls are wrapped in the zygote, never the package: matplotlib's ``Figure.savefig`` renders as usual,
then writes the bytes to the file it was given in pieces, with a pause after each, so that the writing of the figures
spans much of a run; ``json.dumps`` pauses before the report's text. Each wrapper appends a time mark to a file, so
that the kills are placed at fractions of a full run's duration and also as soon as a mark appears (the narrow windows:
a figure begun or written but not yet renamed, the report about to be written), and each kill is attributed to a phase.

Each kill starts from a copy of a previous run's output (another seed); afterwards every file must be either the
previous run's or the new run's, byte for byte (the new run's bytes come from a run that was not killed), and a
``report.json`` must belong to the figures beside it (same run, and not older than any of them).
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FIGURES = ("spectrum.png", "pairwise_mutual_information.png")
REPORT = "report.json"
FINAL_NAMES = (*FIGURES, REPORT)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: length 0, type, CRC

PIECES = 8  # each figure is written in this many pieces ...
PAUSE_S = 0.02  # ... with this pause after each
FRACTIONS = tuple((2 * k + 1) / 16 for k in range(8))  # kill times, as fractions of a full run
TRIGGERS = ("begin 1", "end 1", "begin 2", "report")  # and kills as soon as the child marks these: the narrow windows
NUM_SAMPLES = 64
OLD_SEED, NEW_SEED = 1, 2

ZYGOTE = r"""
import io, json, os, sys, time, traceback

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

import lightning.pytorch as pl
import lightning_mem.evaluate  # noqa: F401  (the command line imports it lazily)
import torch
from lightning_mem.cli import main
from lightning_mem.demo.models import BetaVAE

PIECES, PAUSE_S = int(sys.argv[1]), float(sys.argv[2])
marks = None
figures = 0
savefig = Figure.savefig
dumps = json.dumps


def mark(text):
    os.write(marks, f"{time.monotonic():.6f} {text}\n".encode())


def slow_savefig(self, fname, *args, **kwargs):
    # render as matplotlib does, then write the bytes to the same target in pieces
    global figures
    figures += 1
    buffer = io.BytesIO()
    savefig(self, buffer, *args, **kwargs)
    data = buffer.getvalue()
    file = fname if hasattr(fname, "write") else open(fname, "wb")
    mark(f"begin {figures}")
    step = -(-len(data) // PIECES)
    for start in range(0, len(data), step):
        file.write(data[start : start + step])
        file.flush()
        time.sleep(PAUSE_S)
    if file is not fname:
        file.close()
    mark(f"end {figures}")


def slow_dumps(*args, **kwargs):
    # the report's text: a pause first, so that a kill can land between the last figure and report.json
    mark("report")
    time.sleep(10 * PAUSE_S)  # 0.2 s: wide enough for the triggered kill on a loaded machine
    return dumps(*args, **kwargs)


Figure.savefig = slow_savefig
json.dumps = slow_dumps
warm = plt.figure()
warm.text(0.5, 0.5, "warm-up $H_i$")
savefig(warm, io.BytesIO(), format="png")
plt.close(warm)
print("ready", flush=True)
for line in sys.stdin:
    command = json.loads(line)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            log = os.open(command["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(log, 1)
            os.dup2(log, 2)
            marks = os.open(command["marks"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            mark("start")
            if "checkpoint" in command:
                torch.manual_seed(0)
                trainer = pl.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                     enable_model_summary=False, accelerator="cpu")
                trainer.strategy.connect(BetaVAE(latent_dim=3, hidden_dim=8))
                trainer.save_checkpoint(command["checkpoint"])
                status = 0
            else:
                status = main(command["argv"])
            mark("done")
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    print(dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(dumps({"status": status}), flush=True)
os._exit(0)  # stdin closed: no interpreter teardown needed
"""


class Zygote:
    """The second process: imports once, forks a child per command, reports the child's pid, then its wait status."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.stderr = (folder / "zygote.log").open("wb")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, str(PIECES), str(PAUSE_S)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            cwd=folder,
            env=env,
        )
        self.buffer = b""
        assert self.read(timeout=120) == "ready", self.log()

    def log(self) -> str:
        return (self.folder / "zygote.log").read_text(errors="replace")[-3000:]

    def read(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.process.stdout], [], [], left)[0]:
                raise TimeoutError(f"no answer from the zygote within {timeout} s: {self.log()}")
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the zygote ended (exit status {self.process.wait()}): {self.log()}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    def start(self, name: str, **command: object) -> tuple[int, Path, Path]:
        """Fork a child for ``command``; its pid, its file of time marks and its log."""
        marks, log = self.folder / f"{name}.marks", self.folder / f"{name}.log"
        self.process.stdin.write((json.dumps({**command, "marks": str(marks), "log": str(log)}) + "\n").encode())
        self.process.stdin.flush()
        return json.loads(self.read(timeout=60))["pid"], marks, log

    def wait(self) -> int:
        """The wait status of the last child (the zygote reaps it)."""
        return json.loads(self.read(timeout=120))["status"]

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.stderr.close()


def evaluate_argv(checkpoint: Path, out: Path, seed: int) -> list[str]:
    return [
        "evaluate",
        "--module-class",
        "lightning_mem.demo.models:BetaVAE",
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        "--num-samples",
        str(NUM_SAMPLES),
        "--seed",
        str(seed),
        "--no-progress-bar",
    ]


def read_marks(path: Path) -> list[tuple[float, str]]:
    if not path.exists():
        return []
    return [(float(time), text) for time, _, text in (line.partition(" ") for line in path.read_text().splitlines())]


def check_png(path: Path) -> None:
    """A complete PNG: signature, IEND chunk at the end, and Pillow decodes every pixel."""
    from PIL import Image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), f"{path.name} does not start as a PNG ({len(data)} bytes)"
    assert data.endswith(PNG_END), f"{path.name} is truncated: {len(data)} bytes, no IEND chunk at the end"
    with Image.open(path) as image:
        image.load()


def report_identity(text: str) -> dict:
    """The report without what differs between two runs of the same settings (the wall time, the output paths)."""
    report = json.loads(text)
    report.pop("wall_time_s")
    report.pop("files")
    return report


def snapshot(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in FINAL_NAMES}


def check_consistent(folder: Path, old: dict[str, bytes], new: dict[str, bytes]) -> dict[str, str]:
    """Assert the output folder after a kill is one a reader can trust; return which run each final file is from."""
    leftovers = sorted(path.name for path in folder.iterdir() if path.name not in FINAL_NAMES)
    temporary = re.compile(r"^\.(spectrum\.png|pairwise_mutual_information\.png|report\.json)\.[0-9a-f]+\.partial$")
    for name in leftovers:  # a kill can leave the temporary file: hidden, never a final name nor a final extension
        assert temporary.match(name), f"unexpected file {name!r} in the output folder"
    origin = {}
    for name in FINAL_NAMES:
        path = folder / name
        if not path.exists():
            continue
        if name.endswith(".png"):
            check_png(path)
        else:
            json.loads(path.read_text())  # parses
        data = path.read_bytes()
        if data == old[name]:
            origin[name] = "old"
        elif name == REPORT and report_identity(data.decode()) == report_identity(new[name].decode()):
            origin[name] = "new"
        else:
            assert data == new[name], f"{name} is neither the previous run's nor the new run's ({len(data)} bytes)"
            origin[name] = "new"
    if REPORT in origin:
        figures = {name: origin.get(name, "missing") for name in FIGURES}
        assert set(figures.values()) == {origin[REPORT]}, f"the {origin[REPORT]} run's report.json beside figures {figures}"
        report_time = (folder / REPORT).stat().st_mtime_ns
        newer = [name for name in FIGURES if (folder / name).stat().st_mtime_ns > report_time]
        assert not newer, f"report.json is older than {newer}"
    return origin


def phase(marks: list[tuple[float, str]], origin: dict[str, str]) -> str:
    """Where a kill landed, from the child's marks and what it left."""
    texts = [text for _, text in marks]
    if "done" in texts:
        return "after the run"
    if texts and texts[-1] == "report":
        return "report"
    if not any(text.startswith(("begin", "end")) for text in texts):
        return "load, probe" if origin.get(REPORT) == "old" else "compute, plot"
    event, k = texts[-1].split()
    if event == "begin":
        return f"writing figure {k}"
    if origin.get(FIGURES[int(k) - 1]) == "old":
        return f"renaming figure {k}"
    return "between figures" if k == "1" else "after the figures"


def wait_for_mark(path: Path, text: str, timeout: float = 60.0) -> None:
    """Poll the child's marks until ``text`` appears."""
    deadline = time.monotonic() + timeout
    while not any(mark == text for _, mark in read_marks(path)):
        assert time.monotonic() < deadline, f"no mark {text!r} in {timeout} s"
        time.sleep(0.0005)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    process = Zygote(tmp_path_factory.mktemp("kills"))
    yield process
    process.close()


def run_to_completion(zygote: Zygote, name: str, **command: object) -> tuple[float, list[tuple[float, str]]]:
    start = time.monotonic()
    _, marks, log = zygote.start(name, **command)
    status = zygote.wait()
    assert os.waitstatus_to_exitcode(status) == 0, log.read_text()[-3000:]
    return time.monotonic() - start, read_marks(marks)


def test_a_kill_at_any_moment_leaves_whole_files_and_no_stale_report(zygote):
    folder = zygote.folder
    checkpoint = folder / "model.ckpt"
    run_to_completion(zygote, "checkpoint", checkpoint=str(checkpoint))

    # the previous run, then one complete new run over a copy of it: the two states a kill may leave, file by file
    previous = folder / "previous"
    run_to_completion(zygote, "previous", argv=evaluate_argv(checkpoint, previous, OLD_SEED))
    old = snapshot(previous)
    reference = folder / "reference"
    shutil.copytree(previous, reference)
    duration, marks = run_to_completion(zygote, "reference", argv=evaluate_argv(checkpoint, reference, NEW_SEED))
    new = snapshot(reference)
    assert sorted(path.name for path in reference.iterdir()) == sorted(FINAL_NAMES)  # a complete run leaves no temporary file
    assert all(old[name] != new[name] for name in FINAL_NAMES)  # every file tells the runs apart
    assert json.loads(new[REPORT])["seed"] == NEW_SEED and json.loads(old[REPORT])["seed"] == OLD_SEED
    assert [text for _, text in marks] == ["start", "begin 1", "end 1", "begin 2", "end 2", "report", "done"]

    phases, leftovers = Counter(), Counter()
    for k, when in enumerate((*FRACTIONS, *TRIGGERS)):
        out = folder / f"kill{k}"
        shutil.copytree(previous, out)  # copy2: the previous run's mtimes too
        pid, marks_path, log = zygote.start(f"kill{k}", argv=evaluate_argv(checkpoint, out, NEW_SEED))
        if isinstance(when, float):
            time.sleep(when * duration)
        else:
            wait_for_mark(marks_path, when)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # finished and reaped already
            pass
        status = zygote.wait()
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert killed or os.waitstatus_to_exitcode(status) == 0, log.read_text()[-3000:]
        origin = check_consistent(out, old, new)
        phases[phase(read_marks(marks_path), origin) if killed else "after the run"] += 1
        leftovers.update(path.name.split(".")[1] for path in out.iterdir() if path.name not in FINAL_NAMES)

    print(f"full run {duration:.2f} s; kills by phase: {dict(phases)}; temporary files left: {dict(leftovers)}")
    assert {"writing figure 1", "writing figure 2", "report"} <= set(phases), phases  # the kills hit the writing
