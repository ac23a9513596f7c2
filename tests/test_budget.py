"""The chunk size chosen from a memory budget: the activation count, the per-sample estimate, the clamp."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_mem.budget import activation_numel, auto_chunk_size, jacobian_bytes_per_sample


def test_activation_numel_counts_the_outputs_of_every_leaf_module_of_any_callable():
    mlp = nn.Sequential(nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 784))
    assert activation_numel(mlp, torch.zeros(5, 8)) == 256 + 256 + 784
    # behind a lambda, with a reshape between: the same leaf modules run
    assert activation_numel(lambda z: mlp(z).reshape(-1, 28, 28), torch.zeros(5, 8)) == 256 + 256 + 784
    generator = nn.Sequential(nn.Unflatten(1, (4, 1, 1)), nn.ConvTranspose2d(4, 6, 4), nn.BatchNorm2d(6), nn.ReLU()).eval()
    assert activation_numel(generator, torch.zeros(3, 4)) == 4 + 3 * 6 * 16
    assert activation_numel(lambda z: z.tanh() * 2, torch.zeros(3, 4)) == 0


def test_auto_chunk_size_divides_the_budget_by_the_per_sample_estimate_and_clamps():
    mlp = nn.Sequential(nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 784))
    per_sample = jacobian_bytes_per_sample(8, 784, 256 + 256 + 784, 4)
    assert per_sample == 4 * 9 * (1296 + 784) + 8 * 784 * 8
    z = torch.zeros(1000, 8)
    assert auto_chunk_size(mlp, z, memory_budget=10 * per_sample) == 10
    assert auto_chunk_size(mlp, z, memory_budget=10 * per_sample - 1) == 9
    assert auto_chunk_size(mlp, z, memory_budget=1) == 1  # at least one sample
    assert auto_chunk_size(mlp, z[:7], memory_budget=2**40) == 7  # at most all of them
    assert auto_chunk_size(mlp.double(), z.double(), memory_budget=10 * per_sample) < 10  # float64 entries cost twice
    with pytest.raises(ValueError, match="`memory_budget` to be a positive int"):
        auto_chunk_size(mlp, z, memory_budget=0)
