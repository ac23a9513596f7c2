"""Smoke run of ``benchmarks/bench.py --quick`` on the cases of issue 15 (MAF, ODE, attention, DCGAN estimators,
automatic-chunk memory): the script runs end to end, writes every table, and the checks it reports hold."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("zuko")
pytest.importorskip("torchdiffeq")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("benchmarks_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_bench_of_the_decoder_kinds(tmp_path):
    output = tmp_path / "report.md"
    results = _bench().main(["--quick", "--cases", "maf,ode,attention,dcgan_estimators,memory_auto_chunk", "--output", str(output)])
    text = output.read_text()
    for title in ("## MAF in both directions", "## ODE decoder", "## Attention decoder", "## DCGAN generator", "automatic chunk"):
        assert title in text
    kinds = results["kinds"]
    assert kinds["maf"]["max_abs_difference"] < 1e-8 and kinds["maf"]["entropy_difference"] < 1e-8
    assert kinds["ode"]["max_abs_error"] < 1e-6  # against expm(A) of a linear ODE
    assert kinds["attention"]["max_abs_error"] < 1e-10  # against float64 autograd
    dcgan = results["dcgan"]
    assert [row["k"] for row in dcgan["rows"]] == [4, 8, 16]
    assert [row["N"] for row in dcgan["budget_rows"]] == [dcgan["N"], *(dcgan["N"] * dcgan["d"] // k for k in (4, 8, 16))]
    for row in dcgan["rows"] + dcgan["budget_rows"]:
        assert math.isfinite(row["rms_latent_entropy"]) and row["time"] > 0
    assert dcgan["budget_rows"][1]["latents_drawn"] == 1.0  # N d / k latents with k columns each draw every latent
    auto, unchunked = results["auto_memory"]
    assert (auto["method"], unchunked["method"]) == ("auto", "unchunked")
    assert 1 <= auto["chunk"] <= unchunked["chunk"] == unchunked["memory_N"]
    assert auto["peak"] > 0 and unchunked["peak"] > 0


def test_unknown_case_is_refused(capsys):
    with pytest.raises(SystemExit):
        _bench().main(["--cases", "maf,nonsense"])
    assert "nonsense" in capsys.readouterr().err
