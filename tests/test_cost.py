"""The callback's time budget: the sample-count rule, the budget's accounting, and real fits under a fake clock.

The clock is injected (``callback.budget.clock``): a ``Tick`` callback advances it by ``T`` seconds per training step
and every ``evaluate_decoder`` call of the tracker by ``c`` seconds per latent it evaluates, so that the sample
counts the callback chooses are known in advance and the tests do not depend on the machine's speed. Values are
checked against ``ManifoldEntropicMetrics`` / ``ManifoldCrossMutualInformation`` fed by autograd Jacobians
(``conftest.autograd_jacobian``, not the engine under test) of copies of the decoder, on the first ``n`` of the
documented latents.

Run as a script (``python tests/test_cost.py --ddp OUT_DIR``) it is the 2-process DDP fit of
``test_every_rank_takes_rank_zeros_sample_count``.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _callback_models import LATENT_DIM, RecordDecoder, TinyVAE, loader
from conftest import CaptureLogger, autograd_jacobian, documented_latents, free_port
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_mem.tracking
from lightning_mem import ManifoldCrossMutualInformation, ManifoldEntropicMetrics, ManifoldEntropicMetricsCallback
from lightning_mem.budget import DEFAULT_MAX_OVERHEAD, FIGURE_SECONDS, TimeBudget, affordable_samples

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:The number of training batches:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*treespec.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*the Trainer has no logger:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*is postponed:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*figures were not drawn:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*logs figures only to:UserWarning"),
]

HERE = Path(__file__).resolve().parent
SEED = 0  # the callback's default seed: its latents are documented_latents(256, d, seed=0)


class FakeClock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Tick(Callback):
    """Each training step takes ``seconds`` (placed before the metrics callback, so its evaluations see the time)."""

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.now += self.seconds


def _cost_per_latent(monkeypatch: pytest.MonkeyPatch, clock: FakeClock, seconds: float) -> None:
    """Every latent the tracker evaluates costs ``seconds`` of the fake clock."""
    evaluate = lightning_mem.tracking.evaluate_decoder

    def timed(decoder, z, *args, **kwargs):
        clock.now += seconds * z.shape[0]
        return evaluate(decoder, z, *args, **kwargs)

    monkeypatch.setattr(lightning_mem.tracking, "evaluate_decoder", timed)


def _fit(tmp_path: Path, callback: ManifoldEntropicMetricsCallback, clock: FakeClock, step_seconds: float, **options) -> TinyVAE:
    callback.budget.clock = clock
    model = options.pop("model", None) or TinyVAE()
    trainer_options = {
        "default_root_dir": tmp_path,
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": -1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }
    trainer_options.update(options)
    callbacks = [Tick(clock, step_seconds), callback, *trainer_options.pop("callbacks", [])]
    Trainer(callbacks=callbacks, **trainer_options).fit(model, loader())
    return model


def _brute_force(seconds: float, fixed: float, per_latent: float, low: int, high: int) -> int:
    """The largest of low, 2 low, 4 low, ... and high whose cost fits, by trying them all (0 if none)."""
    candidates = [low * 2**j for j in range(64) if low * 2**j < high] + [high]
    fitting = [n for n in candidates if fixed + per_latent * n <= seconds * (1 + 1e-12)]
    return max(fitting, default=0)


# ---------------------------------------------------------------- the rule


def test_affordable_samples_is_the_largest_power_of_two_multiple_of_the_minimum_that_the_seconds_pay_for():
    # training time T = 4 s since the last evaluation, budget 5%: 0.2 s; c = 0.01 s per latent: 20 latents -> 16
    assert affordable_samples(0.05 * 4.0, fixed_seconds=0.0, sample_seconds=0.01, min_samples=1, max_samples=256) == 16
    assert affordable_samples(0.2, fixed_seconds=0.05, sample_seconds=0.01, min_samples=1, max_samples=256) == 8  # 15 -> 8
    assert affordable_samples(0.2, fixed_seconds=0.0, sample_seconds=0.01, min_samples=3, max_samples=256) == 12  # 3 * 4
    assert affordable_samples(0.2, fixed_seconds=0.0, sample_seconds=0.01, min_samples=1, max_samples=20) == 20  # all of them
    assert affordable_samples(0.2, fixed_seconds=0.0, sample_seconds=0.01, min_samples=1, max_samples=12) == 12
    assert affordable_samples(0.2, fixed_seconds=0.0, sample_seconds=0.3, min_samples=1, max_samples=256) == 0  # not even one
    assert affordable_samples(-1.0, fixed_seconds=0.0, sample_seconds=0.01, min_samples=1, max_samples=256) == 0
    assert affordable_samples(0.1, fixed_seconds=0.0, sample_seconds=0.0, min_samples=1, max_samples=256) == 256  # free
    generator = torch.Generator().manual_seed(0)
    for _ in range(500):
        seconds, fixed, per_latent = (torch.rand(3, generator=generator, dtype=torch.float64) * torch.tensor([2.0, 0.2, 0.05])).tolist()
        low = int(torch.randint(1, 5, (), generator=generator))
        high = int(torch.randint(low, 300, (), generator=generator))
        expected = _brute_force(seconds, fixed, per_latent, low, high)
        assert affordable_samples(seconds, fixed_seconds=fixed, sample_seconds=per_latent, min_samples=low, max_samples=high) == expected


def test_time_budget_credit_is_the_overhead_fraction_of_the_training_time_minus_what_was_spent():
    clock = FakeClock()
    budget = TimeBudget(0.05, min_samples=2, max_samples=256, clock=clock)
    assert budget.limited and not budget.measured and budget.credit() == 0.0
    clock.now = 10.0
    assert budget.training_time() == 10.0 and budget.credit() == pytest.approx(0.5)
    clock.now = 10.3  # 0.3 s of it were the callback's
    budget.charge(0.3)
    assert budget.training_time() == pytest.approx(10.0) and budget.credit() == pytest.approx(0.5 - 0.3)
    budget.record(seconds=0.1, sample_seconds=0.08, num_samples=8)  # a = 0.02 s, b = 0.01 s per latent
    assert budget.measured and budget.fixed_seconds == pytest.approx(0.02) and budget.sample_seconds == pytest.approx(0.01)
    assert budget.cost(4) == pytest.approx(0.06)
    # an optional evaluation keeps back the end of training's (2 latents: 0.04 s): (0.2 - 0.04 - 0.02) / 0.01 = 14 -> 8
    assert budget.num_samples(budget.credit()) == 8
    assert budget.num_samples(budget.credit(), required=True) == 16  # (0.2 - 0.02) / 0.01 = 18 -> 16
    assert budget.num_samples(0.05) == 0 and budget.num_samples(0.05, required=True) == 2  # postponed / the minimum
    # before a drawing was timed: FIGURE_SECONDS and the pictures' Jacobians (16 latents: 0.16 s) > 0.2 s
    assert budget.figure_cost(latents=16) == pytest.approx(FIGURE_SECONDS + 0.16) and not budget.can_draw(latents=16, final=True)
    budget.record_figures(0.18)  # a drawing took 0.18 s: the end may draw; before it, 0.2 - 0.04 kept back does not cover it
    assert budget.can_draw(final=True) and not budget.can_draw()
    budget.start()
    assert budget.credit() == 0.0 and budget.measured  # a new start keeps the measured costs (`reset` forgets them)
    budget.reset(min_samples=1, max_samples=4)
    assert not budget.measured and budget.figure_cost(latents=16) == FIGURE_SECONDS
    unlimited = TimeBudget(None, min_samples=1, max_samples=256, clock=clock)
    assert not unlimited.limited and unlimited.credit() == math.inf and unlimited.num_samples(0.0) == 256 and unlimited.can_draw()


# ---------------------------------------------------------------- real fits under the fake clock


def test_each_evaluation_takes_the_latents_the_credit_since_the_last_one_pays_for(tmp_path, monkeypatch):
    clock, capture, recorder = FakeClock(), CaptureLogger(), RecordDecoder()
    _cost_per_latent(monkeypatch, clock, 0.01)
    callback = ManifoldEntropicMetricsCallback(every_n_train_steps=4, every_n_epochs=None)
    assert callback.max_overhead == DEFAULT_MAX_OVERHEAD and callback.num_samples == 256
    initial = TinyVAE()
    start_decoder = copy.deepcopy(initial.decoder).eval()
    _fit(tmp_path, callback, clock, step_seconds=1.0, max_steps=12, logger=capture, callbacks=[recorder], model=initial)

    # T = 1 s per step, c = 0.01 s per latent, 5%:
    # step 4: credit 0.2 s; the start (half of it, before any cost is known): 1 latent timed (0.01 s), then 0.1 / 0.01 = 10 -> 8;
    #         then the step itself: 0.2 - 0.08 = 0.12, less 0.01 kept back for the end: 11 -> 8
    # step 8: 0.05 * 8 - 0.16 = 0.24, less 0.01: 23 -> 16;  step 12: 0.6 - 0.32 = 0.28, less 0.01: 27 -> 16
    assert [entry["step"] for entry in callback.history] == [0, 4, 8, 12]
    assert capture.scalar("num_samples") == [(0, 8), (4, 8), (8, 16), (12, 16)]
    assert callback.total_time == pytest.approx(0.01 * (8 + 8 + 16 + 16))
    assert callback.budget.credit() == pytest.approx(0.05 * 12 - 0.48)

    # the start of training, evaluated at step 4 from its kept weights, is the initial decoder at the first 8 latents
    z = documented_latents(256, LATENT_DIM, seed=SEED)
    truth = ManifoldEntropicMetrics(LATENT_DIM)
    truth.update(autograd_jacobian(start_decoder, z[:8]))
    expected = truth.compute()
    logged = dict(capture.logged[0][1])
    assert capture.logged[0][0] == 0
    # float32 decoders: the truth's autograd Jacobians round in another order than the engine's (about 1e-7 relative)
    assert logged["mem/entropy"] == pytest.approx(float(expected["entropy"]), rel=1e-5, abs=1e-6)
    assert logged["mem/total_correlation"] == pytest.approx(float(expected["total_correlation"]), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(callback.history[0]["spectrum"], expected["spectrum"], rtol=1e-5, atol=1e-6)

    # drift at step 8 (16 latents) against step 4 (8 latents): on the 8 latents both took
    def decoder_at(step: int) -> torch.nn.Module:
        decoder = TinyVAE().decoder
        decoder.load_state_dict(recorder.weights[step])
        return decoder.eval()

    cross = ManifoldCrossMutualInformation(LATENT_DIM, LATENT_DIM)
    cross.update(autograd_jacobian(decoder_at(8), z[:8]), autograd_jacobian(decoder_at(4), z[:8]))
    drift = cross.compute()
    assert dict(capture.scalar("drift/self_correlation"))[8] == pytest.approx(float(drift["self_correlation"]), rel=1e-5)
    assert dict(capture.scalar("drift/alignment"))[8] == pytest.approx(float(drift["alignment"]), rel=1e-5)
    # and the last evaluation (16 latents, as at step 8): the decoder at step 12, drift over all 16
    truth = ManifoldEntropicMetrics(LATENT_DIM)
    truth.update(autograd_jacobian(decoder_at(12), z[:16]))
    assert float(callback.last_metrics["entropy"]) == pytest.approx(float(truth.compute()["entropy"]), rel=1e-5, abs=1e-6)
    cross = ManifoldCrossMutualInformation(LATENT_DIM, LATENT_DIM)
    cross.update(autograd_jacobian(decoder_at(12), z[:16]), autograd_jacobian(decoder_at(8), z[:16]))
    torch.testing.assert_close(
        callback.last_metrics["drift/cross_mutual_information"], cross.compute()["cross_mutual_information"], rtol=1e-5, atol=1e-6
    )


def test_an_evaluation_the_budget_cannot_pay_for_is_postponed_and_the_end_is_always_evaluated(tmp_path, monkeypatch):
    clock, capture = FakeClock(), CaptureLogger()
    _cost_per_latent(monkeypatch, clock, 1.0)  # a latent costs as much as a training step
    callback = ManifoldEntropicMetricsCallback(every_n_train_steps=2, every_n_epochs=None)
    with pytest.warns(UserWarning, match=r"evaluation at step 2 is postponed.*even 1 latent\(s\) would cost about 1 s") as caught:
        _fit(tmp_path, callback, clock, step_seconds=1.0, max_steps=8, logger=capture)
    assert len([w for w in caught if "postponed" in str(w.message)]) == 1  # said once
    # step 2: the start takes its 1 timed latent (1 s, the credit is 0.05 s); every later step is in debt until the end
    assert [entry["step"] for entry in callback.history] == [0, 8]
    assert capture.scalar("num_samples") == [(0, 1), (8, 1)]


def test_explicit_latents_or_max_overhead_none_evaluate_everything_at_every_step_before_training_as_before(tmp_path, monkeypatch):
    assert ManifoldEntropicMetricsCallback(num_samples=32).max_overhead is None  # "auto": explicit samples are exact
    assert ManifoldEntropicMetricsCallback(latents=torch.zeros(4, 3)).max_overhead is None
    assert ManifoldEntropicMetricsCallback(num_samples=32, max_overhead=0.1).budget.limited
    for bad in ("fast", 0.0, -0.5, True, math.inf):
        with pytest.raises(ValueError, match=r"`max_overhead` to be a positive"):
            ManifoldEntropicMetricsCallback(max_overhead=bad)

    class SeenBeforeTheFirstStep(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 0:
                self.evaluations = len(callback.history)

    clock, capture, seen = FakeClock(), CaptureLogger(), SeenBeforeTheFirstStep()
    _cost_per_latent(monkeypatch, clock, 1.0)  # far more than any budget: without one, nothing changes
    callback = ManifoldEntropicMetricsCallback(max_overhead=None, every_n_train_steps=2, every_n_epochs=None, log_figures=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no postponement, no budget warning
        warnings.filterwarnings("ignore", message=".*(does not have many workers|treespec|number of training batches).*")
        _fit(tmp_path, callback, clock, step_seconds=1.0, max_steps=6, logger=capture, callbacks=[seen])
    assert seen.evaluations == 1  # the start was evaluated in on_train_start, before the first step
    assert [entry["step"] for entry in callback.history] == [0, 2, 4, 6]
    assert int(callback.last_metrics["num_samples"]) == 256
    assert capture.scalar("num_samples") == []  # not logged without a budget
    assert callback.total_time == pytest.approx(4 * 256 * 1.0)


@pytest.mark.parametrize(("step_seconds", "drawn"), [(100.0, True), (1.0, False)])
def test_figures_are_drawn_only_from_credit_the_evaluations_left(tmp_path, monkeypatch, step_seconds, drawn):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    clock = FakeClock()
    _cost_per_latent(monkeypatch, clock, 1e-4)
    callback = ManifoldEntropicMetricsCallback(num_evaluations=2)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, callback, clock, step_seconds=step_seconds, max_steps=4, logger=logger)
    # 4 steps of 100 s: a credit of 20 s covers the figures; of 1 s: the 0.2 s of credit does not cover FIGURE_SECONDS
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert ("mem/spectrum_history" in events.Tags()["images"]) is drawn
    assert any("figures were not drawn" in str(w.message) for w in caught) is not drawn
    assert [entry["step"] for entry in callback.history] == [0, 2, 4]


# ---------------------------------------------------------------- distributed: rank zero decides


def _ddp_main(out: Path) -> None:
    """Rank r's latents cost 10^r times rank 0's: only a shared decision gives every rank the same sample counts."""
    warnings.filterwarnings("ignore")
    seed_everything(0, verbose=False)
    clock = FakeClock()
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    evaluate = lightning_mem.tracking.evaluate_decoder

    def timed(decoder, z, *args, **kwargs):
        clock.now += 0.01 * 10**rank * z.shape[0]
        return evaluate(decoder, z, *args, **kwargs)

    lightning_mem.tracking.evaluate_decoder = timed
    callback = ManifoldEntropicMetricsCallback(every_n_train_steps=4, every_n_epochs=None, log_figures=False)
    callback.budget.clock = clock

    class Counts(Callback):
        def __init__(self) -> None:
            self.counts: list[tuple[int, int]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if "mem/num_samples" in trainer.callback_metrics and callback.history[-1]["step"] == trainer.global_step:
                self.counts.append((trainer.global_step, int(trainer.callback_metrics["mem/num_samples"])))

    counts, recorder = Counts(), RecordDecoder()
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        precision="64-true",
        max_steps=12,
        max_epochs=-1,
        logger=False,
        callbacks=[Tick(clock, 1.0), callback, counts, recorder],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(TinyVAE(), loader())
    torch.save(
        {"counts": counts.counts, "history": callback.history, "last_metrics": callback.last_metrics, "weights": recorder.weights},
        out / f"rank{trainer.global_rank}.pt",
    )


@pytest.mark.slow
def test_every_rank_takes_rank_zeros_sample_count_and_the_result_is_the_first_n_latents_in_one_process(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    result = subprocess.run(
        [sys.executable, str(HERE / "test_cost.py"), "--ddp", str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1))
    assert [entry["step"] for entry in rank0["history"]] == [entry["step"] for entry in rank1["history"]] == [0, 4, 8, 12]
    assert rank0["counts"] == rank1["counts"]
    assert len({count for _, count in rank0["counts"]}) > 1  # the budget did choose (not all 256 every time)
    for name, value in rank0["last_metrics"].items():
        if name != "eval_time":
            assert torch.equal(value, rank1["last_metrics"][name]), name
    # the synced result is one process's evaluation of the first n latents (n logged), not of two different prefixes
    n = int(rank0["last_metrics"]["num_samples"])
    assert n == rank0["counts"][-1][1] and n & (n - 1) == 0
    decoder = TinyVAE().decoder.double()
    decoder.load_state_dict(rank0["weights"][12])
    truth = ManifoldEntropicMetrics(LATENT_DIM)
    truth.update(autograd_jacobian(decoder.eval(), documented_latents(256, LATENT_DIM, seed=SEED, dtype=torch.float64)[:n]))
    expected = truth.compute()
    torch.testing.assert_close(rank0["last_metrics"]["entropy"], expected["entropy"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rank0["last_metrics"]["latent_entropy"], expected["latent_entropy"], rtol=1e-10, atol=1e-10)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--ddp":
    _ddp_main(Path(sys.argv[2]))


def test_the_tracker_times_on_the_budgets_clock_and_the_callback_still_pickles():
    """ddp_spawn pickles the callbacks; the active latents' pass must be timed on the budget's (replaceable) clock."""
    callback = ManifoldEntropicMetricsCallback()
    clock = FakeClock()
    callback.budget.clock = clock
    clock.now = 12.5
    assert callback._tracker.clock() == 12.5
    restored = pickle.loads(pickle.dumps(callback))
    assert restored._tracker.clock() == 12.5 and restored._tracker.clock.__self__ is restored
