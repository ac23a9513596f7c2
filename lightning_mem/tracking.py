"""What the callback evaluates: a module's decoder at fixed latents, with its drift and reference, evaluation after evaluation."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_mem._checks import check_labels
from lightning_mem.budget import auto_chunk_size
from lightning_mem.decoders import ResolvedDecoder, buffer_names, decoder_with_state, resolve_decoder, state_snapshot
from lightning_mem.evaluation import Comparison, active_total_correlation, evaluate_decoder, evaluation_mode, prior_latents
from lightning_mem.functional.active import active_alignment
from lightning_mem.jacobian import JacobianMode, OutputKey, check_latent_shape, check_output_key, probe_decoder
from lightning_mem.metrics import ManifoldCrossMutualInformation, ManifoldEntropicMetrics
from lightning_mem.pictures import LatentPictures, latent_pictures

__all__ = ["MAX_KEPT_JACOBIAN_BYTES", "PICTURE_SAMPLES", "PROBE_SAMPLES", "DecoderTracker"]

PROBE_SAMPLES = 2
"""Latents the decoder is tried on in ``setup`` (:meth:`DecoderTracker.probe`), before training starts."""

PICTURE_SAMPLES = 16
"""Latents over which :meth:`DecoderTracker.pictures` averages the absolute Jacobian columns (the first is the
traversals' origin)."""

MAX_KEPT_JACOBIAN_BYTES = 64 * 2**20
"""An evaluation keeps its Jacobians (per process) when they take at most this much memory: for the total correlation
of its active latents (otherwise their columns are computed again) and, with ``drift`` and fixed latents, for the next
evaluation's drift (otherwise it recomputes them from the parameter snapshot)."""


class DecoderTracker:
    """Evaluates a LightningModule's decoder into metrics, and keeps what the next evaluation's drift needs.

    Each evaluation (:meth:`accumulate`, then :meth:`compute`, on every DDP rank) resolves the decoder, evaluates this
    rank's share of the latents with :func:`lightning_mem.evaluation.evaluate_decoder`, syncs and finishes the metrics.
    An evaluation may take only the first ``n`` latents (a time budget's choice), in one call or in several
    (``start``/``stop``); rank ``r`` takes the latents ``i`` with ``i % world_size == r``, so its share of the first
    ``n`` is a prefix of its share of all of them. Drift compares the latents the two evaluations have in common
    (the first ``min(n_previous, n)``). The drift state (a snapshot of the decoder's weights, and its Jacobians when
    they fit :data:`MAX_KEPT_JACOBIAN_BYTES`) moves on only when the evaluation succeeded. :meth:`compute` adds the
    ``active/...`` values: the total correlation of the active latents (a second pass, see
    :func:`~lightning_mem.evaluation.active_total_correlation`) and the drift and reference alignment of their rows
    (:func:`~lightning_mem.functional.active_alignment`). A warning raised during evaluations
    (e.g. the engine's fall-back to ``mode="loop"``) is given once per run (per :meth:`setup`). Arguments are those of
    :class:`~lightning_mem.ManifoldEntropicMetricsCallback`.
    """

    def __init__(
        self,
        *,
        decoder: str | Callable[..., Any] | None,
        latent_dim: int | None,
        num_samples: int,
        output_key: OutputKey | None = None,
        latent_shape: Sequence[int] | None = None,
        latents: Tensor | Callable[[Trainer, LightningModule], Any] | None,
        conditions: Tensor | Callable[[Tensor], Tensor] | None,
        num_classes: int | None,
        reference_decoder: Callable[..., Any] | None,
        reference_latents: Tensor | Callable[[Trainer, LightningModule], Tensor] | None,
        drift: bool,
        chunk_size: int | str | None,
        mode: JacobianMode,
        std: Tensor | float | None,
        sigma: Tensor | None,
        eps: float,
        active_threshold: float | None,
        seed: int,
    ) -> None:
        check_output_key(output_key)
        self.latent_shape = check_latent_shape(latent_shape, latent_dim)
        self.decoder, self.latent_dim, self.num_samples, self.latents = decoder, latent_dim, num_samples, latents
        self.output_key = output_key
        self.conditions, self.num_classes = conditions, num_classes
        self.reference_decoder, self.reference_latents, self.drift = reference_decoder, reference_latents, drift
        self.chunk_size, self.mode, self.std, self.sigma, self.eps, self.seed = chunk_size, mode, std, sigma, eps, seed
        self.active_threshold = active_threshold
        self.clock: Callable[[], float] = time.perf_counter  # the owner's clock (the callback's time budget's)
        self.previous: dict[str, Tensor] | None = None  # the decoder's state at the last evaluation (for drift)
        self.previous_jacobians: list[Tensor] | None = None  # its Jacobians at this rank's share of the latents, when kept
        self.previous_count: int | None = None  # how many of the latents (the first ones) it took; None: all
        self._pending: tuple[dict[str, Tensor] | None, list[Tensor] | None, int | None] = (None, None, None)
        self._evaluated: _Evaluated | None = None  # this evaluation's decoder, rows and kept Jacobians (active pass)
        self.active_seconds = 0.0  # seconds of the last evaluation's pass over the active latents' columns
        self._drawn_latents: Tensor | None = None
        self.metric: ManifoldEntropicMetrics | None = None
        self._reference_metric: ManifoldCrossMutualInformation | None = None
        self._warned: set[tuple[type, str]] = set()

    def resolve(self, pl_module: LightningModule) -> ResolvedDecoder:
        """The module's decoder, as :func:`lightning_mem.decoders.resolve_decoder` finds it with this tracker's options."""
        return resolve_decoder(pl_module, self.decoder, output_key=self.output_key, latent_shape=self.latent_shape)

    def setup(self, latent_dim: int) -> None:
        """Fix the latent size (known once the module is) and make the metrics; warnings start afresh."""
        self.latent_dim = latent_dim
        self._warned = set()
        self._auto_chunk: int | None = None
        std, sigma, eps, num_classes = self.std, self.sigma, self.eps, self.num_classes
        self.metric = ManifoldEntropicMetrics(
            latent_dim, active_threshold=self.active_threshold, std=std, sigma=sigma, eps=eps, num_classes=num_classes
        )
        self._drift_metric = ManifoldCrossMutualInformation(
            latent_dim, latent_dim, reference_sigma=sigma, std=std, sigma=sigma, eps=eps, num_classes=num_classes
        )
        self._reference_metric = None

    def _set_up(self) -> tuple[int, ManifoldEntropicMetrics]:
        """The latent size and the metric that :meth:`setup` fixed, which every evaluation needs."""
        if self.latent_dim is None or self.metric is None:
            raise RuntimeError("Expected DecoderTracker.setup(latent_dim) before an evaluation, but it was not called.")
        return self.latent_dim, self.metric

    def reseed(self, seed: int) -> None:
        """Draw the latents with another seed from the next evaluation on (a restored run's)."""
        if seed != self.seed:
            self.seed, self._drawn_latents = seed, None

    def probe(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fail fast: call the decoder once at :data:`PROBE_SAMPLES` of this run's latents, before training starts.

        In eval mode, with the module's state untouched (training flags, buffers and RNG states restored, no parameter
        gradient). Skipped when ``latents`` is a callable (it may need the run under way); the first evaluation checks
        then.

        Raises:
            ValueError, TypeError: naming the cause and the fix, if the decoder raises, returns no tensor, one that is
                not a differentiable function of the latents, not one row per latent, or NaN/inf (e.g. a wrong latent
                size).
        """
        if callable(self.latents):
            return
        resolved = self.resolve(pl_module)
        # in `setup` the module is still where the user put it (Lightning moves it later): use its parameters' device
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        z, conditions, _, _ = self._inputs(trainer, pl_module, device=device, with_reference=False)
        rows = slice(0, PROBE_SAMPLES)
        z, conditions = z[rows], None if conditions is None else conditions[rows]
        with evaluation_mode([pl_module]):
            try:
                probe_decoder(resolved.function, z, conditions, check_finite=True)
            except (ValueError, TypeError) as error:
                raise type(error)(f"the decoder `{resolved.name}` failed a test call before training: {error}") from error
            except Exception as error:
                message = str(error).splitlines()[0] if str(error) else ""
                raise ValueError(
                    f"the decoder `{resolved.name}` failed a test call on {z.shape[0]} latents of size latent_dim={self.latent_dim} "
                    f"before training ({type(error).__name__}: {message}). Check that `decoder` names the decoder and "
                    "`latent_dim` its latent size (`latent_shape` for a decoder that takes latents of another shape, "
                    "`conditions` / `num_classes` for a conditional one)."
                ) from error

    def pictures(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        latents: Tensor,
        image_shape: Sequence[int] | None = None,
        *,
        num_samples: int | None = None,
        state: dict[str, Tensor] | None = None,
    ) -> LatentPictures | None:
        """:func:`~lightning_mem.pictures.latent_pictures` of ``latents`` (e.g. the top of the spectrum) at the first
        ``num_samples`` latents of the run (default :data:`PICTURE_SAMPLES`), in
        :func:`~lightning_mem.evaluation.evaluation_mode`, of the decoder now or with the weights ``state`` (a
        :meth:`snapshot`); ``None`` for a decoder whose output is no image, or with callable latents (they may be
        costly to draw again)."""
        if callable(self.latents):
            return None
        z, conditions, _, _ = self._inputs(trainer, pl_module, with_reference=False)
        rows = slice(0, PICTURE_SAMPLES if num_samples is None else num_samples)
        condition = None if conditions is None else conditions[rows]
        resolved = self.resolve(pl_module)
        decoder = resolved.function if state is None else decoder_with_state(resolved, _on(state, pl_module.device))
        with evaluation_mode([pl_module]):
            return latent_pictures(decoder, z[rows], latents, image_shape=image_shape, condition=condition, sigma=self.sigma)

    def snapshot(self, pl_module: LightningModule) -> dict[str, Tensor]:
        """A CPU copy of the decoder's weights now (:func:`~lightning_mem.decoders.state_snapshot` of its owner), to
        evaluate later with ``accumulate(..., state=...)``."""
        return state_snapshot(self.resolve(pl_module).owner)

    def accumulate(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        *,
        start: int = 0,
        stop: int | None = None,
        state: dict[str, Tensor] | None = None,
    ) -> None:
        """This rank's share of the latents ``start:stop`` (default: all) into the metrics, reset first when ``start``
        is 0 (a later call with ``start`` where the previous one stopped extends the same evaluation). With ``state``
        (a :meth:`snapshot`) the decoder is evaluated at those weights instead of its current ones. Call it in
        :func:`~lightning_mem.evaluation.evaluation_mode`, on every rank, then :meth:`compute` on every rank."""
        with self._warnings_once():
            self._pending = self._accumulate(trainer, pl_module, start, stop, state)

    @contextmanager
    def _warnings_once(self) -> Iterator[None]:
        """Give each distinct warning raised inside once per run (each evaluation would repeat the same ones)."""
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield
        finally:
            for warning in caught:
                key = (warning.category, str(warning.message))
                if key not in self._warned:
                    self._warned.add(key)
                    warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)

    def compute(self) -> dict[str, Tensor]:
        """Every rank: sync and finish the metrics (on the CPU), with the ``active/...`` values; only then does the drift
        state move on."""
        values = self._compute()
        values.update(self._active_values(values))
        self.previous, self.previous_jacobians, self.previous_count = self._pending
        self._evaluated = None
        return values

    def _active_values(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every rank: the ``active/...`` values beyond the metric's own: the total correlation of the active latents
        and the drift and reference alignment of their rows (the drift's columns: the same latents, earlier).

        The active latents come from the synced spectrum, so every rank takes the same ones, and its own samples' sums
        add up exactly across ranks. The total correlation needs a second pass over this rank's Jacobians: the ones
        the evaluation kept (no decoder call) or, when they did not fit :data:`MAX_KEPT_JACOBIAN_BYTES`, the active
        columns computed again (``|A|`` of ``d`` forward passes); its seconds are in :attr:`active_seconds`.
        """
        begin = self.clock()
        _, metric = self._set_up()
        active = metric.active_latents(values["latent_entropy"]).mask
        active_values: dict[str, Tensor] = {}
        evaluated = self._evaluated
        if evaluated is not None:  # the kept Jacobians when there are some, else the decoder's active columns again
            active_values["active/total_correlation"] = active_total_correlation(
                metric,
                active,
                total_correlation=values["total_correlation"],
                jacobians=evaluated.kept,
                decoder=evaluated.decoder,
                z=evaluated.z,
                condition=evaluated.condition,
                labels=evaluated.labels,
                mode=self.mode,
                chunk_size=evaluated.chunk_size,
            )
        for group, columns in (("drift", active), ("reference", None)):
            if f"{group}/cross_mutual_information" in values:
                summary = active_alignment(values[f"{group}/cross_mutual_information"], active, columns)
                active_values.update({f"active/{group}/{name}": value for name, value in summary.items()})
        self.active_seconds = self.clock() - begin
        return active_values

    def _inputs(
        self, trainer: Trainer, pl_module: LightningModule, *, device: torch.device | None = None, with_reference: bool = True
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """The full ``(latents, conditions, labels, reference_latents)`` of this evaluation, on the module's device (or
        ``device``); ``with_reference=False`` leaves the reference latents out."""
        device = pl_module.device if device is None else device
        latent_dim, _ = self._set_up()
        dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), torch.get_default_dtype())
        conditions = self.conditions if isinstance(self.conditions, Tensor) else None
        z = self.latents(trainer, pl_module) if callable(self.latents) else self.latents
        if isinstance(z, (tuple, list)):
            z, conditions = z
        if z is None:
            if self._drawn_latents is None:
                self._drawn_latents = prior_latents(self.num_samples, latent_dim, self.seed, sigma=self.sigma)
            z = self._drawn_latents
        if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[1] != latent_dim:
            raise ValueError(f"Expected latents of shape (N, {latent_dim}), but got {getattr(z, 'shape', type(z).__name__)}.")
        n, labels = z.shape[0], None
        if self.num_classes is not None:
            labels = conditions if isinstance(conditions, Tensor) else torch.arange(n) % self.num_classes
            check_labels(labels, self.num_classes, "conditions")
            labels = labels.to(device)
            conditions = self.conditions(labels) if callable(self.conditions) else labels
        if conditions is not None and conditions.shape[0] != n:
            raise ValueError(f"Expected conditions with N == {n} rows (one per latent), but got {tuple(conditions.shape)}.")
        reference = None
        if self.reference_decoder is not None and with_reference:
            reference = self.reference_latents(trainer, pl_module) if callable(self.reference_latents) else self.reference_latents
            reference = z if reference is None else reference
            if not isinstance(reference, Tensor) or reference.ndim != 2 or reference.shape[0] != n:
                raise ValueError(
                    f"Expected `reference_latents` of shape ({n}, d_ref) (one per latent), "
                    f"but got {getattr(reference, 'shape', reference)}."
                )
            parameters = self.reference_decoder.parameters() if isinstance(self.reference_decoder, nn.Module) else ()
            reference = reference.to(device=device, dtype=next((p.dtype for p in parameters if p.is_floating_point()), reference.dtype))
        return z.to(device=device, dtype=dtype), None if conditions is None else conditions.to(device), labels, reference

    def _accumulate(
        self, trainer: Trainer, pl_module: LightningModule, start: int, stop: int | None, state: dict[str, Tensor] | None
    ) -> tuple[dict[str, Tensor] | None, list[Tensor] | None, int | None]:
        """Fill the metrics; return the decoder's state, Jacobians and latent count for the next evaluation's drift."""
        if start == 0:
            self._evaluated = None  # (an earlier evaluation's, if it failed before its compute)
        resolved = self.resolve(pl_module)
        latent_dim, metric = self._set_up()
        device, rank, world_size = pl_module.device, trainer.global_rank, trainer.world_size
        if state is not None:  # earlier weights (the start of training): equal on every rank, as DDP starts them
            current, decoder = state, decoder_with_state(resolved, _on(state, device))
        else:
            decoder, current = resolved.function, state_snapshot(resolved.owner)
            if world_size > 1 and (names := buffer_names(resolved.owner)):
                # Parameters agree across DDP ranks, buffers need not (BatchNorm statistics of each rank's batches):
                # every rank evaluates rank zero's, as the next forward pass (and the saved checkpoint) would.
                buffers = trainer.strategy.broadcast({name: current[name] for name in names}, src=0)
                current.update(buffers)
                decoder = decoder_with_state(resolved, _on(buffers, device))
        z, conditions, labels, reference_z = self._inputs(trainer, pl_module)
        stop = z.shape[0] if stop is None else min(stop, z.shape[0])

        if self.drift and self.previous is not None and self.previous.keys() != current.keys():
            rank_zero_warn(
                "ManifoldEntropicMetricsCallback: the decoder's parameters changed names since the previous evaluation; drift restarts."
            )
            self.previous = self.previous_jacobians = self.previous_count = None
        if reference_z is not None and (self._reference_metric is None or self._reference_metric.reference_dim != reference_z.shape[1]):
            self._reference_metric = ManifoldCrossMutualInformation(
                latent_dim, reference_z.shape[1], std=self.std, sigma=self.sigma, eps=self.eps, num_classes=self.num_classes
            )
        kept: list[Tensor] | None = []
        if start == 0:
            for each in (metric, self._drift_metric, self._reference_metric):
                if each is not None:
                    each.to(device).reset()
        elif self._evaluated is not None:  # extending this evaluation: its Jacobians so far
            kept = self._evaluated.kept
        fixed_inputs = not callable(self.latents) and not callable(self.conditions)
        chunk_size = self._chunk(decoder, z, conditions)
        previous: Callable[..., Any] | None = None  # the decoder at the previous evaluation's weights, made when needed
        for lo, hi, drift_source in self._parts(start, stop, rank, world_size, z.device):
            rows = slice(lo + (rank - lo) % world_size, hi, world_size)  # this rank's latents among lo:hi
            if len(range(*rows.indices(z.shape[0]))) == 0:
                continue
            comparisons = []
            if drift_source == "kept":
                jacobians = self._kept_rows(len(range(rank, lo, world_size)), len(range(rank, hi, world_size)), chunk_size)
                comparisons.append(Comparison(self._drift_metric, jacobians=jacobians))
            elif drift_source == "snapshot":
                previous = previous or decoder_with_state(resolved, _on(self.previous or {}, device))
                comparisons.append(Comparison(self._drift_metric, decoder=previous))
            if reference_z is not None and self._reference_metric is not None:  # (made above)
                comparisons.append(Comparison(self._reference_metric, decoder=self.reference_decoder, latents=reference_z[rows]))
            kept_bytes = 0 if kept is None else sum(j.numel() * j.element_size() for j in kept)
            keep = MAX_KEPT_JACOBIAN_BYTES - kept_bytes if kept is not None else 0
            part = evaluate_decoder(
                decoder,
                z[rows],
                metric,
                condition=None if conditions is None else conditions[rows],
                labels=None if labels is None else labels[rows],
                comparisons=comparisons,
                mode=self.mode,
                chunk_size=chunk_size,
                check_output=True,
                keep_bytes=max(keep, 0),
            )
            kept = None if kept is None or part is None else kept + part
        mine = slice(rank, stop, world_size)  # this rank's latents of the evaluation so far, in the order evaluated
        self._evaluated = _Evaluated(
            decoder,
            z[mine],
            None if conditions is None else conditions[mine],
            None if labels is None else labels[mine],
            kept,
            chunk_size,
        )
        return (current, kept if fixed_inputs else None, stop) if self.drift else (None, None, None)

    def _parts(self, start: int, stop: int, rank: int, world_size: int, device: torch.device) -> list[tuple[int, int, str | None]]:
        """The latents ``start:stop`` in parts ``(lo, hi, drift)``: the drift compares the decoder with the previous
        evaluation's on the latents both took (its ``kept`` Jacobians when they are here, else its ``snapshot``);
        the latents beyond have no drift (``None``)."""
        if not self.drift or self.previous is None:
            return [(start, stop, None)]
        covered = stop if self.previous_count is None else min(stop, self.previous_count)
        kept = self.previous_jacobians or []
        have = len(range(rank, stop if self.previous_count is None else self.previous_count, world_size))
        usable = bool(kept) and kept[0].device == device and sum(int(j.shape[0]) for j in kept) == have
        parts: list[tuple[int, int, str | None]] = [(start, covered, "kept" if usable else "snapshot")] if start < covered else []
        if stop > max(start, covered):
            parts.append((max(start, covered), stop, None))
        return parts

    def _kept_rows(self, first: int, last: int, chunk_size: int | None) -> list[Tensor]:
        """Rows ``first:last`` of this rank's kept Jacobians, in chunks of ``chunk_size`` (those of this evaluation)."""
        kept = self.previous_jacobians or []
        step = (last - first) if chunk_size is None else chunk_size
        sizes = [min(step, last - start) for start in range(first, last, step)] if last > first else []
        if first == 0 and [j.shape[0] for j in kept] == sizes:
            return kept
        return list(torch.cat(kept)[first:last].split(step)) if last > first else []

    def _chunk(self, decoder: Callable[..., Any], z: Tensor, conditions: Tensor | None) -> int | None:
        """``chunk_size``, or for ``"auto"`` the one :func:`~lightning_mem.budget.auto_chunk_size` picks for all the
        latents ``z`` (once per run, so that every evaluation, whatever its sample count, has the same chunks)."""
        if not isinstance(self.chunk_size, str):  # (the only string is "auto", checked by the callback)
            return self.chunk_size
        if self._auto_chunk is None:
            self._auto_chunk = auto_chunk_size(decoder, z, condition=conditions)
        return self._auto_chunk

    def _compute(self) -> dict[str, Tensor]:
        """Every rank: sync and finish the metrics (rank-zero-only compute would deadlock the sync)."""
        _, metric = self._set_up()
        values = {**metric.compute(), **metric.diagnostics()}
        if self.drift and self.previous is not None:
            values.update({f"drift/{name}": value for name, value in self._drift_metric.compute().items()})
        if self.reference_decoder is not None and self._reference_metric is not None:
            values.update({f"reference/{name}": value for name, value in self._reference_metric.compute().items()})
        if self.num_classes is None:
            values.pop("num_classes_seen")
        return {name: value.detach().cpu() for name, value in values.items()}


class _Evaluated(NamedTuple):
    """What an evaluation took on this rank, for the pass over its active latents: the decoder and its inputs
    (``z``, ``condition``, ``labels``), the Jacobians when ``kept`` (else ``None``), the ``chunk_size``."""

    decoder: Callable[..., Any]
    z: Tensor
    condition: Tensor | None
    labels: Tensor | None
    kept: list[Tensor] | None
    chunk_size: int | None


def _on(state: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """``state`` with every tensor on ``device``."""
    return {name: tensor.to(device) for name, tensor in state.items()}
