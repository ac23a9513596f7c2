"""Tests of offline checkpoint evaluation: round trips through real Lightning checkpoints, the CLI, and the errors."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import autograd_jacobian, documented_latents, freia_flow, linear_closed_form, naive_metrics
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mem import ManifoldEntropicMetricsCallback
from lightning_mem.cli import main
from lightning_mem.evaluate import evaluate_checkpoint, load_module

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
            self.mapping = self.decoder  # a name the default search does not try
            del self.decoder

        def training_step(self, batch, batch_idx):
            return self.mapping(batch[0]).sum() * 0.0


    class NoLatentDimModule(LinearDecoderModule):
        # a method decoder: nothing tells its latent size (a module decoder's first nn.Linear would)

        def __init__(self, weight):
            super().__init__(weight)
            del self.latent_dim
            self.linear = self.decoder
            del self.decoder

        def decode(self, z):
            return self.linear(z)

        def training_step(self, batch, batch_idx):
            return self.linear(batch[0]).sum() * 0.0
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


def test_round_trip_of_a_linear_decoder_matches_the_closed_form(user_package, tmp_path):
    from user_models import LinearDecoderModule

    checkpoint = _write_checkpoint(LinearDecoderModule(WEIGHT), tmp_path / "linear.ckpt", 3)
    report = evaluate_checkpoint(checkpoint, "user_models:LinearDecoderModule", out_dir=tmp_path / "report", num_samples=10, progress=False)
    truth = linear_closed_form(torch.tensor(WEIGHT, dtype=torch.float64))
    torch.testing.assert_close(torch.tensor(report["latent_entropy"], dtype=torch.float64), truth["entropy_per_dim"])
    assert report["entropy"] == pytest.approx(float(truth["entropy"]), abs=1e-9)
    assert report["total_correlation"] == pytest.approx(float(truth["total_correlation"]), abs=1e-9)
    pairwise = torch.tensor(report["pairwise_mutual_information"], dtype=torch.float64)
    torch.testing.assert_close(pairwise, truth["pairwise_mutual_information"])
    assert report["spectrum_order"] == truth["entropy_per_dim"].argsort(descending=True).tolist()
    assert report["num_active"] == 3 and report["latent_dim"] == 3 and report["decoder"] == "decoder"
    assert report["global_step"] == 1 and report["num_samples"] == 10
    # the JSON on disk is the report, and the figures are PNG files
    assert json.loads((tmp_path / "report" / "report.json").read_text()) == json.loads(json.dumps(report))
    for name in ("spectrum", "pairwise_mutual_information"):
        data = open(report["files"][name], "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 1_000 < len(data) < 200_000


def test_an_image_decoder_gets_the_latent_pictures_and_another_does_not(user_package, tmp_path, monkeypatch):
    """The 4 outputs of the linear decoder as a 2x2 image: ``latent_columns.png`` and ``latent_traversals.png``, listed
    in the report (the pictures' values are those of tests/test_pictures.py); as a vector: neither."""
    from PIL import Image
    from user_models import LinearDecoderModule

    checkpoint = _write_checkpoint(LinearDecoderModule(WEIGHT), tmp_path / "linear.ckpt", 3)
    report = evaluate_checkpoint(
        checkpoint, LinearDecoderModule, out_dir=tmp_path / "image", num_samples=10, image_shape=(2, 2), progress=False
    )
    for name in ("latent_columns", "latent_traversals"):
        path = tmp_path / "image" / f"{name}.png"
        assert report["files"][name] == str(path)
        with Image.open(path) as image:
            image.load()  # a whole PNG
            assert image.width > 100 and image.height > 100
    vector = evaluate_checkpoint(checkpoint, LinearDecoderModule, out_dir=tmp_path / "vector", num_samples=10, progress=False)
    assert sorted(vector["files"]) == ["pairwise_mutual_information", "report", "spectrum"]
    assert sorted(path.name for path in (tmp_path / "vector").iterdir()) == [
        "pairwise_mutual_information.png",
        "report.json",
        "spectrum.png",
    ]
    with pytest.raises(ValueError, match=r"`image_shape` to be \(H, W\) or \(H, W, C\) of positive ints, but got \(2, 0\)"):
        evaluate_checkpoint(checkpoint, LinearDecoderModule, out_dir=tmp_path / "bad", image_shape=(2, 0), progress=False)
    # the pictures are written before the report, which is last: a report never sits beside older pictures
    report_time = (tmp_path / "image" / "report.json").stat().st_mtime_ns
    assert all((tmp_path / "image" / f"{name}.png").stat().st_mtime_ns <= report_time for name in ("latent_columns", "latent_traversals"))
    # an image shape that does not fit the 4 outputs: named before any Jacobian, and nothing is written

    def no_metrics(*args, **kwargs):
        raise AssertionError("the metrics were computed before the image shape was checked")

    monkeypatch.setattr("lightning_mem.evaluate.decoder_metrics", no_metrics)
    with pytest.raises(ValueError, match=r"`image_shape`.*4 entries.*but got \(3, 3\)"):
        evaluate_checkpoint(checkpoint, LinearDecoderModule, out_dir=tmp_path / "misfit", image_shape=(3, 3), progress=False)
    assert not any((tmp_path / "misfit").glob("*"))


def test_round_trip_of_a_beta_vae_matches_a_naive_autograd_evaluation(tmp_path):
    from lightning_mem.demo.models import BetaVAE

    module = BetaVAE(latent_dim=3, hidden_dim=16)
    checkpoint = _write_checkpoint(module, tmp_path / "vae.ckpt", 64)
    report = evaluate_checkpoint(checkpoint, BetaVAE, num_samples=12, seed=7, chunk_size=5, double=True, progress=False)
    assert report["files"]["report"] == str(tmp_path / "vae_mem" / "report.json")

    # naive: the same prior samples, per-sample torch.autograd.functional.jacobian in float64, formulas by hand
    reloaded = load_module(BetaVAE, checkpoint).double()
    z = documented_latents(12, 3, seed=7, dtype=torch.float64)
    truth = naive_metrics(autograd_jacobian(reloaded.decoder, z))
    torch.testing.assert_close(torch.tensor(report["latent_entropy"], dtype=torch.float64), truth["entropy_per_dim"])
    assert report["entropy"] == pytest.approx(float(truth["entropy"]), abs=1e-9)
    assert report["total_correlation"] == pytest.approx(float(truth["total_correlation"]), abs=1e-9)
    pairwise = torch.tensor(report["pairwise_mutual_information"], dtype=torch.float64)
    torch.testing.assert_close(pairwise, truth["pairwise_mutual_information"])


@pytest.mark.slow
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
    truth = linear_closed_form(torch.tensor(WEIGHT, dtype=torch.float64))
    report = json.loads((out / "report.json").read_text())
    assert report["entropy"] == pytest.approx(float(truth["entropy"]), abs=1e-9)
    assert report["total_correlation"] == pytest.approx(float(truth["total_correlation"]), abs=1e-9)
    column_norms = torch.tensor(WEIGHT).norm(dim=0)  # 1.41, 2.06, 0.56: two columns above the threshold 1.0
    assert report["num_active"] == int((column_norms > 1.0).sum()) == 2 and report["active_threshold"] == 1.0
    assert f"{float(truth['entropy']):.3f} nats" in done.stdout and str(out / "spectrum.png") in done.stdout


class InvertibleDecoderModule(LightningModule):
    """A normalizing flow whose ``decoder`` attribute is the FrEIA ``SequenceINN`` itself: its forward pass encodes
    x -> z, so the decoder z -> x is the reverse pass. The loss is zero and the learning rate too: weights stay put."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.latent_dim = dim
        # global scales of 0.7 per block and strong couplings: the forward and reverse passes differ by nats in the
        # entropies and by a tenth of a nat in the total correlation, not by rounding
        self.decoder = freia_flow(dim, "AllInOneBlock", 2, global_affine_init=0.7, dtype=torch.float32)
        with torch.no_grad():
            for module in self.decoder.modules():
                if isinstance(module, nn.Linear):
                    module.weight.mul_(4.0)

    def training_step(self, batch, batch_idx):
        return self.decoder(batch[0])[0].sum() * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.filterwarnings("ignore:.*the Trainer has no logger:UserWarning")
def test_evaluate_and_the_callback_both_differentiate_the_reverse_pass_of_an_invertible_decoder(tmp_path):
    """Pinned: `evaluate` used to differentiate a FrEIA decoder's forward (encoder) pass while the callback used the
    reverse pass. Both must give the float64 autograd truth of ``inn(z, rev=True)[0]`` at the same prior latents."""
    num_samples, seed, dim = 48, 5, 4
    torch.manual_seed(0)
    model = InvertibleDecoderModule(dim)
    callback = ManifoldEntropicMetricsCallback(num_samples=num_samples, seed=seed, num_evaluations=None, log_figures=False, strict=True)
    trainer = Trainer(
        max_steps=1,
        precision="64-true",
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, DataLoader(TensorDataset(torch.randn(4, dim)), batch_size=2))
    assert [entry["step"] for entry in callback.history] == [0, 1]
    trainer.save_checkpoint(tmp_path / "flow.ckpt")
    report = evaluate_checkpoint(
        tmp_path / "flow.ckpt", InvertibleDecoderModule, num_samples=num_samples, seed=seed, double=True, progress=False
    )
    assert report["decoder"] == "decoder" and report["latent_dim"] == dim
    from_evaluate = {
        "latent_entropy": torch.tensor(report["latent_entropy"], dtype=torch.float64),
        "entropy": torch.tensor(report["entropy"], dtype=torch.float64),
        "total_correlation": torch.tensor(report["total_correlation"], dtype=torch.float64),
    }
    from_callback = {name: callback.last_metrics[name] for name in from_evaluate}

    # the truths: float64 autograd Jacobians of the reverse pass (the decoder) and of the forward pass (the old bug)
    inn = model.decoder.double()
    z = documented_latents(num_samples, dim, seed, dtype=torch.float64)
    truths = {}
    for direction, rev in (("reverse", True), ("forward", False)):
        naive = naive_metrics(autograd_jacobian(lambda v, rev=rev: inn(v, rev=rev)[0], z))
        truths[direction] = {
            "latent_entropy": naive["entropy_per_dim"],
            "entropy": naive["entropy"],
            "total_correlation": naive["total_correlation"],
        }
    for name, truth in truths["reverse"].items():
        torch.testing.assert_close(from_evaluate[name], from_callback[name].double(), atol=1e-10, rtol=0, msg=name)  # (a)
        torch.testing.assert_close(from_evaluate[name], truth, atol=1e-10, rtol=0, msg=name)  # (b)
        # (c) the forward pass gives other values (about 6 nats in H, 1.7 in H_i, 0.02 in MTC), so (b) pins the direction
        assert (truth - truths["forward"][name]).abs().max() > (0.01 if name == "total_correlation" else 0.5), name


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
    with pytest.raises(ValueError, match="`decoder` or `decode` \\(also searched: `generator`"):
        evaluate_checkpoint(checkpoint, "user_models:NoDecoderModule")
    assert main(["evaluate", "--module-class", "user_models:NoDecoderModule", "--checkpoint", str(checkpoint)]) == 2
    assert "NoDecoderModule to expose a decoder" in capsys.readouterr().err
    # naming the attribute fixes it
    report = evaluate_checkpoint(checkpoint, "user_models:NoDecoderModule", decoder="mapping", num_samples=4, progress=False)
    assert report["decoder"] == "mapping" and report["latent_dim"] == 3

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
