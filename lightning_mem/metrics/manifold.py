"""torchmetrics ``Metric`` classes accumulating summable Jacobian statistics across batches and processes."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

from lightning_mem.functional.manifold import entropy_spectrum
from lightning_mem.functional.statistics import (
    DEFAULT_ACTIVE_THRESHOLD,
    DEFAULT_EPS,
    CrossStatistics,
    GramStatistics,
    batch_statistics,
    check_jacobian,
    cross_statistics,
    finish_cross_mutual_information,
    finish_entropy,
    finish_pairwise_mutual_information,
    finish_total_correlation,
    num_active_latents,
)
from lightning_mem.plotting import plot_entropy_spectrum, plot_mutual_information

__all__ = [
    "ManifoldCrossMutualInformation",
    "ManifoldEntropicMetrics",
    "ManifoldEntropy",
    "ManifoldPairwiseMutualInformation",
    "ManifoldTotalCorrelation",
]


def _positive_int(value: Any, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive int{' or None' if allow_none else ''}, but got {value!r}.")


def _positive_float(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"Expected `{name}` to be a positive finite float, but got {value!r}.")


class _ClassConditionalMetric(Metric):
    """Validation and the class-row bookkeeping shared by every metric here."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, latent_dim: int, *, eps: float, num_classes: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _positive_int(latent_dim, "latent_dim")
        _positive_float(eps, "eps")
        _positive_int(num_classes, "num_classes", allow_none=True)
        self.latent_dim = latent_dim
        self.eps = eps
        self.num_classes = num_classes

    def _add_sum_states(self, shapes: dict[str, tuple[int, ...]]) -> None:
        rows = 1 if self.num_classes is None else self.num_classes
        for name, shape in shapes.items():
            self.add_state(name, default=torch.zeros((rows, *shape), dtype=torch.float64), dist_reduce_fx="sum")

    def _accumulate(self, statistics: GramStatistics | CrossStatistics) -> None:
        for name, value in zip(statistics._fields, statistics, strict=True):
            setattr(self, name, getattr(self, name) + value.detach().to(getattr(self, name).device))

    def merge_state(self, incoming_state: dict[str, Tensor] | Metric) -> None:
        """Add another metric's (or a state dict's) sums to this one; the cached ``compute`` value is dropped."""
        super().merge_state(incoming_state)
        self._computed = None  # torchmetrics keeps the value cached by an earlier compute() otherwise

    def _num_classes_seen(self) -> Tensor:
        seen = self.count > 0
        if self.num_classes is not None and 0 < int(seen.sum()) < self.num_classes:
            missing = (~seen).nonzero().flatten().tolist()
            rank_zero_warn(
                f"{type(self).__name__}: {len(missing)} of {self.num_classes} classes had no samples (classes {missing[:10]}"
                f"{'...' if len(missing) > 10 else ''}); the result averages the {int(seen.sum())} classes seen.",
                category=UserWarning,
            )
        return seen.sum()


class _GramMetric(_ClassConditionalMetric):
    """States: float64 sums of :class:`~lightning_mem.functional.statistics.GramStatistics`, one row per class."""

    def __init__(
        self,
        latent_dim: int,
        *,
        std: Tensor | float | None = None,
        sigma: Tensor | None = None,
        per_dim: bool = False,
        eps: float = DEFAULT_EPS,
        num_classes: int | None = None,
        active_threshold: float = DEFAULT_ACTIVE_THRESHOLD,
        **kwargs: Any,
    ) -> None:
        super().__init__(latent_dim, eps=eps, num_classes=num_classes, **kwargs)
        _positive_float(active_threshold, "active_threshold")
        if sigma is not None and torch.as_tensor(sigma).numel() != latent_dim:
            shape = tuple(torch.as_tensor(sigma).shape)
            raise ValueError(f"Expected `sigma` of shape ({latent_dim},) (one scale per latent), but got {shape}.")
        self.std = std
        self.sigma = sigma
        self.per_dim = per_dim
        self.active_threshold = active_threshold
        d = latent_dim
        self._add_sum_states({"count": (), "log_diag": (d,), "log_det": (), "pairwise": (d, d), "num_inactive": (d,), "num_fallback": ()})

    def update(self, jacobian: Tensor | None = None, labels: Tensor | None = None, *, gram: Tensor | None = None) -> None:
        """Add a batch of decoder Jacobians ``(N, *output_shape, d)`` (or, as ``gram=``, their Gram matrices ``(N, d, d)``).

        ``labels`` ``(N,)`` are required in class-conditional mode (``num_classes`` set) and refused otherwise.
        """
        if jacobian is not None:  # finiteness is checked once, on the Gram diagonal, by `batch_statistics`
            check_jacobian(jacobian, latent_dim=self.latent_dim, check_finite=False)
        elif gram is not None and (gram.ndim != 3 or gram.shape[-1] != self.latent_dim):
            raise ValueError(f"Expected `gram` of shape (N, {self.latent_dim}, {self.latent_dim}), but got {tuple(gram.shape)}.")
        statistics = batch_statistics(
            jacobian, gram, std=self.std, sigma=self.sigma, eps=self.eps, labels=labels, num_classes=self.num_classes
        )
        self._accumulate(statistics)

    def update_gram(self, gram: Tensor, labels: Tensor | None = None) -> None:
        """Add a batch of Gram matrices ``G = J^T J`` of shape ``(N, d, d)`` (same as ``update(gram=gram)``)."""
        self.update(gram=gram, labels=labels)

    @property
    def statistics(self) -> GramStatistics:
        """The accumulated sums (synced across processes inside ``compute``)."""
        return GramStatistics(*(getattr(self, name) for name in GramStatistics._fields))

    def _entropy_values(self) -> dict[str, Tensor]:
        entropy_per_latent, total = finish_entropy(self.statistics, per_dim=self.per_dim)
        spectrum, order = entropy_spectrum(entropy_per_latent)
        return {
            "per_dim": entropy_per_latent,
            "total": total,
            "spectrum": spectrum,
            "order": order,
            "num_active": num_active_latents(entropy_per_latent, self.active_threshold),
        }


class ManifoldEntropy(_GramMetric):
    r"""Per-latent manifold entropies, the total manifold entropy and the entropy spectrum, accumulated over batches.

    .. math::
        H_i = h_0 + \tfrac12 \mathbb{E}_z[\log G_{ii}], \qquad H = d\,h_0 + \tfrac12 \mathbb{E}_z[\log\det G].

    States are float64 sums (of :math:`\log G_{ii}`, :math:`\log\det G`, ...) and a count, reduced with ``sum``
    across processes, so a run split over processes gives the same result as one process.

    Args:
        latent_dim: number of latents ``d``.
        std: data scale (scalar or per output entry), see :func:`lightning_mem.functional.manifold_entropy`.
        sigma: latent scale ``(d,)``.
        per_dim: divide the total by ``d`` (nats/dim).
        eps: floor on :math:`G_{ii}`; columns at or below it count as inactive samples.
        num_classes: class-conditional mode: ``update(jacobian, labels)`` accumulates per class, ``compute`` averages
            the classes seen (and warns about classes never seen).
        active_threshold: a latent is active when :math:`\exp(H_i - h_0)` exceeds it.
        kwargs: passed to :class:`torchmetrics.Metric`.

    ``compute()`` returns a dict: ``per_dim`` ``(d,)`` (the :math:`H_i`), ``total`` ``()``, ``spectrum`` ``(d,)``
    (descending), ``order`` ``(d,)`` long, ``num_active`` ``()``, ``num_inactive_samples`` ``(d,)`` (samples whose
    column was floored), ``num_classes_seen`` ``()``.

    Raises:
        ValueError: for invalid arguments; in ``update`` for a Jacobian of another latent size; in ``compute`` before
            any ``update``.

    Example:
        >>> metric = ManifoldEntropy(latent_dim=2)
        >>> metric.update(torch.tensor([[[1.0, 0.0], [0.0, 0.5]]]))
        >>> result = metric.compute()
        >>> result["order"], result["num_active"]
        (tensor([0, 1]), tensor(2))

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
    """

    higher_is_better = None

    def compute(self) -> dict[str, Tensor]:
        """Finish the accumulated sums."""
        values = self._entropy_values()
        values["num_inactive_samples"] = self.num_inactive.sum(0)
        values["num_classes_seen"] = self._num_classes_seen()
        return values

    def plot(self, val: dict[str, Tensor] | None = None, ax: Any = None, log_x: bool = False) -> tuple[Any, Any]:
        """Entropy spectrum (nats/dim against sorted latent index); returns ``(figure, axes)``."""
        val = self.compute() if val is None else val
        return plot_entropy_spectrum(val["spectrum"], ax=ax, log_x=log_x)


class ManifoldTotalCorrelation(_GramMetric):
    r"""Manifold total correlation of the latents, accumulated over batches (lower is more disentangled).

    .. math:: \mathrm{MTC} = \tfrac12 \mathbb{E}_z\Big[\sum_i \log G_{ii} - \log\det G\Big] \ge 0.

    Arguments as in :class:`ManifoldEntropy`; ``compute()`` returns a scalar float64 tensor.

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

    def compute(self) -> Tensor:
        """Finish the accumulated sums."""
        self._num_classes_seen()
        return finish_total_correlation(self.statistics, per_dim=self.per_dim)

    def plot(self, val: Tensor | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Value (or a sequence of values over time) as torchmetrics plots a scalar; returns ``(figure, axes)``."""
        return self._plot(val, ax)


class ManifoldPairwiseMutualInformation(_GramMetric):
    r"""Manifold pairwise mutual information matrix of the latents, accumulated over batches.

    .. math:: \mathrm{MPMI}_{ij} = -\tfrac12 \mathbb{E}_z[\log(1 - \rho_{ij}^2)], \quad \rho_{ij} = G_{ij}/\sqrt{G_{ii}G_{jj}}.

    Arguments as in :class:`ManifoldEntropy`; ``compute()`` returns the symmetric ``(d, d)`` float64 matrix with zero
    diagonal.

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

    def compute(self) -> Tensor:
        """Finish the accumulated sums."""
        self._num_classes_seen()
        return finish_pairwise_mutual_information(self.statistics)

    def plot(self, val: Tensor | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Heatmap of the MPMI matrix with a colour bar; returns ``(figure, axes)``."""
        return plot_mutual_information(self.compute() if val is None else val, ax=ax)


class ManifoldEntropicMetrics(_GramMetric):
    r"""Every single-decoder manifold entropic metric from one pass over one Jacobian, as a flat dict.

    This is what :class:`~lightning_mem.ManifoldEntropicMetricsCallback` logs. Arguments as in
    :class:`ManifoldEntropy` (``per_dim`` is ignored: both the totals and their per-dim versions are returned).

    ``compute()`` keys (stable):

    - ``entropy`` ``()``: total manifold entropy :math:`H` (nats); ``entropy_per_dim`` ``()``: :math:`H/d`.
    - ``latent_entropy`` ``(d,)``: :math:`H_i`; ``spectrum`` ``(d,)``: sorted descending; ``spectrum_order``
      ``(d,)`` long; ``num_active`` ``()``.
    - ``total_correlation`` ``()`` and ``total_correlation_per_dim`` ``()``.
    - ``pairwise_mutual_information`` ``(d, d)``; ``pairwise_mutual_information_max`` ``()`` and
      ``pairwise_mutual_information_mean`` ``()`` over the off-diagonal pairs (0 when ``d == 1``).
    - ``num_fallback`` ``()``: samples whose log-determinant came from the eigenvalue fallback (Cholesky failed or
      was numerically singular); ``num_classes_seen`` ``()``.

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
        d = self.latent_dim
        statistics = self.statistics
        entropy = self._entropy_values()
        total_correlation = finish_total_correlation(statistics)
        pairwise = finish_pairwise_mutual_information(statistics)
        off_diagonal = pairwise[~torch.eye(d, dtype=torch.bool, device=pairwise.device)]
        zero = pairwise.new_zeros(())
        return {
            "entropy": entropy["total"] if not self.per_dim else entropy["total"] * d,
            "entropy_per_dim": entropy["total"] / d if not self.per_dim else entropy["total"],
            "latent_entropy": entropy["per_dim"],
            "spectrum": entropy["spectrum"],
            "spectrum_order": entropy["order"],
            "num_active": entropy["num_active"],
            "total_correlation": total_correlation,
            "total_correlation_per_dim": total_correlation / d,
            "pairwise_mutual_information": pairwise,
            "pairwise_mutual_information_max": off_diagonal.max() if d > 1 else zero,
            "pairwise_mutual_information_mean": off_diagonal.mean() if d > 1 else zero,
            "num_fallback": self.num_fallback.sum(),
            "num_classes_seen": self._num_classes_seen(),
        }

    def plot(self, val: dict[str, Tensor] | None = None, ax: Any = None, log_x: bool = False) -> tuple[Any, Any]:
        """Entropy spectrum (nats/dim against sorted latent index); returns ``(figure, axes)``."""
        val = self.compute() if val is None else val
        return plot_entropy_spectrum(val["spectrum"], ax=ax, log_x=log_x)


class ManifoldCrossMutualInformation(_ClassConditionalMetric):
    r"""Manifold cross-pairwise mutual information between a model decoder and a reference decoder, and alignment.

    .. math::
        \mathrm{MCPMI}_{ij} = -\tfrac12 \mathbb{E}[\log(1 - \rho_{ij}^2)], \quad
        \rho_{ij} = \frac{\langle a_i, b_j\rangle}{\|a_i\|\,\|b_j\|}, \qquad
        r_{ij} = \sqrt{1 - e^{-2\,\mathrm{MCPMI}_{ij}}} \in [0, 1),

    with :math:`a_i` column ``i`` of the model's Jacobian and :math:`b_j` column ``j`` of the reference's, both at the
    same data point. :math:`r_{ij}` is Linfoot's informational correlation (for a single sample it is
    :math:`|\rho_{ij}|`, the absolute cosine). Per model latent ``i``, ``best_match[i]`` is
    :math:`\arg\max_j r_{ij}` and ``best_match_score[i]`` its :math:`r`; ``alignment`` is their mean (1 when every model
    latent moves the data exactly like some reference latent).

    Args:
        latent_dim: model latents ``d``.
        reference_dim: reference latents ``d_ref``.
        std: data scale shared by both decoders; sigma, reference_sigma: latent scales.
        eps, num_classes, kwargs: as in :class:`ManifoldEntropy`.

    ``compute()`` returns a dict: ``cross_mutual_information`` ``(d, d_ref)``, ``informational_correlation``
    ``(d, d_ref)``, ``best_match`` ``(d,)`` long, ``best_match_score`` ``(d,)``, ``alignment`` ``()``,
    ``num_classes_seen`` ``()``.

    Example:
        >>> metric = ManifoldCrossMutualInformation(latent_dim=2, reference_dim=2)
        >>> metric.update(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[[0.0, 2.0], [1.0, 0.0]]]))
        >>> result = metric.compute()
        >>> result["best_match"], round(float(result["alignment"]), 6)
        (tensor([1, 0]), 1.0)

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
        E. H. Linfoot, *An informational measure of correlation*, Information and Control 1(1), 1957.
    """

    higher_is_better = None

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
        super().__init__(latent_dim, eps=eps, num_classes=num_classes, **kwargs)
        _positive_int(reference_dim, "reference_dim")
        self.reference_dim = reference_dim
        self.std = std
        self.sigma = sigma
        self.reference_sigma = reference_sigma
        self._add_sum_states({"count": (), "pairwise": (latent_dim, reference_dim)})

    def update(self, jacobian: Tensor, reference_jacobian: Tensor, labels: Tensor | None = None) -> None:
        """Add Jacobians of the model ``(N, *output_shape, d)`` and of the reference ``(N, *output_shape, d_ref)``."""
        check_jacobian(jacobian, "jacobian", self.latent_dim)
        check_jacobian(reference_jacobian, "reference_jacobian", self.reference_dim)
        statistics = cross_statistics(
            jacobian,
            reference_jacobian,
            std=self.std,
            sigma=self.sigma,
            reference_sigma=self.reference_sigma,
            eps=self.eps,
            labels=labels,
            num_classes=self.num_classes,
        )
        self._accumulate(statistics)

    def compute(self) -> dict[str, Tensor]:
        """Finish the accumulated sums."""
        cross = finish_cross_mutual_information(CrossStatistics(self.count, self.pairwise))
        correlation = torch.sqrt(-torch.expm1(-2.0 * cross))
        score, match = correlation.max(dim=1)
        return {
            "cross_mutual_information": cross,
            "informational_correlation": correlation,
            "best_match": match,
            "best_match_score": score,
            "alignment": score.mean(),
            "num_classes_seen": self._num_classes_seen(),
        }

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
