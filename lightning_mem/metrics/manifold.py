"""torchmetrics ``Metric`` classes accumulating summable Jacobian statistics across batches and processes."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

from lightning_mem._checks import check_positive_float, check_positive_int, check_scale
from lightning_mem.functional.active import ActiveLatents, active_latents, pairwise_summary
from lightning_mem.functional.alignment import alignment_summary
from lightning_mem.functional.manifold import entropy_spectrum
from lightning_mem.functional.statistics import (
    DEFAULT_EPS,
    CrossStatistics,
    GramStatistics,
    batch_statistics,
    cross_statistics,
    finish_entropy,
    finish_mutual_information,
    finish_total_correlation,
)
from lightning_mem.plotting import plot_entropy_spectrum, plot_mutual_information

__all__ = [
    "ManifoldCrossMutualInformation",
    "ManifoldEntropicMetrics",
    "ManifoldEntropy",
    "ManifoldPairwiseMutualInformation",
    "ManifoldTotalCorrelation",
]


def _as_list(value: Tensor | float | None) -> list[float] | None:
    """A scale setting as a plain list of floats (comparable, hashable through ``repr``), ``None`` kept."""
    return None if value is None else torch.as_tensor(value, dtype=torch.float64).flatten().tolist()


def _setting(value: Tensor) -> str:
    """A configuration entry for a message: sizes as ints (0 meaning none), ``eps`` as a float."""
    number = float(value)
    return "None" if number == 0 else str(int(number)) if number.is_integer() and number >= 1 else repr(number)


class _SumMetric(Metric):
    """Float64 sum states (one row per class), their validation, and the diagnostics shared by every metric here."""

    is_differentiable = False
    full_state_update = False
    _statistics: type[GramStatistics] | type[CrossStatistics] = GramStatistics
    # states, made by `add_state` (torch's `Module.__getattr__` would type them `Tensor | Module`)
    count: Tensor
    pairwise: Tensor
    configuration: Tensor

    def __init__(
        self,
        latent_dim: int,
        *,
        std: Tensor | float | None,
        sigma: Tensor | None,
        eps: float,
        num_classes: int | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_positive_int(latent_dim, "latent_dim")
        check_positive_float(eps, "eps")
        check_positive_int(num_classes, "num_classes", allow_none=True)
        if sigma is not None:
            sigma = check_scale(sigma, "sigma", latent_dim).reshape(latent_dim)
        if std is not None:
            check_scale(std, "std")
        self.latent_dim = latent_dim
        self.std = std
        self.sigma = sigma
        self.eps = eps
        self.num_classes = num_classes

    def _configuration(self) -> dict[str, Any]:
        """What decides the sums an ``update`` adds: metrics that differ in it must never add up or share states."""
        return {
            "latent_dim": self.latent_dim,
            "reference_dim": getattr(self, "reference_dim", None),
            "num_classes": self.num_classes,
            "eps": self.eps,
            "std": _as_list(self.std),
            "sigma": _as_list(self.sigma),
            "reference_sigma": _as_list(getattr(self, "reference_sigma", None)),
        }

    def _configuration_state(self) -> Tensor:
        """The configuration as a float64 state: the sizes, ``eps``, and 8 bytes (0..255) of a SHA-256 of all of it.

        A state, so that ``MetricCollection`` (which lets metrics whose states are equal after the first update share
        one set of states) never groups metrics of different configurations; reduced with ``max`` (equal everywhere),
        kept by ``reset``. The bytes differ by at least 1 where any setting differs, beyond ``torch.allclose``.
        """
        configuration = self._configuration()
        digest = hashlib.sha256(repr(sorted(configuration.items())).encode()).digest()[:8]
        sizes = [float(configuration[key] or 0) for key in ("latent_dim", "reference_dim", "num_classes")]
        return torch.tensor([*sizes, float(self.eps), *digest], dtype=torch.float64)

    def _add_sum_states(self, shapes: dict[str, tuple[int, ...]]) -> None:
        rows = 1 if self.num_classes is None else self.num_classes
        for name, shape in shapes.items():
            self.add_state(name, default=torch.zeros((rows, *shape), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("configuration", default=self._configuration_state(), dist_reduce_fx="max")

    def _apply(self, fn: Any, exclude_state: Any = ()) -> Metric:
        """Move the states with the module (``.to(device)``, ``.cuda()``) but keep them float64 whatever the dtype
        asked for (``.to(torch.float16)``, ``.half()``, ``.bfloat16()``, ``set_dtype``): sums of many float64 terms and
        counts above 2048 do not survive a cast to half precision."""
        super()._apply(fn, exclude_state=tuple(self._defaults))  # moves (and casts) this metric in place
        for name, default in self._defaults.items():
            if isinstance(default, Tensor):  # (every state here is one: no list states)
                self._defaults[name] = default.to(device=self.device, dtype=torch.float64)
                setattr(self, name, getattr(self, name).to(device=self.device, dtype=torch.float64))
        return self

    def _check_compatible(self, states: dict[str, Any], source: str) -> None:
        """Raise a ``ValueError`` naming what differs between ``states`` (from ``source``) and this metric's states."""
        incoming = states.get("configuration")
        # compared in the incoming precision (a state dict cast to float32 still matches: the digest bytes are exact)
        own = self.configuration.to(device=incoming.device, dtype=incoming.dtype) if isinstance(incoming, Tensor) else None
        if isinstance(incoming, Tensor) and own is not None and incoming.shape == own.shape and not torch.equal(incoming, own):
            names = ("latent_dim", "reference_dim", "num_classes", "eps")
            differences = [
                f"{name} ({_setting(own[i])} here, {_setting(incoming[i])} in the {source})"
                for i, name in enumerate(names)
                if float(own[i]) != float(incoming[i])
            ]
            if not differences:
                differences = ["std, sigma or reference_sigma"]
            raise ValueError(
                f"Expected the {source} of a {type(self).__name__} with the same configuration, but it differs in "
                f"{', '.join(differences)}: its sums measure something else."
            )
        for name in self._defaults:
            value = states.get(name)
            if isinstance(value, Tensor) and tuple(value.shape) != tuple(getattr(self, name).shape):
                raise ValueError(
                    f"Expected state `{name}` of shape {tuple(getattr(self, name).shape)} in the {source} "
                    f"(latent_dim={self.latent_dim}, num_classes={self.num_classes}), but got {tuple(value.shape)}: "
                    "it comes from a metric with another latent_dim, reference_dim or num_classes."
                )

    def _accumulate(self, statistics: GramStatistics | CrossStatistics) -> None:
        for name, value in zip(statistics._fields, statistics, strict=True):
            setattr(self, name, getattr(self, name) + value.detach().to(getattr(self, name).device))

    @property
    def statistics(self) -> GramStatistics | CrossStatistics:
        """The accumulated sums of this process (synced across processes inside ``compute``)."""
        return self._statistics(*(getattr(self, name) for name in self._statistics._fields))

    def merge_state(self, incoming_state: dict[str, Tensor] | Metric) -> None:
        """Add another metric's (or a state dict's) sums to this one; the cached ``compute`` value is dropped.

        Raises:
            ValueError: if the other metric is of another class or configuration (``latent_dim``, ``reference_dim``,
                ``num_classes``, ``eps``, ``std``, ``sigma``, ``reference_sigma``), or a state has another shape.
        """
        if isinstance(incoming_state, _SumMetric):
            if type(incoming_state) is not type(self):
                raise ValueError(f"Expected a {type(self).__name__} to merge, but got a {type(incoming_state).__name__}.")
            mine, theirs = self._configuration(), incoming_state._configuration()
            differences = [f"{key} ({mine[key]!r} here, {theirs[key]!r} incoming)" for key in mine if mine[key] != theirs[key]]
            if differences:
                raise ValueError(
                    f"Expected a {type(self).__name__} with the same configuration to merge, but it differs in "
                    f"{', '.join(differences)}: its sums measure something else and cannot be added to these."
                )
        elif isinstance(incoming_state, dict):
            self._check_compatible(incoming_state, "incoming state")
            incoming_state = {**incoming_state, "configuration": incoming_state.get("configuration", self.configuration)}
            incoming_state = {
                name: value.to(device=self.device, dtype=torch.float64) if isinstance(value, Tensor) else value
                for name, value in incoming_state.items()
            }
        super().merge_state(incoming_state)
        self._computed = None  # torchmetrics keeps the value cached by an earlier compute() otherwise

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Load persistent states, checked first: a state dict of another configuration or shape raises a ``ValueError``
        here, at load time (not later in ``compute``); one without ``configuration`` (older) keeps this metric's."""
        states = {name: state_dict[prefix + name] for name in self._defaults if prefix + name in state_dict}
        self._check_compatible(states, "state dict")
        for name, value in states.items():
            if isinstance(value, Tensor):
                state_dict[prefix + name] = value.to(device=self.device, dtype=torch.float64)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _classes_seen(self) -> Tensor:
        """Number of classes with samples, warning about classes never seen (call on synced states)."""
        seen = self.count > 0
        if self.num_classes is not None and 0 < int(seen.sum()) < self.num_classes:
            missing = (~seen).nonzero().flatten().tolist()
            rank_zero_warn(
                f"{type(self).__name__}: {len(missing)} of {self.num_classes} classes had no samples (classes {missing[:10]}"
                f"{'...' if len(missing) > 10 else ''}); the result averages the {int(seen.sum())} classes seen.",
                category=UserWarning,
            )
        return seen.sum()

    def diagnostics(self) -> dict[str, Tensor]:
        """Counts about the accumulated samples (not metric values), synced across processes like ``compute``.

        ``num_samples`` ``()``; ``num_classes_seen`` ``()``; for the Gram metrics also ``num_inactive_samples``
        ``(d,)`` (samples whose column ``i`` was inactive: :math:`G_{ii} \\le` ``eps`` :math:`\\max_j G_{jj}`) and,
        except for the pairwise metric, ``num_fallback`` ``()`` (ill-conditioned samples, whose log-determinant was
        taken from the Jacobian itself, not from the Cholesky factor of :math:`G`: a QR factorisation, refined where
        needed, or singular values where the columns are numerically dependent; from Gram input, eigenvalues; see
        :func:`~lightning_mem.functional.statistics.batch_statistics`). Every process must call it under DDP.
        """
        with self.sync_context(dist_sync_fn=self.dist_sync_fn):
            counts = {"num_samples": self.count.sum(), "num_classes_seen": (self.count > 0).sum()}
            for name, state in (("num_inactive_samples", "num_inactive"), ("num_fallback", "num_fallback")):
                if hasattr(self, state):
                    counts[name] = getattr(self, state).sum(0)
            return {name: value.clone() for name, value in counts.items()}


class _GramMetric(_SumMetric):
    """States: float64 sums of :class:`~lightning_mem.functional.statistics.GramStatistics`, one row per class."""

    _pairwise_only = False

    def __init__(
        self,
        latent_dim: int,
        *,
        std: Tensor | float | None = None,
        sigma: Tensor | None = None,
        eps: float = DEFAULT_EPS,
        num_classes: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(latent_dim, std=std, sigma=sigma, eps=eps, num_classes=num_classes, **kwargs)
        d = latent_dim
        shapes = {"count": (), "pairwise": (d, d)}
        if not self._pairwise_only:
            shapes.update({"log_diag": (d,), "log_det": (), "num_inactive": (d,), "num_fallback": ()})
        self._add_sum_states(shapes)

    def update(self, jacobian: Tensor | None = None, labels: Tensor | None = None, *, gram: Tensor | None = None) -> None:
        """Add a batch of decoder Jacobians ``(N, *output_shape, d)`` (or, as ``gram=``, their Gram matrices ``(N, d, d)``).

        ``labels`` ``(N,)`` are required in class-conditional mode (``num_classes`` set) and refused otherwise.
        """
        statistics = batch_statistics(
            jacobian,
            gram,
            std=self.std,
            sigma=self.sigma,
            eps=self.eps,
            labels=labels,
            num_classes=self.num_classes,
            latent_dim=self.latent_dim,
            pairwise_only=self._pairwise_only,
        )
        self._accumulate(statistics)

    def _gram_statistics(self) -> GramStatistics:
        """:attr:`statistics` of a metric that keeps every Gram sum (all but the pairwise-only one)."""
        return GramStatistics(*(getattr(self, name) for name in GramStatistics._fields))


class _EntropyMetric(_GramMetric):
    """The entropy values shared by :class:`ManifoldEntropy` and :class:`ManifoldEntropicMetrics`."""

    def __init__(self, latent_dim: int, *, active_threshold: float | None = None, **kwargs: Any) -> None:
        super().__init__(latent_dim, **kwargs)
        if active_threshold is not None:
            check_positive_float(active_threshold, "active_threshold")
        # how `compute` reads the sums, not what `update` adds: metrics with different thresholds may merge their states
        self.active_threshold = active_threshold

    def active_latents(self, latent_entropy: Tensor) -> ActiveLatents:
        """The active latents of ``latent_entropy`` by this metric's rule: the spectrum's shape
        (``active_threshold=None``; latents at this metric's ``eps`` floor are dead) or the absolute threshold
        (:func:`~lightning_mem.functional.active_latents`)."""
        return active_latents(latent_entropy, threshold=self.active_threshold, eps=self.eps)

    def _entropy_values(self) -> dict[str, Tensor]:
        self._classes_seen()
        latent_entropy, entropy = finish_entropy(self._gram_statistics())
        spectrum, order = entropy_spectrum(latent_entropy)
        return {
            "entropy": entropy,
            "entropy_per_dim": entropy / self.latent_dim,
            "latent_entropy": latent_entropy,
            "spectrum": spectrum,
            "spectrum_order": order,
            "num_active": self.active_latents(latent_entropy).num_active,
        }

    def plot(self, val: dict[str, Tensor] | None = None, ax: Any = None, log_x: bool = False) -> tuple[Any, Any]:
        """Entropy spectrum (nats/dim against sorted latent index); returns ``(figure, axes)``."""
        val = self.compute() if val is None else val
        return plot_entropy_spectrum(val["spectrum"], ax=ax, log_x=log_x)


class ManifoldEntropy(_EntropyMetric):
    r"""Per-latent manifold entropies, the total manifold entropy and the entropy spectrum, accumulated over batches.

    .. math::
        H_i = h_0 + \tfrac12 \mathbb{E}_z[\log G_{ii}], \qquad H = d\,h_0 + \tfrac12 \mathbb{E}_z[\log\det G].

    States are float64 sums (of :math:`\log G_{ii}`, :math:`\log\det G`, ...) and a count, reduced with ``sum``
    across processes, so a run split over processes gives the same result as one process.

    Args:
        latent_dim: number of latents ``d``.
        std: data scale (scalar or per output entry), see :func:`lightning_mem.functional.manifold_entropy`.
        sigma: latent scale ``(d,)``.
        eps: relative floor: in each sample, column ``i`` is inactive when :math:`G_{ii} \le \epsilon \max_j G_{jj}`
            (counted in :meth:`diagnostics`; see :func:`lightning_mem.functional.manifold_entropy`).
        num_classes: class-conditional mode: ``update(jacobian, labels)`` accumulates per class, ``compute`` averages
            the classes seen (and warns about classes never seen).
        active_threshold: ``None``: ``num_active`` counts the latents above the plateau of switched-off latents at
            the bottom of the spectrum (:func:`~lightning_mem.functional.active_latents`, free of the number of output
            dims and of the data scale); a positive float: the latents with :math:`\exp(H_i - h_0)` above it (the
            geometric-mean column norm in data units). It only changes how ``compute`` reads the sums, so it is no
            part of the configuration that ``merge_state`` checks.
        kwargs: passed to :class:`torchmetrics.Metric`.

    ``compute()`` returns a dict (keys of the README's vocabulary table): ``entropy`` ``()`` (:math:`H`),
    ``entropy_per_dim`` ``()`` (:math:`H/d`), ``latent_entropy`` ``(d,)`` (the :math:`H_i`), ``spectrum`` ``(d,)``
    (descending), ``spectrum_order`` ``(d,)`` long, ``num_active`` ``()``. Counts are in :meth:`diagnostics`.

    Raises:
        ValueError: for invalid arguments; in ``update`` for a Jacobian of another latent size; in ``compute`` before
            any ``update``.

    Example:
        >>> metric = ManifoldEntropy(latent_dim=2)
        >>> metric.update(torch.tensor([[[1.0, 0.0], [0.0, 0.5]]]))
        >>> result = metric.compute()
        >>> result["spectrum_order"], result["num_active"]
        (tensor([0, 1]), tensor(2))

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
    """

    higher_is_better = None

    def compute(self) -> dict[str, Tensor]:
        """Finish the accumulated sums."""
        return self._entropy_values()


class ManifoldTotalCorrelation(_GramMetric):
    r"""Manifold total correlation of the latents, accumulated over batches (lower is more disentangled).

    .. math:: \mathrm{MTC} = \tfrac12 \mathbb{E}_z\Big[\sum_i \log G_{ii} - \log\det G\Big] \ge 0.

    Arguments as in :class:`ManifoldEntropy`, and ``per_dim`` (divide by ``d``, nats/dim); ``compute()`` returns a
    scalar float64 tensor, so ``self.log("mtc", metric)`` works in a LightningModule.

    Example:
        >>> metric = ManifoldTotalCorrelation(latent_dim=2)
        >>> metric.update(torch.tensor([[[1.0, 1.0], [0.0, 1.0]]]))
        >>> metric.compute()
        tensor(0.3466, dtype=torch.float64)

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
    """

    higher_is_better = False
    plot_lower_bound = 0.0

    def __init__(self, latent_dim: int, *, per_dim: bool = False, **kwargs: Any) -> None:
        super().__init__(latent_dim, **kwargs)
        self.per_dim = per_dim

    def compute(self) -> Tensor:
        """Finish the accumulated sums."""
        self._classes_seen()
        return finish_total_correlation(self._gram_statistics(), per_dim=self.per_dim)

    def plot(self, val: Tensor | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Value (or a sequence of values over time) as torchmetrics plots a scalar; returns ``(figure, axes)``."""
        return self._plot(val, ax)


class ManifoldPairwiseMutualInformation(_GramMetric):
    r"""Manifold pairwise mutual information matrix of the latents, accumulated over batches.

    .. math:: \mathrm{MPMI}_{ij} = -\tfrac12 \mathbb{E}_z[\log(1 - \rho_{ij}^2)], \quad \rho_{ij} = G_{ij}/\sqrt{G_{ii}G_{jj}}.

    Arguments as in :class:`ManifoldEntropy`; ``compute()`` returns the symmetric ``(d, d)`` float64 matrix with zero
    diagonal. Only the pairwise sums are kept (no log-determinants are computed).

    Example:
        >>> metric = ManifoldPairwiseMutualInformation(latent_dim=2)
        >>> metric.update(torch.tensor([[[1.0, 1.0], [0.0, 1.0]]]))
        >>> metric.compute()
        tensor([[0.0000, 0.3466],
                [0.3466, 0.0000]], dtype=torch.float64)

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
    """

    higher_is_better = False
    _pairwise_only = True
    _statistics = CrossStatistics

    def compute(self) -> Tensor:
        """Finish the accumulated sums."""
        self._classes_seen()
        return finish_mutual_information(self.statistics)

    def plot(self, val: Tensor | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Heatmap of the MPMI matrix with a colour bar; returns ``(figure, axes)``."""
        return plot_mutual_information(self.compute() if val is None else val, ax=ax)


class ManifoldEntropicMetrics(_EntropyMetric):
    r"""Every single-decoder manifold entropic metric from one pass over one Jacobian, as a flat dict.

    This is what :class:`~lightning_mem.ManifoldEntropicMetricsCallback` logs. Arguments as in
    :class:`ManifoldEntropy`.

    ``compute()`` keys (the README's vocabulary table):

    - ``entropy`` ``()``: total manifold entropy :math:`H` (nats); ``entropy_per_dim`` ``()``: :math:`H/d`.
    - ``latent_entropy`` ``(d,)``: :math:`H_i`; ``spectrum`` ``(d,)``: sorted descending; ``spectrum_order``
      ``(d,)`` long; ``num_active`` ``()``.
    - ``total_correlation`` ``()`` and ``total_correlation_per_dim`` ``()``.
    - ``pairwise_mutual_information`` ``(d, d)``; ``pairwise_mutual_information_max`` ``()`` and
      ``pairwise_mutual_information_mean`` ``()`` over the off-diagonal pairs (0 when ``d == 1``).
    - ``active/pairwise_mutual_information_max`` ``()`` and ``active/pairwise_mutual_information_mean`` ``()``: the
      same over the pairs of active latents only (the ``num_active`` ones, see :meth:`active_latents`; the sub-block
      of the matrix, 0 with fewer than two active latents): switched-off latents have tiny columns in arbitrary
      directions that look dependent, and these leave them out. The total correlation of the active latents,
      ``active/total_correlation``, needs the log-determinants of the active columns' Gram sub-matrices, which no
      sum over all latents holds: :func:`lightning_mem.evaluation.active_total_correlation` takes a second pass over
      the Jacobians (the callback and ``lightning-mem evaluate`` do).

    Counts (samples, classes seen, inactive columns, ill-conditioned samples) are in :meth:`diagnostics`.

    In a LightningModule, log a dict metric's scalar entries with ``self.log_dict`` at the end of the epoch (``compute``
    already syncs across processes) and a scalar metric such as :class:`ManifoldTotalCorrelation` as the ``Metric``
    object itself (Lightning computes and resets it):

    .. code-block:: python

        class LitAutoencoder(lightning.LightningModule):
            def __init__(self, latent_dim: int):
                super().__init__()
                ...
                self.val_mem = ManifoldEntropicMetrics(latent_dim)
                self.val_total_correlation = ManifoldTotalCorrelation(latent_dim)

            def validation_step(self, batch, batch_idx):
                jacobian = lightning_mem.decoder_jacobian(self.decoder, self.encoder(batch))  # works in inference mode
                self.val_mem.update(jacobian)
                self.val_total_correlation.update(jacobian)
                self.log("val/total_correlation", self.val_total_correlation)

            def on_validation_epoch_end(self):
                values = self.val_mem.compute()
                self.log_dict({f"val/mem/{key}": value.double() for key, value in values.items() if value.ndim == 0})
                self.val_mem.reset()

    ``.double()`` spares Lightning's warning about the integer ``num_active``; the vectors and matrices
    (``latent_entropy``, ``spectrum``, ...) are not scalars and stay out of ``log_dict``.

    In a ``MetricCollection``, torchmetrics flattens dict results into one dict; as soon as two results share a key
    (e.g. ``ManifoldEntropy`` and ``ManifoldEntropicMetrics`` both return ``entropy``) it prefixes every dict
    result's keys with the metric's name in the collection: ``MetricCollection({"entropy": ManifoldEntropy(d),
    "all": ManifoldEntropicMetrics(d)})`` gives ``entropy_entropy``, ``all_entropy``, ``all_total_correlation``, ...
    Metrics with equal settings share one set of states (one update); metrics whose ``eps``, ``std``, ``sigma``,
    ``num_classes`` or sizes differ never do. With :class:`ManifoldCrossMutualInformation` in the collection, pass
    the Jacobians by keyword, ``update(jacobian=J, reference_jacobian=J_ref)``: each metric takes the arguments it
    names (positionally, the reference Jacobian would reach the others as ``labels``, which is refused).

    Example:
        >>> metric = ManifoldEntropicMetrics(latent_dim=2)
        >>> metric.update(torch.tensor([[[1.0, 1.0], [0.0, 1.0]]]))
        >>> values = metric.compute()
        >>> values["total_correlation"], values["pairwise_mutual_information_max"]
        (tensor(0.3466, dtype=torch.float64), tensor(0.3466, dtype=torch.float64))

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
    """

    higher_is_better = None

    def compute(self) -> dict[str, Tensor]:
        """Finish the accumulated sums."""
        values = self._entropy_values()
        total_correlation = finish_total_correlation(self._gram_statistics())
        pairwise = finish_mutual_information(self.statistics)
        active = self.active_latents(values["latent_entropy"]).mask
        values.update(
            {
                "total_correlation": total_correlation,
                "total_correlation_per_dim": total_correlation / self.latent_dim,
                "pairwise_mutual_information": pairwise,
                **pairwise_summary(pairwise),
                **{f"active/{name}": value for name, value in pairwise_summary(pairwise, active).items()},
            }
        )
        return values


class ManifoldCrossMutualInformation(_SumMetric):
    r"""Manifold cross-pairwise mutual information between a model decoder and a reference decoder, and alignment.

    .. math::
        \mathrm{MCPMI}_{ij} = -\tfrac12 \mathbb{E}[\log(1 - \rho_{ij}^2)], \quad
        \rho_{ij} = \frac{\langle a_i, b_j\rangle}{\|a_i\|\,\|b_j\|}, \qquad
        r_{ij} = \sqrt{1 - e^{-2\,\mathrm{MCPMI}_{ij}}} \in [0, 1),

    with :math:`a_i` column ``i`` of the model's Jacobian and :math:`b_j` column ``j`` of the reference's, both at the
    same data point. :math:`r_{ij}` is Linfoot's informational correlation (for a single sample it is
    :math:`|\rho_{ij}|`, the absolute cosine).

    Args:
        latent_dim: model latents ``d``.
        reference_dim: reference latents ``d_ref``.
        std: data scale shared by both decoders; sigma, reference_sigma: latent scales.
        eps, num_classes, kwargs: as in :class:`ManifoldEntropy`.

    In a ``MetricCollection`` with single-decoder metrics, update by keyword: ``update(jacobian=J,
    reference_jacobian=J_ref)`` (see :class:`ManifoldEntropicMetrics`).

    ``compute()`` returns ``cross_mutual_information`` ``(d, d_ref)`` and the keys of
    :func:`~lightning_mem.functional.alignment_summary`: ``informational_correlation`` ``(d, d_ref)``,
    ``best_match`` ``(d,)`` long, ``best_match_score`` ``(d,)``, ``alignment`` ``()``, ``num_matched`` ``()``, and
    for ``d == d_ref`` ``self_correlation``, ``cross_mutual_information_diag``, ``num_rematched``.

    Example:
        >>> metric = ManifoldCrossMutualInformation(latent_dim=2, reference_dim=2)
        >>> metric.update(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[[0.0, 2.0], [1.0, 0.0]]]))
        >>> result = metric.compute()
        >>> result["best_match"], round(float(result["alignment"]), 6), int(result["num_rematched"])
        (tensor([1, 0]), 1.0, 2)

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
        E. H. Linfoot, *An informational measure of correlation*, Information and Control 1(1), 1957.
    """

    higher_is_better = None
    _statistics = CrossStatistics

    def __init__(
        self,
        latent_dim: int,
        reference_dim: int,
        *,
        std: Tensor | float | None = None,
        sigma: Tensor | None = None,
        reference_sigma: Tensor | None = None,
        eps: float = DEFAULT_EPS,
        num_classes: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(latent_dim, std=std, sigma=sigma, eps=eps, num_classes=num_classes, **kwargs)
        check_positive_int(reference_dim, "reference_dim")
        if reference_sigma is not None:
            reference_sigma = check_scale(reference_sigma, "reference_sigma", reference_dim).reshape(reference_dim)
        self.reference_dim = reference_dim
        self.reference_sigma = reference_sigma
        self._add_sum_states({"count": (), "pairwise": (latent_dim, reference_dim)})

    def update(self, jacobian: Tensor, reference_jacobian: Tensor, labels: Tensor | None = None) -> None:
        """Add Jacobians of the model ``(N, *output_shape, d)`` and of the reference ``(N, *output_shape, d_ref)``."""
        statistics = cross_statistics(
            jacobian,
            reference_jacobian,
            std=self.std,
            sigma=self.sigma,
            reference_sigma=self.reference_sigma,
            eps=self.eps,
            labels=labels,
            num_classes=self.num_classes,
            latent_dim=self.latent_dim,
            reference_dim=self.reference_dim,
        )
        self._accumulate(statistics)

    def compute(self) -> dict[str, Tensor]:
        """Finish the accumulated sums."""
        self._classes_seen()
        cross = finish_mutual_information(self.statistics)
        return {"cross_mutual_information": cross, **alignment_summary(cross)}

    def plot(self, val: dict[str, Tensor] | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Heatmap of the MCPMI matrix (model latents by reference latents); returns ``(figure, axes)``."""
        val = self.compute() if val is None else val
        return plot_mutual_information(
            val["cross_mutual_information"],
            ax=ax,
            title="Manifold cross-pairwise mutual information",
            xlabel="reference latent j",
            ylabel="model latent i",
        )
