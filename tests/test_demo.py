"""Tests of the demo job: the real command in a second process, the flow variant against its own log-determinant."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import documented_latents
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_mem.cli import main
from lightning_mem.demo import run_demo
from lightning_mem.functional import STANDARD_NORMAL_ENTROPY

pytestmark = pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec.*")


def _events(log_dir):
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.slow
def test_demo_command_trains_logs_and_prints_the_summary(tmp_path):
    command = [sys.executable, "-m", "lightning_mem", "demo", "--steps", "40", "--out", str(tmp_path / "runs"), "--seed", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env={**os.environ, "COLUMNS": "120"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for line in (
        "total entropy H",
        "total correlation MTC",
        "active dims",
        "top entropies H_i",
        f"tensorboard --logdir {tmp_path / 'runs'}",
    ):
        assert line in out
    # Lightning's progress bar: tqdm's writes "Epoch 0: ..." to stdout; rich's (Lightning's default once `rich` is
    # installed) leaves only its last state, "Epoch 2/-2 ..."
    assert re.search(r"Epoch \d+", done.stdout + done.stderr)
    log_dir = Path(re.search(r"TensorBoard logs\s+(\S+)", out).group(1))
    spectrum_png = Path(re.search(r"spectrum figure\s+(\S+)", out).group(1))
    assert log_dir.parent == tmp_path / "runs" / "demo_vae"
    assert spectrum_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(p.name.startswith("events.out.tfevents") for p in log_dir.iterdir())
    assert (log_dir / "final.ckpt").is_file()

    # the callback's curves: one evaluation before training and every 40 / 10 = 4 steps
    events = _events(log_dir)
    tags = events.Tags()
    assert {"train/loss", "train/kl", "mem/entropy", "mem/total_correlation", "mem/num_active", "mem/drift/alignment"} <= set(
        tags["scalars"]
    )
    assert [event.step for event in events.Scalars("mem/entropy")] == list(range(0, 41, 4))
    assert {"mem/spectrum_history", "mem/pairwise_mutual_information"} <= set(tags["images"])
    # the printed table is the last evaluation
    printed_entropy = float(re.search(r"total entropy H\s+(-?\d+\.\d+) nats", out).group(1))
    assert events.Scalars("mem/entropy")[-1].value == pytest.approx(printed_entropy, abs=5e-4)
    printed_active = int(re.search(r"active dims\s+(\d+) of 16", out).group(1))
    assert events.Scalars("mem/num_active")[-1].value == printed_active


def test_flow_demo_entropy_equals_the_flows_own_log_determinant(tmp_path):
    result = run_demo(model="flow", steps=30, out=tmp_path, num_samples=256, seed=3, progress_bar=False)
    metrics = result["metrics"]
    assert metrics["latent_entropy"].shape == (2,) and result["steps"] == 30
    assert [entry["step"] for entry in result["history"]] == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30]

    # H = d h0 + E[log |det J_decoder(z)|] = d h0 - E[log |det J_encoder(x)|] at x = decoder(z): the flow's own log-det
    from lightning_mem.evaluate import load_module

    flow = load_module("lightning_mem.demo.models:CouplingFlow", result["checkpoint"])
    z = documented_latents(256, 2, seed=3)  # the demo's latents
    with torch.no_grad():
        _, log_det_encoder = flow.inn(flow.decoder(z))
    expected = 2 * STANDARD_NORMAL_ENTROPY - float(log_det_encoder.double().mean())
    assert float(metrics["entropy"]) == pytest.approx(expected, abs=1e-3)
    assert Path(result["spectrum_png"]).is_file() and Path(result["mutual_information_png"]).is_file()


def test_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="`model`"):
        run_demo(model="gan", out=tmp_path)
    with pytest.raises(ValueError, match="`steps`"):
        run_demo(steps=0, out=tmp_path)
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0"])
    with pytest.raises(SystemExit):
        main(["demo", "--model", "gan"])
