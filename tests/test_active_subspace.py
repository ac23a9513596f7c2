"""Disentanglement and drift on the active latents, against a naive computation straight from the formulas.

The decoder (tests/_active_ddp.py) has three dense latents and three whose columns are 1000 times shorter: a plateau
about 7 nats below. The truths are float64 ``torch.autograd.functional.jacobian`` per sample, ``slogdet`` of the
Gram sub-matrix of the active columns per sample, and the pairwise and cross terms by loops over pairs.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _active_ddp import ACTIVE, INACTIVE, LATENT_DIM, NUM_SAMPLES, SEED, PlateauDecoder, PlateauModule, RecordWeights, decoder_at
from _active_ddp import plateau_loader as loader
from conftest import H0, CaptureLogger, autograd_jacobian, documented_latents, free_port
from lightning.pytorch import Trainer, seed_everything

from lightning_mem import ManifoldEntropicMetrics, ManifoldEntropicMetricsCallback
from lightning_mem.evaluate import decoder_metrics
from lightning_mem.evaluation import active_total_correlation, evaluate_decoder
from lightning_mem.functional import (
    DEFAULT_ACTIVE_THRESHOLD,
    active_alignment,
    active_latents,
    manifold_entropy,
    manifold_total_correlation,
    num_active_latents,
    pairwise_summary,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:The number of training batches:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*treespec.*:DeprecationWarning"),
]

HERE = Path(__file__).resolve().parent
F64 = torch.float64
RTOL = 1e-10


# ------------------------------------------------------------------------------------------------ truths


def _jacobian(decoder: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    return autograd_jacobian(decoder.double().eval(), z.double())


def naive_total_correlation(jacobian: torch.Tensor, latents: tuple[int, ...]) -> float:
    """1/2 mean over samples of sum_{i in A} log G_ii - log det G_AA, from the Gram sub-matrix of each sample."""
    if len(latents) < 2:
        return 0.0
    total = 0.0
    for j in jacobian:
        g = j[:, list(latents)].T @ j[:, list(latents)]
        sign, log_det = torch.linalg.slogdet(g)
        assert sign > 0
        total += 0.5 * (float(torch.log(g.diagonal()).sum()) - float(log_det))
    return total / jacobian.shape[0]


def naive_cross(jacobian: torch.Tensor, other: torch.Tensor, rows: tuple[int, ...], columns: tuple[int, ...]) -> torch.Tensor:
    """MCPMI_ij = -1/2 mean log(1 - cos^2(a_i, b_j)) for i in rows, j in columns, by a loop over pairs."""
    cross = torch.zeros(len(rows), len(columns), dtype=F64)
    for r, i in enumerate(rows):
        for c, k in enumerate(columns):
            terms = []
            for a, b in zip(jacobian, other, strict=True):
                cosine = float(a[:, i] @ b[:, k]) / (float(a[:, i].norm()) * float(b[:, k].norm()))
                terms.append(-0.5 * math.log(1.0 - cosine**2))
            cross[r, c] = sum(terms) / len(terms)
    return cross


def naive_pairwise(jacobian: torch.Tensor, latents: tuple[int, ...]) -> tuple[float, float]:
    """Max and mean MPMI over the pairs of ``latents`` (0, 0 for fewer than two)."""
    if len(latents) < 2:
        return 0.0, 0.0
    values = [float(naive_cross(jacobian, jacobian, (i,), (k,))) for i in latents for k in latents if i < k]
    return max(values), sum(values) / len(values)


def naive_alignment(cross: torch.Tensor) -> dict[str, float]:
    """Linfoot's r of each entry; the mean of each row's best r, and (square) the mean diagonal and the rows whose best
    is another column."""
    r = torch.sqrt(1.0 - torch.exp(-2.0 * cross))
    best = r.max(dim=1)
    summary = {"alignment": float(best.values.mean()), "num_matched": len(set(best.indices.tolist()))}
    if cross.shape[0] == cross.shape[1]:
        summary["self_correlation"] = float(r.diagonal().mean())
        summary["num_rematched"] = sum(int(k) != i for i, k in enumerate(best.indices.tolist()))
    return summary


@pytest.fixture(scope="module")
def plateau():
    decoder = PlateauDecoder().double().eval()
    z = torch.randn(24, LATENT_DIM, generator=torch.Generator().manual_seed(1), dtype=F64)
    return decoder, z, _jacobian(decoder, z)


# ------------------------------------------------------------------------------------------------ the count


def test_the_default_count_reads_the_spectrum_and_a_threshold_keeps_the_absolute_rule(plateau):
    _, _, jacobian = plateau
    entropy, _ = manifold_entropy(jacobian)
    column_norms = torch.stack([torch.stack([j[:, i].norm() for j in jacobian]).log().mean().exp() for i in range(LATENT_DIM)])
    assert torch.allclose(entropy, H0 + column_norms.log())
    result = active_latents(entropy)
    assert result.mask.tolist() == [i in ACTIVE for i in range(LATENT_DIM)]
    assert int(num_active_latents(entropy)) == int(result.num_active) == len(ACTIVE)
    # the absolute rule counts geometric-mean column norms above the threshold: the switched-off columns (about 1e-3
    # long) are above 1e-4, below 0.01
    for threshold in (DEFAULT_ACTIVE_THRESHOLD, 1e-4, 10.0):
        expected = int((column_norms > threshold).sum())
        assert int(num_active_latents(entropy, threshold=threshold)) == expected
        assert active_latents(entropy, threshold=threshold).mask.tolist() == (column_norms > threshold).tolist()
    assert int(num_active_latents(entropy, threshold=1e-4)) == LATENT_DIM


# ------------------------------------------------------------------------------------------------ the values


def test_pairwise_mutual_information_of_the_active_latents_is_the_naive_one(plateau):
    _, _, jacobian = plateau
    metric = ManifoldEntropicMetrics(LATENT_DIM)
    for chunk in jacobian.split(7):
        metric.update(chunk)
    values = metric.compute()
    largest, mean = naive_pairwise(jacobian, ACTIVE)
    assert float(values["active/pairwise_mutual_information_max"]) == pytest.approx(largest, rel=RTOL)
    assert float(values["active/pairwise_mutual_information_mean"]) == pytest.approx(mean, rel=RTOL)
    # all latents: the inactive ones' tiny columns add pairs of their own
    largest_all, mean_all = naive_pairwise(jacobian, tuple(range(LATENT_DIM)))
    assert float(values["pairwise_mutual_information_max"]) == pytest.approx(largest_all, rel=RTOL)
    assert float(values["pairwise_mutual_information_mean"]) == pytest.approx(mean_all, rel=RTOL)
    # the absolute rule with a threshold below every column: all latents are active, the same values as all latents
    every = ManifoldEntropicMetrics(LATENT_DIM, active_threshold=1e-6)
    every.update(jacobian)
    values = every.compute()
    assert float(values["active/pairwise_mutual_information_max"]) == pytest.approx(largest_all, rel=RTOL)
    assert float(values["active/pairwise_mutual_information_mean"]) == pytest.approx(mean_all, rel=RTOL)


def test_pairwise_summary_with_fewer_than_two_latents_is_zero():
    pairwise = torch.tensor([[0.0, 0.7, 0.2], [0.7, 0.0, 0.4], [0.2, 0.4, 0.0]], dtype=F64)
    for mask in ([True, False, False], [False, False, False]):
        summary = pairwise_summary(pairwise, torch.tensor(mask))
        assert [float(value) for value in summary.values()] == [0.0, 0.0]
    summary = pairwise_summary(pairwise, torch.tensor([False, True, True]))
    assert float(summary["pairwise_mutual_information_max"]) == float(summary["pairwise_mutual_information_mean"]) == 0.4


@pytest.mark.parametrize("route", ["kept", "columns", "reverse", "chunked classes"])
def test_total_correlation_of_the_active_latents_is_the_naive_one(plateau, route):
    decoder, z, jacobian = plateau
    active = torch.tensor([i in ACTIVE for i in range(LATENT_DIM)])
    labels = torch.arange(z.shape[0]) % 3 if route == "chunked classes" else None
    metric = ManifoldEntropicMetrics(LATENT_DIM, num_classes=None if labels is None else 3)
    kept = evaluate_decoder(decoder, z, metric, labels=labels, chunk_size=5, keep_bytes=2**20)
    source = {"jacobians": kept} if route == "kept" else {"decoder": decoder, "z": z, "labels": labels}
    got = active_total_correlation(metric, active, mode="reverse" if route == "reverse" else "auto", chunk_size=5, **source)
    if labels is None:
        expected = naive_total_correlation(jacobian, ACTIVE)
    else:  # class-conditional: the mean over classes of each class's value
        expected = sum(naive_total_correlation(jacobian[labels == k], ACTIVE) for k in range(3)) / 3
    assert got.dtype == F64 and got.ndim == 0
    assert float(got) == pytest.approx(expected, rel=RTOL)
    # it is the dependence of the active latents alone: far below the total correlation of all latents
    assert float(got) < float(manifold_total_correlation(jacobian)) - 0.5


def test_total_correlation_with_fewer_than_two_or_all_latents_active(plateau):
    _, _, jacobian = plateau
    metric = ManifoldEntropicMetrics(LATENT_DIM)
    metric.update(jacobian)
    for mask in ([False] * LATENT_DIM, [i == 0 for i in range(LATENT_DIM)]):  # no pair: no dependence, no pass needed
        assert float(active_total_correlation(metric, torch.tensor(mask))) == 0.0
    every = torch.ones(LATENT_DIM, dtype=torch.bool)
    given = torch.tensor(1.25, dtype=F64)
    assert active_total_correlation(metric, every, total_correlation=given) is not given
    assert float(active_total_correlation(metric, every, total_correlation=given)) == 1.25  # the first pass's value
    recomputed = active_total_correlation(metric, every, jacobians=[jacobian])
    assert float(recomputed) == pytest.approx(naive_total_correlation(jacobian, tuple(range(LATENT_DIM))), rel=RTOL)
    with pytest.raises(ValueError, match="`jacobians`, or `decoder` and `z`"):
        active_total_correlation(metric, torch.tensor([True, True, True, False, False, False]))


def test_active_alignment_restricts_rows_and_columns(plateau):
    _, _, jacobian = plateau
    other = _jacobian(PlateauDecoder(seed=1), plateau[1])
    everything = tuple(range(LATENT_DIM))
    cross = naive_cross(jacobian, other, everything, everything)
    active = torch.tensor([i in ACTIVE for i in range(LATENT_DIM)])
    square = active_alignment(cross, active, active)
    expected = naive_alignment(naive_cross(jacobian, other, ACTIVE, ACTIVE))
    assert set(square) == {"alignment", "num_matched", "self_correlation", "cross_mutual_information_diag", "num_rematched"}
    for name, value in expected.items():
        assert float(square[name]) == pytest.approx(value, rel=RTOL), name
    rows = active_alignment(cross, active)  # all reference latents
    expected = naive_alignment(naive_cross(jacobian, other, ACTIVE, everything))
    assert set(rows) == {"alignment", "num_matched"}
    assert float(rows["alignment"]) == pytest.approx(expected["alignment"], rel=RTOL)
    assert active_alignment(cross, torch.zeros(LATENT_DIM, dtype=torch.bool)) == {}


def test_decoder_metrics_report_the_total_correlation_of_the_active_latents(plateau, monkeypatch):
    decoder, z, jacobian = plateau
    expected = naive_total_correlation(jacobian, ACTIVE)
    kept = decoder_metrics(decoder, z, chunk_size=5)
    monkeypatch.setattr("lightning_mem.evaluate.MAX_KEPT_JACOBIAN_BYTES", 0)  # the second pass recomputes the columns
    recomputed = decoder_metrics(decoder, z, chunk_size=5)
    for values in (kept, recomputed):
        assert int(values["num_active"]) == len(ACTIVE)
        assert float(values["active/total_correlation"]) == pytest.approx(expected, rel=RTOL)


# ------------------------------------------------------------------------------------------------ the callback


def _fit(tmp_path: Path, **options) -> tuple[ManifoldEntropicMetricsCallback, RecordWeights, CaptureLogger]:
    seed_everything(0, verbose=False)
    options.setdefault("reference_decoder", decoder_at(PlateauDecoder(seed=1).state_dict()))
    callback = ManifoldEntropicMetricsCallback(
        num_samples=20, every_n_train_steps=2, every_n_epochs=None, chunk_size=6, log_figures=False, **options
    )
    recorder, logger = RecordWeights(), CaptureLogger()
    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        precision="64-true",
        max_steps=4,
        logger=logger,
        callbacks=[callback, recorder],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(PlateauModule(), loader())
    return callback, recorder, logger


@pytest.mark.parametrize("keep_bytes", [None, 0], ids=["kept", "recomputed"])
def test_class_conditional_total_correlation_of_the_active_latents_is_the_mean_over_classes(plateau, monkeypatch, keep_bytes):
    """Was: with kept Jacobians the second pass dropped the labels, and every call with ``num_classes`` failed."""
    decoder, z, jacobian = plateau
    labels = torch.arange(z.shape[0]) % 3
    expected = sum(naive_total_correlation(jacobian[labels == c], ACTIVE) for c in range(3)) / 3
    if keep_bytes is not None:
        monkeypatch.setattr("lightning_mem.evaluate.MAX_KEPT_JACOBIAN_BYTES", keep_bytes)
    values = decoder_metrics(decoder, z, labels=labels, num_classes=3, chunk_size=5)
    assert int(values["num_active"]) == len(ACTIVE)
    assert float(values["active/total_correlation"]) == pytest.approx(expected, rel=RTOL)


def test_the_callback_with_classes_logs_the_active_total_correlation(tmp_path):
    # a class-conditional decoder is called with the labels as its condition; this one ignores it
    callback, recorder, logger = _fit(
        tmp_path, num_classes=3, decoder=lambda module, z, condition: module.decoder(z), reference_decoder=None
    )
    assert callback.num_failed == 0
    z = documented_latents(20, LATENT_DIM, seed=0, dtype=F64)
    labels = torch.arange(20) % 3  # the callback's labels interleave
    jacobian = _jacobian(decoder_at(recorder.weights[4]), z)
    expected = sum(naive_total_correlation(jacobian[labels == c], ACTIVE) for c in range(3)) / 3
    assert logger.logged[-1][1]["mem/active/total_correlation"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("route", ["kept", "recomputed", "reverse"])
def test_the_callback_logs_the_active_values_of_the_naive_computation(tmp_path, monkeypatch, route):
    if route == "recomputed":
        monkeypatch.setattr("lightning_mem.tracking.MAX_KEPT_JACOBIAN_BYTES", 0)
    callback, recorder, logger = _fit(tmp_path, mode="reverse" if route == "reverse" else "auto")
    assert [entry["step"] for entry in callback.history] == [0, 2, 4]
    step, logged = logger.logged[-1]
    assert step == 4

    z = documented_latents(20, LATENT_DIM, seed=0, dtype=F64)
    jacobian = _jacobian(decoder_at(recorder.weights[4]), z)
    previous = _jacobian(decoder_at(recorder.weights[2]), z)
    reference = _jacobian(decoder_at(PlateauDecoder(seed=1).state_dict()), z)
    largest, mean = naive_pairwise(jacobian, ACTIVE)
    drift = naive_alignment(naive_cross(jacobian, previous, ACTIVE, ACTIVE))
    aligned = naive_alignment(naive_cross(jacobian, reference, ACTIVE, tuple(range(LATENT_DIM))))
    expected = {
        "num_active": len(ACTIVE),
        "active/total_correlation": naive_total_correlation(jacobian, ACTIVE),
        "active/pairwise_mutual_information_max": largest,
        "active/pairwise_mutual_information_mean": mean,
        "active/drift/alignment": drift["alignment"],
        "active/drift/self_correlation": drift["self_correlation"],
        "active/drift/num_rematched": drift["num_rematched"],
        "active/reference/alignment": aligned["alignment"],
        "active/reference/num_matched": aligned["num_matched"],
    }
    for name, value in expected.items():
        assert logged[f"mem/{name}"] == pytest.approx(value, rel=1e-9, abs=1e-12), name
        assert float(callback.last_metrics[name]) == logged[f"mem/{name}"], name
    # with the switched-off latents: more dependence
    assert logged["mem/total_correlation"] > logged["mem/active/total_correlation"] + 0.5
    diagonal = float(naive_cross(jacobian, previous, ACTIVE, ACTIVE).diagonal().mean())
    assert float(callback.last_metrics["active/drift/cross_mutual_information_diag"]) == pytest.approx(diagonal, rel=1e-9)
    # the first evaluation has no drift yet, and every evaluation has the active values
    assert all("mem/active/total_correlation" in metrics for _, metrics in logger.logged if "mem/entropy" in metrics)
    assert "mem/active/drift/alignment" not in logger.logged[0][1]
    assert sorted(INACTIVE) == [i for i in range(LATENT_DIM) if not callback.last_metrics["latent_entropy"][i] > -3.0]


def test_with_an_absolute_threshold_below_every_column_the_active_values_are_those_of_all_latents(tmp_path):
    callback, _, _ = _fit(tmp_path, active_threshold=1e-6)
    values = callback.last_metrics
    assert int(values["num_active"]) == LATENT_DIM
    assert torch.equal(values["active/total_correlation"], values["total_correlation"])
    assert torch.equal(values["active/pairwise_mutual_information_max"], values["pairwise_mutual_information_max"])
    assert torch.equal(values["active/drift/alignment"], values["drift/alignment"])
    assert torch.equal(values["active/reference/alignment"], values["reference/alignment"])


# ------------------------------------------------------------------------------------------------ distributed


@pytest.mark.slow
@pytest.mark.parametrize("keep_bytes", [None, 0], ids=["kept", "recomputed"])
def test_ddp_active_values_equal_one_process(tmp_path, keep_bytes):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    command = [sys.executable, str(HERE / "_active_ddp.py"), str(tmp_path)] + ([] if keep_bytes is None else [str(keep_bytes)])
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert rank0["world_size"] == 2
    for name, value in rank0["last_metrics"].items():
        if name != "eval_time":
            assert torch.equal(value, rank1["last_metrics"][name]), name
    # one process, all 37 latents (ranks took 19 and 18), straight from the formulas
    z = documented_latents(NUM_SAMPLES, LATENT_DIM, seed=SEED, dtype=F64)
    jacobian = _jacobian(decoder_at(rank0["weights"][4]), z)
    previous = _jacobian(decoder_at(rank0["weights"][2]), z)
    values = rank0["last_metrics"]
    assert int(values["num_active"]) == len(ACTIVE)
    assert float(values["active/total_correlation"]) == pytest.approx(naive_total_correlation(jacobian, ACTIVE), rel=1e-10)
    assert float(values["active/pairwise_mutual_information_mean"]) == pytest.approx(naive_pairwise(jacobian, ACTIVE)[1], rel=1e-10)
    drift = naive_alignment(naive_cross(jacobian, previous, ACTIVE, ACTIVE))
    assert float(values["active/drift/alignment"]) == pytest.approx(drift["alignment"], rel=1e-10)


_FAILING_RANK = r"""
import os, sys
import torch
import torch.distributed as dist
from lightning_mem import ManifoldEntropicMetrics
from lightning_mem.evaluation import active_total_correlation

dist.init_process_group("gloo", rank=int(sys.argv[1]), world_size=2)
rank = dist.get_rank()
weight = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def decoder(z):
    if rank == 1:
        raise FloatingPointError("rank 1's decoder failed")
    return z @ weight.T


metric = ManifoldEntropicMetrics(3)
try:
    active_total_correlation(metric, torch.tensor([True, True, False]), decoder=decoder, z=torch.randn(4, 3, dtype=torch.float64))
except Exception as error:
    print(f"rank {rank}: {type(error).__name__}: {error}", flush=True)
dist.destroy_process_group()
"""


def test_a_second_pass_failing_on_one_process_raises_on_every_process_instead_of_hanging(tmp_path):
    script = tmp_path / "failing_rank.py"
    script.write_text(_FAILING_RANK)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    processes = [
        subprocess.Popen([sys.executable, str(script), str(rank)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    try:
        outputs = [process.communicate(timeout=120)[0] for process in processes]
    finally:  # a hang (the bug) must not leave the other process waiting in the sync
        for process in processes:
            process.kill()
    assert "rank 0: RuntimeError: The total correlation of the active latents failed on another process." in outputs[0], outputs[0]
    assert "rank 1: FloatingPointError: rank 1's decoder failed" in outputs[1], outputs[1]
