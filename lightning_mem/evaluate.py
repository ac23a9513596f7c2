"""Offline evaluation of trained LightningModule checkpoints: every manifold entropic metric, JSON reports, curves, figures."""

from __future__ import annotations

import csv
import importlib
import io
import json
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from lightning_mem._checks import check_mode, check_positive_float, check_positive_int
from lightning_mem.decoders import ResolvedDecoder, resolve_decoder, resolve_latent_dim
from lightning_mem.evaluation import active_total_correlation, evaluate_decoder, evaluation_mode, prior_latents
from lightning_mem.files import atomic_write
from lightning_mem.functional import DEFAULT_EPS, active_latents, entropy_spectrum
from lightning_mem.jacobian import JacobianMode, OutputKey, check_latent_shape, check_output_key, probe_decoder
from lightning_mem.metrics import ManifoldEntropicMetrics
from lightning_mem.pictures import image_shape_of, latent_pictures
from lightning_mem.plotting import plot_latent_pictures, plot_mutual_information, save_figure, save_spectrum_figure
from lightning_mem.tracking import MAX_KEPT_JACOBIAN_BYTES, PICTURE_SAMPLES

__all__ = [
    "CURVE_METRICS",
    "LineProgress",
    "decoder_metrics",
    "evaluate_checkpoint",
    "evaluate_checkpoints",
    "find_checkpoints",
    "format_curves",
    "format_metrics",
    "is_terminal",
    "load_module",
]

CURVE_METRICS = (
    "entropy",
    "entropy_per_dim",
    "total_correlation",
    "total_correlation_per_dim",
    "num_active",
    "pairwise_mutual_information_max",
    "pairwise_mutual_information_mean",
    "active/total_correlation",
    "active/pairwise_mutual_information_max",
    "active/pairwise_mutual_information_mean",
)
"""The scalar metrics of ``curves.csv``, one column each, after ``step``, ``epoch`` and ``checkpoint`` and before the
spectrum (``spectrum_1`` ... ``spectrum_d``, the sorted :math:`H_i`) and the per-latent entropies (``latent_entropy_0``
... ``latent_entropy_{d-1}``)."""

CHECKPOINT_PATTERN = "*.ckpt"
"""The checkpoint files of a folder (:func:`find_checkpoints`)."""


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal, where a progress bar may redraw itself in place (``False`` for a
    file, a pipe, a closed stream or an object without ``isatty``)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class LineProgress:
    """Progress for logs: a whole line at each tenth of the work, where a terminal gets a bar redrawn in place.

    A progress bar redraws itself with carriage returns; in a file or a pipe every redraw stays (Lightning's tqdm bar
    left 750 KB in the log of the 3000-step demo). This writes at most ``parts`` lines, each when the work done
    crosses the next ``1 / parts`` of ``total``; with an unknown ``total``, at 1, 2, 4, 8, ... units.

    Args:
        total: units of work, or ``None`` when unknown.
        desc: what is being done: the start of each line.
        unit: the name of a unit.
        parts: lines over the whole work.
        stream: where to write (default: ``sys.stderr`` at the time of writing).

    Raises:
        ValueError: for a non-positive ``total`` or ``parts``.

    Example:
        >>> progress = LineProgress(4, "work", unit="chunks", parts=2, stream=sys.stdout)
        >>> for done in range(1, 5):
        ...     _ = progress.update(done)  # doctest: +ELLIPSIS
        work: 2/4 chunks (50%), ... s
        work: 4/4 chunks (100%), ... s
    """

    def __init__(self, total: int | None, desc: str, *, unit: str = "it", parts: int = 10, stream: TextIO | None = None) -> None:
        check_positive_int(total, "total", allow_none=True)
        check_positive_int(parts, "parts")
        self.total = total
        self.desc = desc
        self.unit = unit
        self.parts = parts
        self.stream = stream
        self._written = 0  # the last milestone written
        self._start = time.perf_counter()

    def update(self, done: int, *, desc: str | None = None, postfix: str = "") -> bool:
        """Note that ``done`` units are done in all; write a line (``desc`` replaces the description, ``postfix`` is
        appended) when that reaches the next milestone. Returns whether a line was written."""
        milestone = done.bit_length() if self.total is None else min(done, self.total) * self.parts // self.total
        if milestone <= self._written:
            return False
        self._written = milestone
        count = f"{done} {self.unit}" if self.total is None else f"{done}/{self.total} {self.unit} ({100 * done // self.total}%)"
        line = f"{self.desc if desc is None else desc}: {count}, {time.perf_counter() - self._start:.1f} s"
        print(f"{line}, {postfix}" if postfix else line, file=sys.stderr if self.stream is None else self.stream, flush=True)
        return True


def _chunk_progress(chunks: Iterator[Any], total: int) -> Iterator[Any]:
    """A tqdm bar over the Jacobian chunks on a terminal (stderr), else :class:`LineProgress` lines."""
    desc = "manifold entropic metrics"
    if is_terminal(sys.stderr):
        from tqdm.auto import tqdm

        yield from tqdm(chunks, total=total, desc=desc, unit="chunk", leave=False)
        return
    progress = LineProgress(total, desc, unit="chunks")
    for done, chunk in enumerate(chunks, start=1):
        yield chunk
        progress.update(done)


def _import_class(module_class: str) -> type:
    if not isinstance(module_class, str) or not module_class.strip():
        raise ValueError(f"Expected `module_class` as 'package.module:ClassName', but got {module_class!r}.")
    if ":" in module_class:
        module_name, _, class_name = module_class.partition(":")
    else:
        module_name, _, class_name = module_class.rpartition(".")
    if not module_name or not class_name:
        raise ValueError(f"Expected `module_class` as 'package.module:ClassName', but got {module_class!r}.")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and module_name.split(".")[0] != error.name.split(".")[0]:
            raise ImportError(f"Could not import `module_class` {module_class!r}: {_where(error)}") from error
        raise ImportError(
            f"Could not import the module {module_name!r} of `module_class` {module_class!r}: {error}. "
            "Is the package installed, or the working directory on sys.path?"
        ) from error
    except Exception as error:  # the user's module is broken (SyntaxError, an ImportError or any error at import time)
        raise ImportError(f"Could not import `module_class` {module_class!r}: {_where(error)}") from error
    try:
        cls = getattr(module, class_name)
    except AttributeError as error:
        raise ImportError(
            f"Could not import `module_class` {module_class!r}: module {module_name!r} has no attribute {class_name!r}."
        ) from error
    return cls


def _where(error: BaseException) -> str:
    """One line: the error, with the file and line of the user's code where it happened."""
    message = str(error.msg if isinstance(error, SyntaxError) else error).splitlines()
    text = f"{type(error).__name__}: {message[0] if message else ''}"
    if isinstance(error, SyntaxError) and error.filename is not None:
        return f"{text} ({error.filename}, line {error.lineno})"
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if not frame.filename.startswith("<frozen")]
    return f"{text} ({frames[-1].filename}, line {frames[-1].lineno})" if frames else text


def _module_class(module_class: str | type[LightningModule]) -> type[LightningModule]:
    cls = _import_class(module_class) if isinstance(module_class, str) else module_class
    if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
        raise TypeError(f"Expected `module_class` to be a LightningModule subclass, but got {cls!r}.")
    return cls


def load_module(
    module_class: str | type[LightningModule], checkpoint: str | Path, *, map_location: str | torch.device = "cpu"
) -> LightningModule:
    """Load a LightningModule from a checkpoint file with ``module_class.load_from_checkpoint``, in eval mode.

    Args:
        module_class: the class, or its import path ``"package.module:ClassName"`` (``"package.module.ClassName"``
            works too).
        checkpoint: path of a checkpoint written by Lightning (``Trainer.save_checkpoint`` or ``ModelCheckpoint``).
        map_location: where to load the tensors.

    Returns:
        The module, in eval mode.

    Raises:
        FileNotFoundError: if ``checkpoint`` does not exist.
        ImportError: if ``module_class`` cannot be imported.
        TypeError: if ``module_class`` is not a LightningModule subclass.
        RuntimeError: if the checkpoint cannot be loaded into the class.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"Expected `checkpoint` to be an existing checkpoint file, but {str(path)!r} does not exist.")
    cls = _module_class(module_class)
    try:
        module = cls.load_from_checkpoint(path, map_location=map_location)
    except Exception as error:
        raise RuntimeError(f"Could not load checkpoint {str(path)!r} into {cls.__qualname__}: {type(error).__name__}: {error}") from error
    return module.eval()


def decoder_metrics(
    decoder: Callable,
    z: Tensor,
    *,
    condition: Tensor | None = None,
    labels: Tensor | None = None,
    num_classes: int | None = None,
    chunk_size: int = 64,
    mode: JacobianMode = "auto",
    std: Tensor | float | None = None,
    eps: float = DEFAULT_EPS,
    active_threshold: float | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    r"""Every manifold entropic metric of a decoder at latents ``z``: :class:`~lightning_mem.ManifoldEntropicMetrics` over chunks.

    .. math::
        H_i = h_0 + \tfrac12\mathbb{E}[\log G_{ii}],\quad H = d\,h_0 + \tfrac12\mathbb{E}[\log\det G],\quad
        \mathrm{MTC} = \textstyle\sum_i H_i - H,\quad \mathrm{MPMI}_{ij} = -\tfrac12\mathbb{E}[\log(1-\rho_{ij}^2)]

    The Jacobians are computed ``chunk_size`` samples at a time by :func:`lightning_mem.evaluation.evaluate_decoder`
    and added to the Metric's float64 sums, so memory stays bounded. The total correlation of the active latents,
    ``active/total_correlation``, takes a second pass (:func:`lightning_mem.evaluation.active_total_correlation`):
    over the Jacobians themselves when they fit in
    :data:`~lightning_mem.tracking.MAX_KEPT_JACOBIAN_BYTES` (64 MiB), else over the active latents' columns computed
    again. With ``progress`` a tqdm bar counts the chunks on a terminal; elsewhere (a log file, a pipe) a
    :class:`LineProgress` line marks each tenth of them.

    Args:
        decoder: callable ``z -> x`` (or ``(z, condition) -> x``), in eval mode.
        z: ``(N, d)`` latents.
        condition: per-sample condition ``(N, ...)`` of a conditional decoder.
        labels, num_classes: class labels ``(N,)`` in ``[0, num_classes)``: the metrics are computed per class and
            averaged over classes.
        chunk_size, mode: as for :func:`lightning_mem.decoder_jacobian`.
        std: data scale, as for :func:`lightning_mem.functional.manifold_entropy`.
        eps: relative floor: latent ``i`` is inactive at a sample when :math:`G_{ii} \\le \\epsilon \\max_j G_{jj}`.
        active_threshold: ``None``: the active latents are read off the spectrum's shape; a float: those with
            :math:`\exp(H_i - h_0)` above it (see :func:`lightning_mem.functional.num_active_latents`).
        progress: show the progress (on stderr).

    Returns:
        The dict of :meth:`ManifoldEntropicMetrics.compute <lightning_mem.ManifoldEntropicMetrics.compute>` and
        ``active/total_correlation`` (the README's vocabulary table).

    Example:
        >>> decoder = torch.nn.Linear(2, 3, bias=False)
        >>> with torch.no_grad():
        ...     _ = decoder.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))
        >>> metrics = decoder_metrics(decoder, torch.zeros(4, 2))
        >>> metrics["spectrum_order"].tolist(), round(float(metrics["total_correlation"]), 6)
        ([1, 0], 0.0)

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
    """
    check_positive_int(chunk_size, "chunk_size")
    metric = ManifoldEntropicMetrics(z.shape[-1], std=std, eps=eps, active_threshold=active_threshold, num_classes=num_classes)
    metric = metric.to(z.device)
    bar = _chunk_progress if progress else None
    kept = evaluate_decoder(
        decoder,
        z,
        metric,
        condition=condition,
        labels=labels,
        mode=mode,
        chunk_size=chunk_size,
        progress=bar,
        keep_bytes=MAX_KEPT_JACOBIAN_BYTES,
    )
    values = metric.compute()
    active = metric.active_latents(values["latent_entropy"]).mask
    values["active/total_correlation"] = active_total_correlation(  # on the kept Jacobians, else the decoder's active columns
        metric,
        active,
        total_correlation=values["total_correlation"],
        jacobians=kept,
        decoder=decoder,
        z=z,
        condition=condition,
        labels=labels,
        mode=mode,
        chunk_size=chunk_size,
    )
    return values


def format_metrics(metrics: Mapping[str, Tensor | float], *, top_k: int = 5, title: str | None = None) -> str:
    """A short plain-text table: total entropy, total correlation, active dims, MPMI and the top entropies.

    Example:
        >>> print(format_metrics({"entropy": 3.0, "total_correlation": 0.5, "num_active": 2, "latent_entropy": torch.tensor([1.0, 2.0])}))
        total entropy H          3.000 nats
        total correlation MTC    0.500 nats
        active dims              2 of 2
        top entropies H_i        z1: 2.000, z0: 1.000
    """
    lines = [] if title is None else [title]

    def row(name: str, value: str) -> None:
        lines.append(f"{name:<24} {value}")

    row("total entropy H", f"{float(metrics['entropy']):.3f} nats")
    row("total correlation MTC", f"{float(metrics['total_correlation']):.3f} nats")
    latent_entropy = torch.as_tensor(metrics["latent_entropy"])
    row("active dims", f"{int(metrics['num_active'])} of {latent_entropy.numel()}")
    for name, prefix in (("MPMI max / mean", ""), ("  active dims only", "active/")):
        if f"{prefix}pairwise_mutual_information_max" in metrics:
            largest, mean = (float(metrics[f"{prefix}pairwise_mutual_information_{kind}"]) for kind in ("max", "mean"))
            row(name, f"{largest:.3f} / {mean:.3f} nats")
    if "active/total_correlation" in metrics:
        row("MTC of the active dims", f"{float(metrics['active/total_correlation']):.3f} nats")
    spectrum, order = entropy_spectrum(latent_entropy)
    top = ", ".join(f"z{int(i)}: {float(h):.3f}" for h, i in zip(spectrum[:top_k], order[:top_k], strict=True))
    row("top entropies H_i", top)
    return "\n".join(lines)


def format_curves(reports: Sequence[Mapping[str, Any]], *, title: str | None = None) -> str:
    """A plain-text table of the curves: a row per checkpoint report (as :func:`evaluate_checkpoints` returns them).

    Example:
        >>> reports = [{"global_step": 10, "checkpoint": "a/epoch=0-step=10.ckpt", "entropy": 3.0, "total_correlation": 0.5,
        ...             "num_active": 2, "latent_dim": 4, "pairwise_mutual_information_max": 0.25}]
        >>> print(format_curves(reports))
          step  checkpoint             H (nats)  MTC (nats)  active  MPMI max
            10  epoch=0-step=10.ckpt      3.000       0.500     2/4     0.250
    """
    width = max([len("checkpoint"), *(len(Path(str(report["checkpoint"])).name) for report in reports)])
    lines = [] if title is None else [title]
    lines.append(f"{'step':>6}  {'checkpoint':<{width}}  {'H (nats)':>9}  {'MTC (nats)':>10}  {'active':>6}  {'MPMI max':>8}")
    for report in reports:
        step = "?" if report["global_step"] is None else report["global_step"]
        active = f"{report['num_active']}/{report['latent_dim']}"
        lines.append(
            f"{step:>6}  {Path(str(report['checkpoint'])).name:<{width}}  {float(report['entropy']):>9.3f}  "
            f"{float(report['total_correlation']):>10.3f}  {active:>6}  {float(report['pairwise_mutual_information_max']):>8.3f}"
        )
    return "\n".join(lines)


def _jsonable(value: object) -> object:
    if isinstance(value, Tensor):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


PICTURE_LATENTS = 5
"""How many of the top latents ``evaluate`` draws the pictures of, for an image decoder (as many as its summary lists)."""


@dataclass(frozen=True)
class _Settings:
    """How every checkpoint is evaluated: the options of :func:`evaluate_checkpoint`, checked once."""

    num_samples: int
    seed: int
    decoder: str | None
    latent_dim: int | None
    output_key: OutputKey | None
    latent_shape: Sequence[int] | None
    num_classes: int | None
    chunk_size: int
    mode: JacobianMode
    double: bool
    active_threshold: float | None
    image_shape: Sequence[int] | None = None

    def __post_init__(self) -> None:
        check_positive_int(self.num_samples, "num_samples")
        check_positive_int(self.chunk_size, "chunk_size")
        check_positive_int(self.num_classes, "num_classes", allow_none=True)
        if self.active_threshold is not None:
            check_positive_float(self.active_threshold, "active_threshold")
        check_mode(self.mode)
        check_output_key(self.output_key)
        object.__setattr__(self, "latent_shape", check_latent_shape(self.latent_shape, self.latent_dim))
        if self.image_shape is not None:
            shape = tuple(self.image_shape)
            if len(shape) not in (2, 3) or not all(isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in shape):
                raise ValueError(f"Expected `image_shape` to be (H, W) or (H, W, C) of positive ints, but got {self.image_shape!r}.")
            object.__setattr__(self, "image_shape", shape)

    def active_level(self, latent_entropy: Sequence[float] | Tensor) -> float:
        """The entropy above which a latent of ``latent_entropy`` counts as active (infinite when all or none do)."""
        return float(active_latents(torch.as_tensor(latent_entropy, dtype=torch.float64), threshold=self.active_threshold).level)

    def decoder_of(self, module: LightningModule) -> tuple[ResolvedDecoder, int]:
        """The module's decoder and latent size (the module in float64 first, with ``double``)."""
        if self.double:
            module.double()
        resolved = resolve_decoder(module, self.decoder, output_key=self.output_key, latent_shape=self.latent_shape)
        return resolved, resolve_latent_dim(module, self.latent_dim, resolved=resolved, latent_shape=self.latent_shape)

    def latents(self, latent_dim: int) -> tuple[Tensor, Tensor | None]:
        """The float64 prior latents of every evaluation and their class labels (``n % num_classes``)."""
        labels = None if self.num_classes is None else torch.arange(self.num_samples) % self.num_classes
        return prior_latents(self.num_samples, latent_dim, self.seed), labels


class _CheckpointInfo(NamedTuple):
    """What a checkpoint file says about itself, read without building the module."""

    path: Path
    global_step: int | None
    epoch: int | None
    parameter_shapes: dict[str, tuple[int, ...]]


def _read_checkpoint(path: Path) -> _CheckpointInfo:
    """The step, epoch and parameter shapes of a Lightning checkpoint; a zip checkpoint is memory-mapped, so its
    tensors are not read. Raises a ``RuntimeError`` naming the file when it is no loadable Lightning checkpoint."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=False, mmap=zipfile.is_zipfile(path))
    except Exception as error:
        raise RuntimeError(f"Could not load checkpoint {str(path)!r}: {type(error).__name__}: {' '.join(str(error).split())}") from error
    if not isinstance(content, Mapping) or not isinstance(content.get("state_dict"), Mapping):
        what = type(content).__name__
        raise RuntimeError(f"Expected a Lightning checkpoint (a dict with a state_dict) in {str(path)!r}, but it holds a {what}.")
    shapes = {name: tuple(value.shape) for name, value in content["state_dict"].items() if isinstance(value, Tensor)}
    return _CheckpointInfo(path, content.get("global_step"), content.get("epoch"), shapes)


def evaluate_checkpoint(
    checkpoint: str | Path,
    module_class: str | type[LightningModule],
    *,
    out_dir: str | Path | None = None,
    num_samples: int = 1024,
    seed: int = 0,
    decoder: str | None = None,
    latent_dim: int | None = None,
    output_key: OutputKey | None = None,
    latent_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    chunk_size: int = 64,
    mode: JacobianMode = "auto",
    double: bool = False,
    active_threshold: float | None = None,
    image_shape: Sequence[int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    r"""Evaluate a LightningModule checkpoint offline: all metrics at prior samples, a JSON report and PNG figures.

    .. math::
        z_n \sim N(0, I_d),\ n = 1..N \quad\Rightarrow\quad H_i,\ H,\ \mathrm{MTC},\ \mathrm{MPMI}
        \text{ of the decoder's Jacobians } J(z_n)

    Writes ``report.json``, ``spectrum.png`` (sorted :math:`H_i`, with the active level of
    :func:`~lightning_mem.functional.active_latents` dotted), ``pairwise_mutual_information.png`` (active latents
    marked) and, for a decoder whose output is an image, ``latent_columns.png`` and ``latent_traversals.png`` (what
    each of the top latents does: :func:`~lightning_mem.pictures.latent_pictures`) into ``out_dir`` (default:
    ``<checkpoint stem>_mem`` next to the checkpoint), each atomically. A folder of checkpoints:
    :func:`evaluate_checkpoints`.

    Args:
        checkpoint: Lightning checkpoint file.
        module_class: the LightningModule class or its import path ``"package.module:ClassName"``.
        out_dir: folder for the report and figures.
        num_samples: latent samples ``N`` drawn from the standard-normal prior.
        seed: seed of the latents' own ``torch.Generator`` (the global RNG is not used).
        decoder: attribute or method path of the decoder (dotted: ``"model.decode"``; default: the search of
            :func:`lightning_mem.decoders.resolve_decoder`, as the callback does; a FrEIA, zuko or normflows flow: its
            sampling direction).
        latent_dim: latent size (default: found as :func:`lightning_mem.decoders.resolve_latent_dim` finds it).
        output_key: the key of a mapping output or the index of a tuple output to measure.
        latent_shape: the shape of one latent as the decoder takes it, e.g. ``(100, 1, 1)``.
        num_classes: a conditional decoder ``(z, labels) -> x``: the latent ``n`` gets the label ``n % num_classes``
            and the metrics are averaged over classes (as the callback does).
        chunk_size: samples differentiated at once (bounds memory).
        mode: Jacobian mode, as for :func:`lightning_mem.decoder_jacobian`.
        double: evaluate the decoder in float64 (the statistics are float64 in any case).
        active_threshold: ``None`` (default): the active latents are read off the spectrum's shape; a float: the
            absolute rule, see :func:`lightning_mem.functional.num_active_latents`.
        image_shape: the image shape ``(H, W)`` or ``(H, W, C)`` of a flattened output, for the latent pictures
            (an output shaped ``(C, H, W)`` or ``(H, W)`` is recognised; see :func:`lightning_mem.pictures.image_shape_of`).
        progress: show the progress over the Jacobian chunks on stderr (see :func:`decoder_metrics`).

    Returns:
        The report, with the metrics of :func:`decoder_metrics` as JSON types, plus ``checkpoint``, ``module_class``,
        ``decoder``, ``latent_dim``, ``num_samples``, ``seed``, ``global_step``, ``wall_time_s`` and ``files``
        (``report``, ``spectrum``, ``pairwise_mutual_information`` paths).

    Raises:
        FileNotFoundError: missing checkpoint file.
        ImportError: unimportable ``module_class``.
        TypeError: ``module_class`` is not a LightningModule.
        ValueError: the module has no decoder or no known latent size, ``out_dir`` is not writable, the decoder
            fails a test call at two latents (the message says why and how to fix it), or a bad number.
        RuntimeError: the checkpoint does not load into the class.

    Everything that can be checked is checked before the Jacobians are computed: the checkpoint loads (the legacy
    non-zip format too), the output folder is writable, the decoder is found and returns a differentiable tensor.

    Example:
        >>> import tempfile, lightning.pytorch as pl
        >>> from lightning_mem.demo.models import BetaVAE
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     trainer = pl.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                          enable_model_summary=False)
        ...     trainer.strategy.connect(BetaVAE(latent_dim=3, hidden_dim=8))
        ...     trainer.save_checkpoint(f"{tmp}/model.ckpt")
        ...     report = evaluate_checkpoint(f"{tmp}/model.ckpt", "lightning_mem.demo.models:BetaVAE", num_samples=8, progress=False)
        >>> report["latent_dim"], len(report["spectrum"]), sorted(report["files"])
        (3, 3, ['pairwise_mutual_information', 'report', 'spectrum'])

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
    """
    settings = _Settings(
        num_samples,
        seed,
        decoder,
        latent_dim,
        output_key,
        latent_shape,
        num_classes,
        chunk_size,
        mode,
        double,
        active_threshold,
        image_shape,
    )
    start = time.perf_counter()
    checkpoint = Path(checkpoint)
    module = load_module(module_class, checkpoint)
    info = _read_checkpoint(checkpoint)
    out = Path(out_dir) if out_dir is not None else checkpoint.with_name(f"{checkpoint.stem}_mem")
    _check_writable(out)
    resolved, d = settings.decoder_of(module)
    z, labels = settings.latents(d)
    return _evaluate_module(
        module, resolved, z, labels, settings, info=info, out=out, module_class=module_class, progress=progress, start=start
    )


def find_checkpoints(folder: str | Path) -> list[Path]:
    """The checkpoint files (``*.ckpt``) in ``folder``, or, when it holds none, in its ``checkpoints/`` subfolder (a
    Lightning run's ``version_<k>`` folder); sorted by name (:func:`evaluate_checkpoints` sorts them by step).

    Raises:
        FileNotFoundError: if ``folder`` is not a folder.
        ValueError: if neither holds a checkpoint file.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     for name in ("checkpoints/epoch=0-step=5.ckpt", "checkpoints/last.ckpt", "events.out"):
        ...         (Path(tmp) / name).parent.mkdir(exist_ok=True)
        ...         (Path(tmp) / name).touch()
        ...     [path.name for path in find_checkpoints(tmp)]
        ['epoch=0-step=5.ckpt', 'last.ckpt']
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Expected `folder` to be an existing folder, but {str(folder)!r} is not one.")
    for candidate in (folder, folder / "checkpoints"):
        paths = sorted(path for path in candidate.glob(CHECKPOINT_PATTERN) if path.is_file())
        if paths:
            return paths
    raise ValueError(
        f"Expected the folder {str(folder)!r} to hold checkpoint files ({CHECKPOINT_PATTERN}), directly or in a checkpoints/ "
        "subfolder, but it holds none."
    )


def evaluate_checkpoints(
    folder: str | Path,
    module_class: str | type[LightningModule],
    *,
    out_dir: str | Path | None = None,
    num_samples: int = 1024,
    seed: int = 0,
    decoder: str | None = None,
    latent_dim: int | None = None,
    output_key: OutputKey | None = None,
    latent_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    chunk_size: int = 64,
    mode: JacobianMode = "auto",
    double: bool = False,
    active_threshold: float | None = None,
    image_shape: Sequence[int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    r"""Evaluate every checkpoint of a folder (a run's ``checkpoints/``) at the same latents: the metric-vs-step curves.

    .. math::
        z_n \sim N(0, I_d) \text{ drawn once (seed } s) \quad\Rightarrow\quad
        \big(H,\ \mathrm{MTC},\ \#\text{active},\ \max/\mathrm{mean}\ \mathrm{MPMI},\ H_{(1)} \ge \dots \ge H_{(d)}\big)
        \text{ at every checkpoint}

    The checkpoints (:func:`find_checkpoints`) are sorted by the ``global_step`` stored in them, not by name. Each is
    evaluated as :func:`evaluate_checkpoint` does, at the same ``num_samples`` latents, with its report and figures in
    ``out_dir/<checkpoint stem>/``. Into ``out_dir`` (default: ``<folder name>_mem`` next to the folder) go:

    - ``curves.csv``: a row per checkpoint, in step order: ``step``, ``epoch``, ``checkpoint`` (file name), the
      :data:`CURVE_METRICS`, ``spectrum_1`` ... ``spectrum_d`` (the sorted :math:`H_i`) and ``latent_entropy_0`` ...
      ``latent_entropy_{d-1}``; rewritten after each checkpoint, so an interrupted run keeps the rows done;
    - ``curves.png``: entropy, total correlation, active latents and MPMI against the step;
    - ``spectra.png``: the entropy spectra of all checkpoints, coloured by step, with the last one's active level.

    Every file is written atomically (a temporary file, then ``os.replace``). Before any Jacobian is computed: the
    output folder is checked writable, every checkpoint file is read (memory-mapped: its step and parameter shapes;
    an unreadable one, or one whose parameters differ from the others', is a named error naming the file), and the
    first checkpoint's module is built and its decoder found and called on two latents. Each module is then built
    once, with ``module_class.load_from_checkpoint``, and released after its evaluation.

    Args:
        folder: a folder of checkpoint files, or a run folder with a ``checkpoints/`` subfolder.
        module_class: the LightningModule class or its import path ``"package.module:ClassName"``.
        num_samples, seed, decoder, latent_dim, output_key, latent_shape: as for :func:`evaluate_checkpoint`.
        num_classes, chunk_size, mode, double, active_threshold, image_shape: as for :func:`evaluate_checkpoint`.
        out_dir: folder of the curves, with a subfolder per checkpoint.
        progress: a line per checkpoint on stderr, and on a terminal a bar over each one's Jacobian chunks.

    Returns:
        ``folder``, ``module_class``, ``num_samples``, ``seed``, ``checkpoints`` (the reports of
        :func:`evaluate_checkpoint`, in step order), ``files`` (``curves``, ``curves_figure``, ``spectra_figure``) and
        ``wall_time_s``.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ImportError, TypeError: as for :func:`evaluate_checkpoint`.
        ValueError: no checkpoint in the folder, one without a ``global_step``, checkpoints of different parameter
            shapes or latent sizes, and the errors of :func:`evaluate_checkpoint`.
        RuntimeError: a checkpoint that is no loadable Lightning checkpoint (the message names it).

    Example:
        >>> import tempfile, lightning.pytorch as pl
        >>> from lightning_mem.demo.models import BetaVAE
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     trainer = pl.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                          enable_model_summary=False)
        ...     trainer.strategy.connect(BetaVAE(latent_dim=3, hidden_dim=8))
        ...     for name in ("b", "a"):
        ...         trainer.save_checkpoint(f"{tmp}/run/{name}.ckpt")
        ...     result = evaluate_checkpoints(f"{tmp}/run", BetaVAE, num_samples=8, progress=False)
        ...     header = (Path(tmp) / "run_mem" / "curves.csv").read_text().splitlines()[0].split(",")
        >>> [Path(report["checkpoint"]).name for report in result["checkpoints"]], header[:5], header[-1]
        (['a.ckpt', 'b.ckpt'], ['step', 'epoch', 'checkpoint', 'entropy', 'entropy_per_dim'], 'latent_entropy_2')

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
    """
    settings = _Settings(
        num_samples,
        seed,
        decoder,
        latent_dim,
        output_key,
        latent_shape,
        num_classes,
        chunk_size,
        mode,
        double,
        active_threshold,
        image_shape,
    )
    start = time.perf_counter()
    folder = Path(folder)
    paths = find_checkpoints(folder)
    out = Path(out_dir) if out_dir is not None else folder.with_name(f"{folder.name}_mem")
    _check_writable(out)
    cls = _module_class(module_class)
    infos = [_read_checkpoint(path) for path in paths]
    for info in infos:
        if not isinstance(info.global_step, int):
            raise ValueError(f"Expected every checkpoint to store its global_step, as Lightning's do, but {str(info.path)!r} does not.")
    infos.sort(key=lambda info: (info.global_step, info.path.name))
    for info in infos[1:]:
        if info.parameter_shapes != infos[0].parameter_shapes:
            raise ValueError(
                f"Expected the checkpoints to hold parameters of the same shapes, but {str(infos[0].path)!r} and "
                f"{str(info.path)!r} differ: {_shape_difference(infos[0].parameter_shapes, info.parameter_shapes)}."
            )
    module = load_module(cls, infos[0].path)
    resolved, d = settings.decoder_of(module)
    z, labels = settings.latents(d)
    with evaluation_mode([module]):
        _probe(resolved.function, z.to(_dtype(module)), labels, resolved.name)
    files = {name: out / name for name in ("curves.csv", "curves.png", "spectra.png")}
    for path in files.values():  # a run killed from here on leaves no stale curves beside new reports
        path.unlink(missing_ok=True)
    lines = LineProgress(len(infos), "checkpoints", unit="evaluated", parts=len(infos)) if progress else None
    reports: list[dict[str, Any]] = []
    for index, info in enumerate(infos):
        if index:
            module = load_module(cls, info.path)
            resolved, latent_size = settings.decoder_of(module)
            if latent_size != d:
                raise ValueError(f"Expected every checkpoint's latent size to be {d}, but {str(info.path)!r} has {latent_size}.")
        chunk_bar = progress and is_terminal(sys.stderr)  # elsewhere a line per checkpoint is enough
        report = _evaluate_module(
            module, resolved, z, labels, settings, info=info, out=out / info.path.stem, module_class=cls, progress=chunk_bar
        )
        del module, resolved  # one module in memory at a time
        reports.append(report)
        _write_text_atomically(files["curves.csv"], _curves_csv(reports, infos))
        if lines is not None:
            summary = f"H {report['entropy']:.3f} nats, {report['num_active']}/{d} active"
            lines.update(index + 1, postfix=f"step {info.global_step} ({info.path.name}): {summary}")
    save_figure(_curves_figure(reports), files["curves.png"], close=False)
    save_spectrum_figure(
        {
            f"{Path(str(report['checkpoint'])).name} (step {report['global_step']})": torch.tensor(report["latent_entropy"])
            for report in reports
        },
        files["spectra.png"],
        title=f"Entropy spectra of {len(reports)} checkpoints ({cls.__name__})",
        threshold=settings.active_level(reports[-1]["latent_entropy"]),
        color_values=[report["global_step"] for report in reports],
        color_label="global step",
    )
    return {
        "folder": str(folder),
        "module_class": _class_path(module_class),
        "num_samples": num_samples,
        "seed": seed,
        "checkpoints": reports,
        "files": {
            "curves": str(files["curves.csv"]),
            "curves_figure": str(files["curves.png"]),
            "spectra_figure": str(files["spectra.png"]),
        },
        "wall_time_s": time.perf_counter() - start,
    }


def _shape_difference(expected: Mapping[str, tuple[int, ...]], actual: Mapping[str, tuple[int, ...]]) -> str:
    only_first, only_second = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    if only_first or only_second:
        return f"parameters only in the first {only_first[:3]}, only in the second {only_second[:3]}"
    name = next(name for name in expected if expected[name] != actual[name])
    return f"{name} has shape {expected[name]} in the first, {actual[name]} in the second"


def _save_latent_pictures(
    module: LightningModule,
    resolved: ResolvedDecoder,
    z: Tensor,
    labels: Tensor | None,
    spectrum_order: Tensor,
    settings: _Settings,
    out: Path,
    where: str,
) -> dict[str, Path]:
    """For a decoder whose output is an image: ``latent_columns.png`` and ``latent_traversals.png`` of the top
    :data:`PICTURE_LATENTS` latents, at the first :data:`~lightning_mem.tracking.PICTURE_SAMPLES` latents (the
    callback's figures); nothing for another decoder. Pictures are extras, as in the callback: a decoder they do not
    suit (e.g. one that cannot decode a traversal) gets a warning, and the report is written without them."""
    rows = slice(0, PICTURE_SAMPLES)
    condition = None if labels is None else labels[rows]
    try:
        with evaluation_mode([module]):
            pictures = latent_pictures(
                resolved.function, z[rows], spectrum_order[:PICTURE_LATENTS], image_shape=settings.image_shape, condition=condition
            )
    except Exception as error:
        warnings.warn(f"No latent pictures ({type(error).__name__}: {error}).", RuntimeWarning, stacklevel=2)
        return {}
    if pictures is None:
        return {}
    files = {}
    for kind, what in (("columns", "mean |dg/dz_i|"), ("traversals", "traversals")):
        figure = plot_latent_pictures(pictures, kind=kind, title=f"Top latents: {what} ({where})")
        files[f"latent_{kind}"] = save_figure(figure, out / f"latent_{kind}.png")
    return files


def _class_path(module_class: str | type) -> str:
    return module_class if isinstance(module_class, str) else f"{module_class.__module__}:{module_class.__qualname__}"


def _dtype(module: LightningModule) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.get_default_dtype())


def _evaluate_module(
    module: LightningModule,
    resolved: ResolvedDecoder,
    z: Tensor,
    labels: Tensor | None,
    settings: _Settings,
    *,
    info: _CheckpointInfo,
    out: Path,
    module_class: str | type,
    progress: bool,
    start: float | None = None,
) -> dict[str, Any]:
    """The metrics of one loaded checkpoint at ``z``, its figures and ``report.json`` in ``out`` (the report last, so
    that one beside figures always describes them); ``wall_time_s`` counts from ``start`` (default: now)."""
    start = time.perf_counter() if start is None else start
    z = z.to(_dtype(module))
    with evaluation_mode([module]):
        output_shape = _probe(resolved.function, z, labels, resolved.name)
        image_shape_of(output_shape, settings.image_shape)  # a wrong `image_shape`: a named error before any Jacobian
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").unlink(missing_ok=True)  # a run killed from here on leaves no stale report beside new figures
        metrics = decoder_metrics(
            resolved.function,
            z,
            condition=labels,
            labels=labels,
            num_classes=settings.num_classes,
            chunk_size=settings.chunk_size,
            mode=settings.mode,
            active_threshold=settings.active_threshold,
            progress=progress,
        )
    where = type(module).__name__ if info.global_step is None else f"{type(module).__name__}, step {info.global_step}"
    active = active_latents(metrics["latent_entropy"], threshold=settings.active_threshold)
    spectrum = save_spectrum_figure(
        {info.path.name: metrics["latent_entropy"]},
        out / "spectrum.png",
        title=f"Entropy spectrum ({where})",
        threshold=float(active.level),
    )
    figure, _ = plot_mutual_information(
        metrics["pairwise_mutual_information"],
        title=f"Manifold pairwise mutual information ({where})",
        active=active.mask,
    )
    mutual_information = save_figure(figure, out / "pairwise_mutual_information.png")
    pictures = _save_latent_pictures(module, resolved, z, labels, metrics["spectrum_order"], settings, out, where)
    report = {
        "checkpoint": str(info.path),
        "module_class": _class_path(module_class),
        "decoder": resolved.name,
        "latent_dim": z.shape[1],
        "latent_shape": None if settings.latent_shape is None else list(settings.latent_shape),
        "output_key": settings.output_key,
        "num_classes": settings.num_classes,
        "num_samples": settings.num_samples,
        "seed": settings.seed,
        "global_step": info.global_step,
        "active_threshold": settings.active_threshold,
        **{key: _jsonable(value) for key, value in metrics.items()},
        "wall_time_s": time.perf_counter() - start,
        "files": {
            "report": str(out / "report.json"),
            "spectrum": str(spectrum),
            "pairwise_mutual_information": str(mutual_information),
            **{name: str(path) for name, path in pictures.items()},
        },
    }
    _write_text_atomically(out / "report.json", json.dumps(report, indent=2))
    return report


def _curves_csv(reports: Sequence[Mapping[str, Any]], infos: Sequence[_CheckpointInfo]) -> str:
    """``curves.csv``: a row per report, the report of ``infos[k]`` first (floats as Python writes them: they read back
    exactly)."""
    d = len(reports[0]["spectrum"])
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(
        [
            "step",
            "epoch",
            "checkpoint",
            *CURVE_METRICS,
            *(f"spectrum_{k}" for k in range(1, d + 1)),
            *(f"latent_entropy_{i}" for i in range(d)),
        ]
    )
    for report, info in zip(reports, infos[: len(reports)], strict=True):
        writer.writerow(
            [
                "" if info.global_step is None else info.global_step,
                "" if info.epoch is None else info.epoch,
                info.path.name,
                *(report[name] for name in CURVE_METRICS),
                *report["spectrum"],
                *report["latent_entropy"],
            ]
        )
    return text.getvalue()


def _curves_figure(reports: Sequence[Mapping[str, Any]]) -> Any:
    """Entropy, total correlation, active latents and MPMI (max and mean) against the step, in four panels (the total
    correlation and the MPMI of all latents and of the active ones)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    steps = [report["global_step"] for report in reports]
    figure = Figure(figsize=(9.0, 6.0), layout="constrained")
    axes = figure.subplots(2, 2, sharex=True)
    pairwise = {
        f"{prefix}pairwise_mutual_information_{kind}": f"{kind}{suffix}"
        for prefix, suffix in (("", ""), ("active/", ", active latents"))
        for kind in ("max", "mean")
    }
    panels = (
        (axes[0, 0], "total entropy $H$ (nats)", {"entropy": None}),
        (axes[0, 1], "total correlation MTC (nats)", {"total_correlation": "all latents", "active/total_correlation": "active latents"}),
        (axes[1, 0], "active latents", {"num_active": None}),
        (axes[1, 1], "pairwise MI (nats)", pairwise),
    )
    for ax, label, keys in panels:
        for key, legend in keys.items():
            ax.plot(steps, [report[key] for report in reports], marker="o", markersize=3, label=legend)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize="small")
    axes[1, 0].yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[1]:
        ax.set_xlabel("global step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(f"Manifold entropic metrics of {len(reports)} checkpoints")
    return figure


def _probe(decoder: Callable, z: Tensor, labels: Tensor | None, name: str) -> tuple[int, ...]:
    """The decoder once at two of the latents, before the Jacobians: a named error for what would fail or mislead;
    the shape of one output."""
    rows = slice(0, 2)
    try:
        return tuple(probe_decoder(decoder, z[rows], None if labels is None else labels[rows], check_finite=True).shape[1:])
    except (ValueError, TypeError) as error:
        raise type(error)(f"The decoder `{name}` failed a test call: {error}") from error
    except Exception as error:
        message = str(error).splitlines()[0] if str(error) else ""
        raise ValueError(
            f"The decoder `{name}` failed a test call on 2 latents of size {z.shape[1]} ({type(error).__name__}: {message}). "
            "Check --decoder, --latent-dim (--latent-shape for a decoder that takes latents of another shape, --num-classes "
            "for a conditional one)."
        ) from error


def _check_writable(folder: Path) -> None:
    """Check that ``folder`` can be created and written to (a file in it or its nearest existing ancestor), creating
    nothing, before any computation."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{str(existing)!r} is a file")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(
            f"Expected `out_dir` to be a writable folder, but {str(folder)!r} is not ({type(error).__name__}: {error})."
        ) from error


def _write_text_atomically(path: Path, text: str) -> None:
    with atomic_write(path) as file:
        file.write(text)
