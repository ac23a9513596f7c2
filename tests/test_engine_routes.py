"""The engine on its own: forward-mode attention kernels, an ODE decoder's tangent ODE, the fast direction of flows."""

import warnings

import pytest
import torch
import zuko
from conftest import autograd_jacobian
from test_attention import DECODERS, F64, _latents

from lightning_mem import as_decoder, decoder_jacobian
from lightning_mem.inverse import InverseJacobianDecoder
from lightning_mem.ode import ODEDecoder


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_engine_picks_attention_kernels_forward_mode_can_differentiate(name):
    decoder = DECODERS[name]().to(F64).eval()
    z = _latents(3)
    before = torch.backends.mha.get_fastpath_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to the loop
        jacobian = decoder_jacobian(decoder, z)  # auto: forward mode (D > d), no context entered by the caller
    torch.testing.assert_close(jacobian, autograd_jacobian(decoder, z), rtol=0, atol=1e-12)
    assert torch.backends.mha.get_fastpath_enabled() == before


def test_engine_uses_the_ode_decoders_tangent_ode():
    a = 0.6 * torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    decoder = ODEDecoder(lambda t, x: x @ a.T, rtol=1e-10, atol=1e-11)
    z = torch.randn(5, 3, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        jacobian = decoder_jacobian(decoder, z, chunk_size=2)
    torch.testing.assert_close(jacobian, torch.cat([decoder.decoder_jacobian(c) for c in z.split(2)]), rtol=0, atol=0)
    torch.testing.assert_close(jacobian, torch.linalg.matrix_exp(a).expand(5, 3, 3), rtol=0, atol=1e-8)


@pytest.mark.parametrize("kind", ["MAF", "NSF"])
def test_as_decoder_takes_the_fast_direction_for_autoregressive_zuko_flows(kind):
    torch.manual_seed(0)
    flow = getattr(zuko.flows, kind)(features=4, transforms=2, hidden_features=(16,)).to(F64).eval()
    decoder = as_decoder(flow)
    assert isinstance(decoder, InverseJacobianDecoder) and decoder.latent_dim == 4
    z = torch.randn(5, 4, dtype=F64)
    truth = autograd_jacobian(lambda u: flow().transform.inv(u), z)
    torch.testing.assert_close(decoder_jacobian(decoder, z), truth, rtol=0, atol=1e-10)
    assert not isinstance(as_decoder(zuko.flows.RealNVP(features=4)), InverseJacobianDecoder)
    assert as_decoder(decoder) is decoder


def test_engine_asks_the_ode_decoder_for_sampled_columns():
    from lightning_mem import iter_decoder_jacobian_columns

    a = 0.6 * torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    decoder = ODEDecoder(lambda t, x: torch.tanh(x) @ a.T, rtol=1e-10, atol=1e-11)  # adaptive: no forward AD through it
    z = torch.randn(5, 3, dtype=F64)
    columns = torch.tensor([[0], [2], [1], [1], [0]])
    sampled = torch.cat(list(iter_decoder_jacobian_columns(decoder, z, columns, chunk_size=2)))
    full = decoder.decoder_jacobian(z)
    torch.testing.assert_close(sampled, torch.stack([full[n][:, columns[n]] for n in range(5)]), rtol=0, atol=1e-8)
