"""The demo job: train a small model on embedded data with the metrics callback attached, log to TensorBoard, summarise."""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TextIO, TypedDict

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_mem._checks import check_positive_int
from lightning_mem.demo.datasets import load_digits, make_two_moons, tensor_dataloader
from lightning_mem.demo.models import BetaVAE, CouplingFlow
from lightning_mem.evaluate import LineProgress, is_terminal
from lightning_mem.functional import active_latents
from lightning_mem.plotting import save_mutual_information_figure, save_spectrum_figure

__all__ = [
    "DEFAULT_STEPS",
    "DEMO_NUM_EVALUATIONS",
    "MODELS",
    "DemoModel",
    "DemoResult",
    "LineProgressBar",
    "build_demo",
    "fit",
    "intra_op_threads",
    "run_demo",
]

DemoModel = Literal["vae", "flow"]
"""The demo's models (:data:`MODELS`)."""
MODELS: tuple[str, ...] = ("vae", "flow")
"""``vae``: a beta-VAE on scikit-learn's 8x8 digits; ``flow``: a FrEIA coupling flow on two moons."""

DEFAULT_STEPS = {"vae": 3000, "flow": 2000}
"""Training steps of each demo model by default (each well under 3 minutes on 2 CPU cores)."""

DEMO_BETA = 1.0
"""The demo VAE's KL weight (the plain VAE): on the digits it already switches most of its 16 latents off."""

DEMO_LATENT_DIM = 16
DEMO_BATCH_SIZE = 128
DEMO_NUM_EVALUATIONS = 10
"""Evaluations of the callback over the run (plus one before the first step)."""

_QUIET_WARNINGS = (
    ".*does not have many workers.*",
    ".*smaller than the logging interval.*",
    ".*treespec, LeafSpec.*",
)
"""Lightning notices that say nothing about the demo (in-memory data needs no workers; internal deprecations)."""


@contextmanager
def intra_op_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(num_threads)`` and restore the previous number afterwards.

    The demo's models are tiny, so a second intra-op thread buys little, while on a busy machine oversubscribed
    threads slowed a training step of the two-moons flow about 20-fold (measured on the 2-core CI machine).
    ``None`` leaves the setting alone.
    """
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class LineProgressBar(ProgressBar):
    """Lightning's progress bar for logs: a line per tenth of the training steps, with the progress-bar metrics.

    Lightning's tqdm bar redraws itself in place; in a file or a pipe every redraw stays (750 KB for the 3000-step
    demo). This bar writes lines such as ``Epoch 3: 120/1200 steps (10%), 4.1 s, train/loss 25.3`` to ``stream``
    (default: ``sys.stderr`` when writing) with :class:`~lightning_mem.evaluate.LineProgress`.
    """

    def __init__(self, parts: int = 10, stream: TextIO | None = None) -> None:
        super().__init__()
        self.parts = parts
        self.stream = stream
        self._enabled = True
        self._progress: LineProgress | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        steps = trainer.estimated_stepping_batches
        total = int(steps) if math.isfinite(steps) and steps > 0 else None
        self._progress = LineProgress(total, "Epoch 0", unit="steps", parts=self.parts, stream=self.stream)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: object, batch_idx: int) -> None:
        if not self._enabled or self._progress is None:
            return
        metrics = self.get_metrics(trainer, pl_module)
        postfix = ", ".join(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}" for name, value in metrics.items())
        self._progress.update(trainer.global_step, desc=f"Epoch {trainer.current_epoch}", postfix=postfix)


def fit(
    module: LightningModule,
    loader: DataLoader,
    *,
    steps: int,
    progress_bar: bool = False,
    logger: Logger | bool = False,
    callbacks: Sequence[Callback] = (),
    precision: Literal["64-true", "32-true", "16-true", "16-mixed", "bf16-true", "bf16-mixed"] | None = None,
    log_every_n_steps: int = 10,
) -> Trainer:
    """Train ``module`` for ``steps`` optimizer steps on CPU with Lightning, without checkpoints or model summary.

    Args:
        module: the LightningModule.
        loader: its training data.
        steps: optimizer steps (epochs are unlimited).
        progress_bar: show the progress: Lightning's progress bar when stdout (where it writes) is a terminal, else
            a :class:`LineProgressBar` (a line per tenth of the steps on stderr).
        logger: a Lightning logger, or ``False``.
        callbacks: extra callbacks.
        precision: Lightning precision, e.g. ``"64-true"`` for float64 training.
        log_every_n_steps: logging interval.

    Returns:
        The fitted ``Trainer``.
    """
    lines = progress_bar and not is_terminal(sys.stdout)
    trainer = Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[*callbacks, LineProgressBar()] if lines else list(callbacks),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
        log_every_n_steps=log_every_n_steps,
        precision=precision,
    )
    with warnings.catch_warnings():
        for message in _QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        trainer.fit(module, loader)
    return trainer


def build_demo(model: DemoModel, *, seed: int = 0) -> tuple[BetaVAE | CouplingFlow, DataLoader]:
    """The demo's module and training data for ``model`` (``"vae"`` or ``"flow"``), built deterministically from ``seed``.

    Raises:
        ValueError: for an unknown ``model``.
    """
    if model == "vae":
        images, _ = load_digits()
        return BetaVAE(latent_dim=DEMO_LATENT_DIM, beta=DEMO_BETA), tensor_dataloader(images, batch_size=DEMO_BATCH_SIZE, seed=seed)
    if model == "flow":
        points, _ = make_two_moons(4096, noise=0.1, generator=torch.Generator().manual_seed(seed))
        points = points - points.mean(0)
        return CouplingFlow(dim=2, num_blocks=8, seed=seed), tensor_dataloader(points, batch_size=256, seed=seed)
    raise ValueError(f"Expected `model` to be one of {MODELS}, but got {model!r}.")


class DemoResult(TypedDict):
    """What :func:`run_demo` returns: the last evaluation's metrics, the files it wrote and its times.

    ``metrics``: the callback's ``last_metrics`` (the keys of :class:`~lightning_mem.ManifoldEntropicMetrics` plus
    ``eval_time`` and ``drift/...``); ``history``: the callback's ``[{"step", "spectrum"}]``; ``model``; ``steps``:
    the optimizer steps taken; ``log_dir``, ``spectrum_png``, ``mutual_information_png``, ``checkpoint``: paths;
    ``module_class``: ``"module:Class"`` of the trained module (for ``lightning-mem evaluate``);
    ``tensorboard_command``; ``train_time_s``, ``wall_time_s``: seconds.
    """

    metrics: dict[str, Tensor]
    history: list[dict[str, Any]]
    model: DemoModel
    steps: int
    log_dir: str
    spectrum_png: str
    mutual_information_png: str
    checkpoint: str
    module_class: str
    tensorboard_command: str
    train_time_s: float
    wall_time_s: float


def run_demo(
    *,
    steps: int | None = None,
    out: str | Path = "runs",
    seed: int = 0,
    model: DemoModel = "vae",
    num_samples: int = 1024,
    progress_bar: bool = True,
    num_threads: int | None = 1,
) -> DemoResult:
    r"""Train the demo model with Lightning and :class:`~lightning_mem.ManifoldEntropicMetricsCallback`, and summarise it.

    .. math::
        H_i = h_0 + \tfrac12\mathbb{E}_{z \sim N(0,I)}[\log G_{ii}(z)],\quad H,\quad \mathrm{MTC},\quad \mathrm{MPMI}

    The callback evaluates the decoder at ``num_samples`` fixed prior samples
    ``torch.randn(num_samples, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)`` before
    training and at 10 evenly spaced steps up to the end (its default schedule, ``num_evaluations=10``), and logs
    curves and (at the end) figures to TensorBoard in
    ``out/demo_<model>/version_<k>``. The returned metrics are those of its last evaluation; ``spectrum.png`` (the
    spectra of all evaluations, coloured by step), ``pairwise_mutual_information.png`` and ``final.ckpt`` are
    written next to the event files.

    Args:
        steps: optimizer steps (default :data:`DEFAULT_STEPS` of the model).
        out: root folder of the TensorBoard runs.
        seed: seed of everything (data order, initialisation, sampling; Lightning's ``seed_everything``) and of
            the callback's latents.
        model: ``"vae"`` (beta-VAE on 8x8 digits) or ``"flow"`` (coupling flow on two moons).
        num_samples: prior samples of every evaluation.
        progress_bar: show the progress (see :func:`fit`).
        num_threads: torch intra-op threads while training (restored afterwards); ``None`` keeps the current setting.

    Returns:
        A :class:`DemoResult`: the last evaluation's ``metrics``, the ``history`` of spectra, the paths of the logs,
        figures and checkpoint, and the times.

    Raises:
        ValueError: for an unknown ``model`` or a non-positive ``steps``/``num_samples``.
    """
    from lightning_mem.callback import ManifoldEntropicMetricsCallback

    start = time.perf_counter()
    if model not in MODELS:
        raise ValueError(f"Expected `model` to be one of {MODELS}, but got {model!r}.")
    steps = DEFAULT_STEPS[model] if steps is None else steps
    check_positive_int(steps, "steps")
    check_positive_int(num_samples, "num_samples")
    seed_everything(seed, verbose=False)
    module, loader = build_demo(model, seed=seed)
    out = Path(out)
    logger = TensorBoardLogger(save_dir=str(out), name=f"demo_{model}", default_hp_metric=False)
    latents = torch.randn(num_samples, module.latent_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    callback = ManifoldEntropicMetricsCallback(
        latents=latents,
        num_evaluations=DEMO_NUM_EVALUATIONS,
        seed=seed,
    )
    train_start = time.perf_counter()
    with intra_op_threads(num_threads):
        trainer = fit(module, loader, steps=steps, progress_bar=progress_bar, logger=logger, callbacks=[callback])
    train_time = time.perf_counter() - train_start

    log_dir = Path(logger.log_dir)
    checkpoint = log_dir / "final.ckpt"
    trainer.save_checkpoint(checkpoint, weights_only=False)  # a full checkpoint: it can resume the run
    metrics = callback.last_metrics
    history = callback.history
    spectrum_png = save_spectrum_figure(
        {f"step {entry['step']}": entry["spectrum"] for entry in history},
        log_dir / "spectrum.png",
        title=f"Entropy spectrum of the demo {model} during training",
        threshold=float(active_latents(metrics["latent_entropy"]).level),  # the last evaluation's
        color_values=[entry["step"] for entry in history],
        color_label="training step",
    )
    mutual_information_png = save_mutual_information_figure(
        metrics["pairwise_mutual_information"], log_dir / "pairwise_mutual_information.png"
    )
    logger.finalize("success")
    return {
        "metrics": metrics,
        "history": history,
        "model": model,
        "steps": trainer.global_step,
        "log_dir": str(log_dir),
        "spectrum_png": str(spectrum_png),
        "mutual_information_png": str(mutual_information_png),
        "checkpoint": str(checkpoint),
        "module_class": f"{type(module).__module__}:{type(module).__qualname__}",
        "tensorboard_command": f"tensorboard --logdir {out}",
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - start,
    }
