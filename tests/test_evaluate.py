"""Tests of offline checkpoint evaluation: round trips through real Lightning checkpoints, the CLI, and the errors."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_mem.cli import main
from lightning_mem.evaluate import evaluate_checkpoint, load_module
from lightning_mem.functional import STANDARD_NORMAL_ENTROPY

pytestmark = pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec.*")

# A user's own package, written to tmp_path: modules are loaded by import path as a user would.
USER_MODULES = textwrap.dedent(
    """
    import torch
    from lightning.pytorch import LightningModule
    from torch import nn


    class LinearDecoderModule(LightningModule):
        def __init__(self, weight):
            super().__init__()
            self.save_hyperparameters()
            weight = torch.tensor(weight)
            self.decoder = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            with torch.no_grad():
                self.decoder.weight.copy_(weight)
            self.latent_dim = weight.shape[1]

        def training_step(self, batch, batch_idx):
            return self.decoder(batch[0]).sum() * 0.0

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)


    class NoDecoderModule(LinearDecoderModule):
        def __init__(self, weight):
            super().__init__(weight)
            self.generator = self.decoder
            del self.decoder

        def training_step(self, batch, batch_idx):
            return self.generator(batch[0]).sum() * 0.0


    class NoLatentDimModule(LinearDecoderModule):
        def __init__(self, weight):
            super().__init__(weight)
            del self.latent_dim
    """
)

# Columns of different norms, not orthogonal: every metric has a distinct closed-form value.
WEIGHT = [[1.0, 0.5, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.25], [1.0, 0.0, 0.5]]


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(USER_MODULES)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_models", None)
    yield tmp_path
    sys.modules.pop("user_models", None)


def _write_checkpoint(module, path, latent_dim):
    """Fit one (no-op) step with a real Trainer, then save the checkpoint as a user would."""
    trainer = Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu"
    )
    trainer.fit(module, DataLoader(TensorDataset(torch.zeros(4, latent_dim)), batch_size=2))
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def vae_checkpoint(tmp_path_factory):
    from lightning_mem.demo.models import BetaVAE

    return _write_checkpoint(BetaVAE(latent_dim=2, hidden_dim=4), tmp_path_factory.mktemp("vae") / "vae.ckpt", 64)


def _closed_form(weight):
    """Metrics of the linear decoder x = A z, from the formulas (J = A everywhere)."""
    a = torch.tensor(weight, dtype=torch.float64)
    gram = a.T @ a
    norms2 = gram.diagonal()
    latent_entropy = STANDARD_NORMAL_ENTROPY + 0.5 * norms2.log()
    entropy = a.shape[1] * STANDARD_NORMAL_ENTROPY + 0.5 * torch.logdet(gram)
    rho2 = gram.square() / (norms2[:, None] * norms2[None, :])
    pairwise = -0.5 * torch.log(1.0 - rho2.fill_diagonal_(0.0))
    return latent_entropy, entropy, latent_entropy.sum() - entropy, pairwise


def test_round_trip_of_a_linear_decoder_matches_the_closed_form(user_package, tmp_path):
    from user_models import LinearDecoderModule

    checkpoint = _write_checkpoint(LinearDecoderModule(WEIGHT), tmp_path / "linear.ckpt", 3)
    report = evaluate_checkpoint(checkpoint, "user_models:LinearDecoderModule", out_dir=tmp_path / "report", num_samples=10, progress=False)
    latent_entropy, entropy, total_correlation, pairwise = _closed_form(WEIGHT)
    torch.testing.assert_close(torch.tensor(report["latent_entropy"], dtype=torch.float64), latent_entropy)
    assert report["entropy"] == pytest.approx(float(entropy), abs=1e-9)
    assert report["total_correlation"] == pytest.approx(float(total_correlation), abs=1e-9)
    torch.testing.assert_close(torch.tensor(report["pairwise_mutual_information"], dtype=torch.float64), pairwise)
    assert report["spectrum_order"] == latent_entropy.argsort(descending=True).tolist()
    assert report["num_active"] == 3 and report["latent_dim"] == 3 and report["decoder"] == "decoder"
    assert report["global_step"] == 1 and report["num_samples"] == 10
    # the JSON on disk is the report, and the figures are PNG files
    assert json.loads((tmp_path / "report" / "report.json").read_text()) == json.loads(json.dumps(report))
    for name in ("spectrum", "pairwise_mutual_information"):
        data = open(report["files"][name], "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 1_000 < len(data) < 200_000


def test_round_trip_of_a_beta_vae_matches_a_naive_autograd_evaluation(tmp_path):
    from lightning_mem.demo.models import BetaVAE

    module = BetaVAE(latent_dim=3, hidden_dim=16)
    checkpoint = _write_checkpoint(module, tmp_path / "vae.ckpt", 64)
    report = evaluate_checkpoint(checkpoint, BetaVAE, num_samples=12, seed=7, chunk_size=5, double=True, progress=False)
    assert report["files"]["report"] == str(tmp_path / "vae_mem" / "report.json")

    # naive: the same prior samples, per-sample torch.autograd.functional.jacobian in float64, formulas by hand
    reloaded = load_module(BetaVAE, checkpoint).double()
    z = torch.randn(12, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    jacobians = torch.stack([torch.autograd.functional.jacobian(lambda v: reloaded.decoder(v[None])[0], z_n) for z_n in z])
    log_diag = torch.stack([torch.log(torch.diag(j.T @ j)) for j in jacobians]).mean(0)
    log_det = torch.stack([torch.logdet(j.T @ j) for j in jacobians]).mean()
    latent_entropy = STANDARD_NORMAL_ENTROPY + 0.5 * log_diag
    entropy = 3 * STANDARD_NORMAL_ENTROPY + 0.5 * log_det
    torch.testing.assert_close(torch.tensor(report["latent_entropy"], dtype=torch.float64), latent_entropy)
    assert report["entropy"] == pytest.approx(float(entropy), abs=1e-9)
    assert report["total_correlation"] == pytest.approx(float(latent_entropy.sum() - entropy), abs=1e-9)
    pairwise = torch.zeros(3, 3, dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            if i != j:
                terms = [-0.5 * math.log(1 - float((g[i, j] ** 2) / (g[i, i] * g[j, j]))) for g in (jj.T @ jj for jj in jacobians)]
                pairwise[i, j] = sum(terms) / len(terms)
    torch.testing.assert_close(torch.tensor(report["pairwise_mutual_information"], dtype=torch.float64), pairwise)


def test_cli_round_trip_in_a_second_process(user_package, tmp_path):
    from user_models import LinearDecoderModule

    checkpoint = _write_checkpoint(LinearDecoderModule(WEIGHT), tmp_path / "linear.ckpt", 3)
    out = tmp_path / "cli_report"
    command = [sys.executable, "-m", "lightning_mem", "evaluate", "--module-class", "user_models:LinearDecoderModule"]
    command += ["--checkpoint", str(checkpoint), "--out", str(out), "--num-samples", "8", "--active-threshold", "1.0"]
    env = {**os.environ, "PYTHONPATH": str(user_package)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "manifold entropic metrics" in done.stderr  # the progress bar
    _, entropy, total_correlation, _ = _closed_form(WEIGHT)
    report = json.loads((out / "report.json").read_text())
    assert report["entropy"] == pytest.approx(float(entropy), abs=1e-9)
    assert report["total_correlation"] == pytest.approx(float(total_correlation), abs=1e-9)
    column_norms = torch.tensor(WEIGHT).norm(dim=0)  # 1.41, 2.06, 0.56: two columns above the threshold 1.0
    assert report["num_active"] == int((column_norms > 1.0).sum()) == 2 and report["active_threshold"] == 1.0
    assert f"{float(entropy):.3f} nats" in done.stdout and str(out / "spectrum.png") in done.stdout


def test_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        evaluate_checkpoint(missing, "lightning_mem.demo.models:BetaVAE")
    assert main(["evaluate", "--module-class", "lightning_mem.demo.models:BetaVAE", "--checkpoint", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("module_class", "error", "match"),
    [
        ("no_such_package.models:Model", ImportError, "no_such_package"),
        ("lightning_mem.demo.models:NoSuchModel", ImportError, "NoSuchModel"),
        ("NoModulePath", ValueError, "package.module:ClassName"),
        ("torch.nn:Linear", TypeError, "LightningModule subclass"),
    ],
)
def test_unimportable_or_wrong_class(vae_checkpoint, capsys, module_class, error, match):
    with pytest.raises(error, match=match):
        evaluate_checkpoint(vae_checkpoint, module_class)
    assert main(["evaluate", "--module-class", module_class, "--checkpoint", str(vae_checkpoint)]) == 2
    assert match in capsys.readouterr().err


def test_module_without_decoder_or_latent_size(user_package, tmp_path, capsys):
    from user_models import NoDecoderModule, NoLatentDimModule

    checkpoint = _write_checkpoint(NoDecoderModule(WEIGHT), tmp_path / "no_decoder.ckpt", 3)
    with pytest.raises(ValueError, match="`decoder` or `decode`"):
        evaluate_checkpoint(checkpoint, "user_models:NoDecoderModule")
    assert main(["evaluate", "--module-class", "user_models:NoDecoderModule", "--checkpoint", str(checkpoint)]) == 2
    assert "NoDecoderModule to expose a decoder" in capsys.readouterr().err
    # naming the attribute fixes it
    report = evaluate_checkpoint(checkpoint, "user_models:NoDecoderModule", decoder="generator", num_samples=4, progress=False)
    assert report["decoder"] == "generator" and report["latent_dim"] == 3

    checkpoint = _write_checkpoint(NoLatentDimModule(WEIGHT), tmp_path / "no_latent_dim.ckpt", 3)
    with pytest.raises(ValueError, match="latent size"):
        evaluate_checkpoint(checkpoint, "user_models:NoLatentDimModule")
    report = evaluate_checkpoint(checkpoint, "user_models:NoLatentDimModule", latent_dim=3, num_samples=4, progress=False)
    assert len(report["spectrum"]) == 3


def test_bad_numbers_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="num_samples"):
        evaluate_checkpoint(tmp_path / "any.ckpt", "lightning_mem.demo.models:BetaVAE", num_samples=0)
    with pytest.raises(SystemExit):
        main(["evaluate", "--module-class", "x:Y", "--checkpoint", "c.ckpt", "--num-samples", "-3"])
