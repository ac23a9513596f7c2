"""Tests of the decoder resolver and the output adapters: paths, latent sizes, flows, the model-state guard, fail-fast.

Truths: closed forms of small decoders (``J = W``, ``J = diag(s(1 - s)) W`` for a sigmoid), per-sample
``torch.autograd.functional.jacobian`` of the hand-adapted decoder, a flow's own forward Jacobian (inverted), the
module's buffers copied before the call.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections import OrderedDict

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import normflows as nf
import pytest
import torch
import zuko
from conftest import autograd_jacobian, tanh_subnet
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.distributions import Bernoulli, Independent, Normal
from torch.utils.data import DataLoader, TensorDataset

from lightning_mem import (
    DecoderStateError,
    ManifoldEntropicMetricsCallback,
    as_decoder,
    decoder_jacobian,
    iter_decoder_jacobian_columns,
    iter_decoder_jacobians,
)
from lightning_mem.decoders import (
    DEFAULT_DECODER_NAMES,
    InvertibleDecoder,
    NormflowsDecoder,
    ZukoFlowDecoder,
    resolve_decoder,
    resolve_latent_dim,
)
from lightning_mem.inverse import InverseJacobianDecoder
from lightning_mem.jacobian import ModelStateGuard

pytestmark = pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec.*")

F64 = torch.float64
ATOL = 1e-10
MODES = ("auto", "forward", "reverse", "loop")


def linear(d_in: int, d_out: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=False).double()


def latents(n: int = 5, d: int = 3, seed: int = 1) -> Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------- paths and search order


class Holder(nn.Module):
    """An empty module to hang attributes on."""


class ExamplesVAE(nn.Module):
    """pytorch/examples' VAE: the encoder's ``fc1`` is registered first, ``decode`` is a method."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc3 = nn.Linear(10, 8), nn.Linear(3, 10)

    def decode(self, z: Tensor) -> Tensor:
        return torch.tanh(self.fc3(z))


def test_dotted_paths_name_a_decoder_one_attribute_deeper():
    module = Holder()
    module.model = ExamplesVAE().double()
    for decoder in ("model.decode", None):  # named, and found by the default search
        resolved = resolve_decoder(module, decoder)
        assert resolved.name == "model.decode" and resolved.owner is module.model
        z = latents()
        torch.testing.assert_close(decoder_jacobian(resolved.function, z), autograd_jacobian(module.model.decode, z), atol=ATOL, rtol=0)
    module.vae = Holder()
    module.vae.decoder = linear(3, 4)
    assert resolve_decoder(module, "vae.decoder").owner is module.vae.decoder


def test_default_search_order_and_non_callables_are_passed_over():
    module = Holder()
    module.generator = torch.Generator()  # an RNG, not a decoder: passed over
    module.decode = linear(3, 4)
    assert resolve_decoder(module).name == "decode"
    module.decoder = linear(3, 5)
    assert resolve_decoder(module).name == "decoder"  # `decoder` comes first
    gan = Holder()
    gan.generator = linear(2, 4)
    gan.dec = linear(3, 4)
    assert resolve_decoder(gan).name == "generator"
    assert DEFAULT_DECODER_NAMES[:6] == ("decoder", "decode", "generator", "dec", "model.decoder", "model.decode")


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        ("model.decoder", ValueError, r"`model.decoder`, but `model` has no `decoder`.*dotted paths"),
        ("model.net.decoder", ValueError, r"`model.net` has no `decoder`"),
        ("missing", ValueError, r"`missing`, but it has none"),
        ("model.size", TypeError, r"`Holder.model.size` to be a decoder z -> x, but it is a int"),
    ],
)
def test_a_missing_or_wrong_path_names_the_missing_part(path, error, message):
    module = Holder()
    module.model = Holder()
    module.model.net = Holder()
    module.model.size = 3
    with pytest.raises(error, match=message):
        resolve_decoder(module, path)


def test_no_decoder_lists_what_was_searched():
    module = Holder()
    module.model = linear(3, 3)  # a plain module at `model` is not a flow: not taken
    with pytest.raises(ValueError, match=r"`decoder` or `decode` \(also searched: `generator`, `dec`, `model.decoder`.*flow"):
        resolve_decoder(module)


# ---------------------------------------------------------------- latent size


@pytest.mark.parametrize("name", ["latent_dim", "latent_size", "latent_dims", "z_dim", "nz"])
def test_latent_size_names_on_the_module_its_hparams_and_the_decoders_owner(name):
    module = Holder()
    module.decoder = lambda z: z
    setattr(module, name, 4)
    assert resolve_latent_dim(module, resolved=resolve_decoder(module)) == 4
    inner = Holder()
    inner.model = ExamplesVAE()
    setattr(inner.model, name, 3)  # on the model that owns `model.decode`, not on the LightningModule
    assert resolve_latent_dim(inner, resolved=resolve_decoder(inner)) == 3


def test_latent_size_in_hparams_and_from_a_sequential_decoders_first_linear():
    class WithHparams(LightningModule):
        def __init__(self, z_dim: int = 6) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.decode = lambda z: z

    module = WithHparams()
    assert resolve_latent_dim(module, resolved=resolve_decoder(module)) == 6
    sequential = Holder()
    sequential.decoder = nn.Sequential(nn.Sequential(nn.Linear(7, 4)), nn.Tanh())
    assert resolve_latent_dim(sequential, resolved=resolve_decoder(sequential)) == 7


def test_a_methods_module_does_not_tell_the_latent_size_by_its_first_layer():
    module = Holder()
    module.model = ExamplesVAE()  # fc1 (10 inputs) is the encoder's: it must not be taken for the latent size
    with pytest.raises(ValueError, match=r"latent size of Holder's decoder, but none was found: pass `latent_dim=...`"):
        resolve_latent_dim(module, resolved=resolve_decoder(module))


def test_latent_size_priority_and_conflicts():
    module = Holder()
    module.latent_dim = 3
    module.decoder = linear(3, 4)
    resolved = resolve_decoder(module)
    assert resolve_latent_dim(module, 5, resolved=resolved) == 5  # explicit wins
    assert resolve_latent_dim(module, latent_shape=(2, 2, 1), resolved=resolved) == 4
    with pytest.raises(ValueError, match=r"`latent_shape` with 5 entries in all \(the latent size\), but got \(4, 1, 1\)"):
        resolve_latent_dim(module, 5, latent_shape=(4, 1, 1))
    with pytest.raises(ValueError, match=r"`latents` of shape \(N, 3\) \(the latent size\), but got \(2, 4\)"):
        resolve_latent_dim(module, latents=torch.zeros(2, 4))
    module.latent_dim = 2.5
    with pytest.raises(ValueError, match=r"latent size `Holder.latent_dim` to be a positive int, but got 2.5"):
        resolve_latent_dim(module)


# ---------------------------------------------------------------- output adapters


class Decoders(nn.Module):
    """``x = W z`` returned in every form a decoder may return it."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.linear = linear(3, 4)

    def forward(self, z: Tensor):
        x = self.linear(z)
        if self.form == "bernoulli":
            return Bernoulli(logits=x)
        if self.form == "normal":
            return Independent(Normal(x, 0.5), 1)
        if self.form == "dict":
            return {"reconstruction": x}
        if self.form == "model_output":
            return OrderedDict(reconstruction=x, z=z * 2)
        if self.form == "tuple":
            return z * 2, x
        raise AssertionError(self.form)


@pytest.mark.parametrize("mode", MODES)
def test_distribution_outputs_are_measured_at_their_mean(mode):
    z = latents()
    weight = Decoders("bernoulli").linear.weight
    s = torch.sigmoid(z @ weight.T)
    expected = (s * (1 - s))[:, :, None] * weight  # d sigmoid(Wz) / dz = diag(s (1 - s)) W
    torch.testing.assert_close(decoder_jacobian(Decoders("bernoulli"), z, mode=mode), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(decoder_jacobian(Decoders("normal"), z, mode=mode), weight.expand(5, 4, 3), atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_mapping_and_tuple_outputs_with_output_key(mode):
    z = latents()
    weight = Decoders("dict").linear.weight.expand(5, 4, 3)
    torch.testing.assert_close(decoder_jacobian(Decoders("dict"), z, mode=mode), weight, atol=ATOL, rtol=0)  # one tensor: no key
    for form, key in [("model_output", "reconstruction"), ("tuple", 1), ("tuple", -1)]:
        jacobian = decoder_jacobian(Decoders(form), z, mode=mode, output_key=key)
        torch.testing.assert_close(jacobian, weight, atol=ATOL, rtol=0)
    twice = decoder_jacobian(Decoders("tuple"), z, mode=mode, output_key=0)
    torch.testing.assert_close(twice, 2 * torch.eye(3, dtype=F64).expand(5, 3, 3), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("form", "key", "error", "message"),
    [
        ("tuple", None, TypeError, r"returned a tuple of 2 elements: pass `output_key=` the index.*--output-key 0"),
        ("model_output", None, TypeError, r"returned a OrderedDict with keys \['reconstruction', 'z'\]: pass `output_key=`"),
        ("model_output", "recon", ValueError, r"to have the key `output_key`='recon', but its keys are \['reconstruction', 'z'\]"),
        ("tuple", 2, ValueError, r"`output_key`=2 to index the decoder's tuple output, but it has 2 elements"),
        ("dict", 0, ValueError, r"dict output to have the key `output_key`=0, but its keys are \['reconstruction'\]"),
        ("bernoulli", "reconstruction", TypeError, r"`output_key`='reconstruction' from, but it returned Bernoulli"),
    ],
)
def test_outputs_that_need_a_key_raise_and_say_which_option(form, key, error, message):
    with pytest.raises(error, match=message):
        decoder_jacobian(Decoders(form), latents(), output_key=key)


def test_a_distribution_without_mean_and_a_flow_called_forward_are_named():
    flow = zuko.flows.MAF(3, hidden_features=[8]).double()
    with pytest.raises(TypeError, match=r"NormalizingFlow output to have a mean.*`lightning_mem.as_decoder\(flow\)`"):
        decoder_jacobian(lambda z: flow(z), latents())  # z taken as the context: a distribution comes back
    inn = Ff.SequenceINN(3)
    inn.append(Fm.AllInOneBlock, subnet_constructor=tanh_subnet)
    with pytest.raises(TypeError, match=r"tuple of 2 elements.*`lightning_mem.as_decoder\(inn\)`"):
        decoder_jacobian(inn.double(), latents())  # the forward pass is the encoder, and returns (x, log_det)


# ---------------------------------------------------------------- latent_shape


def dcgan_generator(nz: int = 3) -> nn.Module:
    """DCGAN-shaped: latents ``(N, nz, 1, 1)`` -> ``ConvTranspose2d`` + ``BatchNorm2d`` -> a 4 x 4 image."""
    torch.manual_seed(2)
    generator = nn.Sequential(
        nn.ConvTranspose2d(nz, 4, 2, 1, 0, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.ConvTranspose2d(4, 1, 4, 2, 1), nn.Tanh()
    ).double()
    with torch.no_grad():  # running statistics of a trained generator, and 5 batches seen
        for _ in range(5):
            generator(torch.randn(8, nz, 1, 1, dtype=F64))
    return generator


@pytest.mark.parametrize("mode", MODES)
def test_latent_shape_reshapes_flat_latents(mode):
    generator = dcgan_generator().eval()
    z = latents()
    expected = autograd_jacobian(lambda v: generator(v[:, :, None, None]), z)
    jacobian = decoder_jacobian(generator, z, mode=mode, latent_shape=(3, 1, 1))
    assert jacobian.shape == (5, 1, 4, 4, 3)
    torch.testing.assert_close(jacobian, expected, atol=ATOL, rtol=0)
    chunks = list(iter_decoder_jacobians(generator, z, mode=mode, chunk_size=2, latent_shape=(3, 1, 1)))
    torch.testing.assert_close(torch.cat(chunks), expected, atol=ATOL, rtol=0)
    columns = torch.tensor([[2], [0], [1], [1], [0]])
    sampled = next(iter_decoder_jacobian_columns(generator, z, columns, latent_shape=(3, 1, 1)))
    torch.testing.assert_close(sampled[..., 0], expected[torch.arange(5), ..., columns[:, 0]], atol=ATOL, rtol=0)


def test_a_generator_that_wants_4d_latents_suggests_latent_shape():
    with pytest.raises(ValueError, match=r"latents of shape \(1, 3\).*conv_transpose2d.*pass latent_shape=\(3, 1, 1\)"):
        decoder_jacobian(dcgan_generator().eval(), latents())
    with pytest.raises(ValueError, match=r"its first layer takes 5 inputs, not 3: if the latent size is 5, pass latent_dim=5"):
        decoder_jacobian(linear(5, 4), latents())


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2, 2), r"`latent_shape` with 3 entries in all \(the latent size\), but got \(2, 2\) \(4 entries\)"),
        ((3, 0), r"`latent_shape` to be a non-empty tuple of positive ints"),
        ("3,1,1", r"`latent_shape` to be a non-empty tuple of positive ints"),
        ((), r"`latent_shape` to be a non-empty tuple of positive ints"),
    ],
)
def test_bad_latent_shape(shape, message):
    with pytest.raises(ValueError, match=message):
        decoder_jacobian(lambda z: z, latents(), latent_shape=shape)


# ---------------------------------------------------------------- known flows


@pytest.mark.parametrize("kind", ["NSF", "MAF"])
def test_zuko_flow_decoder_is_the_inverse_of_the_flows_own_transform(kind):
    torch.manual_seed(3)
    flow = getattr(zuko.flows, kind)(3, hidden_features=[16]).double()
    decoder = as_decoder(flow)
    # MAF and NSF sample in d sequential passes: their Jacobians invert the fast density direction's
    assert isinstance(decoder, InverseJacobianDecoder) and isinstance(decoder.decoder, ZukoFlowDecoder)
    assert decoder.decoder.latent_dim == 3
    z = latents(6)
    jacobian = decoder_jacobian(decoder, z)
    x = decoder(z).detach()
    torch.testing.assert_close(flow().transform.inv(z), x, atol=ATOL, rtol=0)  # the sampling direction
    forward = torch.stack([torch.autograd.functional.jacobian(lambda v: flow().transform(v[None])[0], x_n) for x_n in x])
    torch.testing.assert_close(jacobian, torch.linalg.inv(forward), atol=1e-9, rtol=0)


def test_conditional_zuko_flow_takes_the_condition_as_context():
    torch.manual_seed(4)
    flow = zuko.flows.MAF(3, context=2, hidden_features=[16]).double()
    z, c = latents(4), latents(4, 2, seed=9)
    expected = autograd_jacobian(lambda v, c_: flow(c_).transform.inv(v), z, c)
    torch.testing.assert_close(decoder_jacobian(as_decoder(flow), z, condition=c), expected, atol=ATOL, rtol=0)


def normflows_realnvp(temperature: float | None = None) -> nn.Module:
    torch.manual_seed(5)
    flows = []
    for _ in range(2):
        flows += [nf.flows.AffineCouplingBlock(nf.nets.MLP([2, 16, 4], init_zeros=False)), nf.flows.Permute(4, mode="swap")]
    base = nf.distributions.DiagGaussian(4, trainable=True)
    with torch.no_grad():  # a learned base: loc 0.15, log-scale 0.02 and others
        base.loc.copy_(torch.tensor([[0.15, -0.4, 0.3, 0.0]]))
        base.log_scale.copy_(torch.tensor([[0.02, -0.7, 0.5, 0.2]]))
    base.temperature = temperature
    return nf.NormalizingFlow(base, flows).double()


@pytest.mark.filterwarnings("ignore:torch.func could not trace the decoder")
@pytest.mark.parametrize("temperature", [None, 0.7])
def test_normflows_decoder_draws_from_its_learned_base(temperature):
    model = normflows_realnvp(temperature)
    decoder = as_decoder(model)
    assert isinstance(decoder, NormflowsDecoder) and decoder.latent_dim == 4
    loc, scale = model.q0.loc, model.q0.log_scale.exp() * (1.0 if temperature is None else temperature)
    eps = latents(5, 4)
    expected = autograd_jacobian(lambda e: model.forward(loc + scale * e), eps)  # w.r.t. the standard-normal eps
    torch.testing.assert_close(decoder_jacobian(decoder, eps), expected, atol=ATOL, rtol=0)
    # the latents are the model's prior: decoder(eps) is distributed as model.sample()
    torch.testing.assert_close(decoder(eps), model.forward(loc + scale * eps), atol=1e-14, rtol=0)


def test_normflows_base_that_is_not_gaussian_is_named():
    model = normflows_realnvp()
    model.q0 = nf.distributions.UniformGaussian(4, [0])
    with pytest.raises(TypeError, match=r"base distribution `q0` to be a DiagGaussian.*but got UniformGaussian"):
        decoder_jacobian(as_decoder(model), latents(3, 4))


def test_known_flows_are_found_by_the_resolver():
    module = Holder()
    module.inn = Ff.SequenceINN(3)
    module.inn.append(Fm.AllInOneBlock, subnet_constructor=tanh_subnet)
    resolved = resolve_decoder(module)
    assert resolved.name == "inn" and isinstance(resolved.function, InvertibleDecoder) and resolved.latent_dim == 3
    module = Holder()
    module.flow = zuko.flows.NSF(2, hidden_features=[8])
    resolved = resolve_decoder(module)
    assert isinstance(resolved.function, ZukoFlowDecoder) and resolve_latent_dim(module, resolved=resolved) == 2
    module = Holder()
    module.model = normflows_realnvp()
    resolved = resolve_decoder(module)
    assert isinstance(resolved.function, NormflowsDecoder) and resolve_latent_dim(module, resolved=resolved) == 4
    assert as_decoder(resolved.function) is resolved.function  # wrapping twice is a no-op
    with pytest.raises(TypeError, match=r"`inn` to be a torch.nn.Module \(an invertible network or flow\), but got function"):
        as_decoder(lambda z: z)


# ---------------------------------------------------------------- the model is never changed, never in training mode


def buffers(module: nn.Module) -> dict[str, Tensor]:
    return {name: buffer.clone() for name, buffer in module.named_buffers()}


def assert_same_buffers(module: nn.Module, before: dict[str, Tensor]) -> None:
    after = dict(module.named_buffers())
    assert after.keys() == before.keys()
    for name, buffer in before.items():
        assert torch.equal(after[name], buffer), name


class Closure:
    """A callable object whose model is reachable only through a closure inside ``__call__``."""

    def __init__(self, generator: nn.Module) -> None:
        self._decode = lambda z: generator(z.view(*z.shape, 1, 1))

    def __call__(self, z: Tensor) -> Tensor:
        return self._decode(z)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("wrapping", ["lambda", "partial", "closure-object"])
def test_batch_norm_in_training_mode_behind_any_callable_raises_and_changes_nothing(mode, wrapping):
    generator = dcgan_generator().train()
    decoder = {
        "lambda": lambda z: generator(z[:, :, None, None]),
        "partial": functools.partial(lambda z, g: g(z[:, :, None, None]), g=generator),
        "closure-object": Closure(generator),
    }[wrapping]
    before, flags = buffers(generator), [m.training for m in generator.modules()]
    assert int(generator[1].num_batches_tracked) == 5
    with pytest.raises(DecoderStateError, match=r"normalization layers to be in eval mode, but BatchNorm2d is in training mode"):
        decoder_jacobian(decoder, latents(), mode=mode)
    assert_same_buffers(generator, before)  # running statistics and num_batches_tracked (5) untouched
    assert [m.training for m in generator.modules()] == flags
    generator.eval()  # in eval mode the same lambda gives the eval-mode Jacobian
    expected = autograd_jacobian(lambda v: generator(v[:, :, None, None]), latents())
    torch.testing.assert_close(decoder_jacobian(decoder, latents(), mode=mode), expected, atol=ATOL, rtol=0)
    assert_same_buffers(generator, before)


class Counter(nn.Module):
    """Updates a buffer in ``forward`` (as spectral normalization's power iteration does in training mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = linear(3, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, z: Tensor) -> Tensor:
        self.calls += 1
        return self.linear(z)


@pytest.mark.parametrize("mode", MODES)
def test_a_decoder_that_changes_a_buffer_is_restored_and_named(mode):
    counter = Counter()
    with pytest.raises(DecoderStateError, match=r"changed the buffer Counter.calls \(1 changed in all; they were restored\)"):
        decoder_jacobian(lambda z: counter(z), latents(), mode=mode)
    assert int(counter.calls) == 0


def test_the_guard_is_gone_afterwards_and_never_watches_other_threads():
    norm = nn.BatchNorm1d(2)  # training mode
    seen: list[BaseException | None] = []

    def other_thread() -> None:
        try:
            norm(torch.randn(4, 2))
            seen.append(None)
        except BaseException as error:  # reported to the test below
            seen.append(error)

    with ModelStateGuard():
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert seen == [None] and int(norm.num_batches_tracked) == 1  # the other thread trained its layer as usual
    norm(torch.randn(4, 2))  # and after the guard, so does this one
    assert int(norm.num_batches_tracked) == 2


# ---------------------------------------------------------------- outputs that are not differentiable


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("decoder", "message"),
    [
        (lambda z: (z @ torch.ones(3, 4, dtype=F64)).argmax(1, keepdim=True), r"floating point tensor .* but got torch.int64"),
        (lambda z: (z * 3).round().long(), r"floating point tensor .* but got torch.int64"),
        (lambda z: z.detach() * 2, r"depend differentiably on z, but it does not require grad"),
    ],
)
def test_a_non_differentiable_decoder_gets_a_named_error(decoder, message, mode):
    with pytest.raises(ValueError, match=message):
        decoder_jacobian(decoder, latents(), mode=mode)


# ---------------------------------------------------------------- the callback fails fast


class Tiny(LightningModule):
    """Counts its training steps; its decoder can be made to raise, return NaN or a tuple."""

    def __init__(self, behaviour: str = "fine", latent_dim: int = 3) -> None:
        super().__init__()
        self.latent_dim, self.behaviour, self.steps = latent_dim, behaviour, 0
        self.net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 4))

    def decode(self, z: Tensor):
        if self.behaviour == "raises":
            raise RuntimeError("the decoder is broken")
        x = self.net(z)
        return {"nan": lambda: x * float("nan"), "tuple": lambda: (x, x), "fine": lambda: x}[self.behaviour]()

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(module: LightningModule, tmp_path, **options) -> Trainer:
    callback = ManifoldEntropicMetricsCallback(num_samples=8, log_figures=False, **options)
    trainer = Trainer(default_root_dir=tmp_path, max_steps=2, callbacks=[callback], logger=False, enable_progress_bar=False)
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(16, 3)), batch_size=4))
    return trainer


@pytest.mark.parametrize(
    ("behaviour", "options", "message"),
    [
        (
            "raises",
            {},
            r"`decode` failed a test call on 2 latents of size latent_dim=3 before training \(RuntimeError: the decoder is broken",
        ),
        ("fine", {"latent_dim": 5}, r"first layer takes 3 inputs, not 5: if the latent size is 3, pass latent_dim=3"),
        ("nan", {}, r"finite decoder output, but it holds NaN or inf at 8 of 8 entries"),
        ("tuple", {}, r"tuple of 2 elements: pass `output_key=`"),
        ("fine", {"output_key": "x"}, r"mapping .* to select `output_key`='x' from, but it returned Tensor"),
    ],
)
def test_a_broken_decoder_or_wrong_latent_size_fails_in_setup_before_training(tmp_path, behaviour, options, message):
    module = Tiny(behaviour)
    with pytest.raises(MisconfigurationException, match=r"ManifoldEntropicMetricsCallback: the decoder .*" + message):
        _fit(module, tmp_path, **options)
    assert module.steps == 0


def test_the_probe_leaves_the_module_as_it_was(tmp_path):
    module = Tiny()
    module.net[1].running_mean.uniform_(-1, 1)
    module.net[2].training = False  # a mixed state
    before, flags, rng = buffers(module), [m.training for m in module.modules()], torch.get_rng_state()
    callback = ManifoldEntropicMetricsCallback(num_samples=8, log_figures=False)
    trainer = Trainer(default_root_dir=tmp_path, max_steps=1, logger=False, enable_progress_bar=False)
    callback.setup(trainer, module, "fit")  # probes the decoder
    assert_same_buffers(module, before)
    assert [m.training for m in module.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in module.parameters())


@pytest.mark.filterwarnings("ignore:.*has no logger")
def test_a_warning_of_every_evaluation_is_given_once_per_run(tmp_path):
    class NormflowsModule(LightningModule):  # normflows' in-place log-det sums cannot be traced: the loop fallback warns
        def __init__(self) -> None:
            super().__init__()
            self.model = normflows_realnvp().float()

        def training_step(self, batch, batch_idx):
            return self.model.forward_kld(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback = ManifoldEntropicMetricsCallback(num_samples=8, every_n_train_steps=1, every_n_epochs=None, log_figures=False)
        trainer = Trainer(default_root_dir=tmp_path, max_steps=3, callbacks=[callback], logger=False, enable_progress_bar=False)
        trainer.fit(NormflowsModule(), DataLoader(TensorDataset(torch.randn(12, 4)), batch_size=4))
    assert [entry["step"] for entry in callback.history] == [0, 1, 2, 3]
    fallbacks = [w for w in caught if "could not trace the decoder" in str(w.message)]
    assert len(fallbacks) == 1
