"""Figures shared by the Metric classes' ``plot``, the callback and the CLI: entropy spectra and mutual-information heatmaps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_mem.files import atomic_write
from lightning_mem.functional.active import active_latents
from lightning_mem.functional.manifold import entropy_spectrum
from lightning_mem.functional.statistics import DEFAULT_EPS
from lightning_mem.pictures import LatentPictures

__all__ = [
    "EvaluationFigures",
    "MutualInformationFigure",
    "SpectrumHistoryFigure",
    "mark_active_latents",
    "plot_entropy_spectrum",
    "plot_latent_pictures",
    "plot_mutual_information",
    "save_figure",
    "save_mutual_information_figure",
    "save_spectrum_figure",
]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as error:  # pragma: no cover - matplotlib is a dependency
        raise ModuleNotFoundError("Plotting needs `matplotlib`; install it with `pip install matplotlib`.") from error
    return plt


_FIGURE_SIZE = (6.0, 4.0)
"""Width and height in inches of a new figure (600 x 400 pixels at matplotlib's default 100 dpi)."""
_SPECTRUM_LINE = {"marker": "o", "markersize": 2}
_SPECTRUM_XLABEL = "latent (sorted by entropy)"
_SPECTRUM_YLABEL = "manifold entropy $H_i$ (nats/dim)"
_ACTIVE_LINE = {"color": "gray", "linewidth": 0.8, "linestyle": ":", "label": "active level"}
_ACTIVE_MARKS = "active latents"


def _new_axes(ax: Any) -> tuple[Any, Any]:
    if ax is not None:
        return ax.get_figure(), ax
    return _pyplot().subplots(figsize=_FIGURE_SIZE, layout="constrained")


def _offscreen_axes() -> tuple[Any, Any]:
    """A figure for logging: Agg canvas, outside pyplot (nothing to close, no GUI state), fixed margins.

    Made for the callback, which draws every evaluation's figures: a layout engine (constrained or tight) computes
    every text's extent before drawing and so about doubles the cost of rendering; matplotlib's classic subplot
    margins leave room for the tick labels, axis labels, title and colour bar of these plots.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=_FIGURE_SIZE)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def plot_entropy_spectrum(
    spectra: Tensor | Sequence[Tensor],
    *,
    ax: Any = None,
    labels: Sequence[str] | None = None,
    color_values: Sequence[float] | None = None,
    color_label: str = "step",
    log_x: bool = False,
    title: str | None = "Entropy spectrum",
    active_level: float | None = None,
) -> tuple[Any, Any]:
    r"""Line plot of one or more entropy spectra: :math:`H_i` (nats/dim) against the sorted latent index.

    Args:
        spectra: a ``(d,)`` spectrum (sorted descending) or a sequence of them (lengths may differ).
        ax: matplotlib axes to draw on; a new figure when ``None``.
        labels: a legend label per spectrum.
        color_values: a number per spectrum (e.g. the training step or beta): lines are coloured by it on a
            viridis scale with a colour bar, like the paper's beta-VAE spectra figure.
        color_label: the colour bar's label.
        log_x: logarithmic x axis (useful for many latents).
        title: axes title.
        active_level: the entropy (nats) above which a latent counts as active, drawn as a dotted line when finite
            (the ``level`` of :func:`~lightning_mem.functional.active_latents`: the middle of the gap above the
            plateau of switched-off latents, or :math:`h_0 + \log(\mathrm{threshold})`; infinite when all or no
            latents are active).

    Returns:
        ``(figure, axes)``. The latent index axis has integer ticks.

    Raises:
        ValueError: if a spectrum is not 1-D, or ``labels`` / ``color_values`` do not match the number of spectra.

    Example:
        >>> fig, ax = plot_entropy_spectrum([torch.tensor([2.0, 1.0, -3.0]), torch.tensor([1.5, 0.5, -1.0])], color_values=[0, 100])
        >>> len(ax.lines)
        2
    """
    if isinstance(spectra, Tensor):
        spectra = [spectra] if spectra.ndim == 1 else list(spectra)
    spectra = [torch.as_tensor(s).detach().cpu().double() for s in spectra]
    for i, spectrum in enumerate(spectra):
        if spectrum.ndim != 1:
            raise ValueError(f"Expected every spectrum of shape (d,), but spectrum {i} has shape {tuple(spectrum.shape)}.")
    for name, values in (("labels", labels), ("color_values", color_values)):
        if values is not None and len(values) != len(spectra):
            raise ValueError(f"Expected `{name}` with one entry per spectrum ({len(spectra)}), but got {len(values)}.")
    plt = _pyplot()
    fig, ax = _new_axes(ax)
    colors = [None] * len(spectra)
    if color_values is not None:
        norm = plt.Normalize(*_color_limits(color_values))
        cmap = plt.get_cmap("viridis")
        colors = [cmap(norm(v)) for v in color_values]
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=color_label)
    for i, spectrum in enumerate(spectra):
        _plot_spectrum(ax, spectrum, color=colors[i], label=None if labels is None else labels[i])
    if log_x:
        ax.set_xscale("log")
    _style_spectrum_axes(ax)
    active_level = _finite(active_level)
    if active_level is not None:
        ax.axhline(active_level, **_ACTIVE_LINE)
    if title:
        ax.set_title(title)
    if labels is not None or active_level is not None:
        ax.legend(fontsize="small")
    return fig, ax


def _finite(level: float | Tensor | None) -> float | None:
    """``level`` as a float, or ``None`` when it is ``None`` or infinite (all or no latents active: no line)."""
    if level is None or not torch.isfinite(torch.as_tensor(level, dtype=torch.float64)):
        return None
    return float(level)


def plot_mutual_information(
    matrix: Tensor,
    *,
    ax: Any = None,
    title: str | None = "Manifold pairwise mutual information",
    xlabel: str = "latent j",
    ylabel: str = "latent i",
    colorbar_label: str = "nats",
    active: Tensor | None = None,
) -> tuple[Any, Any]:
    """Heatmap of a mutual-information matrix (MPMI ``(d, d)`` or MCPMI ``(d, d_ref)``) with a colour bar.

    Latent indices get integer ticks; ``active`` (a boolean ``(d,)`` mask of the row latents, e.g. the ``mask`` of
    :func:`~lightning_mem.functional.active_latents`) marks the active latents with triangles beside the rows (and
    above the columns of a square matrix).

    Args:
        matrix: 2-D tensor.
        ax: matplotlib axes to draw on; a new figure when ``None``.
        title, xlabel, ylabel, colorbar_label: text.

    Returns:
        ``(figure, axes)``.

    Raises:
        ValueError: if ``matrix`` is not 2-D.

    Example:
        >>> fig, ax = plot_mutual_information(torch.tensor([[0.0, 0.3], [0.3, 0.0]]))
        >>> ax.get_title()
        'Manifold pairwise mutual information'
    """
    matrix = torch.as_tensor(matrix).detach().cpu().double()
    if matrix.ndim != 2:
        raise ValueError(f"Expected `matrix` of shape (d, d_ref), but got {tuple(matrix.shape)}.")
    fig, ax = _new_axes(ax)
    image = ax.imshow(matrix.numpy(), cmap="magma", vmin=0.0, interpolation="nearest", aspect="auto")
    fig.colorbar(image, ax=ax, label=colorbar_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _integer_ticks(ax.xaxis, ax.yaxis)
    mark_active_latents(ax, active, square=matrix.shape[0] == matrix.shape[1])
    if title:
        ax.set_title(title)
    return fig, ax


def mark_active_latents(ax: Any, active: Tensor | None, *, square: bool) -> None:
    """Triangles beside the rows (and, for a square matrix, above the columns) of the active latents of a heatmap;
    ``None`` or a new ``active`` mask replaces the previous marks."""
    for collection in [c for c in ax.collections if c.get_label() == _ACTIVE_MARKS]:
        collection.remove()
    if active is None:
        return
    index = torch.as_tensor(active).detach().cpu().bool().nonzero().flatten().numpy()
    style = {"color": "tab:green", "s": 18, "clip_on": False, "label": _ACTIVE_MARKS, "zorder": 3}
    ax.scatter([-0.5 - 0.6] * len(index), index, marker=">", **style)
    if square:
        ax.scatter(index, [-0.5 - 0.6] * len(index), marker="v", **style)


def _integer_ticks(*axes: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    for axis in axes:
        axis.set_major_locator(MaxNLocator(integer=True))


def _style_spectrum_axes(ax: Any) -> None:
    ax.set_xlabel(_SPECTRUM_XLABEL)
    ax.set_ylabel(_SPECTRUM_YLABEL)
    if ax.get_xscale() == "linear":
        _integer_ticks(ax.xaxis)
    ax.grid(alpha=0.3)


def _color_limits(color_values: Sequence[float]) -> tuple[float, float]:
    low, high = min(color_values), max(color_values)
    return low, high if high > low else low + 1


def _plot_spectrum(ax: Any, spectrum: Tensor, **style: Any) -> Any:
    index = torch.arange(1, spectrum.numel() + 1)
    return ax.plot(index.numpy(), spectrum.numpy(), **_SPECTRUM_LINE, **style)[0]


class SpectrumHistoryFigure:
    """``plot_entropy_spectrum(spectra, color_values=...)`` on off-screen axes, kept and updated as spectra are added.

    The callback draws the history of all its evaluations again and again: adding the new lines and recolouring
    the old ones costs about half as much as building a figure anew (its axes, ticks and texts).
    """

    def __init__(self, color_label: str) -> None:
        plt = _pyplot()
        self.figure, self.ax = _offscreen_axes()
        self._cmap = plt.get_cmap("viridis")
        self._mappable = plt.cm.ScalarMappable(norm=plt.Normalize(0, 1), cmap=self._cmap)
        self.figure.colorbar(self._mappable, ax=self.ax, label=color_label)
        _style_spectrum_axes(self.ax)
        self._level: Any = None

    def update(
        self, spectra: Sequence[Tensor], color_values: Sequence[float], title: str, active_level: float | Tensor | None = None
    ) -> Any:
        """Draw ``spectra`` (the previous update's followed by new ones), coloured by ``color_values``, with the
        ``active_level`` line of :func:`plot_entropy_spectrum` (hidden while it is ``None`` or infinite); returns the
        figure."""
        active_level = _finite(active_level)
        if self._level is None and active_level is not None:
            self._level = self.ax.axhline(active_level, **_ACTIVE_LINE)
            self.ax.legend(fontsize="small", loc="upper right")
        elif self._level is not None and active_level is not None:
            self._level.set_ydata([active_level, active_level])
        if self._level is not None:
            self._level.set_visible(active_level is not None)
        lines = [line for line in self.ax.lines if line is not self._level]
        if len(lines) > len(spectra):  # not a continuation of the last update's spectra: start over
            for line in lines:
                line.remove()
            lines = []
        for spectrum in spectra[len(lines) :]:
            lines.append(_plot_spectrum(self.ax, torch.as_tensor(spectrum).detach().cpu().double()))
        self._mappable.set_clim(*_color_limits(color_values))
        for line, value in zip(lines, color_values, strict=True):
            line.set_color(self._cmap(self._mappable.norm(value)))
        self.ax.relim()
        self.ax.autoscale_view()
        self.ax.set_title(title)
        return self.figure


class MutualInformationFigure:
    """``plot_mutual_information`` on off-screen axes, kept and updated with each new matrix of the same shape."""

    def __init__(self, **text: str) -> None:
        self.text = text
        self.figure = None
        self._image = None

    def update(self, matrix: Tensor, title: str, active: Tensor | None = None) -> Any:
        """Draw ``matrix`` with ``title`` and the ``active`` marks of :func:`plot_mutual_information`; returns the figure."""
        matrix = torch.as_tensor(matrix).detach().cpu().double()
        if self._image is None or self._image.get_array().shape != tuple(matrix.shape):
            _, ax = _offscreen_axes()
            self.figure, ax = plot_mutual_information(matrix, ax=ax, title=title, active=active, **self.text)
            self._image = ax.images[0]
            return self.figure
        self._image.set_data(matrix.numpy())
        self._image.set_clim(0.0, float(matrix.max()))  # as imshow(vmin=0.0) scales a new image
        self._image.axes.set_title(title)
        mark_active_latents(self._image.axes, active, square=matrix.shape[0] == matrix.shape[1])
        return self.figure


class EvaluationFigures:
    """The callback's figures of one run, kept between evaluations and updated with each (off-screen, Agg).

    ``update(history, values, pictures)`` returns ``{tag: figure}``: ``spectrum_history`` (every evaluation's spectrum,
    coloured by step, with the last one's active level), ``pairwise_mutual_information`` (its active latents marked),
    when ``values`` has it ``reference/cross_mutual_information``, and with ``pictures`` ``latent_columns`` and
    ``latent_traversals``. The active latents are those of :func:`~lightning_mem.functional.active_latents` with
    ``active_threshold`` (``None``: the spectrum's shape) and ``eps`` (the metrics' floor).
    """

    def __init__(self, active_threshold: float | None = None, eps: float = DEFAULT_EPS) -> None:
        self.active_threshold = active_threshold
        self.eps = eps
        self.spectrum_history = SpectrumHistoryFigure(color_label="training step")
        self.pairwise = MutualInformationFigure()
        self.reference = MutualInformationFigure(xlabel="reference latent j", ylabel="model latent i")

    def update(
        self, history: Sequence[Mapping[str, Any]], values: Mapping[str, Tensor], pictures: LatentPictures | None = None
    ) -> dict[str, Any]:
        """Figures of the evaluation that ``values`` and ``history[-1]`` (``{"step", "spectrum"}`` entries) describe, with
        ``latent_columns`` and ``latent_traversals`` from ``pictures`` (:func:`~lightning_mem.pictures.latent_pictures`)."""
        steps = [entry["step"] for entry in history]
        spectra = [entry["spectrum"] for entry in history]
        found = active_latents(values["latent_entropy"], threshold=self.active_threshold, eps=self.eps)
        level, active = found.level, found.mask
        figures = {
            "spectrum_history": self.spectrum_history.update(
                spectra, steps, title=f"Entropy spectrum, steps {steps[0]} to {steps[-1]}", active_level=level
            ),
            "pairwise_mutual_information": self.pairwise.update(
                values["pairwise_mutual_information"], title=f"Manifold pairwise MI, step {steps[-1]}", active=active
            ),
        }
        if "reference/cross_mutual_information" in values:
            figures["reference/cross_mutual_information"] = self.reference.update(
                values["reference/cross_mutual_information"], title=f"Manifold cross MI with the reference, step {steps[-1]}"
            )
        if pictures is not None:
            for kind, what in (("columns", "mean |dg/dz_i|"), ("traversals", "traversals")):
                figures[f"latent_{kind}"] = plot_latent_pictures(pictures, kind=kind, title=f"Top latents: {what}, step {steps[-1]}")
        return figures


def _subplots(figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A new figure on matplotlib's non-interactive Agg backend (files only, no display needed)."""
    return _pyplot().subplots(figsize=figsize, dpi=100, layout="constrained")


def save_figure(fig: Any, path: str | Path, *, close: bool = True) -> Path:
    """Write ``fig`` to ``path`` atomically (:func:`~lightning_mem.files.atomic_write`).

    A kill leaves the old file or the new one, never half of one. Parent folders are created. ``close`` closes the
    figure afterwards (pyplot's, for figures made by :func:`plot_entropy_spectrum` and friends without ``ax``).
    """
    path = Path(path)
    try:
        with atomic_write(path, "wb") as file:
            fig.savefig(file, format=path.suffix.lstrip(".") or "png")
    finally:
        if close:
            _pyplot().close(fig)
    return path


def save_spectrum_figure(
    spectra: Mapping[str, Tensor],
    path: str | Path,
    *,
    title: str = "Entropy spectrum",
    reference: Tensor | None = None,
    reference_label: str = "ground truth",
    threshold: float | None = None,
    color_values: Sequence[float] | None = None,
    color_label: str = "step",
) -> Path:
    r"""Draw one or more entropy spectra (sorted :math:`H_i` against rank) with :mod:`lightning_mem.plotting` into a PNG.

    Args:
        spectra: label -> ``(d,)`` per-latent entropies (sorted here, descending).
        path: output PNG path (parent folders are created).
        title: figure title.
        reference: optional ``(d,)`` ground-truth entropies, drawn dashed (sorted here).
        reference_label: its legend label.
        threshold: optional active-latent level in nats (the ``level`` of
            :func:`~lightning_mem.functional.active_latents`), a dotted line when finite.
        color_values: a number per spectrum (e.g. beta) to colour the lines by, with a colour bar.
        color_label: the colour bar's label.

    Returns:
        The path written.
    """
    fig, ax = _subplots((5.2, 3.6))
    sorted_spectra = [entropy_spectrum(torch.as_tensor(values, dtype=torch.float64).detach().cpu())[0] for values in spectra.values()]
    labels = None if color_values is not None else list(spectra)  # a colour bar replaces the legend
    plot_entropy_spectrum(sorted_spectra, ax=ax, labels=labels, color_values=color_values, color_label=color_label, title=title)
    if reference is not None:
        truth = entropy_spectrum(torch.as_tensor(reference, dtype=torch.float64).detach().cpu())[0]
        ax.plot(torch.arange(1, truth.numel() + 1).numpy(), truth.numpy(), "k--", label=reference_label)
    threshold = _finite(threshold)
    if threshold is not None:
        ax.axhline(threshold, **_ACTIVE_LINE)
    if labels is not None or reference is not None or threshold is not None:
        ax.legend(fontsize="small")
    return save_figure(fig, path)


def save_mutual_information_figure(
    matrix: Tensor,
    path: str | Path,
    *,
    title: str = "Manifold pairwise mutual information",
    xlabel: str = "latent j",
    ylabel: str = "latent i",
) -> Path:
    """Draw an MPMI or MCPMI matrix as a heatmap with :mod:`lightning_mem.plotting` into a PNG and return the path."""
    fig, ax = _subplots((4.6, 3.8))
    plot_mutual_information(torch.as_tensor(matrix), ax=ax, title=title, xlabel=xlabel, ylabel=ylabel)
    return save_figure(fig, path)


def plot_latent_pictures(pictures: LatentPictures, *, kind: str = "traversals", title: str | None = None) -> Any:
    """A figure of :class:`LatentPictures`: ``kind="columns"`` (one image per latent) or ``"traversals"`` (one strip
    per latent, one column per offset). Off-screen (Agg, not managed by pyplot); returns the figure.

    Example:
        >>> from lightning_mem.pictures import latent_pictures
        >>> pictures = latent_pictures(torch.nn.Linear(2, 16), torch.zeros(2, 2), [0, 1], image_shape=(4, 4))
        >>> len(plot_latent_pictures(pictures, kind="columns").axes), len(plot_latent_pictures(pictures).axes)
        (2, 10)
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if kind not in ("columns", "traversals"):
        raise ValueError(f"Expected `kind` to be 'columns' or 'traversals', but got {kind!r}.")
    k = pictures.latents.numel()
    images = pictures.columns[:, None] if kind == "columns" else pictures.traversals
    cols = images.shape[1]
    transpose = kind == "columns"  # one row of k images
    rows, cols = (1, k) if transpose else (k, cols)
    figure = Figure(figsize=(1.3 * cols + 0.6, 1.3 * rows + 0.6))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False)
    for i in range(k):
        for j in range(images.shape[1]):
            ax = axes[0][i] if transpose else axes[i][j]
            image = images[i, j].numpy()
            gray = image.ndim == 2 or image.shape[-1] == 1
            shown = image.squeeze(-1) if image.ndim == 3 and gray else image
            if not gray:  # colour images: each picture scaled into [0, 1] for display
                shown = (shown - shown.min()) / max(float(shown.max() - shown.min()), 1e-12)
            ax.imshow(shown, cmap="magma" if kind == "columns" else "gray", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if transpose or j == 0:
                (ax.set_title if transpose else ax.set_ylabel)(f"z{int(pictures.latents[i])}", fontsize="small")
            if not transpose and i == 0:
                ax.set_title(f"{pictures.steps[j]:+g}σ", fontsize="small")
    if title:
        figure.suptitle(title, fontsize="small")
    return figure
