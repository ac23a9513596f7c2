"""The Jacobian engine: per-sample decoder Jacobians (all columns, or sampled ones) on ``torch.func``, chunk by chunk."""

from __future__ import annotations

import contextlib
import math
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.distributions import Distribution
from torch.func import jacfwd, jacrev, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.module import register_module_forward_pre_hook

from lightning_mem._checks import check_latents, check_mode, check_positive_int

__all__ = [
    "DecoderStateError",
    "JacobianMode",
    "ModelStateGuard",
    "OutputKey",
    "call_decoder",
    "check_latent_shape",
    "check_output_key",
    "decoder_jacobian",
    "decoder_output",
    "forward_mode_kernels",
    "iter_decoder_jacobian_columns",
    "iter_decoder_jacobians",
    "probe_decoder",
]

JacobianMode = Literal["auto", "forward", "reverse", "loop"]
"""How Jacobians are computed: ``torch.func`` forward or reverse mode, a plain-autograd loop, or ``auto`` (forward or
reverse by output size, the loop where ``torch.func`` cannot trace the decoder)."""
OutputKey = str | int
"""Which part of a decoder's output is measured: a key of a mapping output, or an index of a tuple output."""

_UNTRACEABLE = (RuntimeError, NotImplementedError, ValueError, TypeError)
"""What ``torch.func`` raises on a decoder it cannot trace (in-place updates, data-dependent control flow, ...)."""

_SHAPE_ERROR = re.compile(r"\b\d+D\b|dimension|shape|size|mat1 and mat2", re.IGNORECASE)
"""Messages of errors a decoder raises on latents of the wrong shape (a hint to ``latent_shape``/``latent_dim`` follows)."""


def check_latent_shape(latent_shape: Any, latent_dim: int | None = None) -> tuple[int, ...] | None:
    """``latent_shape`` as a tuple of positive ints (or ``None``), with ``latent_dim`` entries in all when given.

    Raises:
        ValueError: if it is not a non-empty sequence of positive ints, or its product is not ``latent_dim``.
    """
    if latent_shape is None:
        return None
    if (
        isinstance(latent_shape, (str, bytes, Tensor))
        or not isinstance(latent_shape, Sequence)
        or not latent_shape
        or not all(isinstance(size, int) and not isinstance(size, bool) and size >= 1 for size in latent_shape)
    ):
        raise ValueError(f"Expected `latent_shape` to be a non-empty tuple of positive ints such as (100, 1, 1), but got {latent_shape!r}.")
    shape = tuple(latent_shape)
    if latent_dim is not None and math.prod(shape) != latent_dim:
        raise ValueError(
            f"Expected `latent_shape` with {latent_dim} entries in all (the latent size), but got {shape} ({math.prod(shape)} entries)."
        )
    return shape


def check_output_key(output_key: Any) -> None:
    """Raise a ``TypeError`` unless ``output_key`` is a str (a mapping key), an int (a tuple index) or ``None``."""
    if output_key is not None and (isinstance(output_key, bool) or not isinstance(output_key, (str, int))):
        raise TypeError(
            f"Expected `output_key` to be a str (the key of a mapping output), an int (the index of a tuple output) or None, "
            f"but got {type(output_key).__name__}."
        )


def decoder_output(output: Any, output_key: OutputKey | None = None) -> Tensor:
    """The tensor a decoder's output stands for: the one place where outputs are adapted.

    - a tensor is itself;
    - a ``torch.distributions.Distribution`` (e.g. ``Bernoulli(logits=...)``, ``Independent(Normal(...), 1)``) is
      measured at its ``.mean``;
    - a mapping (a ``dict``, pythae's ``ModelOutput``, ...) gives ``output[output_key]``, or its only tensor when it
      holds exactly one and ``output_key`` is ``None``;
    - a tuple or list gives ``output[output_key]`` for an int ``output_key``; without one it is an error (which
      element is the data is not guessed).

    Raises:
        TypeError: for an output that is none of these, a tuple without ``output_key``, a mapping with several tensors
            and no ``output_key``, or a distribution without a mean.
        ValueError: if ``output_key`` is not in the output.

    Example:
        >>> decoder_output(torch.distributions.Bernoulli(logits=torch.zeros(1, 2)))
        tensor([[0.5000, 0.5000]])
        >>> decoder_output({"reconstruction": torch.ones(1, 2), "z": torch.zeros(1, 3)}, "reconstruction")
        tensor([[1., 1.]])
    """
    if output_key is not None:
        output = _select(output, output_key)
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Distribution):
        try:
            return output.mean
        except NotImplementedError:
            raise TypeError(
                f"Expected the decoder's {type(output).__name__} output to have a mean (a distribution output is measured at its "
                "`.mean`), but it has none. Return a tensor instead, e.g. the distribution's location parameter; a zuko or "
                "normflows flow is a decoder through `lightning_mem.as_decoder(flow)`."
            ) from None
    if isinstance(output, Mapping):
        keys = [key for key, value in output.items() if isinstance(value, (Tensor, Distribution))]
        if len(keys) == 1:
            return decoder_output(output[keys[0]])
        raise TypeError(
            f"Expected the decoder to return a tensor, but it returned a {type(output).__name__} with keys {list(output)}: "
            f"pass `output_key=` the key of the output to measure (e.g. output_key={(keys or list(output) or ['x'])[0]!r}; "
            "--output-key on the command line)."
        )
    if isinstance(output, (tuple, list)):
        raise TypeError(
            f"Expected the decoder to return a tensor, but it returned a {type(output).__name__} of {len(output)} elements: "
            "pass `output_key=` the index of the output to measure (e.g. output_key=0; --output-key 0 on the command line). "
            "For an invertible network (whose forward pass is the encoder) use `lightning_mem.as_decoder(inn)`."
        )
    raise TypeError(
        f"Expected the decoder to return a tensor, a torch.distributions.Distribution or a mapping of tensors, but got "
        f"{type(output).__name__}."
    )


def _select(output: Any, output_key: OutputKey) -> Any:
    """``output[output_key]`` of a mapping or a tuple, with errors that list what there is."""
    if isinstance(output, Mapping):
        if isinstance(output_key, int) and output_key not in output and str(output_key) in output:
            output_key = str(output_key)  # `--output-key 0` on the command line for a key "0"
        if output_key not in output:
            raise ValueError(
                f"Expected the decoder's {type(output).__name__} output to have the key `output_key`={output_key!r}, "
                f"but its keys are {list(output)}."
            )
        return output[output_key]
    if isinstance(output, (tuple, list)) and isinstance(output_key, int):
        if not -len(output) <= output_key < len(output):
            raise ValueError(
                f"Expected `output_key`={output_key} to index the decoder's {type(output).__name__} output, but it has "
                f"{len(output)} elements."
            )
        return output[output_key]
    if isinstance(output_key, str) and not isinstance(output, (Tensor, tuple, list)) and hasattr(output, output_key):
        return getattr(output, output_key)  # an output object with attributes (a dataclass, a named tuple)
    raise TypeError(
        f"Expected the decoder to return a mapping (or, for an int `output_key`, a tuple) to select `output_key`={output_key!r} "
        f"from, but it returned {type(output).__name__}."
    )


def call_decoder(
    decoder: Callable,
    z: Tensor,
    condition: Tensor | None = None,
    *,
    latent_shape: Sequence[int] | None = None,
    output_key: OutputKey | None = None,
) -> Tensor:
    """``decoder(z)`` (or ``decoder(z, condition)``) as a tensor, through :func:`decoder_output`.

    With ``latent_shape`` the flat latents ``(N, d)`` are passed reshaped to ``(N, *latent_shape)`` (e.g. a DCGAN
    generator's ``(N, 100, 1, 1)``).

    Raises:
        TypeError: for an output :func:`decoder_output` cannot adapt.
    """
    if latent_shape is not None:
        z = z.reshape(z.shape[0], *latent_shape)
    output = decoder(z) if condition is None else decoder(z, condition)
    return decoder_output(output, output_key)


class DecoderStateError(ValueError):
    """A decoder ran a normalization layer in training mode, or changed a buffer of a module it ran."""


def _is_training_normalization(module: nn.Module) -> bool:
    # BatchNorm and friends in training mode mix the samples of a batch and update their running statistics.
    return isinstance(module, nn.modules.batchnorm._NormBase) and module.training


def _same(tensor: Tensor, copy: Tensor) -> bool:
    try:
        if torch.equal(tensor, copy):
            return True
        return bool((tensor.isnan() & copy.isnan()).logical_or(tensor == copy).all()) if tensor.is_floating_point() else False
    except RuntimeError:  # a tensor that cannot be compared (e.g. a transform's wrapper outside its level): not ours to judge
        return True


class ModelStateGuard:
    """While entered, no normalization layer runs in training mode, and no module that runs keeps a changed buffer.

    A decoder can be any callable, e.g. ``lambda z: g(z[:, :, None, None])``: what it reaches cannot be read off it.
    So the guard watches what runs: a forward pre-hook common to all modules (on the entering thread only) raises a
    :class:`DecoderStateError` *before* a training-mode normalization layer (BatchNorm, InstanceNorm with running
    statistics) computes anything, and copies the buffers of every other module the first time it runs. On exit,
    a buffer that changed (a running statistic, a counter, a spectral-norm vector updated in ``forward``) is put back
    and a :class:`DecoderStateError` names it. Enter it around each piece of work; the copies are kept across entries.
    Cost: one Python call per module call, and one comparison of the buffers seen per exit.

    Example:
        >>> bn = nn.BatchNorm1d(2)  # training mode
        >>> with ModelStateGuard():  # doctest: +ELLIPSIS
        ...     bn(torch.randn(4, 2))
        Traceback (most recent call last):
        ...
        lightning_mem.jacobian.DecoderStateError: Expected the decoder's normalization layers to be in eval mode, but BatchNorm1d ...
        >>> int(bn.num_batches_tracked)
        0
    """

    def __init__(self) -> None:
        self._copies: dict[int, tuple[str, Tensor, Tensor]] = {}
        self._handle: Any = None
        self._thread: int | None = None

    def __enter__(self) -> ModelStateGuard:
        self._thread = threading.get_ident()
        self._handle = register_module_forward_pre_hook(self._before_forward)
        return self

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if threading.get_ident() != self._thread:
            return
        if _is_training_normalization(module):
            raise DecoderStateError(
                f"Expected the decoder's normalization layers to be in eval mode, but {type(module).__name__} is in training mode: "
                "its output would depend on the whole batch and its running statistics would change. "
                "Call `decoder.eval()` first (and `decoder.train()` afterwards to restore it); for a closure or lambda, "
                "call `.eval()` on the model it uses."
            )
        for name, buffer in module.named_buffers(recurse=False):
            if id(buffer) not in self._copies:
                with torch.no_grad():
                    self._copies[id(buffer)] = (f"{type(module).__name__}.{name}", buffer, buffer.detach().clone())

    def __exit__(self, error_type: Any, error: Any, traceback: Any) -> None:
        self._handle.remove()
        changed = [(label, buffer, copy) for label, buffer, copy in self._copies.values() if not _same(buffer, copy)]
        with torch.no_grad():
            for _, buffer, copy in changed:
                buffer.copy_(copy)
        if changed and error_type is None:
            raise DecoderStateError(
                f"Expected the decoder to leave its model unchanged, but it changed the buffer {changed[0][0]} "
                f"({len(changed)} changed in all; they were restored): a module that updates its state in `forward` in training "
                "mode (e.g. spectral normalization) must be in eval mode. Call `.eval()` on the model first."
            )


def _call_hint(error: BaseException, z: Tensor, latent_shape: tuple[int, ...] | None, conditional: bool) -> str | None:
    """A suggestion for an error the decoder raised on latents of (probably) the wrong shape, or on a missing condition;
    ``None`` for other errors."""
    message = str(error)
    if not isinstance(error, (RuntimeError, ValueError, TypeError)):
        return None
    d = z.shape[1]
    shape = (z.shape[0], *(latent_shape or (d,)))
    hints = []
    if isinstance(error, TypeError) and not conditional and re.search(r"missing \d+ required positional argument", message):
        hints.append(
            "a conditional decoder needs its condition: `condition=` (in the callback `conditions=` or `num_classes=`, "
            "on the command line --num-classes)"
        )
    elif _SHAPE_ERROR.search(message):
        if latent_shape is None and re.search(r"conv|\b[345]D\b", message, re.IGNORECASE):
            hints.append(f"if it takes latents shaped (N, {d}, 1, 1) like a DCGAN generator, pass latent_shape=({d}, 1, 1)")
        multiplied = re.search(r"mat1 and mat2 shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)", message)
        if multiplied and multiplied.group(2) != multiplied.group(3):
            inputs, given = multiplied.group(3), multiplied.group(2)
            hints.append(f"its first layer takes {inputs} inputs, not {given}: if the latent size is {inputs}, pass latent_dim={inputs}")
        if not hints:
            hints.append(f"check the latent size (d={d}" + ("" if latent_shape is None else f", latent_shape={latent_shape}") + ")")
    if not hints:
        return None
    first_line = message.splitlines()[0] if message else ""
    return f"The decoder failed on latents of shape {shape} ({type(error).__name__}: {first_line}); " + "; ".join(hints) + "."


def probe_decoder(
    decoder: Callable,
    z: Tensor,
    condition: Tensor | None = None,
    *,
    latent_shape: Sequence[int] | None = None,
    output_key: OutputKey | None = None,
    check_finite: bool = False,
    guard: ModelStateGuard | None = None,
) -> Tensor:
    """Call the decoder once at a few latents and check what comes back; return the (detached) output.

    The call runs under a :class:`ModelStateGuard` (no training-mode normalization, buffers unchanged), with gradients
    on for ``z`` only, to check that the output is a floating point tensor that depends differentiably on ``z``, one
    row per latent (and finite, with ``check_finite``). Nothing is kept: no graph, no parameter gradient.

    Raises:
        TypeError: for an output :func:`decoder_output` cannot adapt.
        ValueError: for an integer output, an output that does not require grad, a lost batch dimension, non-finite
            values (with ``check_finite``), or a decoder error that looks like a latent-shape mismatch (the message
            suggests ``latent_shape`` or ``latent_dim``); :class:`DecoderStateError` for training-mode normalization.
        Exception: any other error of the decoder, as raised.

    Example:
        >>> probe_decoder(lambda z: z.argmax(1, keepdim=True), torch.zeros(2, 3))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Expected the decoder output to be a floating point tensor (a differentiable function of z), but got torch.int64: ...
    """
    shape = None if latent_shape is None else tuple(latent_shape)
    with guard if guard is not None else ModelStateGuard(), torch.enable_grad():
        z_ = z.detach().requires_grad_(True)
        latents = z_ if shape is None else z_.reshape(z.shape[0], *shape)
        try:
            output = decoder(latents) if condition is None else decoder(latents, condition)
        except DecoderStateError:
            raise
        except Exception as error:
            hint = _call_hint(error, z, shape, condition is not None)
            if hint is None:
                raise
            raise ValueError(hint) from error
        output = decoder_output(output, output_key)
    if not (output.is_floating_point() or output.is_complex()):
        raise ValueError(
            f"Expected the decoder output to be a floating point tensor (a differentiable function of z), but got {output.dtype}: "
            "an argmax, a rounding to integers or a sampling step in the decoder has no Jacobian. Return the probabilities, "
            "logits or mean instead."
        )
    if not output.requires_grad:
        raise ValueError(
            "Expected the decoder output to depend differentiably on z, but it does not require grad: a `detach()`, "
            "`torch.no_grad()`, argmax or integer step in the decoder cuts the derivative (the Jacobian would be 0). "
            "Decode without it."
        )
    if output.ndim == 0 or output.shape[0] != z.shape[0]:
        raise ValueError(
            f"Expected the decoder to keep the batch dimension ({z.shape[0]} sample{'s' if z.shape[0] > 1 else ''} in, "
            f"{z.shape[0]} out), but got output shape {tuple(output.shape)}."
        )
    if check_finite and not bool(torch.isfinite(output).all()):
        raise ValueError(
            f"Expected a finite decoder output, but it holds NaN or inf at {int((~torch.isfinite(output)).sum())} of "
            f"{output.numel()} entries for {z.shape[0]} prior latents: check the model's weights and the latent size."
        )
    return output.detach()


def _chunked(
    z: Tensor,
    condition: Tensor | None,
    chunk_size: int | None,
    traced: Callable[[Tensor, Tensor | None, slice], Tensor],
    loop: Callable[[Tensor, Tensor | None, slice], Tensor],
    *,
    fallback: bool,
    guard: ModelStateGuard,
) -> Iterator[Tensor]:
    """``traced`` on each chunk of ``chunk_size`` samples; with ``fallback``, ``loop`` from the first chunk on where
    ``torch.func`` cannot trace the decoder (one warning). Each chunk is computed inside ``guard`` (not while the
    caller holds a yielded chunk)."""
    use_traced = True
    step = z.shape[0] if chunk_size is None else chunk_size
    for start in range(0, z.shape[0], step):
        rows = slice(start, start + step)
        c_rows = None if condition is None else condition[rows]
        if use_traced:
            try:
                with guard:
                    result = traced(z[rows], c_rows, rows)
            except DecoderStateError:
                raise
            except _UNTRACEABLE as error:
                if not fallback or start > 0:
                    raise
                warnings.warn(
                    f"torch.func could not trace the decoder ({type(error).__name__}: {str(error).splitlines()[0]}); "
                    "falling back to mode='loop' (plain autograd, slower). Pass mode='loop' to silence this warning.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                use_traced = False
            else:
                yield result
                continue
        with guard:
            result = loop(z[rows], c_rows, rows)
        yield result


DecoderCall = Callable[[Tensor, Tensor | None], Tensor]
"""``(z, condition) -> x``: a decoder with its latent reshape and output adapter applied (:func:`call_decoder`)."""


@contextlib.contextmanager
def forward_mode_kernels() -> Iterator[None]:
    """Within the block, attention runs on kernels that forward-mode AD can differentiate.

    torch's fused attention kernels have no forward-mode rule (on CPU the flash kernel
    ``_scaled_dot_product_flash_attention_for_cpu``; on CUDA the flash, memory-efficient and cuDNN kernels), nor do
    the fused ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` fast paths taken without gradients
    (``_native_multi_head_attention``, ``_transformer_encoder_layer_fwd``). The block selects the math backend of
    ``scaled_dot_product_attention`` (same values, composite ops) and turns the fast path off, restoring both after.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _own_jacobian(decoder: Callable) -> Callable[..., Tensor] | None:
    """The decoder's own Jacobian, ``decoder.decoder_jacobian(z, condition, create_graph=...) -> (n, *output_shape, d)``,
    or ``None``. :class:`lightning_mem.ode.ODEDecoder` (the tangent ODE) and
    :class:`lightning_mem.inverse.InverseJacobianDecoder` (the inverted encoder Jacobian) have one."""
    method = getattr(decoder, "decoder_jacobian", None)
    return method if callable(method) and not isinstance(decoder, type) else None


def _traced_jacobian(call: DecoderCall, z: Tensor, condition: Tensor | None, forward: bool) -> Tensor:
    def one_sample(z_n: Tensor, c_n: Tensor | None) -> Tensor:
        c = None if c_n is None else c_n.unsqueeze(0)
        return call(z_n.unsqueeze(0), c).squeeze(0)

    jacobian_of = jacfwd if forward else jacrev
    in_dims = (0, None if condition is None else 0)
    return vmap(jacobian_of(one_sample), in_dims=in_dims)(z, condition)


def _loop_jacobian(call: DecoderCall, z: Tensor, condition: Tensor | None, forward: bool, create_graph: bool) -> Tensor:
    """Jacobian by plain autograd: ``d`` forward-mode JVPs or one backward pass per output entry."""
    n, d = z.shape
    if forward:
        columns = []
        # Every column pass starts from the same RNG state, so a random layer (dropout in training mode) draws the
        # same mask in each of the ``d`` passes: one consistent Jacobian per sample, as in the single reverse pass.
        on_cpu = z.device.type == "cpu"
        fork_rng = partial(torch.random.fork_rng, devices=[])
        if not on_cpu:
            fork_rng = partial(torch.random.fork_rng, devices=[z.device], device_type=z.device.type)
        with forward_ad.dual_level():
            for i in range(d):
                tangent = torch.zeros_like(z)
                tangent[:, i] = 1
                with fork_rng():
                    out = call(forward_ad.make_dual(z, tangent), condition)
                column = forward_ad.unpack_dual(out).tangent
                columns.append(torch.zeros_like(out) if column is None else column)
        return torch.stack(columns, dim=-1)
    with torch.enable_grad():
        z_ = z if z.requires_grad and create_graph else z.detach().requires_grad_(True)
        out = call(z_, condition)
        flat = out.reshape(n, -1)
        rows = [
            torch.autograd.grad(
                flat[:, k].sum(), z_, retain_graph=True, create_graph=create_graph, allow_unused=True, materialize_grads=True
            )[0]
            for k in range(flat.shape[1])
        ]
    return torch.stack(rows, dim=1).reshape(*out.shape, d)


def _prepare(
    decoder: Callable,
    z: Tensor,
    condition: Tensor | None,
    chunk_size: int | None,
    latent_shape: Sequence[int] | None,
    output_key: OutputKey | None,
) -> tuple[DecoderCall, Tensor, ModelStateGuard]:
    """Validate the engine's common arguments; return the adapted decoder call, its probed output and the guard."""
    check_latents(z, condition)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    shape = check_latent_shape(latent_shape, z.shape[1])
    check_output_key(output_key)
    guard = ModelStateGuard()
    probe = probe_decoder(
        decoder, z[:1], None if condition is None else condition[:1], latent_shape=shape, output_key=output_key, guard=guard
    )
    return partial(call_decoder, decoder, latent_shape=shape, output_key=output_key), probe, guard


def iter_decoder_jacobians(
    decoder: Callable,
    z: Tensor,
    *,
    condition: Tensor | None = None,
    mode: JacobianMode = "auto",
    chunk_size: int | None = None,
    create_graph: bool = False,
    latent_shape: Sequence[int] | None = None,
    output_key: OutputKey | None = None,
) -> Iterator[Tensor]:
    """Yield the per-sample Jacobians of :func:`decoder_jacobian` chunk by chunk, ``chunk_size`` samples at a time.

    This is what the metrics use to keep memory at ``chunk_size x D x d`` however many samples are evaluated.
    Arguments are those of :func:`decoder_jacobian`.
    """
    check_mode(mode)
    call, probe, guard = _prepare(decoder, z, condition, chunk_size, latent_shape, output_key)
    own = _own_jacobian(decoder) if mode == "auto" and latent_shape is None and output_key is None else None
    forward = mode == "forward" or (mode in ("auto", "loop") and probe[0].numel() > z.shape[1])
    grad_context = torch.enable_grad if create_graph else torch.no_grad
    kernels = forward_mode_kernels if forward else contextlib.nullcontext

    def traced(z_rows: Tensor, c_rows: Tensor | None, rows: slice) -> Tensor:
        with grad_context(), kernels():
            return _traced_jacobian(call, z_rows, c_rows, forward)

    def loop(z_rows: Tensor, c_rows: Tensor | None, rows: slice) -> Tensor:
        with grad_context(), kernels():
            return _loop_jacobian(call, z_rows, c_rows, forward, create_graph)

    if own is not None:

        def own_jacobian(z_rows: Tensor, c_rows: Tensor | None, rows: slice) -> Tensor:
            return own(z_rows, c_rows, create_graph=create_graph)

        chunks = _chunked(z, condition, chunk_size, own_jacobian, own_jacobian, fallback=False, guard=guard)
    else:
        chunks = _chunked(z, condition, chunk_size, loop if mode == "loop" else traced, loop, fallback=mode == "auto", guard=guard)
    for jacobian in chunks:
        yield jacobian if create_graph else jacobian.detach()


def decoder_jacobian(
    decoder: Callable,
    z: Tensor,
    *,
    condition: Tensor | None = None,
    mode: JacobianMode = "auto",
    chunk_size: int | None = None,
    create_graph: bool = False,
    latent_shape: Sequence[int] | None = None,
    output_key: OutputKey | None = None,
) -> Tensor:
    r"""Per-sample Jacobian :math:`J(z) = \partial g / \partial z` of a decoder at each latent sample.

    Each sample is differentiated on its own (``torch.func.vmap`` over samples), so the result is exact for any
    decoder whose samples do not interact. The decoder's train/eval mode is left as it is, and so is its model: for
    any callable (a module, a bound method, a closure or lambda over a model), a normalization layer that runs in
    training mode (BatchNorm: it mixes samples and updates its running statistics) raises a
    :class:`DecoderStateError` (a ``ValueError``) asking for ``.eval()`` before it computes anything, and a buffer
    changed by the decoder is restored and reported the same way (see :class:`ModelStateGuard`). Dropout in training
    mode cannot be traced by ``vmap``: ``mode="auto"`` then falls back to ``"loop"`` with a warning (and the
    Jacobian is that of one random dropout mask per sample).

    Args:
        decoder: a callable ``z -> x`` or, with ``condition``, ``(z, condition) -> x``; ``z`` is ``(N, d)`` (or
            ``(N, *latent_shape)``) and ``x`` is ``(N, *output_shape)``, a ``torch.distributions.Distribution``
            (measured at its ``.mean``), or a mapping or tuple (see ``output_key``). Use :func:`as_decoder` for
            invertible networks and flows (FrEIA, zuko, normflows).
        z: latent points, shape ``(N, d)``, floating point (float32 or float64, any device).
        condition: optional per-sample condition, shape ``(N, ...)``.
        mode: ``"forward"`` (``jacfwd``, ``d`` JVPs a sample), ``"reverse"`` (``jacrev``, ``D`` VJPs a sample),
            ``"auto"`` (the decoder's own ``decoder_jacobian(z, condition, create_graph=...)`` method where it has
            one: :class:`lightning_mem.ode.ODEDecoder` integrates the tangent ODE,
            :class:`lightning_mem.inverse.InverseJacobianDecoder` inverts its encoder's Jacobian; otherwise forward
            when the flattened output ``D`` exceeds ``d``, reverse otherwise; falls back to ``"loop"`` with a
            warning when ``torch.func`` cannot trace the decoder) or ``"loop"`` (plain ``torch.autograd``: ``d``
            forward-mode passes or ``D`` backward passes over the batch). Forward mode runs attention on kernels it
            can differentiate (:func:`forward_mode_kernels`).
        chunk_size: samples differentiated at once; bounds peak memory at about ``chunk_size`` times one
            sample's cost. ``None`` does all samples at once.
        create_graph: keep the autograd graph so that the result can be differentiated (e.g. for a training
            penalty). By default no graph is kept and the result is detached, whatever the grad mode.
        latent_shape: the shape of one latent as the decoder takes it, e.g. ``(100, 1, 1)`` for a DCGAN generator:
            ``z`` stays ``(N, d)`` with ``d = prod(latent_shape)`` and is passed reshaped; the Jacobian's last axis
            is the flattened latent.
        output_key: the key of a mapping output (e.g. ``"reconstruction"`` for pythae's ``ModelOutput``) or the
            index of a tuple output to measure; a mapping holding exactly one tensor needs none, a tuple always
            does (see :func:`decoder_output`).

    Returns:
        The Jacobian in torch's layout, shape ``(N, *output_shape, d)``, dtype and device of the decoder output.

    Raises:
        TypeError: if ``z`` or ``condition`` are not tensors, ``z`` is not floating point, or the decoder's output
            is not a tensor :func:`decoder_output` can adapt (a tuple without ``output_key``, ...).
        ValueError: for a wrong shape of ``z`` or ``condition``, an unknown ``mode``, a bad ``chunk_size`` or
            ``latent_shape``, an output that is not a differentiable function of ``z`` (integer, argmax, detached),
            a decoder error on latents of the wrong shape (the message suggests ``latent_shape``), or (as
            :class:`DecoderStateError`) normalization layers in training mode.

    Example:
        >>> decoder = torch.nn.Linear(2, 3, bias=False)
        >>> with torch.no_grad():
        ...     _ = decoder.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
        >>> decoder_jacobian(decoder, torch.zeros(1, 2))
        tensor([[[1., 0.],
                 [0., 2.],
                 [1., 1.]]])

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
    """
    chunks = iter_decoder_jacobians(
        decoder,
        z,
        condition=condition,
        mode=mode,
        chunk_size=chunk_size,
        create_graph=create_graph,
        latent_shape=latent_shape,
        output_key=output_key,
    )
    return torch.cat(list(chunks), dim=0)


def _column_tangents(z: Tensor, columns: Tensor) -> Tensor:
    """``(k, N, d)`` one-hot tangents: tangent ``j`` of sample ``n`` is the unit vector of latent ``columns[n, j]``."""
    n, d = z.shape
    tangents = torch.zeros(columns.shape[1], n, d, dtype=z.dtype, device=z.device)
    return tangents.scatter_(2, columns.T.unsqueeze(-1).to(z.device), 1.0)


def iter_decoder_jacobian_columns(
    decoder: Callable,
    z: Tensor,
    columns: Tensor,
    *,
    condition: Tensor | None = None,
    chunk_size: int | None = None,
    latent_shape: Sequence[int] | None = None,
    output_key: OutputKey | None = None,
) -> Iterator[Tensor]:
    r"""Yield the sampled columns :math:`J_{S_n} = \partial g / \partial z_{S_n}`, ``chunk_size`` samples at a time.

    Sample ``n`` is pushed forward along the ``k`` latents ``columns[n]`` only (``k`` forward-mode JVPs instead of
    ``d``), e.g. with the design of :func:`lightning_mem.functional.estimators.sample_latent_columns`. Where
    ``torch.func`` cannot trace the decoder, a loop of ``torch.autograd.forward_ad`` passes is used (one warning).
    A decoder with its own ``decoder_jacobian_columns(z, columns, condition)`` method (an
    :class:`lightning_mem.ode.ODEDecoder`: the tangent ODE with ``k`` tangents) is asked for them instead.

    Args:
        decoder, z, condition, chunk_size, latent_shape, output_key: as for :func:`decoder_jacobian`.
        columns: ``(N, k)`` long, the latents differentiated for each sample (indices into the flattened latent).

    Yields:
        ``(n, *output_shape, k)`` per chunk of ``n`` samples, detached; column ``j`` of sample ``n`` is
        :math:`\partial g(z_n) / \partial z_{n, \mathrm{columns}[n, j]}`.

    Example:
        >>> decoder = torch.nn.Linear(3, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = decoder.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
        >>> next(iter_decoder_jacobian_columns(decoder, torch.zeros(2, 3), torch.tensor([[2], [0]])))
        tensor([[[3.],
                 [6.]],
        <BLANKLINE>
                [[1.],
                 [4.]]])
    """
    check_latents(z, condition)
    if not isinstance(columns, Tensor) or columns.ndim != 2 or columns.shape[0] != z.shape[0] or columns.is_floating_point():
        raise ValueError(f"Expected `columns` of shape ({z.shape[0]}, k), integer, but got {getattr(columns, 'shape', columns)!r}.")
    call, probe, guard = _prepare(decoder, z, condition, chunk_size, latent_shape, output_key)
    output_shape = probe.shape[1:]
    own_columns = getattr(decoder, "decoder_jacobian_columns", None) if latent_shape is None and output_key is None else None
    if callable(own_columns):  # e.g. an ODE decoder: the tangent ODE with k tangents

        def own(z_rows: Tensor, c_rows: Tensor | None, rows: slice) -> Tensor:
            return own_columns(z_rows, columns[rows], c_rows)

        yield from _chunked(z, condition, chunk_size, own, own, fallback=False, guard=guard)
        return

    def as_columns(out: Tensor) -> Tensor:  # (k, n, *output_shape) -> (n, *output_shape, k)
        return out.movedim(0, -1).reshape(out.shape[1], *output_shape, out.shape[0])

    def traced(z_rows: Tensor, c_rows: Tensor | None, rows: slice) -> Tensor:
        def push_forward(tangent: Tensor) -> Tensor:
            return jvp(lambda z_: call(z_, c_rows), (z_rows,), (tangent,))[1]

        with torch.no_grad(), forward_mode_kernels():
            return as_columns(vmap(push_forward)(_column_tangents(z_rows, columns[rows])))

    def loop(z_rows: Tensor, c_rows: Tensor | None, rows: slice) -> Tensor:
        outputs = []
        with torch.no_grad(), forward_mode_kernels(), forward_ad.dual_level():
            for tangent in _column_tangents(z_rows, columns[rows]):
                out = call(forward_ad.make_dual(z_rows, tangent), c_rows)
                column = forward_ad.unpack_dual(out).tangent
                outputs.append(torch.zeros_like(out) if column is None else column)
        return as_columns(torch.stack(outputs))

    yield from _chunked(z, condition, chunk_size, traced, loop, fallback=True, guard=guard)
