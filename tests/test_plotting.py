"""Figures: integer latent ticks, the active level drawn, active latents marked; the callback's kept figures agree."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_mem.functional import STANDARD_NORMAL_ENTROPY
from lightning_mem.plotting import (
    EvaluationFigures,
    MutualInformationFigure,
    SpectrumHistoryFigure,
    plot_entropy_spectrum,
    plot_mutual_information,
    save_figure,
)


def _drawn(figure) -> None:
    figure.canvas.draw()  # tick positions are final only once drawn


def _integer_ticks(axis) -> list[float]:
    low, high = axis.get_view_interval()
    ticks = [t for t in axis.get_ticklocs() if min(low, high) <= t <= max(low, high)]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    return ticks


@pytest.mark.parametrize("d", [2, 5, 40])
def test_latent_axes_have_integer_ticks(d):
    fig, ax = plot_entropy_spectrum(torch.linspace(1.0, -3.0, d))
    _drawn(fig)
    _integer_ticks(ax.xaxis)
    fig, ax = plot_mutual_information(torch.rand(d, d))
    _drawn(fig)
    _integer_ticks(ax.xaxis)
    _integer_ticks(ax.yaxis)


def test_the_active_level_is_a_dotted_line_at_its_entropy():
    level = STANDARD_NORMAL_ENTROPY + math.log(0.1)
    _, ax = plot_entropy_spectrum(torch.tensor([1.0, 0.5, -3.0]), active_level=level)
    (line,) = [line for line in ax.lines if line.get_label() == "active level"]
    assert line.get_linestyle() == ":" and list(line.get_ydata()) == [level, level]
    # all or no latents active (an infinite level): no line
    for infinite in (-math.inf, math.inf):
        _, ax = plot_entropy_spectrum(torch.tensor([1.0, 0.5, -3.0]), active_level=infinite)
        assert [line.get_label() for line in ax.lines if line.get_label() == "active level"] == []


def test_active_latents_are_marked_beside_the_rows_and_above_the_columns():
    active = torch.tensor([True, False, True, False])
    _, ax = plot_mutual_information(torch.rand(4, 4), active=active)
    marks = [c for c in ax.collections if c.get_label() == "active latents"]
    rows, columns = (mark.get_offsets() for mark in marks)
    assert rows[:, 1].tolist() == [0, 2] and columns[:, 0].tolist() == [0, 2]
    _, ax = plot_mutual_information(torch.rand(4, 2), active=active)  # cross MI: model latents are the rows only
    assert len([c for c in ax.collections if c.get_label() == "active latents"]) == 1


def test_kept_figures_follow_new_values_and_active_masks():
    figure = MutualInformationFigure()
    figure.update(torch.rand(3, 3), "first", active=torch.tensor([True, True, False]))
    ax = figure.update(torch.rand(3, 3), "second", active=torch.tensor([False, False, True])).axes[0]
    marks = [c for c in ax.collections if c.get_label() == "active latents"]
    assert len(marks) == 2 and marks[0].get_offsets()[:, 1].tolist() == [2]
    history = SpectrumHistoryFigure(color_label="step")
    level = -1.0
    history.update([torch.tensor([1.0, -2.0])], [0], "one", active_level=level)
    ax = history.update([torch.tensor([1.0, -2.0]), torch.tensor([2.0, -3.0])], [0, 5], "two", active_level=level).axes[0]
    spectra = [line for line in ax.lines if line.get_label() != "active level"]
    assert [list(line.get_ydata()) for line in spectra] == [[1.0, -2.0], [2.0, -3.0]]
    assert len(ax.lines) == 3
    # the level follows the last evaluation, and hides while every latent is active
    (level_line,) = [line for line in ax.lines if line.get_label() == "active level"]
    history.update([torch.tensor([1.0, -2.0]), torch.tensor([2.0, -3.0])], [0, 5], "three", active_level=-math.inf)
    assert not level_line.get_visible()
    history.update([torch.tensor([1.0, -2.0]), torch.tensor([2.0, -3.0])], [0, 5], "four", active_level=-0.5)
    assert level_line.get_visible() and list(level_line.get_ydata()) == [-0.5, -0.5]


def test_evaluation_figures_mark_the_active_latents_and_draw_their_level():
    # the spectrum's shape: latents 0, 2 and 3 above a plateau of two near -2 nats
    entropy = torch.tensor([1.0, -2.0, 0.5, 0.8, -2.1], dtype=torch.float64)
    values = {"latent_entropy": entropy, "pairwise_mutual_information": torch.rand(5, 5)}
    history = [{"step": 0, "spectrum": entropy.sort(descending=True).values}]
    for figures, active_rows, level in (
        (EvaluationFigures(), [0, 2, 3], 0.5 * (0.5 - 2.0)),
        (EvaluationFigures(active_threshold=math.exp(0.7 - STANDARD_NORMAL_ENTROPY)), [0, 3], 0.7),  # the absolute rule
    ):
        drawn = figures.update(history, values)
        assert set(drawn) == {"spectrum_history", "pairwise_mutual_information"}
        ax = drawn["pairwise_mutual_information"].axes[0]
        rows = next(c for c in ax.collections if c.get_label() == "active latents").get_offsets()
        assert rows[:, 1].tolist() == active_rows
        (line,) = [line for line in drawn["spectrum_history"].axes[0].lines if line.get_label() == "active level"]
        assert list(line.get_ydata()) == pytest.approx([level, level])


def test_save_figure_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out" / "spectrum.png"
    fig, _ = plot_entropy_spectrum(torch.tensor([1.0, 0.0]))
    save_figure(fig, path)
    first = path.read_bytes()
    fig, _ = plot_entropy_spectrum(torch.tensor([3.0, -4.0, -5.0]))
    save_figure(fig, path)
    assert path.read_bytes() != first and path.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in path.parent.iterdir()] == ["spectrum.png"]
