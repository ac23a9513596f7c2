"""What the metrics may cost: a chunk size from a memory budget, and the callback's sample counts from a time budget."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mem._checks import check_latents, check_positive_float, check_positive_int
from lightning_mem.jacobian import call_decoder

__all__ = [
    "DEFAULT_MAX_OVERHEAD",
    "DEFAULT_MEMORY_BUDGET",
    "FIGURE_SECONDS",
    "TimeBudget",
    "activation_numel",
    "affordable_samples",
    "auto_chunk_size",
    "jacobian_bytes_per_sample",
]

DEFAULT_MEMORY_BUDGET = 2**30
"""Bytes that one chunk of forward-mode Jacobians may take by default (1 GiB): see :func:`auto_chunk_size`."""

DEFAULT_MAX_OVERHEAD = 0.05
"""The callback's default time budget: its evaluations and figures may take 5% of the training time (see :class:`TimeBudget`)."""

FIGURE_SECONDS = 0.25
"""Seconds one set of figures is assumed to take to draw until one drawing has been timed (the digits demo's took
0.22 s on the 2-core CI machine), plus the Jacobians of the latent pictures at the measured cost per latent; the
measured cost of a drawing replaces this guess."""


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


def affordable_samples(seconds: float, *, fixed_seconds: float, sample_seconds: float, min_samples: int, max_samples: int) -> int:
    r"""The most latents an evaluation may take for ``seconds``: ``min_samples`` times a power of two, or ``max_samples``.

    With :math:`m = (s - a) / b` the latents that ``seconds`` :math:`s` pays for at a fixed cost :math:`a` and
    :math:`b` seconds per latent,

    .. math::

        n = \begin{cases} N & m \ge N \\
            n_{\min}\, 2^{\lfloor \log_2 (m / n_{\min}) \rfloor} & n_{\min} \le m < N \\
            0 & m < n_{\min} \end{cases}

    Powers of two keep the count, and with it the curves (the first ``n`` of fixed latents), steady while the
    measured costs wobble: it changes only when the budget doubles or halves.

    Args:
        seconds: what the evaluation may cost, :math:`s`.
        fixed_seconds: its cost whatever the count, :math:`a`.
        sample_seconds: its cost per latent, :math:`b` (0: free).
        min_samples: :math:`n_{\min}`, the fewest latents worth an evaluation.
        max_samples: :math:`N`, all the latents.

    Returns:
        :math:`n`; ``0`` when not even ``min_samples`` fit.

    Example:
        >>> affordable_samples(1.0, fixed_seconds=0.1, sample_seconds=0.01, min_samples=1, max_samples=256)  # m = 90
        64
        >>> affordable_samples(1.0, fixed_seconds=0.1, sample_seconds=0.01, min_samples=3, max_samples=256)  # 3 * 2**4
        48
        >>> affordable_samples(0.05, fixed_seconds=0.1, sample_seconds=0.01, min_samples=1, max_samples=256)
        0
    """
    if sample_seconds > 0:
        affordable = (seconds - fixed_seconds) / sample_seconds
    else:
        affordable = float(max_samples) if seconds >= fixed_seconds else 0.0
    if affordable >= max_samples:
        return max_samples
    if affordable < min_samples:
        return 0
    count = min_samples
    while 2 * count <= affordable:
        count *= 2
    return count


class TimeBudget:
    r"""The callback's time budget: evaluations and figures take at most ``max_overhead`` times the training time.

    The **training time** is the wall time since :meth:`start` (the start of ``fit``) that the callback did not
    spend (:meth:`charge`); the **credit** is what the budget has left,

    .. math:: C = \rho\, T_{\mathrm{train}} - T_{\mathrm{spent}}, \qquad \rho = \texttt{max\_overhead},

    carried from one evaluation to the next (an evaluation that costs less leaves credit for the figures or a later
    one; one that costs more is paid back by the next ones). The costs are this run's own measurements
    (:meth:`record`): a fixed cost :math:`a` per evaluation (resolving, syncing, finishing, logging) and :math:`b`
    seconds per latent (Jacobians and metric updates), each from the latest evaluation; :meth:`num_samples` turns a
    credit into a sample count with :func:`affordable_samples`, keeping back what the end of training's evaluation
    (always made) will cost. Figures are drawn when the credit covers the last
    drawing's cost (before the first: :data:`FIGURE_SECONDS` and the pictures' Jacobians). ``max_overhead=None`` is
    an unlimited budget.

    Args:
        max_overhead: the fraction of the training time the callback may take, or ``None`` for no limit.
        min_samples: the fewest latents an evaluation takes (e.g. one per process).
        max_samples: the most (all the fixed latents).
        clock: seconds, monotonic (``time.perf_counter``; tests pass a fake clock).

    Example:
        >>> now = [0.0]
        >>> budget = TimeBudget(0.05, min_samples=1, max_samples=256, clock=lambda: now[0])
        >>> now[0] = 10.0  # ten seconds of training
        >>> round(budget.credit(), 3)
        0.5
        >>> budget.record(seconds=0.05, sample_seconds=0.04, num_samples=8)  # a = 0.01 s, b = 0.005 s per latent
        >>> budget.num_samples(budget.credit())  # (0.5 - 0.015 kept back - 0.01) / 0.005 = 95 latents: 64
        64
    """

    def __init__(
        self,
        max_overhead: float | None,
        *,
        min_samples: int = 1,
        max_samples: int = sys.maxsize,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if max_overhead is not None:
            check_positive_float(max_overhead, "max_overhead")
        self.max_overhead, self.clock = max_overhead, clock
        self.reset(min_samples=min_samples, max_samples=max_samples)

    def reset(self, *, min_samples: int, max_samples: int) -> None:
        """Forget the measured costs (a new ``fit``) and set the sample range; the clock starts at :meth:`start`."""
        check_positive_int(min_samples, "min_samples")
        check_positive_int(max_samples, "max_samples")
        self.min_samples, self.max_samples = min(min_samples, max_samples), max_samples
        self.fixed_seconds: float | None = None
        self.sample_seconds: float | None = None
        self.figure_seconds: float | None = None
        self.start()

    @property
    def limited(self) -> bool:
        """Whether there is a budget at all (``max_overhead`` is not ``None``)."""
        return self.max_overhead is not None

    @property
    def measured(self) -> bool:
        """Whether an evaluation of this run has been timed (until then the costs are unknown)."""
        return self.sample_seconds is not None

    def start(self) -> None:
        """Training starts now: nothing trained, nothing spent."""
        self.started, self.spent = self.clock(), 0.0

    def charge(self, seconds: float) -> None:
        """The callback spent ``seconds`` (not training time)."""
        self.spent += seconds

    def training_time(self) -> float:
        """Seconds since :meth:`start` not charged to the callback."""
        return self.clock() - self.started - self.spent

    def credit(self) -> float:
        """Seconds the callback may still spend now (negative when overspent; infinite without a budget)."""
        if self.max_overhead is None:
            return float("inf")
        return self.max_overhead * self.training_time() - self.spent

    def num_samples(self, seconds: float, *, required: bool = False) -> int:
        """Latents an evaluation may take for ``seconds`` at the measured costs (:func:`affordable_samples`): ``0``
        when not even ``min_samples`` fit (postpone it), unless ``required`` (then at least ``min_samples``). An
        evaluation that is not ``required`` keeps back the cost of one of ``min_samples`` latents: the end of
        training is always evaluated."""
        if self.max_overhead is None:
            return self.max_samples
        if self.sample_seconds is None or self.fixed_seconds is None:
            raise RuntimeError("TimeBudget.num_samples needs measured costs: call `record` after an evaluation first.")
        count = affordable_samples(
            seconds if required else seconds - self.cost(self.min_samples),
            fixed_seconds=self.fixed_seconds,
            sample_seconds=self.sample_seconds,
            min_samples=self.min_samples,
            max_samples=self.max_samples,
        )
        return max(count, self.min_samples) if required else count

    def cost(self, num_samples: int) -> float:
        """Predicted seconds of an evaluation of ``num_samples`` latents (``a + b n``; 0 before any measurement)."""
        return (self.fixed_seconds or 0.0) + (self.sample_seconds or 0.0) * num_samples

    def record(self, *, seconds: float, sample_seconds: float, num_samples: int) -> None:
        """An evaluation of ``num_samples`` latents took ``seconds``, ``sample_seconds`` of them for the latents."""
        self.sample_seconds = sample_seconds / max(num_samples, 1)
        self.fixed_seconds = max(seconds - sample_seconds, 0.0)

    def record_figures(self, seconds: float) -> None:
        """One set of figures took ``seconds``."""
        self.figure_seconds = seconds

    def figure_cost(self, latents: int = 0) -> float:
        """Predicted seconds of a set of figures whose pictures differentiate the decoder at ``latents`` latents: the
        last drawing's, or before any :data:`FIGURE_SECONDS` plus those Jacobians."""
        if self.figure_seconds is not None:
            return self.figure_seconds
        return FIGURE_SECONDS + (self.sample_seconds or 0.0) * latents

    def can_draw(self, *, latents: int = 0, final: bool = False) -> bool:
        """Whether the credit covers a set of figures (:meth:`figure_cost`; always without a budget); before the
        ``final`` drawing, with one evaluation of ``min_samples`` latents kept back for the end of training."""
        reserve = 0.0 if final else self.cost(self.min_samples)
        return self.credit() - reserve >= self.figure_cost(latents)
