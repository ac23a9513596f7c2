"""Tests of the command line on whole runs: ``evaluate`` on a folder of checkpoints (curves against closed forms and
single-checkpoint evaluations), compact progress in logs, and install hints for missing optional packages."""

from __future__ import annotations

import csv
import importlib.abc
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import autograd_jacobian, documented_latents, linear_closed_form, naive_metrics
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_mem
from lightning_mem.cli import main
from lightning_mem.demo import fit
from lightning_mem.demo.models import BetaVAE
from lightning_mem.demo.run import LineProgressBar
from lightning_mem.evaluate import CURVE_METRICS, decoder_metrics, evaluate_checkpoint, evaluate_checkpoints

pytestmark = pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec.*", "ignore:.*does not have many workers.*")

PNG = b"\x89PNG\r\n\x1a\n"


class LinearRun(LightningModule):
    """``x = A z``, with ``A`` trained towards a target: every checkpoint's metrics are closed forms of its own ``A``."""

    built = 0  # modules constructed, across instances (load_from_checkpoint constructs one)

    def __init__(self, latent_dim: int = 3, data_dim: int = 5) -> None:
        super().__init__()
        type(self).built += 1
        self.save_hyperparameters()
        self.latent_dim = latent_dim
        self.decoder = nn.Linear(latent_dim, data_dim, bias=False)

    def training_step(self, batch, batch_idx):
        z, x = batch
        return (self.decoder(z) - x).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3)


def _train(module: LightningModule, data: tuple[torch.Tensor, ...], folder, *, every: int, steps: int) -> list:
    """Fit ``steps`` steps in one epoch with Lightning's own ``ModelCheckpoint`` keeping every ``every``-th step."""
    torch.manual_seed(0)
    checkpoints = ModelCheckpoint(dirpath=folder, every_n_train_steps=every, save_top_k=-1)
    trainer = Trainer(
        max_steps=steps,
        logger=False,
        callbacks=[checkpoints],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, DataLoader(TensorDataset(*data), batch_size=2))
    return sorted(folder.iterdir())


@pytest.fixture
def linear_run(tmp_path):
    """A run folder ``run/checkpoints/epoch=0-step={5,10,15}.ckpt`` of :class:`LinearRun` (by name: 10, 15, 5)."""
    torch.manual_seed(0)
    z = torch.randn(40, 3)
    target = torch.tensor([[1.0, 0.5, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.25], [1.0, 0.0, 0.5], [0.3, 0.3, 0.3]])
    paths = _train(LinearRun(), (z, z @ target.T), tmp_path / "run" / "checkpoints", every=5, steps=15)
    assert [path.name for path in paths] == ["epoch=0-step=10.ckpt", "epoch=0-step=15.ckpt", "epoch=0-step=5.ckpt"]
    LinearRun.built = 0
    return tmp_path / "run"


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_a_folder_of_checkpoints_gives_curves_in_step_order_that_match_the_closed_forms(linear_run, tmp_path, capsys):
    threshold = 1.0
    argv = ["evaluate", "--module-class", f"{__name__}:LinearRun", "--checkpoint", str(linear_run), "--num-samples", "16"]
    assert main([*argv, "--active-threshold", str(threshold)]) == 0
    captured = capsys.readouterr()
    out = tmp_path / "run_mem"  # next to the folder given
    rows = _rows(out / "curves.csv")
    assert [int(row["step"]) for row in rows] == [5, 10, 15]  # by the stored global_step, not by name
    assert [row["checkpoint"] for row in rows] == [f"epoch=0-step={step}.ckpt" for step in (5, 10, 15)]
    assert LinearRun.built == 3  # each checkpoint built once

    weights = []
    for row in rows:
        weight = torch.load(linear_run / "checkpoints" / row["checkpoint"], weights_only=False)["state_dict"]["decoder.weight"].double()
        weights.append(weight)
        truth = linear_closed_form(weight)
        latent_entropy = truth["entropy_per_dim"]  # conftest's name for the per-latent H_i
        mi = truth["pairwise_mutual_information"]
        active = weight.norm(dim=0) > threshold
        k = int(active.sum())
        active_mi = mi[active][:, active]
        expected = {
            "entropy": truth["entropy"],
            "entropy_per_dim": truth["entropy"] / 3,
            "total_correlation": truth["total_correlation"],
            "total_correlation_per_dim": truth["total_correlation"] / 3,
            "num_active": k,
            "pairwise_mutual_information_max": mi.max(),
            "pairwise_mutual_information_mean": mi.sum() / 6,
            # on the active latents only: the closed form of their columns alone (nothing with fewer than two)
            "active/total_correlation": linear_closed_form(weight[:, active])["total_correlation"] if k > 1 else 0.0,
            "active/pairwise_mutual_information_max": active_mi.max() if k > 1 else 0.0,
            "active/pairwise_mutual_information_mean": active_mi.sum() / (k * (k - 1)) if k > 1 else 0.0,
            **{f"spectrum_{k + 1}": value for k, value in enumerate(latent_entropy.sort(descending=True).values)},
            **{f"latent_entropy_{i}": value for i, value in enumerate(latent_entropy)},
        }
        assert list(row) == ["step", "epoch", "checkpoint", *expected]
        assert list(expected)[: len(CURVE_METRICS)] == list(CURVE_METRICS)
        for name, value in expected.items():
            assert float(row[name]) == pytest.approx(float(value), abs=1e-6), name
        assert int(row["epoch"]) == 0
    assert not torch.allclose(weights[0], weights[-1], atol=1e-3)  # the curves do move
    single = evaluate_checkpoint(
        linear_run / "checkpoints" / rows[-1]["checkpoint"], LinearRun, num_samples=16, active_threshold=threshold, progress=False
    )
    assert [float(rows[-1][name]) for name in CURVE_METRICS] == [single[name] for name in CURVE_METRICS]

    # the table printed, a report and figures per checkpoint, the curves' figures
    table = [line for line in captured.out.splitlines() if re.match(r"\s+\d+\s+epoch=", line)]
    assert [int(line.split()[0]) for line in table] == [5, 10, 15]
    for row in rows:
        report = json.loads((out / row["checkpoint"].removesuffix(".ckpt") / "report.json").read_text())
        assert report["global_step"] == int(row["step"]) and report["entropy"] == float(row["entropy"])
        for name in ("spectrum.png", "pairwise_mutual_information.png"):
            assert (out / row["checkpoint"].removesuffix(".ckpt") / name).read_bytes()[:8] == PNG
    for name in ("curves.png", "spectra.png"):
        assert (out / name).read_bytes()[:8] == PNG and str(out / name) in captured.out
    assert not [path for path in out.rglob(".*")]  # no temporary file left behind

    # off a terminal (capsys): a line per checkpoint, no per-chunk lines
    progress = [line for line in captured.err.splitlines() if line.strip()]
    assert [line.split(",")[0] for line in progress] == [f"checkpoints: {k}/3 evaluated ({100 * k // 3}%)" for k in (1, 2, 3)]


def test_every_checkpoint_is_evaluated_at_the_same_latents_as_a_single_evaluation(tmp_path):
    """A nonlinear decoder: the folder's values equal single-checkpoint evaluations and a naive autograd evaluation at
    the documented latents, whatever the files are called."""
    torch.manual_seed(0)
    images = torch.rand(40, 64)
    paths = _train(BetaVAE(latent_dim=3, hidden_dim=8, learning_rate=0.05), (images,), tmp_path / "ckpts", every=2, steps=6)
    steps = [torch.load(path, weights_only=False)["global_step"] for path in paths]
    folder = tmp_path / "renamed"
    folder.mkdir()
    for path, step in zip(paths, steps, strict=True):  # names in no step order at all
        shutil.copy(path, folder / {2: "c.ckpt", 4: "a.ckpt", 6: "b.ckpt"}[step])
    options = {"num_samples": 12, "seed": 3, "progress": False, "double": True}
    result = evaluate_checkpoints(folder, BetaVAE, out_dir=tmp_path / "curves", **options)
    reports = result["checkpoints"]
    assert [report["global_step"] for report in reports] == [2, 4, 6]
    assert [os.path.basename(report["checkpoint"]) for report in reports] == ["c.ckpt", "a.ckpt", "b.ckpt"]
    rows = _rows(result["files"]["curves"])
    z = documented_latents(12, 3, seed=3, dtype=torch.float64)
    for report, row in zip(reports, rows, strict=True):
        module = BetaVAE.load_from_checkpoint(report["checkpoint"]).double().eval()
        truth = naive_metrics(autograd_jacobian(module.decoder, z))
        assert report["entropy"] == pytest.approx(float(truth["entropy"]), abs=1e-9)
        assert report["total_correlation"] == pytest.approx(float(truth["total_correlation"]), abs=1e-9)
        assert [float(row[f"spectrum_{k}"]) for k in (1, 2, 3)] == report["spectrum"]  # the CSV reads back exactly
    single = evaluate_checkpoint(reports[-1]["checkpoint"], BetaVAE, out_dir=tmp_path / "single", **options)
    for name in (*CURVE_METRICS, "latent_entropy", "spectrum", "pairwise_mutual_information"):
        assert reports[-1][name] == single[name], name
    other_seed = decoder_metrics(module.decoder, documented_latents(12, 3, seed=4, dtype=torch.float64))
    assert float(other_seed["entropy"]) != pytest.approx(single["entropy"], abs=1e-6)  # the latents matter: the equalities say something


def _evaluate_folder(capsys, folder, *args: str) -> tuple[int, str]:
    argv = ["evaluate", "--module-class", f"{__name__}:LinearRun", "--checkpoint", str(folder), "--num-samples", "8", *args]
    status = main(argv)
    return status, capsys.readouterr().err


def test_a_folder_is_checked_before_any_module_is_built(linear_run, tmp_path, capsys):
    checkpoints = linear_run / "checkpoints"
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    status, err = _evaluate_folder(capsys, checkpoints, "--out", str(a_file / "out"))
    assert status == 2 and err.count("\n") == 1 and "`out_dir` to be a writable folder" in err and LinearRun.built == 0

    corrupt = checkpoints / "epoch=0-step=7.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    status, err = _evaluate_folder(capsys, checkpoints, "--out", str(tmp_path / "never"))
    assert status == 2 and err.count("\n") == 1 and f"Could not load checkpoint '{corrupt}'" in err
    assert LinearRun.built == 0 and not (tmp_path / "never").exists()

    trainer = Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(LinearRun(latent_dim=4))
    trainer.save_checkpoint(corrupt)  # another architecture
    LinearRun.built = 0
    status, err = _evaluate_folder(capsys, checkpoints, "--out", str(tmp_path / "never"))
    assert status == 2 and err.count("\n") == 1 and LinearRun.built == 0 and not (tmp_path / "never").exists()
    first = checkpoints / "epoch=0-step=5.ckpt"
    assert f"same shapes, but '{corrupt}' and '{first}' differ: decoder.weight has shape (5, 4) in the first, (5, 3) in the second" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    status, err = _evaluate_folder(capsys, empty)
    assert status == 2 and err.count("\n") == 1 and "to hold checkpoint files (*.ckpt)" in err


def test_chunk_progress_off_a_terminal_is_a_line_per_tenth(capsys):
    decoder = nn.Linear(2, 3)
    decoder_metrics(decoder, torch.randn(37, 2), chunk_size=1, progress=True)  # 37 chunks
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and lines[-1].startswith("manifold entropic metrics: 37/37 chunks (100%), ")
    assert [int(re.search(r"\((\d+)%\)", line).group(1)) // 10 for line in lines] == list(range(1, 11))


def test_training_progress_off_a_terminal_is_a_line_per_tenth(capsys):
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.rand(16, 64)), batch_size=4)
    trainer = fit(BetaVAE(latent_dim=2, hidden_dim=4), loader, steps=30, progress_bar=True)
    captured = capsys.readouterr()
    assert isinstance(trainer.progress_bar_callback, LineProgressBar)
    lines = [line for line in captured.err.splitlines() if line.startswith("Epoch")]
    assert len(lines) == 10 and "\r" not in captured.err + captured.out
    assert re.fullmatch(r"Epoch 7: 30/30 steps \(100%\), [\d.]+ s, train/loss [\d.]+, train/kl [\d.e-]+", lines[-1]), lines[-1]


@pytest.mark.slow
def test_the_demo_writes_a_few_kilobytes_to_a_pipe(tmp_path):
    """Lightning's own bar wrote 15.7 KB for 60 steps (750 KB for the default 3000) into a pipe."""
    command = [sys.executable, "-m", "lightning_mem", "demo", "--steps", "60", "--out", str(tmp_path / "runs")]
    done = subprocess.run(command, capture_output=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert len(done.stdout) + len(done.stderr) < 4000, (len(done.stdout), len(done.stderr))
    lines = re.findall(rb"Epoch \d+: (\d+)/60 steps", done.stderr)
    assert [int(step) for step in lines] == list(range(6, 61, 6))


class _Hidden(importlib.abc.MetaPathFinder):
    """A finder in front of all others: importing one of ``names`` fails as it would were it not installed."""

    def __init__(self, *names: str) -> None:
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


@pytest.fixture
def hide(monkeypatch):
    def hide(*names: str) -> None:
        for module in [module for module in sys.modules if module.partition(".")[0] in names]:
            monkeypatch.delitem(sys.modules, module)
        monkeypatch.setattr(sys, "meta_path", [_Hidden(*names), *sys.meta_path])

    return hide


@pytest.mark.parametrize(
    ("hidden", "model", "message"),
    [
        ("sklearn", "vae", 'lightning-mem demo: error: the demo needs scikit-learn: pip install "lightning_mem[demo]"\n'),
        ("FrEIA", "flow", 'lightning-mem demo: error: the flow demo needs FrEIA: pip install "lightning_mem[demo]"\n'),
    ],
)
def test_a_missing_optional_package_is_a_one_line_install_hint(hide, tmp_path, capsys, hidden, model, message):
    hide(hidden)
    assert main(["demo", "--model", model, "--steps", "1", "--out", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err == message
    assert not (tmp_path / "runs").exists()  # it stopped before training


def _site_packages_without(folder, *hidden: str) -> list[str]:
    """Copies, as symbolic links, of this interpreter's site-packages folders without the ``hidden`` packages (their
    modules and their ``.dist-info``): an environment where they are not installed, for ``python -S``."""
    sites = [Path(entry) for entry in sys.path if Path(entry).name in ("site-packages", "dist-packages") and Path(entry).is_dir()]
    prefixes = tuple(name.lower() for name in hidden)
    copies = []
    for index, site in enumerate(sites):
        copy = folder / f"site{index}"
        copy.mkdir(parents=True)
        for entry in site.iterdir():
            if not entry.name.lower().startswith(prefixes) and entry.suffix != ".pth":
                (copy / entry.name).symlink_to(entry)
        copies.append(str(copy))
    return copies


@pytest.mark.slow
def test_a_missing_optional_package_in_a_second_process(tmp_path):
    """``python -S`` with site-packages without scikit-learn: the whole output is the one-line hint."""
    repository = Path(lightning_mem.__file__).resolve().parents[1]
    path = os.pathsep.join([str(repository), *_site_packages_without(tmp_path / "env", "sklearn", "scikit_learn")])
    command = [sys.executable, "-S", "-m", "lightning_mem", "demo", "--steps", "1", "--out", str(tmp_path / "runs")]
    missing = subprocess.run(
        [sys.executable, "-S", "-c", "import sklearn"], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path}
    )
    assert "No module named 'sklearn'" in missing.stderr  # the environment is as intended
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": path})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == 'lightning-mem demo: error: the demo needs scikit-learn: pip install "lightning_mem[demo]"\n'
    assert not (tmp_path / "runs").exists()
