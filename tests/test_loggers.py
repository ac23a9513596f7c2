"""The callback as a citizen of Lightning: monitorable metrics, figures to every logger kind (real packages), LightningCLI."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from _callback_models import TinyVAE, loader
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, WandbLogger
from matplotlib.image import imread

from lightning_mem import ManifoldEntropicMetricsCallback

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:The number of training batches:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

FIGURES = ("spectrum_history", "pairwise_mutual_information")


def _fit(tmp_path: Path, callbacks: list, logger=False, **options) -> Trainer:
    seed_everything(0, verbose=False)
    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{"max_epochs": 4, "limit_train_batches": 2, "enable_checkpointing": False, **options},
    )
    trainer.fit(TinyVAE(), loader())
    return trainer


def test_model_checkpoint_keeps_the_checkpoints_of_the_lowest_total_correlation(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    metrics = ManifoldEntropicMetricsCallback(num_samples=16, every_n_epochs=1, log_figures=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="mem/total_correlation", mode="min", save_top_k=2)
    # the user's order puts the checkpoint first; Lightning runs checkpoint callbacks last, after the evaluation
    trainer = _fit(tmp_path, [checkpoint, metrics], logger=logger, enable_checkpointing=True)
    assert [entry["step"] for entry in metrics.history] == [0, 2, 4, 6, 8]  # the start and the 4 epoch ends
    logged = {}
    for row in csv.DictReader((Path(logger.log_dir) / "metrics.csv").open()):
        if row.get("mem/total_correlation"):
            logged[int(row["step"])] = float(row["mem/total_correlation"])
    epoch_ends = sorted(logged[step] for step in (2, 4, 6, 8))
    scores = sorted(float(score) for score in checkpoint.best_k_models.values())
    assert scores == pytest.approx(epoch_ends[:2], rel=1e-6)
    assert len(list((tmp_path / "ckpt").glob("*.ckpt"))) == 2
    assert float(trainer.callback_metrics["mem/total_correlation"]) == pytest.approx(float(metrics.last_metrics["total_correlation"]))


def test_callback_metrics_hold_every_logged_scalar_on_the_evaluation_values(tmp_path):
    metrics = ManifoldEntropicMetricsCallback(num_samples=16, num_evaluations=2, log_figures=False, progress_bar_keys=["num_active"])
    trainer = _fit(tmp_path, [metrics])
    values = metrics.last_metrics
    for name in ("entropy", "total_correlation", "num_active", "drift/alignment", "failed", "spectrum/top_1"):
        assert f"mem/{name}" in trainer.callback_metrics, name
    assert float(trainer.callback_metrics["mem/entropy"]) == pytest.approx(float(values["entropy"]), rel=1e-12)
    assert float(trainer.callback_metrics["mem/spectrum/top_1"]) == pytest.approx(float(values["spectrum"][0]), rel=1e-12)
    assert trainer.progress_bar_metrics["mem/num_active"] == float(values["num_active"])
    assert "mem/entropy" not in trainer.progress_bar_metrics


def test_early_stopping_stops_on_a_mem_key(tmp_path):
    metrics = ManifoldEntropicMetricsCallback(num_samples=16, every_n_epochs=1, log_figures=False)
    # num_active >= 0 > -1 always: the threshold is reached at the first check, so training stops after one epoch
    stopper = EarlyStopping(monitor="mem/num_active", mode="max", stopping_threshold=-1.0, check_on_train_epoch_end=True)
    trainer = _fit(tmp_path, [metrics, stopper], max_epochs=10)
    assert trainer.should_stop and trainer.current_epoch == 1
    assert stopper.stopped_epoch == 0
    # without the key Lightning's EarlyStopping (strict by default) would have raised instead


def test_an_unknown_progress_bar_key_is_a_named_error():
    with pytest.raises(ValueError, match=r"`progress_bar_keys` to be names from .* but got \['entropy_spectrum'\]"):
        ManifoldEntropicMetricsCallback(progress_bar_keys=["entropy_spectrum"])


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


def _assert_images(paths: list[Path], count: int) -> None:
    assert len(paths) == count, paths
    for path in paths:
        image = imread(path)
        assert image.shape[0] > 100 and image.shape[1] > 100


def test_csv_logger_gets_scalars_and_png_figures_under_its_log_dir(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    metrics = ManifoldEntropicMetricsCallback(num_samples=16, num_evaluations=2, figures_every_n_evaluations=1)
    _fit(tmp_path, [metrics], logger=logger)
    figures = Path(logger.log_dir) / "figures" / "mem"
    steps = [entry["step"] for entry in metrics.history]
    for tag in FIGURES:
        _assert_images(_pngs(figures / tag), len(steps))
        assert [path.name for path in _pngs(figures / tag)] == [f"step_{step:08d}.png" for step in steps]
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "mem/total_correlation" in header and "mem/entropy" in header


def test_mlflow_logger_gets_png_artifacts_in_a_local_file_store(tmp_path):
    # a local store: runs in SQLite (MLflow's file-system backend is deprecated), artifacts in a local folder
    logger = MLFlowLogger(
        experiment_name="mem", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    metrics = ManifoldEntropicMetricsCallback(num_samples=16, num_evaluations=2, figures_every_n_evaluations=1)
    _fit(tmp_path, [metrics], logger=logger)
    artifacts = Path(logger.experiment.get_run(logger.run_id).info.artifact_uri.removeprefix("file://"))
    for tag in FIGURES:
        _assert_images(_pngs(artifacts / "mem" / tag), len(metrics.history))
    history = logger.experiment.get_metric_history(logger.run_id, "mem/total_correlation")
    assert [point.step for point in history] == [entry["step"] for entry in metrics.history]


def test_wandb_logger_offline_run_holds_the_images(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(project="mem", save_dir=str(tmp_path), offline=True)
    metrics = ManifoldEntropicMetricsCallback(num_samples=16, num_evaluations=2, figures_every_n_evaluations=1)
    try:
        _fit(tmp_path, [metrics], logger=logger)
    finally:
        logger.experiment.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    for tag in FIGURES:
        _assert_images(_pngs(runs[0] / "files" / "media" / "images" / "mem" / tag) or _pngs_named(runs[0], tag), len(metrics.history))
    assert any(path.suffix == ".wandb" for path in runs[0].iterdir())


def _pngs_named(run: Path, tag: str) -> list[Path]:
    return sorted(path for path in (run / "files" / "media" / "images").rglob("*.png") if tag in str(path))


LIGHTNING_CLI_CONFIG = """
trainer:
  max_steps: 4
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_mem.ManifoldEntropicMetricsCallback
      init_args:
        num_samples: 12
        num_evaluations: 2
        prefix: cli/
        top_k: 2
"""


def test_lightning_cli_configures_the_callback_from_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(LIGHTNING_CLI_CONFIG)

    cli = LightningCLI(
        TinyVAE,
        args=["--config", str(config)],
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": str(tmp_path)},
        run=False,
    )
    cli.trainer.fit(cli.model, loader())
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, ManifoldEntropicMetricsCallback)]
    assert callback.prefix == "cli/" and callback.top_k == 2 and callback.num_samples == 12
    assert [entry["step"] for entry in callback.history] == [0, 2, 4]
    assert "cli/spectrum/top_2" in cli.trainer.callback_metrics and "cli/spectrum/top_3" not in cli.trainer.callback_metrics
    assert os.path.exists(config)
