"""A Lightning callback that logs the manifold entropic metrics of a module's decoder while it trains."""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, EarlyStopping, Timer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_mem._checks import check_callback_inputs, check_positive_float
from lightning_mem.budget import DEFAULT_MAX_OVERHEAD, TimeBudget, affordable_samples
from lightning_mem.decoders import resolve_latent_dim
from lightning_mem.evaluation import evaluation_mode
from lightning_mem.functional.statistics import DEFAULT_EPS
from lightning_mem.jacobian import JacobianMode
from lightning_mem.loggers import figure_loggers
from lightning_mem.pictures import LatentPictures
from lightning_mem.plotting import EvaluationFigures
from lightning_mem.tracking import PICTURE_SAMPLES, DecoderTracker

__all__ = ["DEFAULT_NUM_SAMPLES", "LOGGED_SCALARS", "ManifoldEntropicMetricsCallback"]

DEFAULT_NUM_SAMPLES = 256
"""Prior latents the callback draws when ``num_samples`` is not given (with the default time budget it evaluates the
first ``n`` of them that the budget allows)."""

LOGGED_SCALARS = (
    "entropy",
    "entropy_per_dim",
    "total_correlation",
    "total_correlation_per_dim",
    "num_active",
    "pairwise_mutual_information_max",
    "pairwise_mutual_information_mean",
    "num_fallback",
    "num_classes_seen",
    "eval_time",
    "num_samples",
    "drift/alignment",
    "drift/self_correlation",
    "drift/cross_mutual_information_diag",
    "drift/num_rematched",
    "reference/alignment",
    "reference/num_matched",
    "active/total_correlation",
    "active/pairwise_mutual_information_max",
    "active/pairwise_mutual_information_mean",
    "active/drift/alignment",
    "active/drift/self_correlation",
    "active/drift/num_rematched",
    "active/reference/alignment",
    "active/reference/num_matched",
)
"""Keys of ``callback.last_metrics`` logged as scalars (``prefix + key``), with ``spectrum/top_k`` and ``failed``
(``num_samples``, the latents an evaluation took, only with a time budget: ``max_overhead``; ``active/drift/...`` and
``active/reference/...`` only while some latent is active)."""

_STATE_VERSION = 1
_UNBOUNDED_FALLBACK_EPOCHS = 1
"""Epoch interval of the default schedule when the run's length is unknown (``num_evaluations`` cannot spread)."""


def _evenly_spaced_steps(total_steps: int, num_evaluations: int) -> frozenset[int]:
    r"""The steps :math:`\lceil k T / n \rceil`, :math:`k = 1 \ldots n`, of a run of :math:`T` steps (every step if :math:`T \le n`)."""
    return frozenset(-(-k * total_steps // num_evaluations) for k in range(1, num_evaluations + 1))


class ManifoldEntropicMetricsCallback(Callback):
    r"""Log the manifold entropic metrics of a LightningModule's decoder during training: spectrum, MTC, MPMI, drift.

    At about ``num_evaluations`` evenly spaced training steps (and at the start), the callback takes the decoder
    Jacobian :math:`J(z) = \partial g/\partial z` at fixed prior latents (the first ``n`` of ``num_samples``), chunk by chunk,
    feeds a :class:`~lightning_mem.ManifoldEntropicMetrics` and logs ``prefix + key`` for each key of
    :data:`LOGGED_SCALARS` present (the README's vocabulary table says what each means), ``spectrum/top_1`` ... ``top_k``
    and ``failed``, into the loggers and into ``trainer.callback_metrics`` on every rank (so ``ModelCheckpoint`` and
    ``EarlyStopping`` can monitor them); figures ``spectrum_history``, ``pairwise_mutual_information`` and
    ``reference/cross_mutual_information`` go to TensorBoard, Weights & Biases, MLflow and CSV loggers. **Drift**
    compares the decoder with itself at the previous evaluation through the cross mutual information; a
    ``reference_decoder`` (e.g. a ground truth) gives alignment.

    Training is not changed (eval mode, ``no_grad``, RNG states restored: bit-identical weights); under DDP each rank
    evaluates a share of the latents and the result equals one process; a failed evaluation warns and training goes
    on (``strict=True`` raises). ``callback.last_metrics`` holds the last evaluation's values, ``callback.history``
    the spectra, ``callback.total_time`` the seconds spent. The schedule, cost, memory, drift, distributed behaviour
    and faults are explained in ``docs/callback.md``.

    **Cost**: by default the callback spends at most ``max_overhead=0.05`` of the training time
    (:class:`~lightning_mem.budget.TimeBudget`): it times its own evaluations and, before each one, takes only the
    first ``n`` of its ``num_samples`` latents that the time left allows (a power of two, at least one per process;
    logged as ``num_samples``), postpones a scheduled evaluation that not even that many would fit to the next one
    (the end of training is always evaluated), and draws figures only from what is left. The start of training is
    evaluated at the first evaluation (its weights are kept until then) and logged at step 0. The values then
    depend on the machine's speed (which ``n``), and short runs get fewer samples, evaluations and figures.
    Explicit ``num_samples`` or ``latents`` are evaluated in full at every scheduled step, as is everything with
    ``max_overhead=None``.

    Args:
        decoder: attribute or method path of the decoder on the module (dotted: ``"model.decode"``), or a callable
            ``(pl_module, z[, condition]) -> x``; default: ``decoder``, ``decode``, ``generator``, ``dec``,
            ``model.decoder``, ``model.decode``, ... then a FrEIA, zuko or normflows flow at ``flow``, ``inn``, ``model``
            (the order is :func:`lightning_mem.decoders.resolve_decoder`'s; a flow is used in its sampling direction).
        latent_dim: latent size ``d``; default ``pl_module.latent_dim`` (or ``latent_size``, ``latent_dims``, ``z_dim``,
            ``nz``), ``hparams.latent_dim`` and so on, or what the decoder tells (see
            :func:`lightning_mem.decoders.resolve_latent_dim`).
        output_key: for a decoder returning a mapping (e.g. pythae's ``ModelOutput``) the key of the output to measure,
            for one returning a tuple its index; a distribution output is measured at its ``.mean`` (see
            :func:`lightning_mem.jacobian.decoder_output`).
        latent_shape: the shape of one latent as the decoder takes it, e.g. ``(100, 1, 1)`` for a DCGAN generator.
        num_samples: latents drawn from :math:`N(0, I_d)` with the callback's own generator (seed ``seed``);
            default :data:`DEFAULT_NUM_SAMPLES` (256).
        latents: a fixed ``(N, d)`` tensor, or a callable ``(trainer, pl_module) -> z`` (or ``-> (z, conditions)``).
        max_overhead: the fraction of the training time the callback may spend (its evaluations, logging and
            figures), e.g. ``0.05``; ``None``: no limit, every scheduled evaluation on all the latents; ``"auto"``:
            :data:`~lightning_mem.budget.DEFAULT_MAX_OVERHEAD` (0.05) when neither ``num_samples`` nor ``latents``
            is given, else ``None``.
        conditions: for conditional decoders: a tensor ``(N, ...)``, or a callable ``labels -> conditions``.
        num_classes: class-conditional mode (labels ``arange(N) % num_classes``, or ``conditions`` when integer).
        num_evaluations: evaluations spread over the run's ``estimated_stepping_batches``; ``None``: start and end only.
        every_n_train_steps, every_n_epochs: fixed intervals instead of ``num_evaluations``.
        evaluate_at_start, evaluate_at_end: evaluate before the first step / at the end of training.
        reference_decoder: a callable ``z -> x`` with the decoder's output shape, e.g. a ground-truth generator.
        reference_latents: its latents ``(N, d_ref)`` (tensor or callable) for the same points; default ``latents``.
        drift: log the drift since the previous evaluation.
        prefix: prepended to every key.
        progress_bar_keys: names from :data:`LOGGED_SCALARS` (or ``"failed"``) also shown in the progress bar.
        image_shape: ``(H, W)`` or ``(H, W, C)`` of a decoder whose output is a flattened image: then (as for outputs
            shaped ``(C, H, W)`` or ``(H, W)``) the figures include ``latent_columns`` and ``latent_traversals``, pictures
            of the ``top_k`` latents (see :func:`lightning_mem.pictures.latent_pictures`).
        top_k: how many of the largest per-latent entropies to log.
        chunk_size: latents differentiated at once (bounds memory); ``"auto"``: as many as fit in
            :data:`lightning_mem.budget.DEFAULT_MEMORY_BUDGET` (1 GiB) by :func:`lightning_mem.budget.auto_chunk_size`'s
            estimate; ``None``: all of a process's latents at once.
        mode: Jacobian mode, see :func:`lightning_mem.decoder_jacobian`.
        std, sigma: data scale and latent scale ``(d,)`` (latents are then ``sigma * eps``).
        eps: relative floor: latent ``i`` is inactive at a sample when :math:`G_{ii} \\le \\epsilon \\max_j G_{jj}`.
        active_threshold: ``None``: a latent is active when it stands above the plateau of switched-off latents at the
            bottom of the spectrum (:func:`lightning_mem.functional.active_latents`); a float: when
            :math:`\exp(H_i - h_0)` exceeds it (see :func:`lightning_mem.functional.num_active_latents`). The active
            latents give ``num_active`` and the ``active/...`` keys: total correlation, pairwise mutual information,
            drift and reference alignment of the active latents only.
        log_figures: draw and log the figures.
        figures_every_n_evaluations: draw them at evaluations n, 2n, ... and at the last one (1: every evaluation).
        seed: seed of the latents' generator (saved in checkpoints).
        strict: raise on a failed evaluation instead of warning.

    Raises:
        ValueError, TypeError: for invalid arguments.
        MisconfigurationException: in ``setup``, before training starts, when the module has no decoder, the latent
            size is unknown, there are fewer latents than processes, or the decoder fails a test call at two of the
            latents (it raises, returns no tensor or NaN, not one output per latent, or nothing differentiable; skipped
            for a callable ``latents``).

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
        output_key: str | int | None = None,
        latent_shape: Sequence[int] | None = None,
        num_samples: int | None = None,
        latents: Tensor | Callable[[Trainer, LightningModule], Any] | None = None,
        max_overhead: float | str | None = "auto",
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
        progress_bar_keys: Sequence[str] = (),
        image_shape: Sequence[int] | None = None,
        top_k: int = 3,
        chunk_size: int | str | None = "auto",
        mode: JacobianMode = "auto",
        std: Tensor | float | None = None,
        sigma: Tensor | None = None,
        eps: float = DEFAULT_EPS,
        active_threshold: float | None = None,
        log_figures: bool = True,
        figures_every_n_evaluations: int = 10,
        seed: int = 0,
        strict: bool = False,
    ) -> None:
        super().__init__()
        if max_overhead == "auto":
            max_overhead = DEFAULT_MAX_OVERHEAD if num_samples is None and latents is None else None
        elif max_overhead is not None:
            if isinstance(max_overhead, str):
                raise ValueError(f"Expected `max_overhead` to be a positive float, 'auto' or None, but got {max_overhead!r}.")
            check_positive_float(max_overhead, "max_overhead")
        num_samples = DEFAULT_NUM_SAMPLES if num_samples is None else num_samples
        self.sigma = check_callback_inputs(
            decoder=decoder,
            latent_dim=latent_dim,
            num_samples=num_samples,
            counts={"num_samples": num_samples, "top_k": top_k, "figures_every_n_evaluations": figures_every_n_evaluations},
            optional_counts={
                "num_classes": num_classes,
                "num_evaluations": num_evaluations,
                "every_n_train_steps": every_n_train_steps,
                "every_n_epochs": every_n_epochs,
                "chunk_size": None if chunk_size == "auto" else chunk_size,
            },
            mode=mode,
            eps=eps,
            active_threshold=active_threshold,
            seed=seed,
            prefix=prefix,
            latents=latents,
            conditions=conditions,
            num_classes=num_classes,
            reference_decoder=reference_decoder,
            reference_latents=reference_latents,
            sigma=sigma,
        )
        self.decoder, self.latent_dim, self.num_samples, self.latents, self.num_classes = (
            decoder,
            latent_dim,
            num_samples,
            latents,
            num_classes,
        )
        self.num_evaluations, self.every_n_train_steps, self.every_n_epochs = num_evaluations, every_n_train_steps, every_n_epochs
        self.evaluate_at_start, self.evaluate_at_end, self.reference_decoder = evaluate_at_start, evaluate_at_end, reference_decoder
        self.prefix, self.top_k, self.log_figures, self.figures_every_n_evaluations = (
            prefix,
            top_k,
            log_figures,
            figures_every_n_evaluations,
        )
        self.seed, self.strict = seed, strict
        unknown = sorted(set(progress_bar_keys) - {*LOGGED_SCALARS, "failed"})
        if isinstance(progress_bar_keys, str) or unknown:
            raise ValueError(f"Expected `progress_bar_keys` to be names from {LOGGED_SCALARS}, but got {progress_bar_keys!r}.")
        self.progress_bar_keys = tuple(progress_bar_keys)
        self.image_shape = None if image_shape is None else tuple(image_shape)
        self._tracker = DecoderTracker(
            decoder=decoder,
            latent_dim=latent_dim,
            output_key=output_key,
            latent_shape=latent_shape,
            num_samples=num_samples,
            latents=latents,
            conditions=conditions,
            num_classes=num_classes,
            reference_decoder=reference_decoder,
            reference_latents=reference_latents,
            drift=drift,
            chunk_size=chunk_size,
            mode=mode,
            std=std,
            sigma=self.sigma,
            eps=eps,
            active_threshold=active_threshold,
            seed=seed,
        )
        self.history: list[dict[str, Any]] = []
        self.last_metrics: dict[str, Tensor] = {}
        self.num_failed = 0
        self.total_time = 0.0
        self.max_overhead = max_overhead
        self.budget = TimeBudget(max_overhead)
        self._tracker.clock = self._clock  # the active latents' pass is timed on the budget's clock
        """What the evaluations may cost and what they cost so far; its ``clock`` also times ``total_time``."""
        self._start_state: dict[str, Tensor] | None = None  # the weights at the start of training, until evaluated
        self._postponed_warned = False
        self._scheduled_steps: frozenset[int] = frozenset()
        self._epoch_interval: int | None = every_n_epochs
        self._last_step: int | None = None
        self._ready = False
        self._figure_loggers: list[Any] = []
        self._undrawn: tuple[int, dict[str, Tensor], dict[str, Tensor] | None] | None = None
        self._pictures_failed = False
        self._figures = EvaluationFigures()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, seed=self.seed)

    # ---------------------------------------------------------------- set-up and schedule

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        try:
            resolved = self._tracker.resolve(pl_module)
            latents, latent_shape = self.latents if isinstance(self.latents, Tensor) else None, self._tracker.latent_shape
            self.latent_dim = resolve_latent_dim(pl_module, self.latent_dim, latents, resolved=resolved, latent_shape=latent_shape)
        except (ValueError, TypeError) as error:
            raise MisconfigurationException(f"ManifoldEntropicMetricsCallback: {error}") from error
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
        # every fit starts a fresh run (a resumed one gets its state back from `load_state_dict`, which comes later)
        self._tracker.setup(self.latent_dim)
        try:
            self._tracker.probe(trainer, pl_module)  # fail fast: the decoder once at two latents, before training starts
        except (ValueError, TypeError) as error:
            raise MisconfigurationException(f"ManifoldEntropicMetricsCallback: {error}") from error
        self._tracker.previous = self._tracker.previous_jacobians = self._tracker.previous_count = None
        self.history, self.last_metrics, self.num_failed, self._last_step = [], {}, 0, None
        # the fewest latents an evaluation takes: one per process (and, class-conditional, one per class)
        self.budget.reset(
            min_samples=max(trainer.world_size, self.num_classes or 1), max_samples=sys.maxsize if num_latents is None else num_latents
        )
        self._start_state, self._postponed_warned = None, False
        self._ready = True
        self._figure_loggers, self._undrawn, self.total_time = [], None, 0.0
        self._figures = EvaluationFigures(active_threshold=self._tracker.active_threshold, eps=self._tracker.eps)
        self._pictures_failed = False
        if not trainer.is_global_zero:
            return
        if not trainer.loggers:
            rank_zero_warn(
                "ManifoldEntropicMetricsCallback: the Trainer has no logger, so nothing is logged; the values are in "
                "`callback.last_metrics`, `callback.history` and `trainer.callback_metrics`. Pass `logger=TensorBoardLogger(...)` "
                "to see the curves."
            )
        if self.log_figures:
            self._figure_loggers, others = figure_loggers(trainer.loggers)
            if others:
                rank_zero_warn(
                    f"ManifoldEntropicMetricsCallback logs figures only to TensorBoard, Weights & Biases, MLflow and CSV loggers; "
                    f"scalars only for {', '.join(others)}. Pass `log_figures=False` to silence this warning."
                )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._plan(trainer)
        self.budget.start()
        step = trainer.global_step
        if self.evaluate_at_start and not self.history and self._last_step is None:
            if not self.budget.limited:
                self._evaluate(trainer, pl_module)
            elif self._start_state is None and self._ready:  # (a resumed run may have it back from its checkpoint)
                # nothing is known yet of the training time that pays for it: evaluate these weights at the first evaluation
                begin = self.budget.clock()
                self._start_state = self._tracker.snapshot(pl_module)
                self._charge(self.budget.clock() - begin)
        elif self._last_step is not None and step != self._last_step and self._due(step):
            self._evaluate(trainer, pl_module)  # resumed from a checkpoint saved while this step's evaluation was interrupted

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
        callbacks: list[Callback] = getattr(trainer, "callbacks", [])  # Lightning sets it at init; `Trainer` declares no type
        stoppers = [type(c).__name__ for c in callbacks if isinstance(c, (EarlyStopping, Timer))]
        if stoppers:
            rank_zero_warn(
                f"ManifoldEntropicMetricsCallback: `num_evaluations={self.num_evaluations}` are spread over the run's estimated "
                f"{int(total_steps)} steps, but {' and '.join(stoppers)} may end it sooner and leave most of them out (the end of "
                "training is still evaluated). Pass `every_n_epochs` or `every_n_train_steps` for a fixed interval."
            )

    def _clock(self) -> float:
        """The time budget's clock, whichever it is now (tests replace it)."""
        return self.budget.clock()

    def _due(self, step: int) -> bool:
        return step in self._scheduled_steps or (self.every_n_train_steps is not None and step > 0 and step % self.every_n_train_steps == 0)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._due(trainer.global_step):
            self._evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._epoch_interval is not None and (trainer.current_epoch + 1) % self._epoch_interval == 0:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.evaluate_at_end:
            self._evaluate(trainer, pl_module, required=True)
        elif self._start_state is not None and self._ready and not trainer.sanity_checking:
            self._evaluate_once(trainer, pl_module, 0, state=self._start_state, required=True)
        if self._undrawn is None:
            return
        # the last evaluation's figures, when its number was not a multiple of the interval (or the budget was short then)
        latents = self._picture_latents(self._undrawn[1])
        if self.budget.can_draw(latents=latents, final=True):
            self._charge(self._draw(trainer, pl_module, *self._undrawn))
        else:
            rank_zero_warn(
                f"ManifoldEntropicMetricsCallback: the figures were not drawn: they cost about {self.budget.figure_cost(latents):.2g} s, "
                f"more than the {max(self.budget.credit(), 0.0):.2g} s left of the time budget (max_overhead={self.max_overhead} of "
                f"{self.budget.training_time():.3g} s of training). Draw them from `callback.history` and `callback.last_metrics` "
                "with `lightning_mem.plotting`, or pass `max_overhead=None`."
            )
            self._undrawn = None

    # ---------------------------------------------------------------- evaluation

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule, *, required: bool = False) -> None:
        """The evaluation at ``trainer.global_step`` on every rank (once per step), preceded by the start of training's
        when that is still due; ``required``: even when the time budget cannot pay for it (the end of training)."""
        step = trainer.global_step
        if trainer.sanity_checking or not self._ready or step == self._last_step:
            return
        if self._start_state is not None:  # it shares this evaluation's credit with it
            self._evaluate_once(trainer, pl_module, 0, state=self._start_state, required=True, share=2)
            if step == self._last_step:
                return
        self._evaluate_once(trainer, pl_module, step, required=required)

    def _evaluate_once(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        step: int,
        *,
        state: dict[str, Tensor] | None = None,
        required: bool = False,
        share: int = 1,
    ) -> None:
        """One evaluation, logged at ``step``, of the decoder now or with the weights ``state``, its wall time added to
        ``total_time`` and charged to the budget.

        With a time budget, rank zero decides how many of the latents it takes (every rank takes its share of the
        first ``n``): as many as ``1 / share`` of the credit pays for at the measured costs, or, before any cost is
        known, first ``min_samples`` latents, timed, then as many more as that rate affords. Without ``required`` an
        evaluation that not even ``min_samples`` would fit is postponed to the next scheduled one.

        The step counts as done (``_last_step``) only once its result or its failure is recorded: an interruption
        (``KeyboardInterrupt``, a crash) leaves the state as if the evaluation had not begun.
        """
        clock = self.budget.clock
        begin, sampling = clock(), 0.0
        try:
            credit = self.budget.credit()
            pilot = self.budget.limited and not self.budget.measured
            count: int | None = None  # latents to take, None: all
            if self.budget.limited:
                count = self.budget.min_samples if pilot else self.budget.num_samples(credit / share, required=required)
                count = int(trainer.strategy.broadcast(count, src=0))  # rank zero's measurements decide for every rank
                if count == 0:
                    return self._postpone(step, credit)
            modules = [pl_module] + ([self.reference_decoder] if isinstance(self.reference_decoder, nn.Module) else [])
            with evaluation_mode(modules):
                error, seconds = self._accumulate(trainer, pl_module, step, state=state, stop=count)
                sampling += seconds
                if trainer.strategy.reduce_boolean_decision(error is not None, all=False):
                    return self._fail(trainer, step, error, state)
                if pilot and count is not None:
                    # before this run's first measurement: the rate of the first `count` latents prices the rest
                    more = affordable_samples(
                        credit / share,
                        fixed_seconds=0.0,
                        sample_seconds=seconds / count,
                        min_samples=count,
                        max_samples=self.budget.max_samples,
                    )
                    more = int(trainer.strategy.broadcast(max(more, count), src=0))
                    if more > count:
                        error, seconds = self._accumulate(trainer, pl_module, step, state=state, start=count, stop=more)
                        sampling += seconds
                        if trainer.strategy.reduce_boolean_decision(error is not None, all=False):
                            return self._fail(trainer, step, error, state)
                try:
                    values = self._tracker.compute()
                    sampling += self._tracker.active_seconds  # (a pass over the latents too)
                except Exception as exception:  # after the sync every rank holds the same sums and agrees on failures: all fail alike
                    rank_zero_warn(
                        f"ManifoldEntropicMetricsCallback: the evaluation at step {step} failed ({type(exception).__name__}: {exception})."
                    )
                    return self._fail(trainer, step, exception, state)
            values["eval_time"] = torch.tensor(clock() - begin, dtype=torch.float64)
            self.last_metrics = values
            self.history.append({"step": step, "spectrum": values["spectrum"].clone()})
            self._last_step = step
            if state is not None:
                self._start_state = None
            self._log(trainer, step, self._scalars(values))
            self.budget.record(seconds=clock() - begin, sample_seconds=sampling, num_samples=int(values["num_samples"]))
            self._figures_after(trainer, pl_module, step, values, state)
        finally:
            self._charge(clock() - begin)

    def _accumulate(
        self, trainer: Trainer, pl_module: LightningModule, step: int, *, state: dict[str, Tensor] | None, start: int = 0, stop: int | None
    ) -> tuple[Exception | None, float]:
        """This rank's share of the latents ``start:stop`` into the tracker's metrics: the error it raised (warned
        about) or ``None``, and its seconds."""
        clock = self.budget.clock
        begin = clock()
        try:
            if start == 0 and stop is None and state is None:
                self._tracker.accumulate(trainer, pl_module)  # all the latents, the decoder now: the plain call
            else:
                self._tracker.accumulate(trainer, pl_module, start=start, stop=stop, state=state)
        except Exception as exception:
            warnings.warn(
                f"ManifoldEntropicMetricsCallback: the evaluation at step {step} failed on rank {trainer.global_rank} "
                f"({type(exception).__name__}: {exception}).",
                RuntimeWarning,
                stacklevel=3,
            )
            return exception, clock() - begin
        return None, clock() - begin

    def _postpone(self, step: int, credit: float) -> None:
        """Leave the evaluation at ``step`` to the next scheduled one (said once per run)."""
        if self._postponed_warned:
            return
        self._postponed_warned = True
        rank_zero_warn(
            f"ManifoldEntropicMetricsCallback: the evaluation at step {step} is postponed to the next scheduled one: even "
            f"{self.budget.min_samples} latent(s) would cost about {self.budget.cost(self.budget.min_samples):.2g} s, more than the "
            f"{max(credit, 0.0):.2g} s left of the time budget (max_overhead={self.max_overhead} of the training time). Later "
            "postponements are not reported; `callback.history` has the steps evaluated. Pass `max_overhead=None` to evaluate "
            "at every scheduled step."
        )

    def _charge(self, seconds: float) -> None:
        self.total_time += seconds
        self.budget.charge(seconds)

    def _fail(self, trainer: Trainer, step: int, error: BaseException | None, state: dict[str, Tensor] | None = None) -> None:
        """Count a failed evaluation (agreed on by every rank) and log the counter; raise with ``strict=True``."""
        self.num_failed += 1
        self._last_step = step
        if state is not None:
            self._start_state = None
        if self.strict:
            reason = f"{type(error).__name__}: {error}" if error is not None else "it failed on another rank"
            raise RuntimeError(f"ManifoldEntropicMetricsCallback(strict=True): the evaluation at step {step} failed ({reason}).") from error
        if error is None:
            rank_zero_warn(f"ManifoldEntropicMetricsCallback: the evaluation at step {step} failed on another rank; training continues.")
        self._log(trainer, step, {"failed": float(self.num_failed)})

    # ---------------------------------------------------------------- logging

    def _scalars(self, values: dict[str, Tensor]) -> dict[str, float]:
        names = LOGGED_SCALARS if self.budget.limited else [name for name in LOGGED_SCALARS if name != "num_samples"]
        scalars = {name: float(values[name]) for name in names if name in values}
        scalars.update({f"spectrum/top_{rank}": h for rank, h in enumerate(values["spectrum"][: self.top_k].tolist(), start=1)})
        return {**scalars, "failed": float(self.num_failed)}

    def _log(self, trainer: Trainer, step: int, scalars: dict[str, float]) -> None:
        """Every rank: the scalars into ``trainer.callback_metrics`` (for ``ModelCheckpoint``/``EarlyStopping``) and the
        progress bar; rank zero: into the loggers."""
        callback_metrics = trainer.callback_metrics  # (a property that gathers the metrics anew at every read)
        for name, value in scalars.items():
            callback_metrics[f"{self.prefix}{name}"] = torch.tensor(value, dtype=torch.float64)
            if name in self.progress_bar_keys:
                trainer.progress_bar_metrics[f"{self.prefix}{name}"] = value
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics({f"{self.prefix}{name}": value for name, value in scalars.items()}, step=step)

    def _figures_after(
        self, trainer: Trainer, pl_module: LightningModule, step: int, values: dict[str, Tensor], state: dict[str, Tensor] | None
    ) -> None:
        """Rank zero, with figure loggers: draw the figures of this evaluation (of the decoder now, or with the weights
        ``state``) when it is their turn and the budget can pay for them; otherwise keep them for the end of training."""
        if not (trainer.is_global_zero and self._figure_loggers):
            return
        number, interval = len(self.history) - 1, self.figures_every_n_evaluations
        if (interval == 1 or (number > 0 and number % interval == 0)) and self.budget.can_draw(latents=self._picture_latents(values)):
            self._draw(trainer, pl_module, step, values, state)
        else:
            self._undrawn = (step, values, state)

    def _draw(
        self, trainer: Trainer, pl_module: LightningModule, step: int, values: dict[str, Tensor], state: dict[str, Tensor] | None
    ) -> float:
        """Draw and log the figures of the evaluation at ``step`` (with the top latents' pictures); their seconds."""
        begin = self.budget.clock()
        self._undrawn = None
        if state is None and step != trainer.global_step:  # drawn later (at the end): the evaluated weights, if kept
            state = self._tracker.previous
        pictures = self._latent_pictures(trainer, pl_module, values, state) if state is not None or step == trainer.global_step else None
        for tag, figure in self._figures.update(self.history, values, pictures).items():
            for log_figure in self._figure_loggers:
                log_figure(f"{self.prefix}{tag}", figure, step)
        seconds = self.budget.clock() - begin
        self.budget.record_figures(seconds)
        return seconds

    @staticmethod
    def _picture_latents(values: dict[str, Tensor]) -> int:
        """How many latents the pictures of an evaluation differentiate the decoder at: as many as it took, at most
        :data:`~lightning_mem.tracking.PICTURE_SAMPLES`."""
        return max(1, min(PICTURE_SAMPLES, int(values["num_samples"]))) if "num_samples" in values else PICTURE_SAMPLES

    def _latent_pictures(
        self, trainer: Trainer, pl_module: LightningModule, values: dict[str, Tensor], state: dict[str, Tensor] | None
    ) -> LatentPictures | None:
        """The top latents' pictures (rank zero, at most as many latents as the evaluation took); a decoder they do not
        suit warns once."""
        if self._pictures_failed:
            return None
        try:
            top = values["spectrum_order"][: self.top_k]
            return self._tracker.pictures(trainer, pl_module, top, self.image_shape, num_samples=self._picture_latents(values), state=state)
        except Exception as error:  # pictures are extras: they must not stop the run
            self._pictures_failed = True
            rank_zero_warn(f"ManifoldEntropicMetricsCallback: no latent pictures ({type(error).__name__}: {error}).")
            return None

    # ---------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "history": [{"step": entry["step"], "spectrum": entry["spectrum"].clone()} for entry in self.history],
            "last_step": self._last_step,
            "num_failed": self.num_failed,
            "seed": self.seed,
            "previous": self._tracker.previous,
            "start_state": self._start_state,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [{"step": int(entry["step"]), "spectrum": entry["spectrum"].cpu()} for entry in state_dict.get("history", [])]
        self._last_step = state_dict.get("last_step", self.history[-1]["step"] if self.history else None)
        self.num_failed = state_dict.get("num_failed", 0)
        seed = state_dict.get("seed", self.seed)
        self.seed = seed
        self._tracker.reseed(seed)
        previous = state_dict.get("previous")
        self._tracker.previous = None if previous is None else {name: tensor.cpu() for name, tensor in previous.items()}
        self._tracker.previous_jacobians = None  # recomputed from the restored snapshot
        self._tracker.previous_count = None  # (all of its latents)
        start_state = state_dict.get("start_state")  # the start of training, when it was not evaluated yet
        self._start_state = None if start_state is None else {name: tensor.cpu() for name, tensor in start_state.items()}
