"""The 28x28 beta-VAE example's fast mode: the plateau rule finds exactly the latents the encoder's KL calls active.

``examples/digits28_beta_vae.py --fast`` trains the PyTorch examples' VAE (784-400-20) on upsampled digits at two
betas and counts active latents from the decoder's entropy spectrum, from the encoder's KL (> 0.1 nats, which the
rule never sees) and with the old absolute column-norm threshold.
"""

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec.*")


def _example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_digits28_active_latents_are_the_kl_active_units(tmp_path):
    pytest.importorskip("sklearn")
    example = _example("digits28_beta_vae")
    results = example.main(["--fast", "--out", str(tmp_path)])
    runs = results["runs"]
    assert [run["beta"] for run in runs] == sorted(example.FAST_BETAS)
    for run in runs:
        # the same latents, not only the same number: active exactly where the encoder's KL exceeds 0.1 nats
        assert run["active"] == [kl > example.KL_ACTIVE_THRESHOLD for kl in run["kl_per_dim"]], run["beta"]
        assert run["num_active"] == run["num_active_kl"]
        assert 0 < run["num_active"] < example.LATENT_DIM
        # a clear plateau: at least a nat between the active latents and the switched-off ones
        assert run["active_gap"] > 1.0
        # the old absolute threshold counts the switched-off latents too: their 784-pixel columns stay long
        assert run["num_active_old_threshold"] == example.LATENT_DIM
        # the total correlation of a subset of latents never exceeds that of all of them (Hadamard on the Schur
        # complement)
        assert run["total_correlation_active"] <= run["total_correlation"] + 1e-9
    # more pressure on the KL switches more latents off
    counts = [run["num_active"] for run in runs]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    assert Path(results["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((tmp_path / "digits28_beta_vae.json").read_text())
    assert written["num_active"] == counts


def test_upsampled_digits_and_the_examples_vae():
    pytest.importorskip("sklearn")
    import torch

    example = _example("digits28_beta_vae")
    images = example.upsampled_digits()
    assert tuple(images.shape) == (1797, 784) and float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    # bilinear upsampling keeps each image's mean brightness (up to the border and the clamp)
    from lightning_mem.demo.datasets import load_digits

    small, _ = load_digits()
    assert torch.allclose(images.mean(1), small.mean(1), atol=0.02)
    # the spread is the root total variance, written out
    assert example.data_scale(images) == pytest.approx(float(((images - images.mean(0)) ** 2).sum(1).mean().sqrt()), rel=1e-3)
    model = example.ExamplesVAE(beta=2.0)
    sizes = [tuple(layer.weight.shape) for layer in (*model.encoder, *model.decoder) if isinstance(layer, torch.nn.Linear)]
    assert sizes == [(400, 784), (40, 400), (400, 20), (784, 400)]  # the PyTorch examples' VAE: 784-400-(2x20), 20-400-784
    losses = model.losses(images[:8])
    assert set(losses) == {"loss", "reconstruction", "kl"} and torch.isfinite(losses["loss"])
