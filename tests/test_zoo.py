"""A zoo of models in the shapes people train, each measured with at most one argument, as a new user would.

Small stand-ins (float64, CPU, seconds) written here in the shape of public models: the VAE and the DCGAN generator
of the PyTorch examples repository, a decoder returning a ``torch.distributions`` object, pythae's dict-like
``ModelOutput``, a decoder returning a tuple, zuko's NSF and MAF flows, normflows' RealNVP with a learned base, and a
conditional decoder. Each one is trained two steps with the callback attached and evaluated from its checkpoint by
the command line; both must equal the metrics of the *hand-adapted* decoder (the lambda a user would otherwise write),
from per-sample ``torch.autograd.functional.jacobian`` and the formulas written out in ``conftest``, to 1e-10.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import normflows as nf
import pytest
import torch
import zuko
from conftest import autograd_jacobian, documented_latents, naive_metrics
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.distributions import Bernoulli
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_mem import ManifoldEntropicMetricsCallback
from lightning_mem.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec.*", "ignore:torch.func could not trace the decoder")

F64 = torch.float64
TOLERANCE = 1e-10
NUM_SAMPLES = 8
LATENT = 3
IMAGE = 8  # 8 x 8 images
PIXELS = IMAGE * IMAGE


class ZooModule(LightningModule):
    """What every zoo model shares: float64 weights (also when loaded from a checkpoint), Adam, a loader of its data."""

    data_dim = PIXELS

    def finish(self) -> None:
        self.to(F64)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def loader(self) -> DataLoader:
        x = torch.rand(16, self.data_dim, generator=torch.Generator().manual_seed(3), dtype=F64)
        return DataLoader(TensorDataset(x), batch_size=8)


# ---------------------------------------------------------------- PyTorch examples: VAE (held as self.model)


class ExamplesVAE(nn.Module):
    """The VAE of pytorch/examples (``vae/main.py``), narrower: ``decode(z) = sigmoid(fc4(relu(fc3(z))))``."""

    def __init__(self, latent: int = LATENT, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(PIXELS, hidden)
        self.fc21, self.fc22 = nn.Linear(hidden, latent), nn.Linear(hidden, latent)
        self.fc3, self.fc4 = nn.Linear(latent, hidden), nn.Linear(hidden, PIXELS)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def decode(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z))))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decode(z), mu, logvar


class ExamplesVAEModule(ZooModule):
    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = ExamplesVAE()
        self.finish()

    def training_step(self, batch, batch_idx):
        (x,) = batch
        reconstruction, mu, logvar = self.model(x)
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return F.binary_cross_entropy(reconstruction, x, reduction="sum") + kld


# ---------------------------------------------------------------- PyTorch examples: DCGAN generator


class DCGANGenerator(nn.Module):
    """The DCGAN generator of pytorch/examples (``dcgan/main.py``), two blocks: latents ``(N, nz, 1, 1)`` -> 4 x 4 images."""

    def __init__(self, nz: int = LATENT, ngf: int = 4) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 2, 2, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, 1, 4, 2, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.main(z)


class DCGANModule(ZooModule):
    data_dim = 16

    def __init__(self, nz: int = LATENT) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.nz = nz
        self.generator = DCGANGenerator(nz)
        self.finish()

    def training_step(self, batch, batch_idx):
        (x,) = batch
        noise = torch.randn(x.shape[0], self.nz, 1, 1, dtype=x.dtype)
        return (self.generator(noise).flatten(1) - (2 * x - 1)).square().mean()  # a stand-in for the adversarial loss


# ---------------------------------------------------------------- a decoder returning a distribution


class BernoulliDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(LATENT, 16), nn.Tanh(), nn.Linear(16, PIXELS))

    def forward(self, z: Tensor) -> Bernoulli:
        return Bernoulli(logits=self.net(z))


class BernoulliModule(ZooModule):
    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.latent_dim = LATENT
        self.encoder = nn.Linear(PIXELS, LATENT)
        self.decoder = BernoulliDecoder()
        self.finish()

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return -self.decoder(self.encoder(x)).log_prob(x.round()).sum(1).mean()


# ---------------------------------------------------------------- pythae: a dict-like ModelOutput


class ModelOutput(OrderedDict):
    """pythae's ``ModelOutput``: an ``OrderedDict`` whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class PythaeDecoder(nn.Module):
    """A pythae-style decoder: ``ModelOutput(reconstruction=..., hidden=...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(LATENT, 16), nn.Tanh())
        self.out = nn.Linear(16, PIXELS)

    def forward(self, z: Tensor) -> ModelOutput:
        hidden = self.hidden(z)
        return ModelOutput(reconstruction=torch.sigmoid(self.out(hidden)), hidden=hidden)


class PythaeVAE(nn.Module):
    """pythae's models keep ``latent_dim`` (from their config) and an ``encoder`` and ``decoder``."""

    def __init__(self) -> None:
        super().__init__()
        self.latent_dim = LATENT
        self.encoder = nn.Linear(PIXELS, LATENT)
        self.decoder = PythaeDecoder()


class PythaeModule(ZooModule):
    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = PythaeVAE()
        self.finish()

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (self.model.decoder(self.model.encoder(x))["reconstruction"] - x).square().sum(1).mean()


# ---------------------------------------------------------------- a decoder returning a tuple


class TupleModule(ZooModule):
    """``decode(z) -> (log_var, mean)``: the mean, element 1, is the data."""

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.latent_dim = LATENT
        self.encoder = nn.Linear(PIXELS, LATENT)
        self.mean = nn.Sequential(nn.Linear(LATENT, 16), nn.Tanh(), nn.Linear(16, PIXELS))
        self.log_var = nn.Linear(LATENT, PIXELS)
        self.finish()

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.log_var(z), self.mean(z)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        log_var, mean = self.decode(self.encoder(x))
        return (0.5 * ((x - mean).square() / log_var.exp() + log_var)).sum(1).mean()


# ---------------------------------------------------------------- zuko flows


class ZukoModule(ZooModule):
    data_dim = LATENT

    def __init__(self, kind: str = "NSF") -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(5)
        self.flow = getattr(zuko.flows, kind)(LATENT, hidden_features=[16])
        self.finish()

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return -self.flow().log_prob(x).mean()


# ---------------------------------------------------------------- normflows RealNVP with a learned base


class NormflowsModule(ZooModule):
    data_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(6)
        flows = []
        for _ in range(2):
            flows += [nf.flows.AffineCouplingBlock(nf.nets.MLP([2, 16, 4], init_zeros=False)), nf.flows.Permute(4, mode="swap")]
        base = nf.distributions.DiagGaussian(4, trainable=True)
        with torch.no_grad():  # a base far from N(0, I), as after training
            base.loc.copy_(torch.tensor([[0.15, -0.4, 0.3, 0.0]]))
            base.log_scale.copy_(torch.tensor([[0.02, -0.7, 0.5, 0.2]]))
        self.model = nf.NormalizingFlow(base, flows)
        self.finish()

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.model.forward_kld(x)


# ---------------------------------------------------------------- a conditional decoder


class ConditionalModule(ZooModule):
    """A class-conditional VAE decoder ``decode(z, labels)`` (label embedding concatenated to z); says ``latent_size``."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.latent_size = LATENT
        self.embedding = nn.Embedding(self.num_classes, 2)
        self.encoder = nn.Linear(PIXELS, LATENT)
        self.net = nn.Sequential(nn.Linear(LATENT + 2, 16), nn.Tanh(), nn.Linear(16, PIXELS))
        self.finish()

    def decode(self, z: Tensor, labels: Tensor) -> Tensor:
        return self.net(torch.cat([z, self.embedding(labels)], dim=1))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        labels = torch.arange(x.shape[0]) % self.num_classes
        return (self.decode(self.encoder(x), labels) - x).square().sum(1).mean()


# ---------------------------------------------------------------- the zoo


@dataclass
class Species:
    """A zoo model, the one argument it needs (or none) and the hand-adapted decoder a user would have written."""

    make: Callable[[], ZooModule]
    option: dict[str, Any]
    flag: list[str]
    reference: Callable[[Any], Callable[..., Tensor]]
    latent_dim: int = LATENT
    num_classes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _normflows_reference(module: NormflowsModule) -> Callable[[Tensor], Tensor]:
    base = module.model.q0
    return lambda eps: module.model.forward(base.loc + base.log_scale.exp() * eps)


ZOO = {
    "examples-vae": Species(ExamplesVAEModule, {"latent_dim": LATENT}, ["--latent-dim", str(LATENT)], lambda m: m.model.decode),
    "dcgan": Species(
        DCGANModule,
        {"latent_shape": (LATENT, 1, 1)},
        ["--latent-shape", f"{LATENT},1,1"],
        lambda m: lambda z: m.generator(z[:, :, None, None]),
    ),
    "bernoulli": Species(BernoulliModule, {}, [], lambda m: lambda z: torch.sigmoid(m.decoder.net(z))),
    "pythae": Species(
        PythaeModule,
        {"output_key": "reconstruction"},
        ["--output-key", "reconstruction"],
        lambda m: lambda z: m.model.decoder(z)["reconstruction"],
    ),
    "tuple": Species(TupleModule, {"output_key": 1}, ["--output-key", "1"], lambda m: lambda z: m.decode(z)[1]),
    "zuko-nsf": Species(lambda: ZukoModule("NSF"), {}, [], lambda m: lambda u: m.flow().transform.inv(u)),
    "zuko-maf": Species(lambda: ZukoModule("MAF"), {}, [], lambda m: lambda u: m.flow().transform.inv(u)),
    "normflows-realnvp": Species(NormflowsModule, {}, [], _normflows_reference, latent_dim=4),
    "conditional": Species(
        ConditionalModule, {"num_classes": 3}, ["--num-classes", "3"], lambda m: m.decode, num_classes=ConditionalModule.num_classes
    ),
}


def reference_metrics(module: ZooModule, species: Species, num_samples: int) -> dict[str, Tensor]:
    """The metrics of the hand-adapted decoder at the documented latents: autograd Jacobians and the naive formulas,
    class by class and averaged over classes for a conditional decoder."""
    module.eval()
    z = documented_latents(num_samples, species.latent_dim, seed=0, dtype=F64)
    decoder = species.reference(module)
    if species.num_classes is None:
        return naive_metrics(autograd_jacobian(decoder, z))
    labels = torch.arange(num_samples) % species.num_classes
    jacobians = autograd_jacobian(decoder, z, labels)
    per_class = [naive_metrics(jacobians[labels == k]) for k in range(species.num_classes)]
    return {key: torch.stack([values[key] for values in per_class]).mean(0) for key in per_class[0]}


def assert_matches(values: dict[str, Any], expected: dict[str, Tensor]) -> None:
    def close(got: Any, want: Tensor) -> None:
        torch.testing.assert_close(torch.as_tensor(got, dtype=F64), want, atol=TOLERANCE, rtol=0)

    close(values["entropy"], expected["entropy"])
    close(values["latent_entropy"], expected["entropy_per_dim"])
    close(values["total_correlation"], expected["total_correlation"])
    close(values["pairwise_mutual_information"], expected["pairwise_mutual_information"])


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_in_the_callback_and_the_command_line_with_one_argument_at_most(tmp_path, name, capsys):
    species = ZOO[name]
    assert len(species.option) <= 1 and len(species.flag) <= 2  # one keyword, one flag (and its value)
    torch.manual_seed(0)
    module = species.make()
    callback = ManifoldEntropicMetricsCallback(num_samples=NUM_SAMPLES, num_evaluations=None, log_figures=False, **species.option)
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=2,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, module.loader())
    assert callback.num_failed == 0 and [entry["step"] for entry in callback.history] == [0, 2]
    checkpoint = tmp_path / f"{name}.ckpt"
    trainer.save_checkpoint(checkpoint)
    expected = reference_metrics(module, species, NUM_SAMPLES)
    assert_matches(callback.last_metrics, expected)

    # the same model from its checkpoint, on the command line: the class is this test module's, by import path
    module_class = f"{__name__}:{type(module).__name__}"
    out = tmp_path / "report"
    argv = ["evaluate", "--module-class", module_class, "--checkpoint", str(checkpoint), "--out", str(out)]
    status = main([*argv, "--num-samples", str(NUM_SAMPLES), "--no-progress-bar", *species.flag])
    assert status == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["latent_dim"] == species.latent_dim
    assert_matches(report, expected)  # the checkpoint holds the weights the reference was taken at


def test_zoo_models_fail_with_a_message_that_names_the_one_argument(tmp_path):
    """Without their argument, the models that need one fail in ``setup`` (before training) and say which."""
    messages = {
        "examples-vae": r"latent size .* pass `latent_dim=",
        "dcgan": r"latent_shape=\(3, 1, 1\)",
        "pythae": r"keys \['reconstruction', 'hidden'\].*output_key=",
        "tuple": r"tuple of 2 elements.*output_key=",
        "conditional": r"missing 1 required positional argument.*`num_classes=`",
    }
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    for name, message in messages.items():
        module = ZOO[name].make()
        callback = ManifoldEntropicMetricsCallback(num_samples=NUM_SAMPLES, log_figures=False)
        trainer = Trainer(default_root_dir=tmp_path, max_steps=1, callbacks=[callback], logger=False, enable_progress_bar=False)
        with pytest.raises(MisconfigurationException, match=message):
            trainer.fit(module, module.loader())
        assert trainer.global_step == 0, name
