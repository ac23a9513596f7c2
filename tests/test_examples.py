"""The examples' fast modes reproduce the paper's qualitative findings (fixed seed, float64 where it matters).

Each test runs ``main(["--fast", ...])`` of a script in ``examples/`` exactly as a user would, then checks the
finding the example is about against quantities it did not tune: the ground-truth torus, the data's likelihood,
and the encoder's KL divergence (an independent count of active latents).
"""

import importlib.util
import itertools
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec.*")]


def _example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _is_png(path):
    return Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_moons_only_the_reconstruction_flow_is_aligned_and_the_penalties_disentangle(tmp_path):
    results = _example("two_moons_flow").main(["--fast", "--out", str(tmp_path)])
    ml, tc, rec = (results["models"][name] for name in ("ML", "ML + TC", "ML + rec(z0)"))

    def gap(row):
        return row["H_core"] - row["H_detail"]

    # all three fit the data about equally well: same entropy H, and H close to the data's NLL
    entropies = [row["H"] for row in (ml, tc, rec)]
    assert max(entropies) - min(entropies) < 0.3
    for row in (ml, tc, rec):
        assert abs(row["H"] - row["NLL"]) < 0.2
    # ML alone: neither aligned (both latents equally important) nor disentangled
    assert abs(gap(ml)) < 0.6 and ml["MI"] > 0.5
    # the total-correlation penalty disentangles (MPMI ~ 0)
    assert tc["MI"] < 0.15
    # the reconstruction from z0 alone makes z0 the core latent and z1 the detail (aligned) and lowers the MI
    assert gap(rec) > 1.5 and gap(rec) > abs(gap(ml)) + 1.0
    assert rec["MI"] < 0.5 * ml["MI"]
    assert tc["MI"] < rec["MI"] < ml["MI"]
    # in 2-D the total correlation is the pairwise mutual information
    for row in (ml, tc, rec):
        assert row["MTC"] == pytest.approx(row["MI"], abs=1e-6)
    assert _is_png(results["figure"])


def test_torus_penalised_glow_recovers_the_ground_truth_spectrum_and_latents(tmp_path):
    results = _example("torus_alignment").main(["--fast", "--out", str(tmp_path)])
    truth = results["ground_truth"]
    ml, tc = results["models"]["GLOW (ML)"], results["models"]["GLOW (ML + TC)"]
    d = len(truth["spectrum"])
    assert d == 6

    # both flows fit the density: total entropy within 0.3 nats of the ground truth's
    for row in (ml, tc):
        assert abs(row["entropy"] - truth["entropy"]) < 0.3
    # maximum likelihood alone: entangled (MTC >> 0), a flattened spectrum, latents not matched one to one
    assert ml["total_correlation"] > 2.0
    assert ml["spectrum_error_mean"] > 0.5
    assert ml["num_true_latents_matched"] < d
    # with the total-correlation penalty: the ground truth's spectrum within 0.15 nats (mean) / 0.3 nats (max),
    # no residual dependence, and every learned latent moves the data like exactly one true latent
    assert tc["total_correlation"] < 0.2 and tc["pairwise_mutual_information_max"] < 0.1
    assert tc["spectrum_error_mean"] < 0.15 and tc["spectrum_error_max"] < 0.3
    assert tc["alignment"] > 0.95 and tc["num_true_latents_matched"] == d
    assert tc["alignment"] > ml["alignment"]
    assert _is_png(results["figure"])


def test_digits_active_latents_fall_as_beta_grows(tmp_path):
    results = _example("digits_beta_vae").main(["--fast", "--out", str(tmp_path)])
    betas, active, active_kl = results["betas"], results["num_active"], results["num_active_kl"]
    assert betas == sorted(betas) and len(betas) >= 4
    # the paper's beta-VAE finding: the number of active latents is non-increasing in beta, down to none
    assert all(a >= b for a, b in itertools.pairwise(active))
    assert active[0] >= 4 and active[-1] == 0
    # the manifold-entropy count agrees with the encoder's KL-based count of active units
    for mem, kl in zip(active, active_kl, strict=True):
        assert abs(mem - kl) <= 1
    # active and switched-off latents are separated by a gap of more than a nat in the spectrum
    for run in results["runs"]:
        assert run["spectrum"] == sorted(run["spectrum"], reverse=True)
        if run["active_gap"] is not None:
            assert run["active_gap"] > 1.0
    assert _is_png(results["figure"])
