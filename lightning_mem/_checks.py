"""Input validation shared by every public entry point: each checks its arguments once, inner helpers trust them."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "JACOBIAN_MODES",
    "check_callback_inputs",
    "check_eval_mode",
    "check_finite",
    "check_gram",
    "check_gram_values",
    "check_jacobian",
    "check_labels",
    "check_latents",
    "check_mode",
    "check_non_negative_float",
    "check_not_meta",
    "check_positive_float",
    "check_positive_int",
    "check_scale",
]

JACOBIAN_MODES = ("auto", "forward", "reverse", "loop")
"""The ways :func:`lightning_mem.decoder_jacobian` can differentiate a decoder."""


def check_positive_int(value: Any, name: str, *, allow_none: bool = False) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is an int >= 1 (or ``None`` when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive int{' or None' if allow_none else ''}, but got {value!r}.")


def check_positive_float(value: Any, name: str) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a real number in ``(0, inf)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"Expected `{name}` to be a positive finite float, but got {value!r}.")


def check_non_negative_float(value: Any, name: str) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a real number in ``[0, inf)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"Expected `{name}` to be a non-negative float, but got {value!r}.")


def check_mode(mode: Any) -> None:
    """Raise a ``ValueError`` unless ``mode`` is one of :data:`JACOBIAN_MODES`."""
    if mode not in JACOBIAN_MODES:
        raise ValueError(f"Expected `mode` to be one of {JACOBIAN_MODES}, but got {mode!r}.")


def check_latents(z: Any, condition: Any = None) -> None:
    """Check latents ``(N, d)`` (floating point, non-empty) and an optional per-sample ``condition`` ``(N, ...)``."""
    if not isinstance(z, Tensor):
        raise TypeError(f"Expected `z` to be a torch.Tensor, but got {type(z).__name__}.")
    check_not_meta(z, "z")
    if z.ndim != 2:
        raise ValueError(f"Expected `z` of shape (N, d), but got {tuple(z.shape)}.")
    if z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"Expected `z` with at least one sample and one latent dim, but got shape {tuple(z.shape)}.")
    if not z.is_floating_point():
        raise TypeError(f"Expected `z` to be a floating point tensor, but got dtype {z.dtype}.")
    if condition is not None:
        if not isinstance(condition, Tensor):
            raise TypeError(f"Expected `condition` to be a torch.Tensor or None, but got {type(condition).__name__}.")
        if condition.ndim == 0 or condition.shape[0] != z.shape[0]:
            raise ValueError(
                f"Expected `condition` with N == {z.shape[0]} rows (one per latent sample), but got shape {tuple(condition.shape)}."
            )


def check_finite(tensor: Tensor, name: str) -> None:
    """Raise a ``ValueError`` naming the first sample (row) of ``tensor`` that holds NaN or inf."""
    # Fast path: a finite sum proves every entry finite (NaN and inf propagate through a sum); only a non-finite sum
    # (a bad entry, or an overflowing sum of finite entries) pays for the per-sample search below.
    if bool(torch.isfinite(tensor.detach().sum())):
        return
    bad = ~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
    if bad.any():
        raise ValueError(
            f"Expected `{name}` to be finite, but {int(bad.sum())} of {tensor.shape[0]} samples hold NaN or inf "
            f"(first at sample {int(bad.nonzero()[0])})."
        )


def check_jacobian(jacobian: Any, name: str = "jacobian", latent_dim: int | None = None, *, check_values: bool = True) -> Tensor:
    """Validate a ``(N, *output_shape, d)`` Jacobian and return it flattened to ``(N, D, d)``.

    ``check_values=False`` skips the pass over every entry, for callers that check a cheaper quantity derived from
    all of them (the Gram diagonal :math:`\\mathrm{diag}(J^\\top J)`).
    """
    if not isinstance(jacobian, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(jacobian).__name__}.")
    check_not_meta(jacobian, name)
    if not jacobian.is_floating_point():
        raise TypeError(f"Expected `{name}` to be a floating point tensor, but got dtype {jacobian.dtype}.")
    expected_d = "d" if latent_dim is None else f"d == {latent_dim}"
    if jacobian.ndim < 3 or (latent_dim is not None and jacobian.shape[-1] != latent_dim):
        raise ValueError(f"Expected `{name}` of shape (N, *output_shape, {expected_d}), but got {tuple(jacobian.shape)}.")
    if jacobian.shape[0] == 0 or jacobian.shape[-1] == 0 or jacobian[0].numel() == 0:
        raise ValueError(f"Expected `{name}` with at least one sample, output and latent dim, but got shape {tuple(jacobian.shape)}.")
    if check_values:
        check_finite(jacobian, name)
    return jacobian.reshape(jacobian.shape[0], -1, jacobian.shape[-1])


def check_gram(gram: Any, name: str = "gram", latent_dim: int | None = None) -> Tensor:
    """Validate a ``(N, d, d)`` batch of Gram matrices (floating point, finite) and return it."""
    if not isinstance(gram, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(gram).__name__}.")
    check_not_meta(gram, name)
    if not gram.is_floating_point():
        raise TypeError(f"Expected `{name}` to be a floating point tensor, but got dtype {gram.dtype}.")
    d = gram.shape[-1] if gram.ndim else 0
    if not (gram.ndim == 3 and gram.shape[1] == d and (latent_dim is None or d == latent_dim)):
        expected = "d, d" if latent_dim is None else f"{latent_dim}, {latent_dim}"
        raise ValueError(f"Expected `{name}` of shape (N, {expected}), but got {tuple(gram.shape)}.")
    if gram.shape[0] == 0 or d == 0:
        raise ValueError(f"Expected `{name}` with at least one sample and one latent dim, but got shape {tuple(gram.shape)}.")
    check_finite(gram, name)
    return gram


def check_scale(scale: Tensor | float, name: str, numel: int | None = None) -> Tensor:
    """A positive, finite scale (``std`` or ``sigma``) as a float64 tensor; ``numel`` entries when given."""
    scale = torch.as_tensor(scale, dtype=torch.float64)
    if numel is not None and scale.numel() != numel:
        raise ValueError(f"Expected `{name}` with {numel} entries, but got shape {tuple(scale.shape)}.")
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError(
            f"Expected `{name}` to be positive and finite, but got {scale if scale.numel() < 8 else 'entries outside (0, inf)'}."
        )
    return scale


def check_eval_mode(decoder: Any) -> None:
    """Raise a ``ValueError`` if a decoder module (or a bound method's module) has normalization layers in training mode."""
    owner = decoder if isinstance(decoder, nn.Module) else getattr(decoder, "__self__", None)
    modules = owner.modules() if isinstance(owner, nn.Module) else ()
    training = [type(m).__name__ for m in modules if isinstance(m, nn.modules.batchnorm._NormBase) and m.training]
    if training:
        raise ValueError(
            f"Expected the decoder's normalization layers to be in eval mode, but {training[0]} is in training mode: "
            "its output would depend on the whole batch and its running statistics would change. "
            "Call `decoder.eval()` first (and `decoder.train()` afterwards to restore it)."
        )


def check_labels(labels: Tensor, num_classes: int, name: str = "labels") -> None:
    """Integer class labels ``(N,)`` in ``[0, num_classes)``."""
    if (
        not isinstance(labels, Tensor)
        or labels.ndim != 1
        or labels.is_floating_point()
        or labels.is_complex()
        or labels.dtype == torch.bool
    ):
        raise ValueError(
            f"Expected `{name}` to be integer class labels of shape (N,) with num_classes={num_classes} "
            f"(pass a callable labels -> conditions for other condition formats), but got "
            f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}."
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"Expected `{name}` in [0, {num_classes - 1}], but got values from {int(labels.min())} to {int(labels.max())}.")


def check_callback_inputs(
    *,
    decoder: Any,
    latent_dim: int | None,
    num_samples: int,
    counts: dict[str, Any],
    optional_counts: dict[str, Any],
    mode: Any,
    eps: Any,
    active_threshold: Any,
    seed: Any,
    prefix: Any,
    latents: Any,
    conditions: Any,
    num_classes: int | None,
    reference_decoder: Any,
    reference_latents: Any,
    sigma: Any,
) -> Tensor | None:
    """Check the arguments of :class:`~lightning_mem.ManifoldEntropicMetricsCallback`.

    ``counts`` and ``optional_counts`` map names to values that must be positive ints (or ``None``). Returns ``sigma``
    as a float64 ``(d,)`` tensor (or ``None``).
    """
    if decoder is not None and not (isinstance(decoder, str) or callable(decoder)):
        raise TypeError(
            f"Expected `decoder` to be an attribute name, a callable (pl_module, z) -> x or None, but got {type(decoder).__name__}."
        )
    for name, value in [("latent_dim", latent_dim), *optional_counts.items()]:
        check_positive_int(value, name, allow_none=True)
    for name, value in counts.items():
        check_positive_int(value, name)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Expected `seed` to be an int, but got {seed!r}.")
    if not isinstance(prefix, str):
        raise TypeError(f"Expected `prefix` to be a str, but got {type(prefix).__name__}.")
    check_mode(mode)
    check_positive_float(eps, "eps")
    if active_threshold is not None:  # None: the spectrum-shape rule
        check_positive_float(active_threshold, "active_threshold")
    if latents is not None and not (isinstance(latents, Tensor) or callable(latents)):
        raise TypeError(
            f"Expected `latents` to be a tensor (N, d), a callable (trainer, pl_module) -> z or None, but got {type(latents).__name__}."
        )
    if isinstance(latents, Tensor):
        if latents.ndim != 2 or latents.shape[0] == 0 or not latents.is_floating_point():
            raise ValueError(
                "Expected `latents` to be a floating point tensor of shape (N, d) with N >= 1, "
                f"but got {latents.dtype} {tuple(latents.shape)}."
            )
        if latent_dim is not None and latents.shape[1] != latent_dim:
            raise ValueError(f"Expected `latents` of shape (N, {latent_dim}) (latent_dim={latent_dim}), but got {tuple(latents.shape)}.")
    if conditions is not None and not (isinstance(conditions, Tensor) or callable(conditions)):
        raise TypeError(
            f"Expected `conditions` to be a tensor (N, ...), a callable labels -> conditions or None, but got {type(conditions).__name__}."
        )
    if isinstance(conditions, Tensor):
        if conditions.ndim == 0:
            raise ValueError(f"Expected `conditions` of shape (N, ...), one row per latent, but got a scalar {conditions!r}.")
        rows = latents.shape[0] if isinstance(latents, Tensor) else num_samples if latents is None else None
        if rows is not None and conditions.shape[0] != rows:
            raise ValueError(f"Expected `conditions` with N == {rows} rows (one per latent), but got {tuple(conditions.shape)}.")
        if num_classes is not None:
            check_labels(conditions, num_classes, "conditions")
    elif callable(conditions) and num_classes is None:
        raise ValueError("Expected `num_classes` to be set when `conditions` is a callable labels -> conditions, but got num_classes=None.")
    if reference_decoder is not None and not callable(reference_decoder):
        raise TypeError(f"Expected `reference_decoder` to be a callable z -> x or None, but got {type(reference_decoder).__name__}.")
    if reference_latents is not None and reference_decoder is None:
        raise ValueError("Expected `reference_decoder` to be set when `reference_latents` are given, but got reference_decoder=None.")
    if isinstance(reference_latents, Tensor) and (reference_latents.ndim != 2 or not reference_latents.is_floating_point()):
        raise ValueError(
            "Expected `reference_latents` to be a floating point tensor (N, d_ref), "
            f"but got {reference_latents.dtype} {tuple(reference_latents.shape)}."
        )
    if sigma is None:
        return None
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if sigma.ndim != 1 or (latent_dim is not None and sigma.numel() != latent_dim):
        raise ValueError(f"Expected `sigma` of shape (latent_dim,), but got {tuple(sigma.shape)}.")
    return check_scale(sigma, "sigma")


def check_not_meta(tensor: Tensor, name: str) -> None:
    """Raise a ``ValueError`` naming ``name`` if ``tensor`` is on the meta device (a shape without values)."""
    if tensor.is_meta:
        raise ValueError(
            f"Expected `{name}` to hold values, but got a tensor on the meta device (shape {tuple(tensor.shape)}, no data): "
            "create or move it on a real device (a module built on the meta device needs `.to_empty(device=...)` and its weights)."
        )


def check_gram_values(gram: Tensor, name: str = "gram") -> Tensor:
    """Check that a ``(N, d, d)`` batch holds Gram matrices :math:`J^\\top J` up to rounding, and return it.

    Symmetric, a non-negative diagonal, and :math:`|G_{ij}| \\le \\sqrt{G_{ii} G_{jj}}` (:math:`|\\rho_{ij}| \\le 1`), each
    within a relative ``sqrt(finfo(dtype).eps)`` (1.5e-8 for float64, 3.5e-4 for float32).
    """
    tolerance = math.sqrt(torch.finfo(gram.dtype).eps)
    values = gram.detach()
    diag = values.diagonal(dim1=-2, dim2=-1)
    negative = diag < 0
    if bool(negative.any()):
        n, i = (int(k) for k in negative.nonzero()[0])
        raise ValueError(
            f"Expected `{name}` to have a non-negative diagonal (G_ii = |J_i|^2), but sample {n} has G[{i}, {i}] = {float(diag[n, i]):.6g}."
        )
    root = diag.sqrt()
    bound = root[:, :, None] * root[:, None, :]
    asymmetric = (values - values.mT).abs() > tolerance * bound
    if bool(asymmetric.any()):
        n, i, j = (int(k) for k in asymmetric.nonzero()[0])
        raise ValueError(
            f"Expected `{name}` to be symmetric (G = J^T J), but sample {n} has G[{i}, {j}] = {float(values[n, i, j]):.6g} "
            f"and G[{j}, {i}] = {float(values[n, j, i]):.6g}."
        )
    beyond = values.abs() > (1.0 + tolerance) * bound
    if bool(beyond.any()):
        n, i, j = (int(k) for k in beyond.nonzero()[0])
        raise ValueError(
            f"Expected |G_ij| <= sqrt(G_ii G_jj) in `{name}` (|rho_ij| <= 1, as for any J^T J), but sample {n} has "
            f"G[{i}, {j}] = {float(values[n, i, j]):.6g} with sqrt(G_ii G_jj) = {float(bound[n, i, j]):.6g}."
        )
    return gram
