"""Attention decoders: forward-mode Jacobians through nn.MultiheadAttention, nn.TransformerEncoder/Decoder and
F.scaled_dot_product_attention, against the float64 autograd Jacobian.

Forward-mode AD has no rule for torch's fused attention kernels (the CPU flash kernel, CUDA's flash, memory-efficient
and cuDNN kernels, and the fused ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` "fast path" taken
without gradients): ``NotImplementedError: Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu``.
The math kernel (``sdpa_kernel(SDPBackend.MATH)``) with the fast path off is differentiable in forward mode and gives
the same values. Until the engine selects them itself, these tests enter that context around the call.
"""

from __future__ import annotations

import pytest
import torch
from conftest import autograd_jacobian
from torch import nn
from torch.nn import functional as F

from lightning_mem import decoder_jacobian, iter_decoder_jacobian_columns
from lightning_mem.jacobian import forward_mode_kernels

F64 = torch.float64
TOKENS, TOKEN_DIM, WIDTH, OUTPUT_DIM = 4, 2, 16, 6
"""A decoder from 4 latent tokens of 2 dims (d = 8) to 4 output tokens of 6 values (D = 24 > d: forward mode)."""


class TransformerDecoder(nn.Module):
    """Latent tokens -> linear embedding (+ positions) -> 2 ``nn.TransformerEncoderLayer`` blocks -> a linear readout."""

    def __init__(self, *, cross_attention: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(TOKEN_DIM, WIDTH)
        self.positions = nn.Parameter(0.5 * torch.randn(TOKENS, WIDTH))
        if cross_attention:  # a learned query sequence attends to the latent tokens (nn.TransformerDecoder)
            self.queries = nn.Parameter(torch.randn(TOKENS, WIDTH))
            layer = nn.TransformerDecoderLayer(WIDTH, nhead=4, dim_feedforward=32, dropout=0.1, batch_first=True)
            self.blocks = nn.TransformerDecoder(layer, num_layers=2)
        else:
            layer = nn.TransformerEncoderLayer(WIDTH, nhead=4, dim_feedforward=32, dropout=0.1, batch_first=True)
            self.blocks = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.readout = nn.Linear(WIDTH, OUTPUT_DIM)
        self.cross_attention = cross_attention

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(z.reshape(z.shape[0], TOKENS, TOKEN_DIM)) + self.positions
        if self.cross_attention:
            hidden = self.blocks(self.queries.expand(z.shape[0], -1, -1), tokens)
        else:
            hidden = self.blocks(tokens)
        return self.readout(hidden)


class CausalAttentionDecoder(nn.Module):
    """One causal self-attention block written with ``F.scaled_dot_product_attention`` (2 heads) and an MLP."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Linear(TOKEN_DIM, WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.mlp = nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 32), nn.GELU(), nn.Linear(32, OUTPUT_DIM))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n = z.shape[0]
        tokens = self.embed(z.reshape(n, TOKENS, TOKEN_DIM))
        q, k, v = (t.reshape(n, TOKENS, 2, WIDTH // 2).transpose(1, 2) for t in self.qkv(tokens).chunk(3, dim=-1))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, TOKENS, WIDTH)
        return self.mlp(tokens + attended)


DECODERS = {
    "transformer-encoder": lambda: TransformerDecoder(),
    "transformer-decoder": lambda: TransformerDecoder(cross_attention=True),
    "sdpa-causal": CausalAttentionDecoder,
}


def _latents(n: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(n, TOKENS * TOKEN_DIM, generator=torch.Generator().manual_seed(2), dtype=F64).to(dtype)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_forward_mode_jacobian_equals_the_float64_autograd_jacobian(name):
    decoder = DECODERS[name]().to(F64).eval()
    z = _latents(5)
    truth = autograd_jacobian(decoder, z)  # reverse mode, with gradients on: no fused forward-only kernel
    with forward_mode_kernels():
        jacobian = decoder_jacobian(decoder, z, mode="forward", chunk_size=2)
    assert jacobian.shape == (5, TOKENS, OUTPUT_DIM, TOKENS * TOKEN_DIM)
    torch.testing.assert_close(jacobian, truth, rtol=0, atol=1e-12)
    # output token 0 depends on the later latent tokens through attention, except under the causal mask
    later_tokens = jacobian[:, 0, :, TOKEN_DIM:].abs().max()
    assert later_tokens == 0 if name == "sdpa-causal" else later_tokens > 1e-3


def test_float32_forward_mode_is_close_to_float64():
    decoder = TransformerDecoder().eval()
    z = _latents(3, torch.float32)
    truth = autograd_jacobian(TransformerDecoder().to(F64).eval(), z.double())
    with forward_mode_kernels():
        jacobian = decoder_jacobian(decoder, z)  # auto: forward mode (D > d)
    assert jacobian.dtype == torch.float32
    torch.testing.assert_close(jacobian.double(), truth, rtol=0, atol=1e-5)


def test_sampled_columns_through_attention():
    decoder = CausalAttentionDecoder().to(F64).eval()
    z = _latents(4)
    columns = torch.tensor([[0, 5], [7, 1], [2, 2], [6, 3]])
    with forward_mode_kernels():
        sampled = torch.cat(list(iter_decoder_jacobian_columns(decoder, z, columns, chunk_size=3)))
    full = autograd_jacobian(decoder, z)
    torch.testing.assert_close(sampled, torch.stack([full[n][..., columns[n]] for n in range(4)]), rtol=0, atol=1e-12)


def test_the_context_restores_the_attention_settings():
    before = torch.backends.mha.get_fastpath_enabled()
    with forward_mode_kernels():
        assert not torch.backends.mha.get_fastpath_enabled()
    assert torch.backends.mha.get_fastpath_enabled() == before
