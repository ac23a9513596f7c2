"""Fast-direction Jacobians (lightning_mem.inverse): the inverted encoder Jacobian of zuko's MAF and NSF against the
float64 autograd Jacobian of the decoder direction and the flow's own log-determinant."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import H0, autograd_jacobian
from torch import nn

from lightning_mem import decoder_jacobian
from lightning_mem.functional import manifold_entropy, manifold_pairwise_mutual_information, manifold_total_correlation
from lightning_mem.inverse import InverseJacobianDecoder, inverse_jacobian, iter_inverse_jacobians, prefers_encoder_jacobian

zuko = pytest.importorskip("zuko")

F64 = torch.float64
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _flow(kind: str, features: int = 4, seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    flow = getattr(zuko.flows, kind)(features=features, transforms=3, hidden_features=(16, 16), **options).to(F64).eval()
    with torch.no_grad():  # move the flow away from its identity-like initialisation
        for parameter in flow.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, dtype=F64))
    return flow


def _fast(flow: nn.Module) -> InverseJacobianDecoder:
    """The flow's sampling direction ``flow(c).transform.inv``, with its density direction ``flow(c).transform`` as the encoder."""
    return InverseJacobianDecoder(lambda z, c=None: flow(c).transform.inv(z), lambda x, c=None: flow(c).transform(x))


def _latents(n: int, d: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("kind", ["MAF", "NSF"])
def test_inverted_encoder_jacobian_equals_the_decoders_autograd_jacobian(kind):
    flow = _flow(kind)
    decoder = _fast(flow)
    z = _latents(6, 4)
    truth = autograd_jacobian(lambda u: flow().transform.inv(u), z)
    jacobian = decoder.decoder_jacobian(z)
    assert jacobian.shape == (6, 4, 4) and jacobian.dtype == F64
    torch.testing.assert_close(jacobian, truth, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["MAF", "NSF"])
def test_metrics_by_the_fast_direction_equal_the_decoder_direction_and_the_flows_log_det(kind):
    flow = _flow(kind, features=5, seed=1)
    decoder = _fast(flow)
    z = _latents(32, 5)
    fast = decoder.decoder_jacobian(z)
    slow = decoder_jacobian(lambda u: flow().transform.inv(u), z, mode="forward")
    for metric in (manifold_total_correlation, manifold_pairwise_mutual_information):
        torch.testing.assert_close(metric(fast), metric(slow), rtol=0, atol=1e-8)
    (fast_entropy, fast_total), (slow_entropy, slow_total) = manifold_entropy(fast), manifold_entropy(slow)
    torch.testing.assert_close(fast_entropy, slow_entropy, rtol=0, atol=1e-8)
    # H = d h0 + E[log |det J_g(z)|] = d h0 - E[log |det J_f(x)|], the flow's own log-determinant at x = g(z)
    with torch.no_grad():
        transform = flow().transform
        x = transform.inv(z)
        log_det = transform.log_abs_det_jacobian(x, z)
    torch.testing.assert_close(fast_total, 5 * H0 - log_det.mean(), rtol=0, atol=1e-8)
    torch.testing.assert_close(slow_total, fast_total, rtol=0, atol=1e-8)


def test_inverse_jacobian_at_the_flows_own_samples():
    # the prior latents the metrics want are the latents of the flow's samples: x ~ flow, z = f(x)
    flow = _flow("MAF", seed=2)
    with torch.no_grad():
        x = flow().sample((8,))
        z = flow().transform(x)
    jacobian = inverse_jacobian(lambda v: flow().transform(v), x, chunk_size=3)
    torch.testing.assert_close(jacobian, autograd_jacobian(lambda u: flow().transform.inv(u), z), rtol=0, atol=1e-10)
    chunks = list(iter_inverse_jacobians(lambda v: flow().transform(v), x, chunk_size=3))
    assert [chunk.shape[0] for chunk in chunks] == [3, 3, 2]
    torch.testing.assert_close(torch.cat(chunks), jacobian, rtol=0, atol=0)


def test_conditional_flow_gets_each_samples_context():
    flow = _flow("MAF", seed=3, context=2)
    decoder = _fast(flow)
    z, context = _latents(5, 4), _latents(5, 2, seed=7)
    truth = autograd_jacobian(lambda u, c: flow(c).transform.inv(u), z, context)
    torch.testing.assert_close(decoder.decoder_jacobian(z, context), truth, rtol=0, atol=1e-10)
    torch.testing.assert_close(decoder.encode(decoder(z, context), context), z, rtol=0, atol=1e-10)


def test_engine_differentiates_the_forward_pass_when_asked_and_agrees():
    flow = _flow("MAF", seed=4)
    decoder = _fast(flow)
    z = _latents(4, 4)
    for mode in ("forward", "reverse"):
        torch.testing.assert_close(decoder_jacobian(decoder, z, mode=mode), decoder.decoder_jacobian(z), rtol=0, atol=1e-10)


def test_image_shaped_data_keep_their_shape_in_the_jacobian():
    # a bijection of (N, 2, 3) images: x = A z reshaped, so J_g = A, laid out (N, 2, 3, 6)
    a = torch.randn(6, 6, generator=torch.Generator().manual_seed(5), dtype=F64) + 3 * torch.eye(6, dtype=F64)
    a_inverse = torch.linalg.inv(a)

    def encoder(x):
        return x.flatten(1) @ a_inverse.T

    x = _latents(3, 6).reshape(3, 2, 3)
    jacobian = inverse_jacobian(encoder, x)
    assert jacobian.shape == (3, 2, 3, 6)
    torch.testing.assert_close(jacobian.reshape(3, 6, 6), a.expand(3, 6, 6), rtol=0, atol=1e-12)


def test_gradients_flow_through_the_inverse_like_through_the_decoder():
    flow = _flow("MAF", features=3, seed=6)
    decoder = _fast(flow)
    z = _latents(3, 3)
    parameters = list(flow.parameters())

    def gradient(jacobian):
        return torch.autograd.grad(manifold_total_correlation(jacobian), parameters)

    fast = gradient(decoder.decoder_jacobian(z, create_graph=True))
    slow = gradient(
        torch.stack([torch.autograd.functional.jacobian(lambda u: flow().transform.inv(u[None])[0], z_n, create_graph=True) for z_n in z])
    )
    for g_fast, g_slow in zip(fast, slow, strict=True):
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-7, atol=1e-10)
    assert not decoder.decoder_jacobian(z).requires_grad


def test_singular_and_non_square_encoders_are_named():
    # z = x^3 is a bijection whose Jacobian diag(3 x^2) is singular where a coordinate is 0
    x = torch.tensor([[1.0, 1.0], [1.0, 2.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64)
    with pytest.raises(ValueError, match="singular at sample 2"):
        inverse_jacobian(lambda v: v**3, x, chunk_size=2)
    with pytest.raises(ValueError, match="as many outputs as inputs"):
        inverse_jacobian(lambda x: x[:, :1], _latents(2, 2))
    with pytest.raises(TypeError, match=r"`x` to be a torch\.Tensor"):
        inverse_jacobian(lambda x: x, [[0.0, 1.0]])
    with pytest.raises(TypeError, match="`encoder` to be a callable"):
        InverseJacobianDecoder(lambda z: z, "f")
    with pytest.raises(ValueError, match="`mode` to be one of"):
        InverseJacobianDecoder(lambda z: z, lambda x: x, encoder_mode="sideways")


def test_prefers_encoder_jacobian_for_autoregressive_flows_only():
    assert prefers_encoder_jacobian(zuko.flows.MAF(features=4))
    assert prefers_encoder_jacobian(zuko.flows.NSF(features=4))
    assert not prefers_encoder_jacobian(zuko.flows.MAF(features=4, passes=2))  # coupling-like: 2 passes
    assert not prefers_encoder_jacobian(zuko.flows.RealNVP(features=4))
    assert not prefers_encoder_jacobian(nn.Linear(4, 4))
    assert not prefers_encoder_jacobian(lambda z: z)


@pytest.mark.slow
def test_benchmark_script_quick_run_agrees_between_directions():
    spec = importlib.util.spec_from_file_location("example_jacobian_benchmarks", EXAMPLES / "jacobian_benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--quick"])
    maf = rows["maf_directions"]
    assert maf["max_abs_difference"] < 1e-8 and maf["entropy_difference"] < 1e-8
    assert maf["speedup"] > 1.0
    assert rows["ode_jacobian"]["max_abs_error"] < 1e-6
    assert rows["attention_jacobian"]["max_abs_error"] < 1e-10
