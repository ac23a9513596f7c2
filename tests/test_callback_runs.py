"""The callback across runs: a second fit starts afresh; an interrupted evaluation is neither lost nor duplicated."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _callback_models import TinyVAE, loader
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import OnExceptionCheckpoint

from lightning_mem import ManifoldCrossMutualInformation, ManifoldEntropicMetricsCallback, decoder_jacobian
from lightning_mem.evaluation import prior_latents

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:The number of training batches:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*the Trainer has no logger:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def _trainer(tmp_path: Path, callbacks: list[Callback], **options) -> Trainer:
    return Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **{"max_steps": 4, "enable_checkpointing": False, **options},
    )


class RecordWeights(Callback):
    """The decoder's weights at each training step's end (after the optimizer step), for the truth computed by hand."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.states[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.decoder.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.states[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.decoder.state_dict().items()}


def _decoder_at(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = TinyVAE().double()
    model.decoder.load_state_dict({k: v.double() for k, v in state.items()})
    return model.decoder.eval()


def test_a_second_fit_of_the_same_callback_starts_a_fresh_history_without_drift_against_the_old_run(tmp_path):
    callback = ManifoldEntropicMetricsCallback(num_samples=16, every_n_train_steps=2, log_figures=False)
    seed_everything(0, verbose=False)
    _trainer(tmp_path / "first", [callback]).fit(TinyVAE(), loader())
    assert [entry["step"] for entry in callback.history] == [0, 2, 4]

    seed_everything(1, verbose=False)
    record = RecordWeights()
    second_model = TinyVAE()
    _trainer(tmp_path / "second", [callback, record]).fit(second_model, loader())
    assert [entry["step"] for entry in callback.history] == [0, 2, 4]  # its own start evaluation, nothing of the first run
    # the second run's first drift compares step 2 with ITS step 0 (not with the first run's last model)
    z = prior_latents(16, 3, seed=0)
    truth = ManifoldCrossMutualInformation(3, 3)
    truth.update(decoder_jacobian(_decoder_at(record.states[4]), z), decoder_jacobian(_decoder_at(record.states[2]), z))
    torch.testing.assert_close(
        callback.last_metrics["drift/cross_mutual_information"], truth.compute()["cross_mutual_information"], rtol=1e-4, atol=1e-5
    )


class InterruptOnce(Callback):
    """Raises KeyboardInterrupt from inside the metrics callback's evaluation at ``step``, the first time only."""

    def __init__(self, callback: ManifoldEntropicMetricsCallback, step: int) -> None:
        self.step, self.fired = step, False
        tracker = callback._tracker
        original = tracker.accumulate

        def accumulate(trainer, pl_module):
            original(trainer, pl_module)  # the metrics are filled: the interruption comes as late as it can
            if trainer.global_step == self.step and not self.fired:
                self.fired = True
                raise KeyboardInterrupt

        tracker.accumulate = accumulate


@pytest.mark.slow
def test_an_evaluation_interrupted_by_keyboard_interrupt_is_evaluated_after_resume_and_not_lost(tmp_path):
    def run(callback: ManifoldEntropicMetricsCallback, extra: list[Callback], ckpt_path: str | None = None) -> None:
        seed_everything(0, verbose=False)
        trainer = _trainer(tmp_path, [callback, *extra], max_steps=6, enable_checkpointing=True)
        trainer.fit(TinyVAE(), loader(), ckpt_path=ckpt_path)

    uninterrupted = ManifoldEntropicMetricsCallback(num_samples=16, every_n_train_steps=2, log_figures=False)
    run(uninterrupted, [])

    callback = ManifoldEntropicMetricsCallback(num_samples=16, every_n_train_steps=2, log_figures=False)
    on_exception = OnExceptionCheckpoint(dirpath=tmp_path / "interrupted", filename="interrupted")
    InterruptOnce(callback, step=4)
    with pytest.raises(SystemExit):  # Lightning catches the KeyboardInterrupt, runs OnExceptionCheckpoint and exits
        run(callback, [on_exception])
    assert [entry["step"] for entry in callback.history] == [0, 2]  # step 4 was not marked done
    checkpoint = tmp_path / "interrupted" / "interrupted.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 4

    resumed = ManifoldEntropicMetricsCallback(num_samples=16, every_n_train_steps=2, log_figures=False)
    run(resumed, [], ckpt_path=str(checkpoint))
    assert [entry["step"] for entry in resumed.history] == [0, 2, 4, 6]  # step 4 evaluated on resume, once
    # up to the interruption the runs are the same; the resumed step-4 evaluation is that of the uninterrupted run
    # (later steps differ: a mid-epoch resume does not replay the data loader's order)
    for mine, theirs in zip(resumed.history[:3], uninterrupted.history[:3], strict=True):
        torch.testing.assert_close(mine["spectrum"], theirs["spectrum"], rtol=1e-5, atol=1e-6)
