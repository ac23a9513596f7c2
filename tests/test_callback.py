"""Tests of ManifoldEntropicMetricsCallback: real Trainer.fit runs on CPU, checked against the functional API."""

from __future__ import annotations

import copy
import math
import os
import random
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _callback_models import DATA_DIM, LATENT_DIM, RecordDecoder, TinyVAE, ground_truth_decoder, loader
from conftest import CaptureLogger, documented_latents, free_port, freia_flow
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_mem import ManifoldEntropicMetricsCallback, decoder_jacobian
from lightning_mem.functional import (
    STANDARD_NORMAL_ENTROPY,
    manifold_cross_mutual_information,
    manifold_entropy,
    manifold_pairwise_mutual_information,
    manifold_total_correlation,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:The number of training batches:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*treespec.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*the Trainer has no logger:UserWarning"),
]

HERE = Path(__file__).resolve().parent

# Every scalar a run with drift and a reference decoder logs (written out here, not taken from the callback).
SCALAR_NAMES = {
    "entropy",
    "entropy_per_dim",
    "total_correlation",
    "total_correlation_per_dim",
    "num_active",
    "pairwise_mutual_information_max",
    "pairwise_mutual_information_mean",
    "num_fallback",
    "eval_time",
    "failed",
    "spectrum/top_1",
    "spectrum/top_2",
    "spectrum/top_3",
}
DRIFT_NAMES = {"drift/alignment", "drift/self_correlation", "drift/cross_mutual_information_diag", "drift/num_rematched"}
REFERENCE_NAMES = {"reference/alignment", "reference/num_matched"}
# on the active latents only (tests/test_active_subspace.py checks their values)
ACTIVE_NAMES = {
    "active/total_correlation",
    "active/pairwise_mutual_information_max",
    "active/pairwise_mutual_information_mean",
    "active/reference/alignment",
    "active/reference/num_matched",
}
ACTIVE_DRIFT_NAMES = {"active/drift/alignment", "active/drift/self_correlation", "active/drift/num_rematched"}
FIGURE_NAMES = {"spectrum_history", "pairwise_mutual_information", "reference/cross_mutual_information"}


def _trainer(tmp_path: Path, callbacks: list[Callback], **overrides) -> Trainer:
    options = {
        "default_root_dir": tmp_path,
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "limit_train_batches": 4,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }
    options.update(overrides)
    return Trainer(callbacks=callbacks, **options)


def _global_rng_states() -> tuple:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()  # noqa: NPY002 - the legacy global state


def _informational_correlation(cross: torch.Tensor) -> torch.Tensor:
    """Linfoot's informational correlation, written from its definition sqrt(1 - exp(-2 I))."""
    return torch.sqrt(1.0 - torch.exp(-2.0 * cross))


def _decoder_at(weights: dict[str, torch.Tensor], **model_options) -> nn.Module:
    decoder = TinyVAE(**model_options).decoder.to(next(iter(weights.values())).dtype)
    decoder.load_state_dict(weights)
    return decoder.eval()


# ---------------------------------------------------------------- TensorBoard, schedule, values


def test_tensorboard_fit_logs_every_key_at_every_scheduled_step_and_figures(tmp_path):
    seed_everything(0, verbose=False)
    num_samples, reference_dim = 48, 2
    reference_latents = torch.randn(num_samples, reference_dim, generator=torch.Generator().manual_seed(3))
    reference = ground_truth_decoder(reference_dim)
    callback = ManifoldEntropicMetricsCallback(
        num_samples=num_samples,
        every_n_train_steps=3,
        every_n_epochs=1,
        reference_decoder=reference,
        reference_latents=reference_latents,
        chunk_size=20,
        figures_every_n_evaluations=3,
    )
    recorder = RecordDecoder()
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    model = TinyVAE()
    _trainer(tmp_path, [callback, recorder], logger=logger).fit(model, loader())

    # 4 batches x 2 epochs: at start (0), every 3 steps (3, 6), every epoch end (4, 8), at the end (8 again: once)
    expected_steps = [0, 3, 4, 6, 8]
    assert [entry["step"] for entry in callback.history] == expected_steps
    # figures at evaluation number 3 (step 6) and at the last one (step 8), drawn at the end of training
    figure_steps = [6, 8]

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalar_tags = {tag for tag in events.Tags()["scalars"] if tag.startswith("mem/")}
    assert scalar_tags == {f"mem/{name}" for name in SCALAR_NAMES | DRIFT_NAMES | REFERENCE_NAMES | ACTIVE_NAMES | ACTIVE_DRIFT_NAMES}
    for tag in scalar_tags:
        steps = [event.step for event in events.Scalars(tag)]
        drift = tag.startswith(("mem/drift/", "mem/active/drift/"))
        assert steps == (expected_steps[1:] if drift else expected_steps), tag
    assert set(events.Tags()["images"]) == {f"mem/{name}" for name in FIGURE_NAMES}
    for name in FIGURE_NAMES:
        images = events.Images(f"mem/{name}")
        assert [image.step for image in images] == figure_steps
        assert all(image.encoded_image_string.startswith(b"\x89PNG") and image.width > 100 and image.height > 100 for image in images)

    # the last logged values equal the functional API on the final decoder at the documented latents
    decoder = model.decoder.eval()
    z = documented_latents(num_samples, LATENT_DIM, seed=0)
    jacobian = decoder_jacobian(decoder, z)
    per_dim, total = manifold_entropy(jacobian)
    pairwise = manifold_pairwise_mutual_information(jacobian)
    off_diagonal = pairwise[~torch.eye(LATENT_DIM, dtype=torch.bool)]
    spectrum = per_dim.sort(descending=True).values
    reference_cross = manifold_cross_mutual_information(jacobian, decoder_jacobian(reference, reference_latents))
    best = _informational_correlation(reference_cross).max(dim=1)
    expected = {
        "entropy": total,
        "entropy_per_dim": total / LATENT_DIM,
        "total_correlation": manifold_total_correlation(jacobian),
        "num_active": 3,
        "pairwise_mutual_information_max": off_diagonal.max(),
        "pairwise_mutual_information_mean": off_diagonal.mean(),
        "spectrum/top_1": spectrum[0],
        "spectrum/top_3": spectrum[2],
        "reference/alignment": best.values.mean(),
        "reference/num_matched": len(set(best.indices.tolist())),
        "failed": 0,
    }
    for name, value in expected.items():
        logged = events.Scalars(f"mem/{name}")[-1].value  # TensorBoard stores float32
        assert logged == pytest.approx(float(value), rel=1e-5, abs=1e-6), name
    assert callback.last_metrics["spectrum"] == pytest.approx(spectrum, rel=1e-6)
    assert 0 < callback.last_metrics["eval_time"] < 30

    # drift at step 8: MCPMI between the decoder at step 8 and at step 6 on the same latents
    previous_jacobian = decoder_jacobian(_decoder_at(recorder.weights[6]), z)
    drift_cross = manifold_cross_mutual_information(jacobian, previous_jacobian)
    drift_correlation = _informational_correlation(drift_cross)
    assert events.Scalars("mem/drift/self_correlation")[-1].value == pytest.approx(float(drift_correlation.diagonal().mean()), rel=1e-5)
    assert events.Scalars("mem/drift/alignment")[-1].value == pytest.approx(float(drift_correlation.max(dim=1).values.mean()), rel=1e-5)
    assert events.Scalars("mem/drift/cross_mutual_information_diag")[-1].value == pytest.approx(
        float(drift_cross.diagonal().mean()), rel=1e-5
    )

    # the README's vocabulary table documents every key that was logged
    vocabulary = (HERE.parent / "README.md").read_text().split("## Vocabulary", 1)[1].split("\n## ", 1)[0]
    for tag in scalar_tags | set(events.Tags()["images"]):
        name = re.sub(r"top_\d+$", "top_k", tag.removeprefix("mem/"))
        assert f"`{name}`" in vocabulary, name


def test_drift_of_an_unchanged_decoder_is_perfect_correlation(tmp_path):
    callback = ManifoldEntropicMetricsCallback(num_samples=16, every_n_train_steps=2, every_n_epochs=None)
    model = TinyVAE(batch_norm=False, lr=0.0)  # no training progress: the decoder never changes
    _trainer(tmp_path, [callback], max_steps=4).fit(model, loader())
    assert [entry["step"] for entry in callback.history] == [0, 2, 4]
    values = callback.last_metrics
    assert float(values["drift/self_correlation"]) == pytest.approx(1.0, abs=1e-12)
    assert float(values["drift/alignment"]) == pytest.approx(1.0, abs=1e-12)
    assert int(values["drift/num_rematched"]) == 0
    assert torch.equal(callback.history[0]["spectrum"], callback.history[-1]["spectrum"])


def test_drift_from_kept_jacobians_equals_drift_recomputed_from_the_parameter_snapshot(tmp_path, monkeypatch):
    def run(path: Path) -> ManifoldEntropicMetricsCallback:
        seed_everything(0, verbose=False)
        callback = ManifoldEntropicMetricsCallback(num_samples=24, every_n_train_steps=2, chunk_size=10, log_figures=False)
        _trainer(path, [callback], max_steps=6, max_epochs=-1).fit(TinyVAE(), loader())
        return callback

    kept = run(tmp_path / "kept")
    assert [tuple(j.shape) for j in kept._tracker.previous_jacobians] == [(10, DATA_DIM, LATENT_DIM)] * 2 + [(4, DATA_DIM, LATENT_DIM)]
    monkeypatch.setattr("lightning_mem.tracking.MAX_KEPT_JACOBIAN_BYTES", 0)  # nothing fits: recompute every time
    recomputed = run(tmp_path / "recomputed")
    assert recomputed._tracker.previous_jacobians is None
    assert [entry["step"] for entry in kept.history] == [entry["step"] for entry in recomputed.history] == [0, 2, 4, 6]
    for name in ("drift/cross_mutual_information", "drift/informational_correlation", "drift/alignment", "entropy"):
        assert torch.equal(kept.last_metrics[name], recomputed.last_metrics[name]), name


@pytest.mark.parametrize(("interval", "figure_steps"), [(1, [0, 1, 2, 3, 4]), (2, [2, 4]), (5, [4])])
def test_figures_are_drawn_at_every_n_th_evaluation_after_the_first_and_at_the_last(tmp_path, interval, figure_steps):
    callback = ManifoldEntropicMetricsCallback(num_samples=8, figures_every_n_evaluations=interval)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    _trainer(tmp_path, [callback], logger=logger, max_steps=4, max_epochs=-1).fit(TinyVAE(), loader())
    assert [entry["step"] for entry in callback.history] == [0, 1, 2, 3, 4]
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    for name in ("spectrum_history", "pairwise_mutual_information"):
        assert [image.step for image in events.Images(f"mem/{name}")] == figure_steps, name


def test_the_callbacks_kept_figures_render_the_pixels_of_new_figures_from_the_plot_functions():
    from lightning_mem.plotting import (
        MutualInformationFigure,
        SpectrumHistoryFigure,
        _offscreen_axes,
        plot_entropy_spectrum,
        plot_mutual_information,
    )

    def pixels(figure) -> np.ndarray:
        figure.canvas.draw()
        return np.asarray(figure.canvas.buffer_rgba()).copy()

    generator = torch.Generator().manual_seed(0)
    spectra = [torch.randn(16, generator=generator).sort(descending=True).values * (k + 1) for k in range(3)]
    steps = [0, 300, 600]
    history, heatmap = SpectrumHistoryFigure(color_label="training step"), MutualInformationFigure()
    for k in range(1, 4):  # each update adds a spectrum and changes the colour scale, the image and its range
        title = f"steps 0 to {steps[k - 1]}"
        _, ax = _offscreen_axes()
        new, _ = plot_entropy_spectrum(spectra[:k], ax=ax, color_values=steps[:k], color_label="training step", title=title)
        assert np.array_equal(pixels(history.update(spectra[:k], steps[:k], title=title)), pixels(new)), k
        matrix = torch.rand(16, 16, generator=generator) * k
        _, ax = _offscreen_axes()
        new, _ = plot_mutual_information(matrix, ax=ax, title=title)
        assert np.array_equal(pixels(heatmap.update(matrix, title=title)), pixels(new)), k


# ---------------------------------------------------------------- the default schedule


def _evaluated_steps(tmp_path: Path, **trainer_options) -> tuple[list[int], ManifoldEntropicMetricsCallback]:
    num_evaluations = trainer_options.pop("num_evaluations", 10)
    callback = ManifoldEntropicMetricsCallback(num_samples=8, num_evaluations=num_evaluations)
    data = trainer_options.pop("data", None)
    data = loader() if data is None else data
    _trainer(tmp_path, [callback, *trainer_options.pop("callbacks", [])], **trainer_options).fit(TinyVAE(), data)
    return [entry["step"] for entry in callback.history], callback


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        # T = 7 optimizer steps, n = 3: ceil(7/3) = 3, ceil(14/3) = 5, 7; plus the start
        ({"max_steps": 7, "max_epochs": -1, "num_evaluations": 3}, [0, 3, 5, 7]),
        # epochs: 3 x 4 batches = 12 steps, n = 4: every 3 steps, across epoch boundaries
        ({"max_epochs": 3, "num_evaluations": 4}, [0, 3, 6, 9, 12]),
        # gradient accumulation: 3 epochs x ceil(4 / 2) = 6 optimizer steps, n = 4: 2, 3, 5, 6
        ({"max_epochs": 3, "accumulate_grad_batches": 2, "num_evaluations": 4}, [0, 2, 3, 5, 6]),
        # a run shorter than num_evaluations (4 steps, n = 10) is evaluated at every step, once each
        ({"max_steps": 4, "max_epochs": -1}, [0, 1, 2, 3, 4]),
        # the default n = 10 over 2 x 15 = 30 steps
        ({"max_epochs": 2, "limit_train_batches": 15}, [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30]),
        # num_evaluations=None: only at the start and the end
        ({"max_steps": 6, "max_epochs": -1, "num_evaluations": None}, [0, 6]),
    ],
)
def test_default_schedule_spreads_num_evaluations_over_the_runs_total_steps(tmp_path, options, expected):
    data = loader(num=120) if options.get("limit_train_batches") == 15 else None
    steps, callback = _evaluated_steps(tmp_path, data=data, **options)
    assert steps == expected
    assert callback.total_time > 0


def test_evenly_spaced_steps_are_distinct_end_at_the_last_step_and_differ_by_at_most_one():
    from lightning_mem.callback import _evenly_spaced_steps

    assert sorted(_evenly_spaced_steps(3000, 10)) == list(range(300, 3001, 300))
    for total, num in [(25, 10), (7, 3), (1001, 10), (4, 10), (1, 1), (99, 100)]:
        steps = sorted(_evenly_spaced_steps(total, num))
        assert len(steps) == min(total, num) and steps[-1] == total and steps[0] >= 1
        gaps = np.diff([0, *steps])
        assert gaps.max() - gaps.min() <= 1, (total, num, steps)


class StopAfterEpochs(Callback):
    """Ends an otherwise unbounded run after ``epochs`` epochs."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class Batches(torch.utils.data.IterableDataset):
    """Four batches of the synthetic data, without a length: Lightning cannot count the run's steps."""

    def __iter__(self):
        yield from loader(num=32)


@pytest.mark.parametrize("unbounded", ["max_epochs=-1", "iterable dataset"])
def test_an_unbounded_run_warns_once_and_evaluates_every_epoch(tmp_path, unbounded):
    if unbounded == "max_epochs=-1":
        options = {"max_epochs": -1, "callbacks": [StopAfterEpochs(2)]}
    else:
        options = {"max_epochs": 2, "limit_train_batches": 1.0, "data": DataLoader(Batches(), batch_size=None)}
    with pytest.warns(UserWarning, match=r"the run's length is unknown .*num_evaluations=10.* every epoch") as caught:
        steps, _ = _evaluated_steps(tmp_path, **options)
    assert len([w for w in caught if "length is unknown" in str(w.message)]) == 1
    assert steps == [0, 4, 8]  # the start and the end of each of the two epochs of 4 batches


@pytest.mark.parametrize("stopper", ["early_stopping", "max_time"])
def test_a_run_that_may_stop_early_warns_that_the_spread_schedule_may_be_cut_short(tmp_path, stopper):
    options = {"max_epochs": 3}
    if stopper == "early_stopping":
        options["callbacks"] = [EarlyStopping(monitor="loss", patience=100, strict=False)]
    else:
        options["max_time"] = {"hours": 1}
    with pytest.warns(UserWarning, match=r"num_evaluations=10.* estimated 12 steps, but (EarlyStopping|Timer) may end it sooner"):
        steps, _ = _evaluated_steps(tmp_path, **options)
    assert steps == [0, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12]  # the schedule itself is unchanged


# ---------------------------------------------------------------- training is not changed


def _fit_for_weights(tmp_path: Path, callbacks: list[Callback], logger) -> tuple[dict, dict, tuple]:
    seed_everything(3, verbose=False)
    model = TinyVAE(dropout=0.3)
    trainer = _trainer(tmp_path, callbacks, logger=logger, max_steps=4, max_epochs=-1)
    trainer.fit(model, loader())
    rng = _global_rng_states()
    return model.state_dict(), trainer.optimizers[0].state_dict(), rng


def test_training_ends_with_bit_identical_weights_with_and_without_the_callback(tmp_path):
    without = _fit_for_weights(tmp_path / "without", [], TensorBoardLogger(str(tmp_path / "without")))
    callback = ManifoldEntropicMetricsCallback(
        num_samples=24, every_n_train_steps=2, reference_decoder=ground_truth_decoder(LATENT_DIM), chunk_size=10
    )
    with_callback = _fit_for_weights(tmp_path / "with", [callback], TensorBoardLogger(str(tmp_path / "with")))
    assert [entry["step"] for entry in callback.history] == [0, 2, 4]
    assert "drift/alignment" in callback.last_metrics and "reference/alignment" in callback.last_metrics

    weights, optimizer, rng = without
    weights_cb, optimizer_cb, rng_cb = with_callback
    assert weights.keys() == weights_cb.keys()
    for name in weights:
        assert torch.equal(weights[name], weights_cb[name]), name  # includes BatchNorm running statistics
    for index, state in optimizer["state"].items():
        for key, value in state.items():
            assert torch.equal(value, optimizer_cb["state"][index][key]), (index, key)
    assert torch.equal(rng[0], rng_cb[0]) and np.array_equal(rng[1], rng_cb[1]) and rng[2] == rng_cb[2]


class Probe(Callback):
    """Records (``before``) or compares (``after``) everything an evaluation must leave alone."""

    def __init__(self, shared: dict, role: str) -> None:
        self.shared, self.role = shared, role

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.role == "before":
            pl_module.decoder[3].training = False  # a mixed configuration: one submodule in eval mode
            pl_module.encoder.training = True
        state = {
            "modes": [m.training for m in pl_module.modules()],
            "parameters": [p.detach().clone() for p in pl_module.parameters()],
            "grads": [None if p.grad is None else p.grad.clone() for p in pl_module.parameters()],
            "buffers": [b.clone() for b in pl_module.buffers()],
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()["state"]),
            "rng": _global_rng_states(),
            "grad_enabled": torch.is_grad_enabled(),
        }
        if self.role == "before":
            self.shared["before"] = state
            return
        before = self.shared["before"]
        self.shared["compared"] = self.shared.get("compared", 0) + 1
        assert state["modes"] == before["modes"]
        assert state["grad_enabled"] == before["grad_enabled"]
        for name in ("parameters", "grads", "buffers"):
            for new, old in zip(state[name], before[name], strict=True):
                assert (new is None and old is None) or torch.equal(new, old), name
        assert any(g is not None for g in state["grads"])
        for index, values in before["optimizer"].items():
            for key, value in values.items():
                assert torch.equal(value, state["optimizer"][index][key])
        assert torch.equal(state["rng"][0], before["rng"][0]) and np.array_equal(state["rng"][1], before["rng"][1])
        assert state["rng"][2] == before["rng"][2]
        pl_module.decoder[3].training = True


def test_each_evaluation_restores_modes_rng_and_leaves_parameters_grads_buffers_optimizer_alone(tmp_path):
    shared: dict = {}
    callback = ManifoldEntropicMetricsCallback(num_samples=16, every_n_train_steps=1, every_n_epochs=None, chunk_size=6)
    random.seed(1)
    np.random.seed(1)  # noqa: NPY002 - the legacy global state must be left alone
    _trainer(tmp_path, [Probe(shared, "before"), callback, Probe(shared, "after")], max_steps=3).fit(TinyVAE(), loader())
    assert shared["compared"] == 3
    assert [entry["step"] for entry in callback.history] == [0, 1, 2, 3]


# ---------------------------------------------------------------- distributed


@pytest.mark.slow
def test_ddp_fit_on_two_processes_logs_what_one_process_computes(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    result = subprocess.run(
        [sys.executable, str(HERE / "_callback_ddp.py"), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert rank0["world_size"] == 2
    assert [entry["step"] for entry in rank0["history"]] == [0, 2, 4]
    # every rank computed the same synced values
    assert rank0["last_metrics"].keys() == rank1["last_metrics"].keys()
    for name, value in rank0["last_metrics"].items():
        if name != "eval_time":
            assert torch.equal(value, rank1["last_metrics"][name]), name

    # one process, all 37 latents, the functional API, the decoder weights of the last two evaluations (float64)
    z = documented_latents(37, LATENT_DIM, seed=5, dtype=torch.float64)
    jacobian = decoder_jacobian(_decoder_at(rank0["weights"][4]), z)
    previous = decoder_jacobian(_decoder_at(rank0["weights"][2]), z)
    reference = decoder_jacobian(ground_truth_decoder(2).double(), rank0["reference_latents"])
    per_dim, total = manifold_entropy(jacobian)
    drift = _informational_correlation(manifold_cross_mutual_information(jacobian, previous))
    alignment = _informational_correlation(manifold_cross_mutual_information(jacobian, reference)).max(dim=1).values.mean()
    values = rank0["last_metrics"]
    torch.testing.assert_close(values["latent_entropy"], per_dim, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(values["entropy"], total, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(values["total_correlation"], manifold_total_correlation(jacobian), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        values["pairwise_mutual_information"], manifold_pairwise_mutual_information(jacobian), rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(values["drift/self_correlation"], drift.diagonal().mean(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(values["reference/alignment"], alignment, rtol=1e-10, atol=1e-10)

    # and rank zero's logger wrote exactly those values, once per evaluation
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    entropy_events = events.Scalars("mem/entropy")
    assert [event.step for event in entropy_events] == [0, 2, 4]
    assert entropy_events[-1].value == pytest.approx(float(total), rel=1e-6)
    assert events.Scalars("mem/total_correlation")[-1].value == pytest.approx(float(manifold_total_correlation(jacobian)), rel=1e-6)


# ---------------------------------------------------------------- resume


def _resumable_fit(tmp_path: Path, schedule: dict, ckpt_path: str | None = None) -> tuple[ManifoldEntropicMetricsCallback, CaptureLogger]:
    seed_everything(0, verbose=False)
    callback = ManifoldEntropicMetricsCallback(num_samples=24, log_figures=False, **schedule)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    logger = CaptureLogger()
    trainer = _trainer(tmp_path, [callback, checkpoints], logger=logger, enable_checkpointing=True)
    # deterministic training on identical batches: a run resumed mid-epoch retraces the uninterrupted one exactly
    trainer.fit(TinyVAE(dropout=0.0, sample=False), loader(repeat=True), ckpt_path=ckpt_path)
    return callback, logger


# every 2 steps, explicitly or as 4 evaluations spread over the 8 steps (a function of the total, not of the resumed step)
@pytest.mark.parametrize("schedule", [{"every_n_train_steps": 2}, {"num_evaluations": 4}], ids=["every_n_train_steps", "num_evaluations"])
def test_resume_mid_training_continues_history_and_drift_without_duplicates_or_gaps(tmp_path, schedule):
    uninterrupted, _ = _resumable_fit(tmp_path, schedule)
    steps = [entry["step"] for entry in uninterrupted.history]
    assert steps == [0, 2, 4, 6, 8]
    checkpoint = tmp_path / "checkpoints" / "step=3.ckpt"  # saved between the evaluations at steps 2 and 4
    saved = torch.load(checkpoint, weights_only=True)["callbacks"][uninterrupted.state_key]
    assert [entry["step"] for entry in saved["history"]] == [0, 2]

    resumed, logger = _resumable_fit(tmp_path / "resumed", schedule, ckpt_path=str(checkpoint))
    assert [entry["step"] for entry in resumed.history] == steps
    for a, b in zip(uninterrupted.history, resumed.history, strict=True):
        assert torch.equal(a["spectrum"], b["spectrum"]), a["step"]
    # the resumed run logged only its own evaluations, each once, drift included from its first one (step 4)
    logged_steps = [step for step, metrics in logger.logged if "mem/entropy" in metrics]
    assert logged_steps == [4, 6, 8]
    assert all("mem/drift/alignment" in metrics for _, metrics in logger.logged)
    for name in ("drift/alignment", "drift/self_correlation", "entropy"):
        assert torch.equal(resumed.last_metrics[name], uninterrupted.last_metrics[name]), name


def test_load_state_dict_of_an_older_or_partial_state_uses_defaults():
    callback = ManifoldEntropicMetricsCallback(seed=4)
    callback.load_state_dict({})
    assert callback.history == [] and callback.num_failed == 0 and callback.seed == 4
    callback.load_state_dict({"history": [{"step": 7, "spectrum": torch.zeros(3)}]})
    assert [entry["step"] for entry in callback.history] == [7]
    assert callback.state_dict()["last_step"] == 7 and callback.state_dict()["previous"] is None
    callback.load_state_dict({"seed": 9, "num_failed": 2})
    assert callback.seed == 9 and callback.num_failed == 2


# ---------------------------------------------------------------- decoders of other kinds


class FlowModule(LightningModule):
    """A FrEIA normalizing flow trained by maximum likelihood; its decoder is the reverse pass of ``self.flow``."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.latent_dim = dim

        self.flow = freia_flow(dim, "AllInOneBlock", 2, dtype=torch.float32)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        z, log_det = self.flow(x)
        return (0.5 * z.square().sum(1) - log_det).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_freia_flow_module_entropy_equals_the_flows_own_log_determinant(tmp_path):
    seed_everything(1, verbose=False)
    x = torch.randn(32, 4) @ torch.tensor([[1.0, 0.5, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0.3, 0.5]])
    callback = ManifoldEntropicMetricsCallback(decoder="flow", num_samples=32, every_n_train_steps=2, every_n_epochs=None)
    model = FlowModule()
    _trainer(tmp_path, [callback], max_steps=4).fit(model, DataLoader(TensorDataset(x), batch_size=8))
    assert [entry["step"] for entry in callback.history] == [0, 2, 4]
    z = documented_latents(32, 4, seed=0)
    with torch.no_grad():
        generated = model.flow(z, rev=True)[0]
        _, forward_log_det = model.flow(generated)  # log|det dz/dx| = -log|det dx/dz|
    expected = 4 * STANDARD_NORMAL_ENTROPY - forward_log_det.double().mean()
    assert float(callback.last_metrics["entropy"]) == pytest.approx(float(expected), abs=1e-4)


class ConditionalModule(LightningModule):
    """A class-conditional decoder ``decode(z, condition)``; the condition is a label or its one-hot code."""

    def __init__(self, latent_dim: int = 2, num_classes: int = 3, one_hot: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()  # the callback finds the latent size in hparams.latent_dim
        self.embedding = nn.Embedding(num_classes, 3)
        self.net = nn.Sequential(nn.Linear(2 + 3, 16), nn.Tanh(), nn.Linear(16, DATA_DIM))

    def decode(self, z, condition):
        code = condition @ self.embedding.weight if self.hparams.one_hot else self.embedding(condition)
        return self.net(torch.cat([z, code], dim=1))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        labels = torch.arange(x.shape[0]) % self.hparams.num_classes
        condition = F.one_hot(labels, self.hparams.num_classes).float() if self.hparams.one_hot else labels
        return (self.decode(x[:, :2], condition) - x).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize("one_hot", [False, True], ids=["labels", "one-hot"])
def test_conditional_decoder_module_averages_over_classes(tmp_path, one_hot):
    conditions = (lambda labels: F.one_hot(labels, 3).float()) if one_hot else None
    callback = ManifoldEntropicMetricsCallback(num_classes=3, conditions=conditions, num_samples=30, num_evaluations=None)
    model = ConditionalModule(one_hot=one_hot)
    _trainer(tmp_path, [callback], max_steps=2).fit(model, loader())
    assert [entry["step"] for entry in callback.history] == [0, 2]
    z = documented_latents(30, 2, seed=0)
    labels = torch.arange(30) % 3
    condition = F.one_hot(labels, 3).float() if one_hot else labels
    jacobian = decoder_jacobian(model.decode, z, condition=condition)
    per_dim, total = manifold_entropy(jacobian, labels=labels, num_classes=3)
    # the class average is the mean of per-class results, computed class by class here
    per_class = torch.stack([manifold_entropy(jacobian[labels == k])[1] for k in range(3)])
    assert float(total) == pytest.approx(float(per_class.mean()), rel=1e-12)
    values = callback.last_metrics
    assert float(values["entropy"]) == pytest.approx(float(total), rel=1e-6)
    assert values["latent_entropy"] == pytest.approx(per_dim, rel=1e-6)
    assert int(values["num_classes_seen"]) == 3


def test_callable_latents_are_drawn_at_every_evaluation_and_callable_decoder(tmp_path):
    calls = []

    def encoded(trainer, pl_module):  # e.g. encoded data: changes as the encoder trains
        calls.append(trainer.global_step)
        x = next(iter(loader(num=20, batch_size=20)))[0]
        return pl_module.encoder(x).chunk(2, dim=1)[0]

    callback = ManifoldEntropicMetricsCallback(decoder=lambda module, z: module.decoder(z), latents=encoded, num_evaluations=None)
    model = TinyVAE()
    _trainer(tmp_path, [callback], max_steps=2).fit(model, loader())
    assert calls == [0, 2]
    model.eval()
    z = model.encoder(next(iter(loader(num=20, batch_size=20)))[0]).chunk(2, dim=1)[0].detach()
    _, total = manifold_entropy(decoder_jacobian(model.decoder, z))
    assert float(callback.last_metrics["entropy"]) == pytest.approx(float(total), rel=1e-6)


# ---------------------------------------------------------------- misconfiguration and faults


class NoDecoder(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(DATA_DIM, DATA_DIM)
        self.latent_dim = 2

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NoLatentSize(NoDecoder):
    """A method decoder: nothing tells its latent size (a first `nn.Linear` would, for a module decoder)."""

    def __init__(self) -> None:
        super().__init__()
        del self.latent_dim
        self.net = nn.Linear(2, DATA_DIM)

    def decode(self, z):
        return self.net(z)


@pytest.mark.parametrize(
    ("module", "options", "message"),
    [
        (NoDecoder, {}, r"NoDecoder to expose a decoder z -> x as an attribute or method `decoder` or `decode`.*self\.decoder"),
        (NoDecoder, {"decoder": "generator"}, r"method `generator`, but it has none.*decoder='name_of_your_decoder'"),
        (NoDecoder, {"decoder": "latent_dim"}, r"`NoDecoder.latent_dim` to be a decoder z -> x, but it is a int"),
        (NoLatentSize, {}, r"latent size of NoLatentSize's decoder.*latent_dim=.*self\.latent_dim.*save_hyperparameters"),
        (NoLatentSize, {"latents": torch.zeros(4, 3)}, r"`latents` of shape \(N, 2\) \(the latent size\), but got \(4, 3\)"),
    ],
)
def test_misconfiguration_is_reported_in_setup_with_how_to_fix_it(tmp_path, module, options, message):
    model = module()
    if "latents" in options:
        model.latent_dim = 2
    trainer = _trainer(tmp_path, [ManifoldEntropicMetricsCallback(**options)], max_steps=1)
    with pytest.raises(MisconfigurationException, match=message):
        trainer.fit(model, loader())
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"num_samples": 0}, ValueError, r"`num_samples` to be a positive int, but got 0"),
        ({"every_n_train_steps": 2.5}, ValueError, r"`every_n_train_steps` to be a positive int or None, but got 2.5"),
        ({"num_evaluations": 0}, ValueError, r"`num_evaluations` to be a positive int or None, but got 0"),
        ({"num_evaluations": 4.0}, ValueError, r"`num_evaluations` to be a positive int or None, but got 4.0"),
        ({"figures_every_n_evaluations": None}, ValueError, r"`figures_every_n_evaluations` to be a positive int, but got None"),
        ({"top_k": True}, ValueError, r"`top_k`"),
        ({"mode": "fast"}, ValueError, r"`mode` to be one of .* but got 'fast'"),
        ({"latents": torch.zeros(5)}, ValueError, r"`latents` to be a floating point tensor of shape \(N, d\).*\(5,\)"),
        ({"latents": [1.0]}, TypeError, r"`latents` to be a tensor"),
        ({"latent_dim": 2, "latents": torch.zeros(4, 3)}, ValueError, r"`latents` of shape \(N, 2\).*\(4, 3\)"),
        ({"conditions": torch.zeros(10)}, ValueError, r"`conditions` with N == 256 rows \(one per latent\), but got \(10,\)"),
        ({"num_classes": 3, "num_samples": 4, "conditions": torch.rand(4)}, ValueError, r"integer class labels.*torch.float32"),
        ({"conditions": lambda labels: labels}, ValueError, r"`num_classes` to be set"),
        ({"reference_latents": torch.zeros(4, 2)}, ValueError, r"`reference_decoder` to be set"),
        ({"decoder": 3}, TypeError, r"`decoder` to be an attribute name, a callable .* but got int"),
        ({"sigma": torch.tensor([1.0, -1.0])}, ValueError, r"`sigma` to be positive"),
    ],
)
def test_invalid_arguments_name_the_argument_expected_and_actual(options, error, message):
    with pytest.raises(error, match=message):
        ManifoldEntropicMetricsCallback(**options)


class PoisonedDecoder(TinyVAE):
    """Trains fine, but from `on_fit_start` on (after the callback's test call in `setup`) its `decode` output holds NaN
    (through the Jacobian too, or only in the value)."""

    def __init__(self, poison: str, from_the_start: bool = False) -> None:
        super().__init__()
        self.poison, self.poisoned = poison, from_the_start

    def on_fit_start(self) -> None:
        self.poisoned = True

    def decode(self, z):
        x = self.decoder(z)
        if not self.poisoned:
            return x
        return x * math.nan if self.poison == "times" else x + math.nan  # "plus": the Jacobian itself stays finite


@pytest.mark.parametrize("poison", ["times", "plus"])
def test_nan_decoder_warns_counts_failures_and_training_continues(tmp_path, poison):
    logger = CaptureLogger()
    callback = ManifoldEntropicMetricsCallback(decoder="decode", num_samples=8, every_n_epochs=1, log_figures=False)
    trainer = _trainer(tmp_path, [callback], logger=logger)
    with pytest.warns(RuntimeWarning, match=r"evaluation at step \d failed on rank 0 \((ValueError|FloatingPointError)"):
        trainer.fit(PoisonedDecoder(poison), loader())
    assert trainer.global_step == 8  # trained to the end
    assert callback.num_failed == 3 and callback.history == [] and callback.last_metrics == {}  # steps 0, 4 (epoch 1), 8
    assert logger.logged == [(0, {"mem/failed": 1.0}), (4, {"mem/failed": 2.0}), (8, {"mem/failed": 3.0})]


@pytest.mark.parametrize("poison", ["times", "plus"])
def test_a_decoder_that_is_nan_from_the_start_fails_in_setup_before_training(tmp_path, poison):
    callback = ManifoldEntropicMetricsCallback(decoder="decode", num_samples=8)
    trainer = _trainer(tmp_path, [callback])
    with pytest.raises(MisconfigurationException, match=r"NaN or inf"):
        trainer.fit(PoisonedDecoder(poison, from_the_start=True), loader())
    assert trainer.global_step == 0 and callback.history == []


def test_nan_decoder_with_strict_raises(tmp_path):
    callback = ManifoldEntropicMetricsCallback(decoder="decode", num_samples=8, strict=True)
    with pytest.raises(
        RuntimeError, match=r"strict=True\): the evaluation at step 0 failed \(FloatingPointError: the decoder output holds NaN"
    ):
        _trainer(tmp_path, [callback]).fit(PoisonedDecoder("times"), loader())


def test_a_logger_without_figures_gets_the_scalars_and_a_single_warning(tmp_path):
    logger = CaptureLogger()
    callback = ManifoldEntropicMetricsCallback(num_samples=8, every_n_train_steps=1, every_n_epochs=None, top_k=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [callback], logger=logger, max_steps=3).fit(TinyVAE(), loader())
    figure_warnings = [w for w in caught if "figures only to TensorBoard" in str(w.message)]
    assert len(figure_warnings) == 1 and "CaptureLogger" in str(figure_warnings[0].message)
    assert [step for step, _ in logger.logged] == [0, 1, 2, 3]
    # top_k=5 > d=3: three ranks; drift from the second evaluation on
    active = {name for name in ACTIVE_NAMES if "/reference/" not in name}
    assert set(logger.logged[0][1]) == {f"mem/{name}" for name in SCALAR_NAMES | active}
    assert set(logger.logged[1][1]) == {f"mem/{name}" for name in SCALAR_NAMES | DRIFT_NAMES | active | ACTIVE_DRIFT_NAMES}


# ---------------------------------------------------------------- CUDA (runs on a GPU machine; CPU-only CI skips it)


def _fit_on(accelerator: str, tmp_path: Path, callbacks: list[Callback]) -> tuple[TinyVAE, tuple]:
    seed_everything(3, verbose=False)
    model = TinyVAE(dropout=0.3)
    _trainer(tmp_path, callbacks, accelerator=accelerator, max_steps=4, max_epochs=-1).fit(model, loader())
    cuda_rng = torch.cuda.get_rng_state() if accelerator == "gpu" else torch.empty(0)
    return model, (*_global_rng_states(), cuda_rng)


def _check_device_run(accelerator: str, tmp_path: Path) -> None:
    without, rng = _fit_on(accelerator, tmp_path / "without", [])
    callback = ManifoldEntropicMetricsCallback(num_samples=40, every_n_train_steps=2, chunk_size=16, log_figures=False)
    model, rng_cb = _fit_on(accelerator, tmp_path / "with", [callback])
    assert [entry["step"] for entry in callback.history] == [0, 2, 4]
    for name, value in without.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name  # Dropout on the device draws from its generator
    assert torch.equal(rng[0], rng_cb[0]) and np.array_equal(rng[1], rng_cb[1]) and rng[2] == rng_cb[2]
    assert torch.equal(rng[3], rng_cb[3])  # the CUDA generator too
    decoder = model.decoder.cpu().double().eval()
    per_dim, total = manifold_entropy(decoder_jacobian(decoder, documented_latents(40, LATENT_DIM, seed=0).double()))
    assert float(callback.last_metrics["entropy"]) == pytest.approx(float(total), rel=1e-4)
    assert callback.last_metrics["latent_entropy"] == pytest.approx(per_dim, rel=1e-4, abs=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_training_is_unchanged_and_values_match_cpu_float64(tmp_path):
    _check_device_run("gpu", tmp_path)
