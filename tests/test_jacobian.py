"""Tests of the Jacobian engine against ``torch.autograd.functional.jacobian`` applied one sample at a time."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import autograd_jacobian, freia_flow
from torch import Tensor, nn

from lightning_mem import as_decoder, decoder_gram, decoder_jacobian, iter_decoder_jacobians
from lightning_mem.functional import STANDARD_NORMAL_ENTROPY, manifold_entropy

MODES = ("auto", "forward", "reverse", "loop")
ATOL = 1e-10
LATENT_DIM = 3
NUM_SAMPLES = 7


class ConditionalDecoder(nn.Module):
    """``x = net([z, condition])``: a decoder that takes a per-sample condition."""

    def __init__(self, latent_dim: int, condition_dim: int, output_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim + condition_dim, 16), nn.Tanh(), nn.Linear(16, output_dim))

    def forward(self, z: Tensor, condition: Tensor) -> Tensor:
        return self.net(torch.cat([z, condition], dim=1))


class TupleDecoder(nn.Module):
    """A VAE-like decoder returning ``(mean, log_scale)``; the Jacobian is that of the first element."""

    def __init__(self, latent_dim: int, output_dim: int) -> None:
        super().__init__()
        self.mean = nn.Sequential(nn.Linear(latent_dim, 16), nn.Tanh(), nn.Linear(16, output_dim))
        self.log_scale = nn.Linear(latent_dim, output_dim)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.mean(z), self.log_scale(z).square()


def mlp_decoder(latent_dim: int = LATENT_DIM, output_dim: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(latent_dim, 16), nn.Tanh(), nn.Linear(16, output_dim), nn.Softplus())


def conv_decoder(latent_dim: int = LATENT_DIM) -> nn.Module:
    """Linear -> (2, 3, 3) -> ConvTranspose2d -> image output (2, 6, 6)."""
    return nn.Sequential(
        nn.Linear(latent_dim, 2 * 3 * 3),
        nn.Unflatten(1, (2, 3, 3)),
        nn.Tanh(),
        nn.ConvTranspose2d(2, 2, kernel_size=3, stride=2, padding=1, output_padding=1),
    )


def make_case(name: str, seed: int = 0):
    """A float64 decoder, latents and (maybe) a condition, with the expected output shape."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    z = torch.randn(NUM_SAMPLES, LATENT_DIM, generator=generator, dtype=torch.float64)
    condition = None
    if name == "mlp":
        decoder, out_shape = mlp_decoder(), (10,)
    elif name == "conv":
        decoder, out_shape = conv_decoder(), (2, 6, 6)
    elif name == "conditional":
        decoder, out_shape = ConditionalDecoder(LATENT_DIM, 2, 9), (9,)
        condition = torch.randn(NUM_SAMPLES, 2, generator=generator, dtype=torch.float64)
    elif name == "tuple":
        decoder, out_shape = TupleDecoder(LATENT_DIM, 5), (5,)
    elif name == "narrow":  # output smaller than the latent: auto picks reverse mode
        decoder, out_shape = mlp_decoder(output_dim=2), (2,)
    else:
        raise AssertionError(name)
    return decoder.double(), z, condition, out_shape


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["mlp", "conv", "conditional", "tuple", "narrow"])
def test_decoder_jacobian_equals_autograd_per_sample(name, mode):
    decoder, z, condition, out_shape = make_case(name)
    expected = autograd_jacobian(decoder, z, condition)  # of the first output of a tuple
    output_key = 0 if name == "tuple" else None  # a tuple output is measured only where the user says which element
    jacobian = decoder_jacobian(decoder, z, condition=condition, mode=mode, output_key=output_key)
    assert jacobian.shape == (NUM_SAMPLES, *out_shape, LATENT_DIM)
    assert jacobian.dtype == torch.float64
    torch.testing.assert_close(jacobian, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["mlp", "conv", "conditional"])
def test_modes_agree_with_each_other(name):
    decoder, z, condition, _ = make_case(name, seed=1)
    jacobians = [decoder_jacobian(decoder, z, condition=condition, mode=mode) for mode in MODES]
    for jacobian in jacobians[1:]:
        torch.testing.assert_close(jacobian, jacobians[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [1, 3, NUM_SAMPLES, 100])
def test_chunk_size_gives_the_same_jacobian(chunk_size, mode):
    decoder, z, condition, _ = make_case("conditional", seed=2)
    expected = autograd_jacobian(decoder, z, condition)
    jacobian = decoder_jacobian(decoder, z, condition=condition, mode=mode, chunk_size=chunk_size)
    torch.testing.assert_close(jacobian, expected, atol=ATOL, rtol=0)
    chunks = list(iter_decoder_jacobians(decoder, z, condition=condition, mode=mode, chunk_size=chunk_size))
    assert [len(chunk) for chunk in chunks] == [min(chunk_size, NUM_SAMPLES - start) for start in range(0, NUM_SAMPLES, chunk_size)]


@pytest.mark.parametrize("mode", MODES)
def test_float32_decoder(mode):
    decoder, z, _, _ = make_case("conv", seed=3)
    expected = autograd_jacobian(decoder, z)  # float64 truth of the same weights
    jacobian = decoder_jacobian(decoder.float(), z.float(), mode=mode)
    assert jacobian.dtype == torch.float32
    torch.testing.assert_close(jacobian.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", [True, False])
def test_train_eval_mode_is_left_unchanged(training, mode):
    decoder, z, _, _ = make_case("mlp")
    decoder.train(training)
    decoder[1].train(not training)  # a mixed state must survive too
    before = [m.training for m in decoder.modules()]
    decoder_jacobian(decoder, z, mode=mode)
    decoder_gram(decoder, z, mode=mode)
    assert [m.training for m in decoder.modules()] == before


def batch_norm_decoder() -> nn.Module:
    torch.manual_seed(4)
    decoder = nn.Sequential(nn.Linear(LATENT_DIM, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 6)).double()
    with torch.no_grad():  # non-trivial running statistics
        decoder[1].running_mean.uniform_(-1, 1)
        decoder[1].running_var.uniform_(0.5, 2)
    return decoder


@pytest.mark.parametrize("mode", MODES)
def test_batch_norm_in_train_mode_raises(mode):
    decoder = batch_norm_decoder().train()
    running_mean = decoder[1].running_mean.clone()
    z = torch.randn(5, LATENT_DIM, dtype=torch.float64)
    message = r"Expected the decoder's normalization layers to be in eval mode, but BatchNorm1d is in training mode.*decoder\.eval\(\)"
    with pytest.raises(ValueError, match=message):
        decoder_jacobian(decoder, z, mode=mode)
    with pytest.raises(ValueError, match=message):
        decoder_jacobian(decoder.forward, z, mode=mode)  # a bound method of the module is checked too
    with pytest.raises(ValueError, match=message):
        decoder_gram(decoder, z, mode=mode)
    assert decoder.training
    torch.testing.assert_close(decoder[1].running_mean, running_mean, atol=0, rtol=0)  # statistics untouched


@pytest.mark.parametrize("mode", MODES)
def test_batch_norm_in_eval_mode_matches_autograd(mode):
    decoder = batch_norm_decoder().eval()
    z = torch.randn(5, LATENT_DIM, dtype=torch.float64)
    torch.testing.assert_close(decoder_jacobian(decoder, z, mode=mode), autograd_jacobian(decoder, z), atol=ATOL, rtol=0)
    assert not decoder.training


def dropout_decoder(weight: Tensor, p: float) -> nn.Module:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(weight)
    return nn.Sequential(linear, nn.Dropout(p))


def assert_one_dropout_mask_per_sample(jacobian: Tensor, weight: Tensor, p: float) -> None:
    """``x = dropout(W z)`` has Jacobian rows ``m_k W_k / (1 - p)``: each row is all zero or all kept (one mask)."""
    kept = weight / (1 - p)
    for n in range(jacobian.shape[0]):
        for k in range(jacobian.shape[1]):
            row = jacobian[n, k]
            assert torch.equal(row, torch.zeros_like(row)) or torch.allclose(row, kept[k], atol=ATOL, rtol=0), (n, k, row)


def test_dropout_in_train_mode_falls_back_to_loop_with_a_warning():
    weight = torch.randn(12, LATENT_DIM, dtype=torch.float64)
    decoder = dropout_decoder(weight, 0.5).train()
    z = torch.randn(6, LATENT_DIM, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"torch\.func could not trace the decoder .*falling back to mode='loop'"):
        jacobian = decoder_jacobian(decoder, z)
    assert jacobian.shape == (6, 12, LATENT_DIM)
    assert_one_dropout_mask_per_sample(jacobian, weight, 0.5)
    assert decoder.training


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_dropout_in_train_mode_raises_when_tracing_is_forced(mode):
    decoder = dropout_decoder(torch.randn(12, LATENT_DIM, dtype=torch.float64), 0.5).train()
    with pytest.raises(RuntimeError, match="random"):
        decoder_jacobian(decoder, torch.randn(4, LATENT_DIM, dtype=torch.float64), mode=mode)


def test_dropout_in_train_mode_loop_uses_one_mask_per_sample_in_every_column():
    weight = torch.randn(12, 4, dtype=torch.float64)
    decoder = dropout_decoder(weight, 0.3).train()
    z = torch.randn(8, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mode="loop" asks for no warning
        jacobian = decoder_jacobian(decoder, z, mode="loop")
    assert_one_dropout_mask_per_sample(jacobian, weight, 0.3)


def test_dropout_in_eval_mode_is_traced_without_warning():
    weight = torch.randn(12, LATENT_DIM, dtype=torch.float64)
    decoder = dropout_decoder(weight, 0.5).eval()
    z = torch.randn(4, LATENT_DIM, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        jacobian = decoder_jacobian(decoder, z)
    torch.testing.assert_close(jacobian, weight.expand(4, -1, -1), atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_without_create_graph_no_graph_is_kept(mode):
    decoder, z, _, _ = make_case("mlp")
    z.requires_grad_(True)
    jacobian = decoder_jacobian(decoder, z, mode=mode)
    assert not jacobian.requires_grad
    assert jacobian.grad_fn is None
    with torch.enable_grad():
        assert not decoder_jacobian(decoder, z, mode=mode).requires_grad


@pytest.mark.parametrize("mode", ["forward", "reverse", "loop"])
def test_create_graph_gradient_of_entropy_equals_closed_form_for_linear_decoder(mode):
    """``H = d h0 + 1/2 log det(W^T W)`` for ``x = W z + b``, so ``dH/dW = W (W^T W)^{-1}`` and ``dH/db = 0``."""
    torch.manual_seed(5)
    decoder = nn.Linear(LATENT_DIM, 6).double()
    z = torch.randn(4, LATENT_DIM, dtype=torch.float64)
    jacobian = decoder_jacobian(decoder, z, mode=mode, create_graph=True)
    assert jacobian.requires_grad
    _, total = manifold_entropy(jacobian)
    total.backward()
    weight = decoder.weight.detach()
    torch.testing.assert_close(total.detach(), LATENT_DIM * STANDARD_NORMAL_ENTROPY + 0.5 * torch.logdet(weight.T @ weight))
    torch.testing.assert_close(decoder.weight.grad, weight @ torch.linalg.inv(weight.T @ weight), atol=ATOL, rtol=0)
    assert decoder.bias.grad is None or torch.count_nonzero(decoder.bias.grad) == 0


@pytest.mark.parametrize("mode", ["forward", "reverse", "loop"])
@pytest.mark.parametrize("case", ["mlp", "narrow"])  # narrow: D < d, so "loop" runs backward passes
def test_create_graph_gradient_equals_autograd_for_nonlinear_decoder(mode, case):
    decoder, z, _, _ = make_case(case, seed=6)
    weights = [p for p in decoder.parameters()]

    jacobian = decoder_jacobian(decoder, z, mode=mode, create_graph=True)
    got = torch.autograd.grad(jacobian.square().sum(), weights)

    truth = autograd_jacobian(decoder, z, create_graph=True)
    expected = torch.autograd.grad(truth.square().sum(), weights)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


def test_decoder_gram_equals_gram_of_autograd_jacobian():
    decoder, z, _, out_shape = make_case("conv", seed=7)
    flat = autograd_jacobian(decoder, z).reshape(NUM_SAMPLES, -1, LATENT_DIM)
    expected = flat.mT @ flat
    gram = decoder_gram(decoder, z, chunk_size=2)
    assert gram.shape == (NUM_SAMPLES, LATENT_DIM, LATENT_DIM)
    assert gram.dtype == torch.float64
    torch.testing.assert_close(gram, expected, atol=ATOL, rtol=0)

    std = torch.rand(out_shape, dtype=torch.float64) + 0.5
    sigma = torch.rand(LATENT_DIM, dtype=torch.float64) + 0.5
    scaled = std.reshape(1, -1, 1) * flat * sigma
    for std_arg in (std, std.reshape(-1)):
        gram = decoder_gram(decoder, z, std=std_arg, sigma=sigma, mode="reverse")
        torch.testing.assert_close(gram, scaled.mT @ scaled, atol=ATOL, rtol=0)
    gram = decoder_gram(decoder, z, std=2.5)
    torch.testing.assert_close(gram, 2.5**2 * expected, atol=ATOL, rtol=0)


def test_decoder_gram_of_float32_decoder_is_float64():
    decoder, z, _, _ = make_case("mlp", seed=8)
    expected = autograd_jacobian(decoder, z)
    gram = decoder_gram(decoder.float(), z.float())
    assert gram.dtype == torch.float64
    torch.testing.assert_close(gram, expected.mT @ expected, atol=1e-4, rtol=1e-4)


def conditional_inn(dim: int, condition_dim: int) -> nn.Module:
    return freia_flow(dim, "AllInOneBlock", 2, seed=9, permute_seeds=range(2), condition_dim=condition_dim, global_affine_init=0.8)


@pytest.mark.parametrize("mode", MODES)
def test_as_decoder_of_conditional_freia_network(mode):
    inn = conditional_inn(4, 2)
    decoder = as_decoder(inn)
    z = torch.randn(5, 4, dtype=torch.float64)
    condition = torch.randn(5, 2, dtype=torch.float64)

    def reverse(v, c):
        return inn(v, c=[c], rev=True)[0]

    jacobian = decoder_jacobian(decoder, z, condition=condition, mode=mode)
    torch.testing.assert_close(jacobian, autograd_jacobian(reverse, z, condition), atol=ATOL, rtol=0)
    torch.testing.assert_close(decoder(z, condition), reverse(z, condition), atol=0, rtol=0)
    assert [p for p in decoder.parameters()] == [p for p in inn.parameters()]


def test_as_decoder_rejects_a_non_module():
    with pytest.raises(TypeError, match=r"Expected `inn` to be a torch\.nn\.Module .*but got function"):
        as_decoder(lambda z: z)


def test_plain_function_decoder():
    matrix = torch.randn(5, LATENT_DIM, dtype=torch.float64)
    z = torch.randn(4, LATENT_DIM, dtype=torch.float64)
    jacobian = decoder_jacobian(lambda v: torch.sin(v @ matrix.T), z)
    expected = torch.cos(z @ matrix.T)[:, :, None] * matrix
    torch.testing.assert_close(jacobian, expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("z", "error", "message"),
    [
        ([[0.0, 1.0]], TypeError, r"Expected `z` to be a torch.Tensor, but got list"),
        (torch.zeros(3), ValueError, r"Expected `z` of shape \(N, d\), but got \(3,\)"),
        (torch.zeros(2, 3, 1), ValueError, r"Expected `z` of shape \(N, d\), but got \(2, 3, 1\)"),
        (torch.zeros(0, 3), ValueError, r"Expected `z` with at least one sample and one latent dim, but got shape \(0, 3\)"),
        (torch.zeros(4, 0), ValueError, r"Expected `z` with at least one sample and one latent dim, but got shape \(4, 0\)"),
        (torch.zeros(2, 3, dtype=torch.long), TypeError, r"Expected `z` to be a floating point tensor, but got dtype torch.int64"),
    ],
)
def test_bad_z(z, error, message):
    with pytest.raises(error, match=message):
        decoder_jacobian(lambda v: v, z)
    with pytest.raises(error, match=message):
        decoder_gram(lambda v: v, z)


def test_bad_condition():
    decoder = ConditionalDecoder(LATENT_DIM, 2, 5).double()
    z = torch.zeros(4, LATENT_DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"Expected `condition` with N == 4 rows \(one per latent sample\), but got shape \(3, 2\)"):
        decoder_jacobian(decoder, z, condition=torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"Expected `condition` with N == 4 rows .*but got shape \(\)"):
        decoder_jacobian(decoder, z, condition=torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"Expected `condition` to be a torch.Tensor or None, but got list"):
        decoder_jacobian(decoder, z, condition=[[0.0, 0.0]] * 4)


@pytest.mark.parametrize("mode", ["Forward", "jacfwd", "", None])
def test_bad_mode(mode):
    with pytest.raises(ValueError, match=r"Expected `mode` to be one of \('auto', 'forward', 'reverse', 'loop'\), but got"):
        decoder_jacobian(lambda v: v, torch.zeros(2, 2), mode=mode)


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5, True, "4"])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match=rf"Expected `chunk_size` to be a positive int or None, but got {chunk_size!r}"):
        decoder_jacobian(lambda v: v, torch.zeros(2, 2), chunk_size=chunk_size)


def test_bad_decoder_output():
    z = torch.zeros(3, 2)
    with pytest.raises(TypeError, match=r"returned a dict with keys \['x', 'y'\]: pass `output_key=`"):
        decoder_jacobian(lambda v: {"x": v, "y": v}, z)
    with pytest.raises(TypeError, match=r"returned a tuple of 2 elements: pass `output_key=` the index"):
        decoder_jacobian(lambda v: (v, v), z)
    with pytest.raises(TypeError, match=r"returned a tuple of 0 elements"):
        decoder_jacobian(lambda v: (), z)
    with pytest.raises(ValueError, match=r"Expected the decoder to keep the batch dimension .*but got output shape \(4,\)"):
        decoder_jacobian(lambda v: v.sum(0).repeat(2), z)


def test_unit_circle_decoder_has_entropy_h0():
    """A small end-to-end check: the decoder ``z -> (cos z, sin z)`` has orthonormal columns, so ``H = h0``."""
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    jacobian = decoder_jacobian(lambda v: torch.cat([torch.cos(v), torch.sin(v)], dim=1), z)
    per_dim, total = manifold_entropy(jacobian)
    assert math.isclose(float(total), STANDARD_NORMAL_ENTROPY, abs_tol=ATOL)
    assert math.isclose(float(per_dim[0]), STANDARD_NORMAL_ENTROPY, abs_tol=ATOL)
