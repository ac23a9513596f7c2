"""A Lightning callback that logs the manifold entropic metrics of a module's decoder while it trains."""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, EarlyStopping, Timer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.func import functional_call

from lightning_mem.functional.statistics import DEFAULT_ACTIVE_THRESHOLD, DEFAULT_EPS
from lightning_mem.jacobian import as_decoder, iter_decoder_jacobians
from lightning_mem.metrics import ManifoldCrossMutualInformation, ManifoldEntropicMetrics

__all__ = ["ManifoldEntropicMetricsCallback"]

_DEFAULT_DECODER_NAMES = ("decoder", "decode")
_STATE_VERSION = 1
_MAX_KEPT_JACOBIAN_BYTES = 64 * 2**20
"""With ``drift`` and fixed latents, an evaluation keeps its Jacobians (per process) for the next one, which needs the
previous decoder's Jacobians at the same latents, when they take at most this much memory; otherwise the next
evaluation recomputes them from the parameter snapshot."""
_UNBOUNDED_FALLBACK_EPOCHS = 1
"""Epoch interval of the default schedule when the run's length is unknown (``num_evaluations`` cannot spread)."""

Decoder = Callable[..., Any]
"""A decoder in the engine's sense: ``z -> x`` or ``(z, condition) -> x``."""


def _is_invertible_network(module: object) -> bool:
    """True for a FrEIA invertible network (its decoder direction is the reverse pass)."""
    try:
        from FrEIA.modules import InvertibleModule
    except ModuleNotFoundError:  # FrEIA is an optional dependency
        return False
    return isinstance(module, InvertibleModule)


def _call_decoder(decoder: Decoder, z: Tensor, condition: Tensor | None) -> Tensor:
    output = decoder(z) if condition is None else decoder(z, condition)
    return output[0] if isinstance(output, (tuple, list)) else output


class _Bound(nn.Module):
    """``(z[, condition]) -> decode(z[, condition])`` with ``owner`` as a submodule, so ``functional_call`` can swap its weights."""

    def __init__(self, owner: nn.Module, decode: Decoder) -> None:
        super().__init__()
        self.owner = owner
        object.__setattr__(self, "_decode", decode)  # not a submodule: `owner` already holds its parameters

    def forward(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        return _call_decoder(self._decode, z, condition)


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    """A CPU copy of a module's parameters and buffers (what drift needs of the previous evaluation's decoder)."""
    state = itertools.chain(module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False))
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state}


@contextlib.contextmanager
def _untouched_training_state(modules: list[nn.Module]) -> Iterator[None]:
    """Evaluate in eval mode without a trace: restore every module's own mode flag and every global RNG afterwards."""
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


def _evenly_spaced_steps(total_steps: int, num_evaluations: int) -> frozenset[int]:
    r"""The steps :math:`\lceil k T / n \rceil`, :math:`k = 1 \ldots n`, of a run of :math:`T` steps (every step if :math:`T \le n`)."""
    return frozenset(-(-k * total_steps // num_evaluations) for k in range(1, num_evaluations + 1))


def _check_positive_int(value: Any, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive int{' or None' if allow_none else ''}, but got {value!r}.")


class ManifoldEntropicMetricsCallback(Callback):
    r"""Log the manifold entropic metrics of a LightningModule's decoder during training: spectrum, MTC, MPMI, drift.

    At a few training steps the callback takes the decoder Jacobian :math:`J(z) = \partial g/\partial z` at a
    fixed set of latents, ``chunk_size`` samples at a time (:func:`lightning_mem.iter_decoder_jacobians`), feeds
    it to a :class:`~lightning_mem.ManifoldEntropicMetrics` and logs the result:

    .. math::
        H_i = h_0 + \tfrac12 \mathbb{E}_z[\log G_{ii}], \quad H = d\,h_0 + \tfrac12 \mathbb{E}_z[\log\det G], \quad
        \mathrm{MTC} = \textstyle\sum_i H_i - H, \quad G = J^\top J.

    **Schedule**: by default (``every_n_train_steps`` and ``every_n_epochs`` both ``None``) the run has about
    ``num_evaluations`` evaluations whatever its length: at the steps :math:`\lceil k T / n \rceil`,
    :math:`k = 1, \ldots, n` (``n = num_evaluations``), with :math:`T` = ``trainer.estimated_stepping_batches`` (the
    run's optimizer steps from ``max_steps``, ``max_epochs``, ``limit_train_batches`` and gradient accumulation), plus
    one before the first step (``evaluate_at_start``); a run of :math:`T \le n` steps is evaluated at every step. The
    schedule is a function of the run's total length only, so a run resumed from a checkpoint evaluates at the same
    steps as an uninterrupted one, and every DDP rank uses rank zero's :math:`T`. A run of unknown length
    (``max_steps=-1`` with ``max_epochs=-1``, or an iterable dataset without ``max_steps``) warns once and is
    evaluated at the end of every epoch instead. With ``EarlyStopping`` or ``max_time``, which can end a run long
    before its estimated length, the callback warns that fixed intervals may suit better.
    ``every_n_train_steps`` / ``every_n_epochs`` replace this schedule by fixed intervals (``num_evaluations`` is
    then ignored); ``num_evaluations=None`` leaves only the evaluations at the start and the end.

    **Cost**: an evaluation costs ``num_samples`` decoder Jacobians (``d`` forward-mode JVPs each) plus the
    metrics; drift needs the previous decoder's Jacobians at the same latents too, which are kept from the previous
    evaluation when the latents are fixed (see **Memory**) and recomputed otherwise. Drawing the figures (matplotlib
    text layout, PNG encoding) costs about 0.1 to 0.2 s on a CPU, more than evaluating a small model, so they are
    drawn at every ``figures_every_n_evaluations``-th evaluation and at the last one, not for the untrained model.
    ``callback.total_time`` holds the wall-clock seconds this process spent in the callback's evaluations, logging
    and figures during the current (or last) ``fit``.

    The latents are ``num_samples`` draws from :math:`N(0, I_d)` made once with the callback's own seeded
    ``torch.Generator`` (the same points at every evaluation, so curves are smooth and comparable), or the given
    ``latents``. **Representation drift** compares the decoder with itself at the previous evaluation: the manifold
    cross-pairwise mutual information (MCPMI) between current latent ``i`` and previous latent ``j`` at the same
    latents, summarised by Linfoot's informational correlation :math:`r_{ij} = \sqrt{1 - e^{-2\,\mathrm{MCPMI}_{ij}}}`
    (1: latent ``i`` still moves the data in the same direction). With a ``reference_decoder`` (e.g. a known
    ground-truth generator) the MCPMI against it measures alignment.

    **Training is not changed**: the whole module (and the reference decoder) is put in eval mode and each
    submodule's own mode flag is restored afterwards; everything runs under ``torch.no_grad``; the global RNG
    states (torch CPU and CUDA, numpy, python ``random``) are saved and restored; no parameter, buffer, gradient or
    optimizer state is written. A run with and one without the callback end with bit-identical weights.

    **Distributed**: every rank evaluates its shard ``latents[rank::world_size]``, the Metric states (float64 sums)
    are summed across ranks inside ``compute``, which every rank calls; the result equals one process evaluating all
    latents. The decoder's buffers (e.g. BatchNorm statistics, which DDP does not keep equal across ranks) are rank
    zero's on every rank, as in the checkpoint rank zero saves. Only rank zero logs and draws figures.

    **Faults**: an evaluation whose decoder output or Jacobian holds NaN/inf, or that raises, emits a warning,
    increments the ``failed`` counter and training goes on (all ranks agree before ``compute``); ``strict=True``
    raises instead.

    **Memory**: at most ``chunk_size`` Jacobians ``(chunk_size, D, d)`` per decoder (current, previous, reference)
    exist at once. Drift keeps a CPU copy of the parameters and buffers of the decoder module (of the whole
    LightningModule when the decoder is a method or a callable); it is part of the callback's checkpoint state. With
    drift and fixed latents (a tensor, or drawn; not a callable), each process also keeps its share of the last
    evaluation's Jacobians ``(N / world_size, D, d)``, on the module's device, when they take at most 64 MiB.

    Logged scalars (``prefix`` + name; the default prefix is ``"mem/"``), at the evaluation's ``trainer.global_step``:

    - ``entropy``: total manifold entropy :math:`H` (nats); ``entropy_per_dim``: :math:`H/d` (nats/dim).
    - ``total_correlation``: MTC (nats, 0 = disentangled); ``total_correlation_per_dim``: MTC/d.
    - ``num_active``: latents with :math:`\exp(H_i - h_0) >` ``active_threshold``.
    - ``spectrum/top_1`` ... ``spectrum/top_{k}``: the ``top_k`` largest per-latent entropies :math:`H_i` by rank.
    - ``pairwise_mutual_information_max`` and ``pairwise_mutual_information_mean``: over off-diagonal MPMI pairs.
    - ``num_fallback``: samples whose log-determinant came from the eigenvalue fallback (singular Gram matrix).
    - ``num_classes_seen``: with ``num_classes`` only.
    - ``eval_time``: wall-clock seconds of the evaluation on rank zero (Jacobians and metrics, figures excluded).
    - ``failed``: the number of failed evaluations so far (also logged, alone, at a failed evaluation).
    - ``drift/alignment``: mean over current latents of :math:`\max_j r_{ij}` against the previous evaluation;
      ``drift/self_correlation``: mean of :math:`r_{ii}` (latent ``i`` kept its meaning; latents that swapped
      roles lower it but not ``drift/alignment``); ``drift/cross_mutual_information_diag``: mean of
      :math:`\mathrm{MCPMI}_{ii}` in nats (identical columns give the finite cap
      :math:`-\tfrac12\log\epsilon_{64} \approx 18`); ``drift/num_rematched``: latents whose best match is another
      latent. Inactive latents have no stable direction and lower the correlations. From the second evaluation on,
      with ``drift=True``.
    - ``reference/alignment``: mean over model latents of the best informational correlation with a reference
      latent; ``reference/num_matched``: distinct reference latents that are some model latent's best match. With
      ``reference_decoder`` only.

    Figures (rank zero, ``log_figures=True``, to every logger whose ``experiment`` has ``add_figure``, i.e.
    TensorBoard; other loggers get the scalars and one warning), at every ``figures_every_n_evaluations``-th
    evaluation after the first one and at the last one of the run (at every evaluation with 1):

    - ``spectrum_history``: the entropy spectra of all evaluations so far, overlaid, coloured by training step.
    - ``pairwise_mutual_information``: the current MPMI heatmap.
    - ``reference/cross_mutual_information``: the MCPMI heatmap against the reference (with ``reference_decoder``).

    After each evaluation ``callback.last_metrics`` holds the dict of
    :meth:`ManifoldEntropicMetrics.compute <lightning_mem.ManifoldEntropicMetrics.compute>` plus ``eval_time``, the
    ``drift/...`` entries (with the matrices ``drift/cross_mutual_information`` and
    ``drift/informational_correlation``) and the ``reference/...`` entries (with
    ``reference/cross_mutual_information``, ``reference/best_match``), all on the CPU; ``callback.history`` is a list
    of ``{"step": int, "spectrum": Tensor}``, one per successful evaluation.

    Args:
        decoder: the attribute or method name of the decoder on the LightningModule (default: ``"decoder"``, then
            ``"decode"``), or a callable ``(pl_module, z) -> x`` / ``(pl_module, z, condition) -> x``. A FrEIA
            invertible network found by name is used through :func:`lightning_mem.as_decoder` (its reverse pass).
        latent_dim: number of latents ``d``; default ``pl_module.latent_dim``, then ``pl_module.hparams.latent_dim``,
            then the width of a ``latents`` tensor.
        num_samples: how many latents to draw from the prior (ignored when ``latents`` is given).
        latents: a fixed ``(N, d)`` tensor, or a callable ``(trainer, pl_module) -> z`` (or ``-> (z, conditions)``)
            called at every evaluation (e.g. encoded validation data); it must return the same full set on every
            rank.
        conditions: for conditional decoders: a tensor ``(N, ...)`` passed to the decoder with the latents, or a
            callable ``labels -> conditions`` (e.g. ``lambda y: F.one_hot(y, 10).float()``). With ``num_classes`` and
            no ``conditions`` the decoder gets the integer labels.
        num_classes: class-conditional mode: metrics per class, averaged over classes. The labels are the cycle
            ``arange(N) % num_classes`` (equal counts), or ``conditions`` itself when it is a 1-D integer tensor.
        num_evaluations: evaluations spread evenly over the run (see **Schedule**) when ``every_n_train_steps`` and
            ``every_n_epochs`` are both ``None``; ``None``: only at the start and the end.
        every_n_train_steps: evaluate when ``trainer.global_step`` is a multiple of it (``None``: never).
        every_n_epochs: evaluate at the end of every n-th training epoch (``None``: never). Both intervals may be
            active; one step is never evaluated twice.
        evaluate_at_start: evaluate before the first training step, so curves start at initialisation (not again
            when resuming a run whose callback state holds evaluations).
        evaluate_at_end: evaluate at the end of training (unless that step was just evaluated).
        reference_decoder: a callable ``z -> x`` (or ``(z, condition) -> x``), e.g. a ground-truth generator, with
            the same output shape as the decoder; it is put in eval mode during evaluation and restored.
        reference_latents: the reference decoder's latents ``(N, d_ref)`` for the same data points as ``latents``
            (tensor or callable ``(trainer, pl_module) -> z_ref``); default: the model's latents.
        drift: log the representation drift since the previous evaluation.
        prefix: prepended to every key.
        top_k: how many of the largest per-latent entropies to log as scalars.
        chunk_size: latents differentiated at once (bounds memory).
        mode: Jacobian mode, see :func:`lightning_mem.decoder_jacobian`.
        std: data scale (scalar or per output entry) for metrics in original data units.
        sigma: latent scale ``(d,)`` for a prior :math:`N(\mu, \mathrm{diag}(\sigma^2))`; the drawn latents are then
            ``sigma * eps``.
        eps: floor on :math:`G_{ii}` (inactive latents).
        active_threshold: see ``num_active``.
        log_figures: draw and log the figures.
        figures_every_n_evaluations: draw them at the evaluations numbered n, 2n, ... (the first one, usually at the
            start, is number 0) and at the last one of the run; 1: at every evaluation, the first one included. With
            the default schedule (10 evaluations after the first) and 10: once, at the end of the run; 5: also in the
            middle.
        seed: seed of the callback's own generator for the latents (saved in checkpoints).
        strict: raise on a failed evaluation instead of warning.

    Raises:
        ValueError: for invalid arguments.
        MisconfigurationException: in ``setup``, when the module has no decoder, the latent size is unknown, or there
            are fewer latents than processes.

    Example:
        >>> import lightning.pytorch as pl
        >>> class Autoencoder(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.latent_dim = 2
        ...         self.encoder, self.decoder = nn.Linear(4, 2), nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 4))
        ...     def training_step(self, batch, batch_idx):
        ...         (x,) = batch
        ...         return (self.decoder(self.encoder(x)) - x).square().mean()
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4)), batch_size=8)
        >>> callback = ManifoldEntropicMetricsCallback(num_samples=16, num_evaluations=2)  # at steps 2 and 4 of 4
        >>> trainer = pl.Trainer(max_steps=4, callbacks=[callback], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        >>> trainer.fit(Autoencoder(), data)
        >>> [entry["step"] for entry in callback.history]
        [0, 2, 4]
        >>> callback.last_metrics["spectrum"].shape, "drift/alignment" in callback.last_metrics
        (torch.Size([2]), True)

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
        E. H. Linfoot, *An informational measure of correlation*, Information and Control 1(1), 1957.
    """

    def __init__(
        self,
        *,
        decoder: str | Callable[..., Any] | None = None,
        latent_dim: int | None = None,
        num_samples: int = 256,
        latents: Tensor | Callable[[Trainer, LightningModule], Any] | None = None,
        conditions: Tensor | Callable[[Tensor], Tensor] | None = None,
        num_classes: int | None = None,
        num_evaluations: int | None = 10,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        evaluate_at_start: bool = True,
        evaluate_at_end: bool = True,
        reference_decoder: Callable[..., Any] | None = None,
        reference_latents: Tensor | Callable[[Trainer, LightningModule], Tensor] | None = None,
        drift: bool = True,
        prefix: str = "mem/",
        top_k: int = 3,
        chunk_size: int | None = 64,
        mode: str = "auto",
        std: Tensor | float | None = None,
        sigma: Tensor | None = None,
        eps: float = DEFAULT_EPS,
        active_threshold: float = DEFAULT_ACTIVE_THRESHOLD,
        log_figures: bool = True,
        figures_every_n_evaluations: int = 10,
        seed: int = 0,
        strict: bool = False,
    ) -> None:
        super().__init__()
        if decoder is not None and not (isinstance(decoder, str) or callable(decoder)):
            raise TypeError(
                f"Expected `decoder` to be an attribute name, a callable (pl_module, z) -> x or None, but got {type(decoder).__name__}."
            )
        _check_positive_int(latent_dim, "latent_dim", allow_none=True)
        _check_positive_int(num_samples, "num_samples")
        _check_positive_int(num_classes, "num_classes", allow_none=True)
        _check_positive_int(num_evaluations, "num_evaluations", allow_none=True)
        _check_positive_int(every_n_train_steps, "every_n_train_steps", allow_none=True)
        _check_positive_int(every_n_epochs, "every_n_epochs", allow_none=True)
        _check_positive_int(top_k, "top_k")
        _check_positive_int(figures_every_n_evaluations, "figures_every_n_evaluations")
        _check_positive_int(chunk_size, "chunk_size", allow_none=True)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Expected `seed` to be an int, but got {seed!r}.")
        if not isinstance(prefix, str):
            raise TypeError(f"Expected `prefix` to be a str, but got {type(prefix).__name__}.")
        if latents is not None and not (isinstance(latents, Tensor) or callable(latents)):
            raise TypeError(
                f"Expected `latents` to be a tensor (N, d), a callable (trainer, pl_module) -> z or None, but got {type(latents).__name__}."
            )
        if isinstance(latents, Tensor) and (latents.ndim != 2 or latents.shape[0] == 0 or not latents.is_floating_point()):
            raise ValueError(
                "Expected `latents` to be a floating point tensor of shape (N, d) with N >= 1, "
                f"but got {latents.dtype} {tuple(latents.shape)}."
            )
        if isinstance(latents, Tensor) and latent_dim is not None and latents.shape[1] != latent_dim:
            raise ValueError(f"Expected `latents` of shape (N, {latent_dim}) (latent_dim={latent_dim}), but got {tuple(latents.shape)}.")
        if conditions is not None and not (isinstance(conditions, Tensor) or callable(conditions)):
            raise TypeError(
                "Expected `conditions` to be a tensor (N, ...), a callable labels -> conditions or None, "
                f"but got {type(conditions).__name__}."
            )
        if isinstance(conditions, Tensor):
            if conditions.ndim == 0:
                raise ValueError(f"Expected `conditions` of shape (N, ...), one row per latent, but got a scalar {conditions!r}.")
            if isinstance(latents, Tensor) and conditions.shape[0] != latents.shape[0]:
                raise ValueError(
                    f"Expected `conditions` with N == {latents.shape[0]} rows (one per latent), but got {tuple(conditions.shape)}."
                )
            if latents is None and conditions.shape[0] != num_samples:
                raise ValueError(f"Expected `conditions` with N == num_samples == {num_samples} rows, but got {tuple(conditions.shape)}.")
            if num_classes is not None:
                self._check_labels(conditions, num_classes, "conditions")
        elif callable(conditions) and num_classes is None:
            raise ValueError(
                "Expected `num_classes` to be set when `conditions` is a callable labels -> conditions, but got num_classes=None."
            )
        if reference_decoder is not None and not callable(reference_decoder):
            raise TypeError(f"Expected `reference_decoder` to be a callable z -> x or None, but got {type(reference_decoder).__name__}.")
        if reference_latents is not None and reference_decoder is None:
            raise ValueError("Expected `reference_decoder` to be set when `reference_latents` are given, but got reference_decoder=None.")
        if isinstance(reference_latents, Tensor) and (reference_latents.ndim != 2 or not reference_latents.is_floating_point()):
            raise ValueError(
                "Expected `reference_latents` to be a floating point tensor (N, d_ref), "
                f"but got {reference_latents.dtype} {tuple(reference_latents.shape)}."
            )
        if mode not in ("auto", "forward", "reverse", "loop"):
            raise ValueError(f"Expected `mode` to be one of ('auto', 'forward', 'reverse', 'loop'), but got {mode!r}.")
        if sigma is not None:
            sigma = torch.as_tensor(sigma, dtype=torch.float64)
            if sigma.ndim != 1 or (latent_dim is not None and sigma.numel() != latent_dim):
                raise ValueError(f"Expected `sigma` of shape (latent_dim,), but got {tuple(sigma.shape)}.")
            if not (torch.isfinite(sigma).all() and (sigma > 0).all()):
                raise ValueError(f"Expected `sigma` to be positive and finite, but got {sigma}.")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
            raise ValueError(f"Expected `eps` to be a positive float, but got {eps!r}.")
        if isinstance(active_threshold, bool) or not isinstance(active_threshold, (int, float)) or not 0 < active_threshold < math.inf:
            raise ValueError(f"Expected `active_threshold` to be a positive float, but got {active_threshold!r}.")

        self.decoder = decoder
        self.latent_dim = latent_dim
        self.num_samples = num_samples
        self.latents = latents
        self.conditions = conditions
        self.num_classes = num_classes
        self.num_evaluations = num_evaluations
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.evaluate_at_start = evaluate_at_start
        self.evaluate_at_end = evaluate_at_end
        self.reference_decoder = reference_decoder
        self.reference_latents = reference_latents
        self.drift = drift
        self.prefix = prefix
        self.top_k = top_k
        self.chunk_size = chunk_size
        self.mode = mode
        self.std = std
        self.sigma = sigma
        self.eps = eps
        self.active_threshold = active_threshold
        self.log_figures = log_figures
        self.figures_every_n_evaluations = figures_every_n_evaluations
        self.seed = seed
        self.strict = strict

        self.history: list[dict[str, Any]] = []
        self.last_metrics: dict[str, Tensor] = {}
        self.num_failed = 0
        self.total_time = 0.0
        self._scheduled_steps: frozenset[int] = frozenset()
        self._epoch_interval: int | None = every_n_epochs
        self._last_step: int | None = None
        self._previous: dict[str, Tensor] | None = None
        self._next_previous: dict[str, Tensor] | None = None
        self._previous_jacobians: list[Tensor] | None = None
        self._next_previous_jacobians: list[Tensor] | None = None
        self._drawn_latents: Tensor | None = None
        self._metric: ManifoldEntropicMetrics | None = None
        self._drift_metric: ManifoldCrossMutualInformation | None = None
        self._reference_metric: ManifoldCrossMutualInformation | None = None
        self._figure_loggers: list[Any] = []
        self._undrawn: tuple[int, dict[str, Tensor]] | None = None
        self._live_figures: dict[str, Any] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, seed=self.seed)

    # ---------------------------------------------------------------- set-up

    @staticmethod
    def _check_labels(labels: Tensor, num_classes: int, name: str) -> None:
        if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(
                f"Expected `{name}` to be integer class labels of shape (N,) with num_classes={num_classes} "
                f"(pass a callable labels -> conditions for other condition formats), but got {labels.dtype} {tuple(labels.shape)}."
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"Expected `{name}` in [0, {num_classes - 1}], but got values from {int(labels.min())} to {int(labels.max())}."
            )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._resolve_decoder(pl_module)
        self.latent_dim = self._resolve_latent_dim(pl_module)
        if self.sigma is not None and self.sigma.numel() != self.latent_dim:
            raise MisconfigurationException(
                f"`sigma` has {self.sigma.numel()} entries but the decoder has latent_dim={self.latent_dim} latents."
            )
        num_latents = self.latents.shape[0] if isinstance(self.latents, Tensor) else None if callable(self.latents) else self.num_samples
        if num_latents is not None and num_latents < trainer.world_size:
            raise MisconfigurationException(
                f"ManifoldEntropicMetricsCallback needs at least one latent per process, but has {num_latents} latents for "
                f"{trainer.world_size} processes: raise `num_samples`."
            )
        self._metric = ManifoldEntropicMetrics(
            self.latent_dim,
            std=self.std,
            sigma=self.sigma,
            eps=self.eps,
            num_classes=self.num_classes,
            active_threshold=self.active_threshold,
        )
        self._drift_metric = (
            ManifoldCrossMutualInformation(
                self.latent_dim,
                self.latent_dim,
                std=self.std,
                sigma=self.sigma,
                reference_sigma=self.sigma,
                eps=self.eps,
                num_classes=self.num_classes,
            )
            if self.drift
            else None
        )
        self._reference_metric = None
        self._figure_loggers = []
        self._undrawn = None
        self._live_figures = {}
        self.total_time = 0.0
        if trainer.is_global_zero:
            if not trainer.loggers:
                rank_zero_warn(
                    "ManifoldEntropicMetricsCallback: the Trainer has no logger, so nothing is logged; the values are in "
                    "`callback.last_metrics` and `callback.history`. Pass `logger=TensorBoardLogger(...)` to see the curves."
                )
            if self.log_figures:
                self._figure_loggers = [
                    lg for lg in trainer.loggers if callable(getattr(getattr(lg, "experiment", None), "add_figure", None))
                ]
                others = [type(lg).__name__ for lg in trainer.loggers if lg not in self._figure_loggers]
                if others:
                    rank_zero_warn(
                        f"ManifoldEntropicMetricsCallback logs figures only to TensorBoard-like loggers (with `experiment.add_figure`); "
                        f"scalars only for {', '.join(others)}. Pass `log_figures=False` to silence this warning."
                    )

    def _resolve_decoder(self, pl_module: LightningModule) -> tuple[Decoder, nn.Module]:
        """The decoder as ``(z[, condition]) -> x`` and the module that owns its weights."""
        if self.decoder is not None and not isinstance(self.decoder, str):
            function = self.decoder
            return (lambda z, *condition: function(pl_module, z, *condition)), pl_module
        names = (self.decoder,) if isinstance(self.decoder, str) else _DEFAULT_DECODER_NAMES
        for name in names:
            found = getattr(pl_module, name, None)
            if found is None:
                continue
            if _is_invertible_network(found):
                found = as_decoder(found)
            if isinstance(found, nn.Module):
                return found, found
            if callable(found):
                return found, pl_module
            raise MisconfigurationException(
                f"ManifoldEntropicMetricsCallback: `{type(pl_module).__name__}.{name}` is a {type(found).__name__}, not a decoder. "
                "Pass `decoder=` the name of a module or method z -> x, or a callable (pl_module, z) -> x."
            )
        tried = " or ".join(f"`{name}`" for name in names)
        raise MisconfigurationException(
            f"ManifoldEntropicMetricsCallback could not find a decoder on {type(pl_module).__name__}: it has no attribute {tried}. "
            "Add a `self.decoder` module (or a `decode(z)` method) to your LightningModule, or pass "
            "`ManifoldEntropicMetricsCallback(decoder='name_of_your_decoder')` or `decoder=lambda module, z: ...`."
        )

    def _resolve_latent_dim(self, pl_module: LightningModule) -> int:
        candidates = [self.latent_dim, getattr(pl_module, "latent_dim", None)]
        hparams = getattr(pl_module, "hparams", None)
        candidates.append(hparams.get("latent_dim") if hasattr(hparams, "get") else getattr(hparams, "latent_dim", None))
        if isinstance(self.latents, Tensor):
            candidates.append(self.latents.shape[1])
        for value in candidates:
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise MisconfigurationException(
                        f"ManifoldEntropicMetricsCallback: expected the latent size to be a positive int, but got {value!r}."
                    )
                if isinstance(self.latents, Tensor) and self.latents.shape[1] != value:
                    raise MisconfigurationException(
                        f"ManifoldEntropicMetricsCallback: `latents` have {self.latents.shape[1]} columns but the latent size is {value}."
                    )
                return value
        raise MisconfigurationException(
            f"ManifoldEntropicMetricsCallback does not know the latent size of {type(pl_module).__name__}'s decoder. "
            "Pass `ManifoldEntropicMetricsCallback(latent_dim=...)`, set `self.latent_dim` in your LightningModule, "
            "or call `self.save_hyperparameters()` with a `latent_dim` argument."
        )

    # ---------------------------------------------------------------- schedule

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._plan(trainer)
        if self.evaluate_at_start and not self.history and self._last_step is None:
            self._evaluate(trainer, pl_module)

    def _plan(self, trainer: Trainer) -> None:
        """Fix this run's schedule: the explicit ``every_n_*`` intervals, or ``num_evaluations`` steps spread over the run."""
        self._scheduled_steps = frozenset()
        self._epoch_interval = self.every_n_epochs
        if self.every_n_train_steps is not None or self.every_n_epochs is not None or self.num_evaluations is None:
            return
        try:
            total_steps = trainer.estimated_stepping_batches
        except MisconfigurationException:  # documented by Lightning for accumulation it cannot count
            total_steps = math.inf
        # rank zero's estimate on every rank: all ranks must evaluate (and sync) at the same steps
        total_steps = trainer.strategy.broadcast(total_steps, src=0)
        if not math.isfinite(total_steps) or total_steps < 1:
            rank_zero_warn(
                f"ManifoldEntropicMetricsCallback: the run's length is unknown (`trainer.estimated_stepping_batches` is {total_steps}), "
                f"so `num_evaluations={self.num_evaluations}` cannot be spread over it; evaluating at the end of every epoch instead. "
                "Set `max_steps` or `max_epochs`, or pass `every_n_train_steps` or `every_n_epochs`."
            )
            self._epoch_interval = _UNBOUNDED_FALLBACK_EPOCHS
            return
        self._scheduled_steps = _evenly_spaced_steps(int(total_steps), self.num_evaluations)
        stoppers = [type(c).__name__ for c in trainer.callbacks if isinstance(c, (EarlyStopping, Timer))]
        if stoppers:
            rank_zero_warn(
                f"ManifoldEntropicMetricsCallback: `num_evaluations={self.num_evaluations}` are spread over the run's estimated "
                f"{int(total_steps)} steps, but {' and '.join(stoppers)} may end it sooner and leave most of them out (the end of "
                "training is still evaluated). Pass `every_n_epochs` or `every_n_train_steps` for a fixed interval."
            )

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step in self._scheduled_steps or (self.every_n_train_steps is not None and step > 0 and step % self.every_n_train_steps == 0):
            self._evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._epoch_interval is not None and (trainer.current_epoch + 1) % self._epoch_interval == 0:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.evaluate_at_end:
            self._evaluate(trainer, pl_module)
        if self._undrawn is not None:  # the last evaluation's figures, when its number was not a multiple of the interval
            start = time.perf_counter()
            self._log_figures(*self._undrawn)
            self.total_time += time.perf_counter() - start

    # ---------------------------------------------------------------- evaluation

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """One evaluation at ``trainer.global_step`` on every rank (once per step), its wall time added to ``total_time``."""
        if trainer.sanity_checking or self._metric is None or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        start = time.perf_counter()
        try:
            self._evaluate_and_log(trainer, pl_module, start)
        finally:
            self.total_time += time.perf_counter() - start

    def _evaluate_and_log(self, trainer: Trainer, pl_module: LightningModule, start: float) -> None:
        step = trainer.global_step
        modules = [pl_module] + ([self.reference_decoder] if isinstance(self.reference_decoder, nn.Module) else [])
        with _untouched_training_state(modules):
            error: BaseException | None = None
            try:
                self._accumulate(trainer, pl_module)
            except Exception as exception:
                error = exception
                warnings.warn(
                    f"ManifoldEntropicMetricsCallback: the evaluation at step {step} failed on rank {trainer.global_rank} "
                    f"({type(exception).__name__}: {exception}).",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if trainer.strategy.reduce_boolean_decision(error is not None, all=False):
                self._fail(trainer, step, error)
                return
            try:
                values = self._compute(pl_module)
            except Exception as exception:  # after the sync every rank holds the same sums, so all fail alike
                rank_zero_warn(
                    f"ManifoldEntropicMetricsCallback: the evaluation at step {step} failed ({type(exception).__name__}: {exception})."
                )
                self._fail(trainer, step, exception)
                return
        values["eval_time"] = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
        self.last_metrics = values
        self.history.append({"step": step, "spectrum": values["spectrum"].clone()})
        self._log(trainer, step, values)

    def _inputs(self, trainer: Trainer, pl_module: LightningModule) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """The full ``(latents, conditions, labels, reference_latents)`` of this evaluation, on the module's device."""
        device = pl_module.device
        dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), torch.get_default_dtype())
        conditions = self.conditions if isinstance(self.conditions, Tensor) else None
        if callable(self.latents):
            z = self.latents(trainer, pl_module)
            if isinstance(z, (tuple, list)):
                z, conditions = z
        elif isinstance(self.latents, Tensor):
            z = self.latents
        else:
            if self._drawn_latents is None:
                generator = torch.Generator().manual_seed(self.seed)
                self._drawn_latents = torch.randn(self.num_samples, self.latent_dim, generator=generator, dtype=torch.float64)
                if self.sigma is not None:
                    self._drawn_latents = self._drawn_latents * self.sigma
            z = self._drawn_latents
        if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"Expected latents of shape (N, {self.latent_dim}), but got {getattr(z, 'shape', type(z).__name__)}.")
        n = z.shape[0]
        labels = None
        if self.num_classes is not None:
            if isinstance(conditions, Tensor):
                self._check_labels(conditions, self.num_classes, "conditions")
                labels = conditions
            else:
                labels = torch.arange(n) % self.num_classes
            labels = labels.to(device)
            conditions = self.conditions(labels) if callable(self.conditions) else labels
        if conditions is not None and conditions.shape[0] != n:
            raise ValueError(f"Expected conditions with N == {n} rows (one per latent), but got {tuple(conditions.shape)}.")
        z = z.to(device=device, dtype=dtype)
        reference = None
        if self.reference_decoder is not None:
            reference = self.reference_latents(trainer, pl_module) if callable(self.reference_latents) else self.reference_latents
            reference = z if reference is None else reference
            if not isinstance(reference, Tensor) or reference.ndim != 2 or reference.shape[0] != n:
                raise ValueError(
                    f"Expected `reference_latents` of shape ({n}, d_ref) (one per latent), "
                    f"but got {getattr(reference, 'shape', reference)}."
                )
            parameters = self.reference_decoder.parameters() if isinstance(self.reference_decoder, nn.Module) else ()
            reference_dtype = next((p.dtype for p in parameters if p.is_floating_point()), reference.dtype)
            reference = reference.to(device=device, dtype=reference_dtype)
        return z, None if conditions is None else conditions.to(device), labels, reference

    def _accumulate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """This rank's share: Jacobians of its shard of the latents, chunk by chunk, into the (reset) metrics."""
        plain_decoder, owner = self._resolve_decoder(pl_module)
        decoder = plain_decoder
        device = pl_module.device
        current = _snapshot(owner)
        if trainer.world_size > 1:
            # Parameters agree across DDP ranks, buffers need not (BatchNorm statistics of each rank's batches):
            # every rank evaluates rank zero's, as the next forward pass (and the saved checkpoint) would.
            names = set(_buffer_names(owner))
            if names:
                buffers = trainer.strategy.broadcast({name: current[name] for name in names}, src=0)
                current.update(buffers)
                decoder = self._with_state(owner, plain_decoder, {name: buffer.to(device) for name, buffer in buffers.items()})

        z, conditions, labels, reference_z = self._inputs(trainer, pl_module)
        shard = slice(trainer.global_rank, None, trainer.world_size)
        z = z[shard]
        conditions = None if conditions is None else conditions[shard]
        labels = None if labels is None else labels[shard]
        reference_z = None if reference_z is None else reference_z[shard]
        options = {"condition": conditions, "mode": self.mode, "chunk_size": self.chunk_size}

        self._metric = self._metric.to(device)
        self._metric.reset()
        previous = None
        if self._drift_metric is not None and self._previous is not None:
            if self._previous.keys() == current.keys():
                if self._previous_jacobians is not None and self._previous_jacobians[0].device == z.device:
                    previous = iter(self._previous_jacobians)  # kept by the previous evaluation: same decoder, same latents
                else:
                    state = {name: tensor.to(device) for name, tensor in self._previous.items()}
                    previous = iter_decoder_jacobians(self._with_state(owner, plain_decoder, state), z, **options)
                self._drift_metric = self._drift_metric.to(device)
                self._drift_metric.reset()
            else:
                rank_zero_warn(
                    "ManifoldEntropicMetricsCallback: the decoder's parameters changed names since the previous evaluation; drift restarts."
                )
                self._previous = None
        reference = None
        if reference_z is not None:
            if self._reference_metric is None or self._reference_metric.reference_dim != reference_z.shape[1]:
                self._reference_metric = ManifoldCrossMutualInformation(
                    self.latent_dim, reference_z.shape[1], std=self.std, sigma=self.sigma, eps=self.eps, num_classes=self.num_classes
                )
            self._reference_metric = self._reference_metric.to(device)
            self._reference_metric.reset()
            reference = iter_decoder_jacobians(self.reference_decoder, reference_z, **options)

        step = z.shape[0] if self.chunk_size is None else self.chunk_size
        jacobians = iter_decoder_jacobians(decoder, z, **options)
        # the next evaluation's drift needs these Jacobians again when the latents stay the same: keep small ones
        fixed_inputs = not callable(self.latents) and not callable(self.conditions)
        kept: list[Tensor] | None = [] if self._drift_metric is not None and fixed_inputs else None
        kept_bytes = 0
        for index, (jacobian, previous_jacobian, reference_jacobian) in enumerate(
            zip(jacobians, previous or itertools.repeat(None), reference or itertools.repeat(None), strict=False)
        ):
            chunk = slice(index * step, (index + 1) * step)
            output = _call_decoder(decoder, z[chunk], None if conditions is None else conditions[chunk])
            if not torch.isfinite(output).all():
                raise FloatingPointError(f"the decoder output holds NaN or inf at {int((~torch.isfinite(output)).sum())} entries")
            chunk_labels = None if labels is None else labels[chunk]
            self._metric.update(jacobian, chunk_labels)
            if previous_jacobian is not None:
                self._drift_metric.update(jacobian, previous_jacobian, chunk_labels)
            if reference_jacobian is not None:
                self._reference_metric.update(jacobian, reference_jacobian, chunk_labels)
            if kept is not None:
                kept_bytes += jacobian.numel() * jacobian.element_size()
                if kept_bytes <= _MAX_KEPT_JACOBIAN_BYTES:
                    kept.append(jacobian)
                else:
                    kept = None
        self._next_previous = current if self._drift_metric is not None else None
        self._next_previous_jacobians = kept or None

    @staticmethod
    def _with_state(owner: nn.Module, decoder: Decoder, state: dict[str, Tensor]) -> Decoder:
        """The decoder with (some of) ``owner``'s parameters and buffers replaced by ``state``, the module untouched."""
        bound = _Bound(owner, decoder)
        renamed = {f"owner.{name}": tensor for name, tensor in state.items()}
        return lambda *args: functional_call(bound, renamed, args)

    def _compute(self, pl_module: LightningModule) -> dict[str, Tensor]:
        """Every rank: sync and finish the metrics (rank-zero-only compute would deadlock the sync)."""
        values = {name: value.detach().cpu() for name, value in self._metric.compute().items()}
        if self._drift_metric is not None and self._previous is not None:
            drift = self._drift_metric.compute()
            correlation = drift["informational_correlation"].detach().cpu()
            matches = drift["best_match"].detach().cpu()
            values["drift/alignment"] = drift["alignment"].detach().cpu()
            values["drift/self_correlation"] = correlation.diagonal().mean()
            values["drift/cross_mutual_information_diag"] = drift["cross_mutual_information"].detach().cpu().diagonal().mean()
            values["drift/num_rematched"] = (matches != torch.arange(matches.numel())).sum()
            values["drift/cross_mutual_information"] = drift["cross_mutual_information"].detach().cpu()
            values["drift/informational_correlation"] = correlation
        if self._reference_metric is not None and self.reference_decoder is not None:
            reference = self._reference_metric.compute()
            values["reference/alignment"] = reference["alignment"].detach().cpu()
            values["reference/num_matched"] = torch.tensor(reference["best_match"].unique().numel())
            values["reference/best_match"] = reference["best_match"].detach().cpu()
            values["reference/cross_mutual_information"] = reference["cross_mutual_information"].detach().cpu()
        self._previous = self._next_previous
        self._previous_jacobians = self._next_previous_jacobians
        return values

    def _fail(self, trainer: Trainer, step: int, error: BaseException | None) -> None:
        """Count a failed evaluation (agreed on by every rank) and log the counter; raise with ``strict=True``."""
        self.num_failed += 1
        if self.strict:
            reason = f"{type(error).__name__}: {error}" if error is not None else "it failed on another rank"
            raise RuntimeError(f"ManifoldEntropicMetricsCallback(strict=True): the evaluation at step {step} failed ({reason}).") from error
        if error is None:
            rank_zero_warn(f"ManifoldEntropicMetricsCallback: the evaluation at step {step} failed on another rank; training continues.")
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({f"{self.prefix}failed": float(self.num_failed)}, step=step)

    # ---------------------------------------------------------------- logging

    def _scalars(self, values: dict[str, Tensor]) -> dict[str, float]:
        names = [
            "entropy",
            "entropy_per_dim",
            "total_correlation",
            "total_correlation_per_dim",
            "num_active",
            "pairwise_mutual_information_max",
            "pairwise_mutual_information_mean",
            "num_fallback",
            "eval_time",
            "drift/alignment",
            "drift/self_correlation",
            "drift/cross_mutual_information_diag",
            "drift/num_rematched",
            "reference/alignment",
            "reference/num_matched",
        ]
        if self.num_classes is not None:
            names.append("num_classes_seen")
        scalars = {f"{self.prefix}{name}": float(values[name]) for name in names if name in values}
        for rank, entropy in enumerate(values["spectrum"][: self.top_k].tolist(), start=1):
            scalars[f"{self.prefix}spectrum/top_{rank}"] = entropy
        scalars[f"{self.prefix}failed"] = float(self.num_failed)
        return scalars

    def _log(self, trainer: Trainer, step: int, values: dict[str, Tensor]) -> None:
        if not trainer.is_global_zero:
            return
        scalars = self._scalars(values)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        if not self._figure_loggers:
            return
        number, interval = len(self.history) - 1, self.figures_every_n_evaluations
        if interval == 1 or (number > 0 and number % interval == 0):
            self._log_figures(step, values)
        else:
            self._undrawn = (step, values)

    def _log_figures(self, step: int, values: dict[str, Tensor]) -> None:
        self._undrawn = None
        for tag, figure in self._figures(values):
            for logger in self._figure_loggers:
                logger.experiment.add_figure(f"{self.prefix}{tag}", figure, global_step=step, close=False)

    def _figures(self, values: dict[str, Tensor]) -> Iterator[tuple[str, Any]]:
        """The figures of the evaluation that ``values`` and ``history[-1]`` describe, updating the ones kept from the last time."""
        from lightning_mem.plotting import _MutualInformationFigure, _SpectrumHistoryFigure

        if not self._live_figures:
            self._live_figures = {
                "spectrum_history": _SpectrumHistoryFigure(color_label="training step"),
                "pairwise_mutual_information": _MutualInformationFigure(),
                "reference/cross_mutual_information": _MutualInformationFigure(xlabel="reference latent j", ylabel="model latent i"),
            }
        steps = [entry["step"] for entry in self.history]
        yield (
            "spectrum_history",
            self._live_figures["spectrum_history"].update(
                [entry["spectrum"] for entry in self.history], steps, title=f"Entropy spectrum, steps {steps[0]} to {steps[-1]}"
            ),
        )
        yield (
            "pairwise_mutual_information",
            self._live_figures["pairwise_mutual_information"].update(
                values["pairwise_mutual_information"], title=f"Manifold pairwise MI, step {steps[-1]}"
            ),
        )
        if "reference/cross_mutual_information" in values:
            yield (
                "reference/cross_mutual_information",
                self._live_figures["reference/cross_mutual_information"].update(
                    values["reference/cross_mutual_information"], title=f"Manifold cross MI with the reference, step {steps[-1]}"
                ),
            )

    # ---------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "history": [{"step": entry["step"], "spectrum": entry["spectrum"].clone()} for entry in self.history],
            "last_step": self._last_step,
            "num_failed": self.num_failed,
            "seed": self.seed,
            "previous": self._previous,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [{"step": int(entry["step"]), "spectrum": entry["spectrum"].cpu()} for entry in state_dict.get("history", [])]
        self._last_step = state_dict.get("last_step", self.history[-1]["step"] if self.history else None)
        self.num_failed = state_dict.get("num_failed", 0)
        seed = state_dict.get("seed", self.seed)
        if seed != self.seed:
            self.seed = seed
            self._drawn_latents = None
        previous = state_dict.get("previous")
        self._previous = None if previous is None else {name: tensor.cpu() for name, tensor in previous.items()}
        self._previous_jacobians = None  # recomputed from the restored snapshot


def _buffer_names(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_buffers(remove_duplicate=False)]
