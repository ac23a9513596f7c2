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
from torchmetrics import Metric

from lightning_mem.jacobian import JacobianMode, ModelStateGuard, call_decoder, iter_decoder_jacobian_columns, iter_decoder_jacobians
from lightning_mem.metrics import ManifoldCrossMutualInformation, ManifoldEntropicMetrics, ManifoldTotalCorrelation

__all__ = ["Comparison", "active_total_correlation", "evaluate_decoder", "evaluation_mode", "prior_latents"]


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
    others = [_comparison_jacobians(comparison, z, condition, mode, chunk_size) for comparison in comparisons]
    step = z.shape[0] if chunk_size is None else chunk_size
    chunks: Iterator[Any] = zip(
        itertools.count(), iter_decoder_jacobians(decoder, z, condition=condition, mode=mode, chunk_size=chunk_size), *others
    )
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


def _comparison_jacobians(
    comparison: Comparison, z: Tensor, condition: Tensor | None, mode: JacobianMode, chunk_size: int | None
) -> Iterator[Tensor]:
    """The chunks of a comparison's Jacobians: its precomputed ``jacobians``, or its decoder's at its latents (or ``z``)."""
    if comparison.jacobians is not None:
        return iter(comparison.jacobians)
    if comparison.decoder is None:
        raise TypeError("Expected each of `comparisons` to have a `decoder` or `jacobians`, but got one with neither.")
    latents = z if comparison.latents is None else comparison.latents
    return iter_decoder_jacobians(comparison.decoder, latents, condition=condition, mode=mode, chunk_size=chunk_size)


def active_total_correlation(
    metric: ManifoldEntropicMetrics,
    active: Tensor,
    *,
    total_correlation: Tensor | None = None,
    jacobians: Iterable[Tensor] | None = None,
    decoder: Callable[..., Any] | None = None,
    z: Tensor | None = None,
    condition: Tensor | None = None,
    labels: Tensor | None = None,
    mode: JacobianMode = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    r"""The manifold total correlation of the ``active`` latents only: a second pass over their Jacobian columns.

    .. math::
        \mathrm{MTC}_A = \sum_{i \in A} H_i - H_A
        = \tfrac12 \mathbb{E}_z\Big[\sum_{i \in A} \log G_{ii} - \log\det G_{AA}\Big] \ \ge 0,

    :func:`~lightning_mem.functional.manifold_total_correlation` of the columns ``J[..., A]``, with the settings of
    ``metric`` (``std``, ``sigma`` restricted to ``A``, ``eps``, ``num_classes``). Unlike the pairwise mutual
    information, it is no sub-block of the full statistics: :math:`\log\det G_{AA}` of each sample is needed, and
    ``A`` is known only once every sample's :math:`\log G_{ii}` is summed (and, under DDP, synced). So this runs
    after ``metric.compute()``, on the ``jacobians`` of the first pass when they were kept (no decoder call), else on
    the active columns of ``decoder`` at ``z`` (:func:`~lightning_mem.jacobian.iter_decoder_jacobian_columns`: ``|A|``
    forward-mode passes instead of ``d``; other modes and decoders with their own Jacobian recompute it whole). Under
    DDP every process calls it with its own samples and the same ``active`` (decided from the synced spectrum): the
    per-sample sums add up across processes as in one process, so the value is exact.

    No pass is needed with fewer than two active latents (no dependence: 0) or with all of them active (the total
    correlation of all latents, ``total_correlation`` when given).

    Args:
        metric: the :class:`~lightning_mem.ManifoldEntropicMetrics` of the first pass (for its settings).
        active: ``(d,)`` bool mask of the active latents, equal on every process.
        total_correlation: the first pass's ``total_correlation``, returned when every latent is active.
        jacobians: this process's Jacobian chunks ``(n, *output_shape, d)`` of the first pass, in sample order.
        decoder, z, condition: otherwise, the decoder and this process's latents ``(N, d)`` (and conditions).
        labels: ``(N,)`` class labels, class-conditional mode.
        mode, chunk_size: as for :func:`lightning_mem.decoder_jacobian`.

    Returns:
        Scalar float64 tensor, nats.

    Example:
        >>> decoder = torch.nn.Linear(3, 4).double()
        >>> with torch.no_grad():
        ...     decoder.weight[:, 2] *= 1e-3  # latent 2 barely moves the output
        >>> z = torch.randn(8, 3, dtype=torch.float64)
        >>> metric = ManifoldEntropicMetrics(3)
        >>> kept = evaluate_decoder(decoder, z, metric, keep_bytes=2**20)
        >>> active = torch.tensor([True, True, False])
        >>> from lightning_mem.functional import manifold_total_correlation
        >>> torch.allclose(active_total_correlation(metric, active, jacobians=kept),
        ...                manifold_total_correlation(decoder.weight[None, :, :2]))
        True
    """
    active = active.to(torch.bool).cpu()
    k, d = int(active.sum()), active.numel()
    if k < 2:
        return torch.zeros((), dtype=torch.float64)
    if k == d and total_correlation is not None:
        return total_correlation.detach().to(torch.float64)
    sigma = None if metric.sigma is None else metric.sigma[active.to(metric.sigma.device)]
    subspace = ManifoldTotalCorrelation(
        k,
        std=metric.std,
        sigma=sigma,
        eps=metric.eps,
        num_classes=metric.num_classes,
        # synced like the first pass: the same processes, the same way
        process_group=metric.process_group,
        dist_sync_fn=metric.dist_sync_fn,
        distributed_available_fn=metric.distributed_available_fn,
        sync_on_compute=metric.sync_on_compute,
    )
    subspace = subspace.to(metric.device)  # where the other processes' states are (the sync needs them on one device)
    columns = active.nonzero().flatten()
    own_jacobian, own_columns = (callable(getattr(decoder, name, None)) for name in ("decoder_jacobian", "decoder_jacobian_columns"))
    if jacobians is not None:
        chunks: Iterable[Tensor] = (jacobian[..., columns.to(jacobian.device)] for jacobian in jacobians)
    elif decoder is None or z is None:
        raise ValueError("Expected `jacobians`, or `decoder` and `z`, to compute the total correlation of the active latents.")
    elif mode in ("auto", "forward") and (own_columns or not own_jacobian):
        design = columns.to(z.device).expand(z.shape[0], k)  # the same k columns for every sample
        chunks = iter_decoder_jacobian_columns(decoder, z, design, condition=condition, chunk_size=chunk_size)
    else:  # a mode the columns route does not take, or a decoder with its own Jacobian but no columns method
        full = iter_decoder_jacobians(decoder, z, condition=condition, mode=mode, chunk_size=chunk_size)
        chunks = (jacobian[..., columns.to(jacobian.device)] for jacobian in full)
    error: Exception | None = None
    try:
        start = 0
        for chunk in chunks:
            rows = slice(start, start + chunk.shape[0])
            subspace.update(chunk, None if labels is None else labels[rows])
            start = rows.stop
    except Exception as exception:  # raised below on every process alike, never left to hang the others in the sync
        error = exception
    _agree_on_failure(subspace, error)
    return subspace.compute().detach().cpu()


def _agree_on_failure(metric: Metric, error: Exception | None) -> None:
    """Raise ``error`` here, and a ``RuntimeError`` on every other process of ``metric``'s group, when any process
    failed before the metric's sync: a process that raised alone would leave the others waiting in it forever."""
    failed = error is not None
    if metric.sync_on_compute and metric.distributed_available_fn():
        flag = torch.tensor(float(failed), device=metric.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=metric.process_group)
        if not failed and bool(flag):
            raise RuntimeError("The total correlation of the active latents failed on another process.")
    if error is not None:
        raise error
