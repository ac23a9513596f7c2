"""How many latents to differentiate at once: a chunk size chosen from a memory budget."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mem._checks import check_latents, check_positive_int
from lightning_mem.jacobian import call_decoder

__all__ = ["DEFAULT_MEMORY_BUDGET", "activation_numel", "auto_chunk_size", "jacobian_bytes_per_sample"]

DEFAULT_MEMORY_BUDGET = 2**30
"""Bytes that one chunk of forward-mode Jacobians may take by default (1 GiB): see :func:`auto_chunk_size`."""


def activation_numel(decoder: Callable[..., Any], z: Tensor, condition: Tensor | None = None) -> int:
    """Entries of the outputs of every leaf module that one decoder call on the first latent of ``z`` runs.

    Counted with a global forward hook, so it sees the modules of any callable (a method, a closure); a decoder made
    of plain tensor operations has none and counts 0.
    """
    count = 0

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal count
        if next(module.children(), None) is None:  # leaf modules only: a container's output is its last child's
            count += sum(t.numel() for t in (output if isinstance(output, (tuple, list)) else [output]) if isinstance(t, Tensor))

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        with torch.no_grad():
            call_decoder(decoder, z[:1], None if condition is None else condition[:1])
    finally:
        handle.remove()
    return count


def jacobian_bytes_per_sample(latent_dim: int, output_numel: int, activations: int, itemsize: int) -> int:
    r"""Estimated working memory of one sample's forward-mode Jacobian and its float64 statistics, in bytes.

    .. math:: b = s\,(d + 1)(A + D) + 8\,D\,d,

    with ``s`` the decoder's bytes per entry, ``A`` the entries of its intermediate outputs for one sample
    (:func:`activation_numel`), ``D`` its output entries: forward mode carries ``d`` tangents beside each
    intermediate value, and the Gram product reads the Jacobian in float64.

    Example:
        >>> jacobian_bytes_per_sample(latent_dim=10, output_numel=784, activations=1000, itemsize=4)
        141216
    """
    return itemsize * (latent_dim + 1) * (activations + output_numel) + 8 * output_numel * latent_dim


def auto_chunk_size(
    decoder: Callable[..., Any],
    z: Tensor,
    *,
    condition: Tensor | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> int:
    """The most latents of ``z`` whose Jacobians fit in ``memory_budget`` bytes at once (at least 1, at most ``N``).

    The per-sample cost is :func:`jacobian_bytes_per_sample`, from one decoder call on the first latent. It is an
    estimate of the working set, not a measurement: peak memory also depends on the decoder's own temporaries.

    Raises:
        ValueError, TypeError: for bad latents or a non-positive ``memory_budget``.

    Example:
        >>> decoder = torch.nn.Sequential(torch.nn.Linear(8, 256), torch.nn.Tanh(), torch.nn.Linear(256, 784))
        >>> auto_chunk_size(decoder, torch.zeros(1000, 8), memory_budget=2**20)
        8
    """
    check_latents(z, condition)
    check_positive_int(memory_budget, "memory_budget")
    activations = activation_numel(decoder, z, condition)
    with torch.no_grad():
        output = call_decoder(decoder, z[:1], None if condition is None else condition[:1])
    per_sample = jacobian_bytes_per_sample(z.shape[1], output[0].numel(), activations, output.element_size())
    return max(1, min(z.shape[0], memory_budget // per_sample))
