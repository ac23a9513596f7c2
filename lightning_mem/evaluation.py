"""The evaluation engine: a decoder's Jacobians, chunk by chunk, into Metric objects (callback, CLI and benchmark)."""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from lightning_mem.jacobian import JacobianMode, ModelStateGuard, call_decoder, iter_decoder_jacobians
from lightning_mem.metrics import ManifoldCrossMutualInformation, ManifoldEntropicMetrics

__all__ = ["Comparison", "evaluate_decoder", "evaluation_mode", "prior_latents"]


class Comparison(NamedTuple):
    """A second decoder compared with the model through the manifold cross-pairwise mutual information.

    Its Jacobians come from ``decoder`` at ``latents`` (default: the model's latents, e.g. the same model earlier in
    training) or, precomputed, from ``jacobians`` (chunks of the same sizes as the model's).
    """

    metric: ManifoldCrossMutualInformation
    decoder: Callable[..., Any] | None = None
    latents: Tensor | None = None
    jacobians: Iterable[Tensor] | None = None


def prior_latents(num_samples: int, latent_dim: int, seed: int, *, sigma: Tensor | None = None) -> Tensor:
    """``num_samples`` float64 draws from :math:`N(0, \\mathrm{diag}(\\sigma^2))` with a generator of their own, seeded
    with ``seed`` (the global RNG is not used).

    Example:
        >>> torch.equal(prior_latents(4, 2, seed=0), prior_latents(4, 2, seed=0))
        True
    """
    z = torch.randn(num_samples, latent_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return z if sigma is None else z * sigma


@contextlib.contextmanager
def evaluation_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Evaluate in eval mode without a trace: restore every module's own mode flag and every global RNG afterwards.

    Inside the block every submodule has ``training = False`` and gradients are off; afterwards each submodule's own
    flag is back, and so are the torch (CPU and initialised CUDA), numpy and python ``random`` generator states.
    """
    flags = [(m, m.training) for module in modules for m in module.modules()]
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    numpy_state = np.random.get_state()  # noqa: NPY002 - the legacy global state is what user code may rely on
    python_state = random.getstate()
    try:
        for m, _ in flags:
            m.training = False  # set the flag itself: an overridden `train()` could have side effects
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(numpy_state)  # noqa: NPY002
        random.setstate(python_state)


def evaluate_decoder(
    decoder: Callable[..., Any],
    z: Tensor,
    metric: ManifoldEntropicMetrics,
    *,
    condition: Tensor | None = None,
    labels: Tensor | None = None,
    comparisons: Sequence[Comparison] = (),
    mode: JacobianMode = "auto",
    chunk_size: int | None = None,
    check_output: bool = False,
    keep_bytes: int = 0,
    progress: Callable[[Iterator[Any], int], Iterator[Any]] | None = None,
) -> list[Tensor] | None:
    """Feed a decoder's Jacobians at ``z``, ``chunk_size`` samples at a time, into ``metric`` and the comparisons.

    Only ``chunk_size`` Jacobians of each decoder exist at once. ``metric`` and the comparisons' metrics are updated,
    not reset: call ``compute()`` on them afterwards (on every process, under DDP).

    Args:
        decoder: ``z -> x`` or ``(z, condition) -> x``.
        z: ``(N, d)`` latents.
        metric: receives ``update(jacobian, labels)`` for every chunk.
        condition: per-sample condition ``(N, ...)`` passed to the decoder (and to the comparisons' decoders).
        labels: ``(N,)`` class labels, for class-conditional metrics.
        comparisons: decoders compared with this one (drift, reference); each one's metric receives
            ``update(jacobian, other_jacobian, labels)``.
        mode, chunk_size: as for :func:`lightning_mem.decoder_jacobian`.
        check_output: also evaluate the decoder on each chunk and raise a ``FloatingPointError`` on NaN or inf.
        keep_bytes: keep and return the Jacobian chunks when they take at most this many bytes in all.
        progress: wraps the chunk iterator (e.g. a progress bar), given it and the number of chunks.

    Returns:
        The Jacobian chunks, when kept; else ``None``.

    Example:
        >>> decoder = torch.nn.Linear(2, 3)
        >>> metric = ManifoldEntropicMetrics(2)
        >>> kept = evaluate_decoder(decoder, torch.randn(5, 2), metric, chunk_size=2, keep_bytes=2**20)
        >>> [tuple(chunk.shape) for chunk in kept], int(metric.diagnostics()["num_samples"])
        ([(2, 3, 2), (2, 3, 2), (1, 3, 2)], 5)
    """
    options = {"condition": condition, "mode": mode, "chunk_size": chunk_size}
    others = [
        iter(comparison.jacobians)
        if comparison.jacobians is not None
        else iter_decoder_jacobians(comparison.decoder, z if comparison.latents is None else comparison.latents, **options)
        for comparison in comparisons
    ]
    step = z.shape[0] if chunk_size is None else chunk_size
    chunks: Iterator[Any] = zip(itertools.count(), iter_decoder_jacobians(decoder, z, **options), *others)
    if progress is not None:
        chunks = progress(chunks, -(-z.shape[0] // step))
    kept: list[Tensor] | None = [] if keep_bytes > 0 else None
    kept_bytes = 0
    guard = ModelStateGuard()
    for index, jacobian, *other_jacobians in chunks:
        rows = slice(index * step, (index + 1) * step)
        if check_output:
            with guard:
                output = call_decoder(decoder, z[rows], None if condition is None else condition[rows])
            if not torch.isfinite(output).all():
                raise FloatingPointError(f"the decoder output holds NaN or inf at {int((~torch.isfinite(output)).sum())} entries")
        chunk_labels = None if labels is None else labels[rows]
        metric.update(jacobian, chunk_labels)
        for comparison, other in zip(comparisons, other_jacobians, strict=True):
            comparison.metric.update(jacobian, other, chunk_labels)
        if kept is not None:
            kept_bytes += jacobian.numel() * jacobian.element_size()
            if kept_bytes <= keep_bytes:
                kept.append(jacobian)
            else:
                kept = None
    return kept
