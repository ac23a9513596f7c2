"""CUDA runs give the CPU's float64 results (run on a GPU machine; CPU-only CI has no device to run them on)."""

import pytest
import torch
from conftest import freia_flow
from torch import nn

from lightning_mem import ManifoldCrossMutualInformation, ManifoldEntropicMetrics, as_decoder, decoder_gram, decoder_jacobian

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _decoders():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 48))
    conv = nn.Sequential(nn.Linear(5, 2 * 4 * 4), nn.Unflatten(1, (2, 4, 4)), nn.ConvTranspose2d(2, 3, 3), nn.Softplus())
    return {"mlp": mlp, "conv": conv}


@pytest.mark.parametrize("name", ["mlp", "conv"])
@pytest.mark.parametrize("mode", ["forward", "reverse", "loop"])
def test_jacobian_on_cuda_equals_cpu_float64(name, mode):
    decoder = _decoders()[name].double()
    z = torch.randn(17, 5, dtype=torch.float64)
    cpu = decoder_jacobian(decoder, z, mode=mode, chunk_size=8)
    gpu = decoder_jacobian(decoder.cuda(), z.cuda(), mode=mode, chunk_size=8)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-10, rtol=0)


def test_float32_on_cuda_close_to_float64():
    decoder = _decoders()["mlp"]
    z = torch.randn(64, 5)
    exact = decoder_gram(decoder.double(), z.double())
    approximate = decoder_gram(decoder.float().cuda(), z.cuda())
    assert approximate.dtype == torch.float64 and approximate.device.type == "cuda"
    torch.testing.assert_close(approximate.cpu(), exact, atol=1e-4, rtol=1e-4)


def test_metrics_move_to_cuda_and_match_cpu():
    decoder = _decoders()["mlp"].double()
    z = torch.randn(40, 5, dtype=torch.float64)
    jacobian = decoder_jacobian(decoder, z)
    cpu, gpu = ManifoldEntropicMetrics(5), ManifoldEntropicMetrics(5).to("cuda")
    cpu.update(jacobian)
    gpu.update(jacobian.cuda())
    for key, value in cpu.compute().items():
        torch.testing.assert_close(gpu.compute()[key].cpu(), value, atol=1e-10, rtol=0)
    cross_cpu, cross_gpu = ManifoldCrossMutualInformation(5, 5), ManifoldCrossMutualInformation(5, 5).to("cuda")
    cross_cpu.update(jacobian, jacobian.flip(-1))
    cross_gpu.update(jacobian.cuda(), jacobian.flip(-1).cuda())
    torch.testing.assert_close(
        cross_gpu.compute()["cross_mutual_information"].cpu(), cross_cpu.compute()["cross_mutual_information"], atol=1e-10, rtol=0
    )


def test_freia_flow_on_cuda():
    pytest.importorskip("FrEIA")
    inn = freia_flow(4, "GLOWCouplingBlock", 3, seed=0, permute_seeds=range(3))
    z = torch.randn(20, 4, dtype=torch.float64)
    cpu = decoder_jacobian(as_decoder(inn), z)
    gpu = decoder_jacobian(as_decoder(inn.cuda()), z.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-10, rtol=0)
