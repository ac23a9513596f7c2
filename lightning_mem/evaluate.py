"""Offline evaluation of a trained LightningModule checkpoint: every manifold entropic metric, a JSON report and figures."""

from __future__ import annotations

import importlib
import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from lightning_mem._checks import check_positive_int
from lightning_mem.decoders import resolve_decoder, resolve_latent_dim
from lightning_mem.evaluation import evaluate_decoder, evaluation_mode, prior_latents
from lightning_mem.functional import DEFAULT_ACTIVE_THRESHOLD, DEFAULT_EPS, entropy_spectrum
from lightning_mem.jacobian import OutputKey, check_latent_shape, check_output_key, probe_decoder
from lightning_mem.metrics import ManifoldEntropicMetrics
from lightning_mem.plotting import save_mutual_information_figure, save_spectrum_figure

__all__ = ["decoder_metrics", "evaluate_checkpoint", "format_metrics", "load_module"]


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
    cls = _import_class(module_class) if isinstance(module_class, str) else module_class
    if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
        raise TypeError(f"Expected `module_class` to be a LightningModule subclass, but got {cls!r}.")
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
    mode: str = "auto",
    std: Tensor | float | None = None,
    eps: float = DEFAULT_EPS,
    active_threshold: float = DEFAULT_ACTIVE_THRESHOLD,
    progress: bool = False,
) -> dict[str, Tensor]:
    r"""Every manifold entropic metric of a decoder at latents ``z``: :class:`~lightning_mem.ManifoldEntropicMetrics` over chunks.

    .. math::
        H_i = h_0 + \tfrac12\mathbb{E}[\log G_{ii}],\quad H = d\,h_0 + \tfrac12\mathbb{E}[\log\det G],\quad
        \mathrm{MTC} = \textstyle\sum_i H_i - H,\quad \mathrm{MPMI}_{ij} = -\tfrac12\mathbb{E}[\log(1-\rho_{ij}^2)]

    The Jacobians are computed ``chunk_size`` samples at a time by :func:`lightning_mem.evaluation.evaluate_decoder`
    and added to the Metric's float64 sums, so memory stays bounded; a tqdm progress bar counts the chunks when
    ``progress`` is set.

    Args:
        decoder: callable ``z -> x`` (or ``(z, condition) -> x``), in eval mode.
        z: ``(N, d)`` latents.
        condition: per-sample condition ``(N, ...)`` of a conditional decoder.
        labels, num_classes: class labels ``(N,)`` in ``[0, num_classes)``: the metrics are computed per class and
            averaged over classes.
        chunk_size, mode: as for :func:`lightning_mem.decoder_jacobian`.
        std: data scale, as for :func:`lightning_mem.functional.manifold_entropy`.
        eps: floor on :math:`G_{ii}`.
        active_threshold: a latent is active when :math:`\exp(H_i - h_0)` exceeds it.
        progress: show a progress bar.

    Returns:
        The dict of :meth:`ManifoldEntropicMetrics.compute <lightning_mem.ManifoldEntropicMetrics.compute>` (the
        README's vocabulary table).

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

    def progress_bar(chunks: Iterator[Any], total: int) -> Iterator[Any]:
        from tqdm.auto import tqdm

        return iter(tqdm(chunks, total=total, desc="manifold entropic metrics", unit="chunk", leave=False))

    bar = progress_bar if progress else None
    evaluate_decoder(decoder, z, metric, condition=condition, labels=labels, mode=mode, chunk_size=chunk_size, progress=bar)
    return metric.compute()


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
    if "pairwise_mutual_information_max" in metrics:
        row(
            "MPMI max / mean",
            f"{float(metrics['pairwise_mutual_information_max']):.3f} / {float(metrics['pairwise_mutual_information_mean']):.3f} nats",
        )
    spectrum, order = entropy_spectrum(latent_entropy)
    top = ", ".join(f"z{int(i)}: {float(h):.3f}" for h, i in zip(spectrum[:top_k], order[:top_k], strict=True))
    row("top entropies H_i", top)
    return "\n".join(lines)


def _jsonable(value: object) -> object:
    if isinstance(value, Tensor):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


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
    mode: str = "auto",
    double: bool = False,
    active_threshold: float = DEFAULT_ACTIVE_THRESHOLD,
    progress: bool = True,
) -> dict[str, object]:
    r"""Evaluate a LightningModule checkpoint offline: all metrics at prior samples, a JSON report and two PNGs.

    .. math::
        z_n \sim N(0, I_d),\ n = 1..N \quad\Rightarrow\quad H_i,\ H,\ \mathrm{MTC},\ \mathrm{MPMI}
        \text{ of the decoder's Jacobians } J(z_n)

    Writes ``report.json``, ``spectrum.png`` (sorted :math:`H_i`) and ``pairwise_mutual_information.png`` into
    ``out_dir`` (default: ``<checkpoint stem>_mem`` next to the checkpoint).

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
        active_threshold: see :func:`lightning_mem.functional.num_active_latents`.
        progress: show a progress bar over the Jacobian chunks.

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
    check_positive_int(num_samples, "num_samples")
    check_positive_int(chunk_size, "chunk_size")
    check_positive_int(num_classes, "num_classes", allow_none=True)
    check_output_key(output_key)
    latent_shape = check_latent_shape(latent_shape, latent_dim)
    start = time.perf_counter()
    checkpoint = Path(checkpoint)
    module = load_module(module_class, checkpoint)
    step = torch.load(checkpoint, map_location="cpu", weights_only=False).get("global_step")
    if double:
        module = module.double()
    out = Path(out_dir) if out_dir is not None else checkpoint.with_name(f"{checkpoint.stem}_mem")
    _check_writable(out)
    resolved = resolve_decoder(module, decoder, output_key=output_key, latent_shape=latent_shape)
    d = resolve_latent_dim(module, latent_dim, resolved=resolved, latent_shape=latent_shape)
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.get_default_dtype())
    z = prior_latents(num_samples, d, seed).to(dtype)
    labels = None if num_classes is None else torch.arange(num_samples) % num_classes
    with evaluation_mode([module]):
        _probe(resolved.function, z, labels, resolved.name)
        (out / "report.json").unlink(missing_ok=True)  # a run killed from here on leaves no stale report beside new figures
        metrics = decoder_metrics(
            resolved.function,
            z,
            condition=labels,
            labels=labels,
            num_classes=num_classes,
            chunk_size=chunk_size,
            mode=mode,
            active_threshold=active_threshold,
            progress=progress,
        )

    class_path = module_class if isinstance(module_class, str) else f"{module_class.__module__}:{module_class.__qualname__}"
    files = {
        "report": str(out / "report.json"),
        "spectrum": str(
            save_spectrum_figure(
                {checkpoint.name: metrics["latent_entropy"]}, out / "spectrum.png", title=f"Entropy spectrum ({type(module).__name__})"
            )
        ),
        "pairwise_mutual_information": str(
            save_mutual_information_figure(metrics["pairwise_mutual_information"], out / "pairwise_mutual_information.png")
        ),
    }
    report: dict[str, object] = {
        "checkpoint": str(checkpoint),
        "module_class": class_path,
        "decoder": resolved.name,
        "latent_dim": d,
        "latent_shape": None if latent_shape is None else list(latent_shape),
        "output_key": output_key,
        "num_classes": num_classes,
        "num_samples": num_samples,
        "seed": seed,
        "global_step": step,
        "active_threshold": active_threshold,
        **{key: _jsonable(value) for key, value in metrics.items()},
        "wall_time_s": time.perf_counter() - start,
        "files": files,
    }
    _write_text_atomically(Path(files["report"]), json.dumps(report, indent=2))
    return report


def _probe(decoder: Callable, z: Tensor, labels: Tensor | None, name: str) -> None:
    """The decoder once at two of the latents, before the Jacobians: a named error for what would fail or mislead."""
    rows = slice(0, 2)
    try:
        probe_decoder(decoder, z[rows], None if labels is None else labels[rows], check_finite=True)
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
    """Create ``folder`` and check that a file can be written there, before any computation."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(
            f"Expected `out_dir` to be a writable folder, but {str(folder)!r} is not ({type(error).__name__}: {error})."
        ) from error


def _write_text_atomically(path: Path, text: str) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
