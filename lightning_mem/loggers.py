"""Figures to every Lightning logger that can take them: one small adapter per logger kind.

Lightning's loggers share ``log_metrics`` for scalars but have no common image API, so each kind gets an adapter
here: TensorBoard (``experiment.add_figure``), Weights & Biases (``WandbLogger.log_image``), MLflow (a PNG artifact
through ``MlflowClient.log_figure``) and ``CSVLogger`` (PNG files under its ``log_dir``). Every adapter takes a
matplotlib figure as it is: the packages encode the images themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, WandbLogger

from lightning_mem.plotting import save_figure

__all__ = ["FigureLogger", "figure_loggers"]

FigureLogger = Callable[[str, Any, int], None]
"""``log(tag, figure, step)``: writes one matplotlib figure to one logger; the figure stays open."""


def _tensorboard(logger: Any) -> FigureLogger:
    """Any logger whose ``experiment`` has ``add_figure`` (a TensorBoard ``SummaryWriter``)."""

    def log(tag: str, figure: Any, step: int) -> None:
        logger.experiment.add_figure(tag, figure, global_step=step, close=False)

    return log


def _wandb(logger: WandbLogger) -> FigureLogger:
    def log(tag: str, figure: Any, step: int) -> None:
        logger.log_image(key=tag, images=[figure], step=step)

    return log


def _mlflow(logger: MLFlowLogger) -> FigureLogger:
    def log(tag: str, figure: Any, step: int) -> None:
        logger.experiment.log_figure(logger.run_id, figure, f"{tag}/step_{step:08d}.png")

    return log


def _files(folder: Path) -> FigureLogger:
    def log(tag: str, figure: Any, step: int) -> None:
        save_figure(figure, folder / tag / f"step_{step:08d}.png", close=False)

    return log


def figure_loggers(loggers: Sequence[Logger]) -> tuple[list[FigureLogger], list[str]]:
    """The figure adapters of ``loggers``, and the class names of those that cannot take figures.

    Example:
        >>> import tempfile
        >>> from lightning.pytorch.loggers import CSVLogger
        >>> adapters, others = figure_loggers([CSVLogger(tempfile.mkdtemp())])
        >>> len(adapters), others
        (1, [])
    """
    adapters: list[FigureLogger] = []
    others: list[str] = []
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            adapters.append(_wandb(logger))
        elif isinstance(logger, MLFlowLogger):
            adapters.append(_mlflow(logger))
        elif isinstance(logger, CSVLogger):
            adapters.append(_files(Path(logger.log_dir) / "figures"))
        elif callable(getattr(getattr(logger, "experiment", None), "add_figure", None)):
            adapters.append(_tensorboard(logger))
        else:
            others.append(type(logger).__name__)
    return adapters, others
