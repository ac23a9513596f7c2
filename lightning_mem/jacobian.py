"""The Jacobian engine: per-sample decoder Jacobians (all columns, or sampled ones) on ``torch.func``, chunk by chunk."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from functools import partial
from typing import Literal

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.func import jacfwd, jacrev, jvp, vmap

from lightning_mem._checks import check_eval_mode, check_latents, check_mode, check_positive_int

__all__ = ["call_decoder", "decoder_jacobian", "iter_decoder_jacobian_columns", "iter_decoder_jacobians"]

JacobianMode = Literal["auto", "forward", "reverse", "loop"]

_UNTRACEABLE = (RuntimeError, NotImplementedError, ValueError, TypeError)
"""What ``torch.func`` raises on a decoder it cannot trace (in-place updates, data-dependent control flow, ...)."""


def call_decoder(decoder: Callable, z: Tensor, condition: Tensor | None = None) -> Tensor:
    """``decoder(z)`` (or ``decoder(z, condition)``) as a tensor: a tuple or list output gives its first element.

    Raises:
        TypeError: if the output is neither a tensor nor a non-empty sequence starting with one.
    """
    output = decoder(z) if condition is None else decoder(z, condition)
    if isinstance(output, (tuple, list)):
        if not output:
            raise TypeError("Expected the decoder to return a tensor or a non-empty tuple, but got an empty sequence.")
        output = output[0]
    if not isinstance(output, Tensor):
        raise TypeError(f"Expected the decoder to return a tensor (or a tuple starting with one), got {type(output).__name__}.")
    return output


def _probe(decoder: Callable, z: Tensor, condition: Tensor | None) -> Tensor:
    """The decoder's output for the first sample, checked to keep the batch dimension."""
    with torch.no_grad():
        probe = call_decoder(decoder, z[:1], None if condition is None else condition[:1])
    if probe.shape[0] != 1:
        raise ValueError(
            f"Expected the decoder to keep the batch dimension (1 sample in, 1 out), but got output shape {tuple(probe.shape)}."
        )
    return probe


def _chunked(
    z: Tensor,
    condition: Tensor | None,
    chunk_size: int | None,
    traced: Callable[[Tensor, Tensor | None, slice], Tensor],
    loop: Callable[[Tensor, Tensor | None, slice], Tensor],
    *,
    fallback: bool,
) -> Iterator[Tensor]:
    """``traced`` on each chunk of ``chunk_size`` samples; with ``fallback``, ``loop`` from the first chunk on where
    ``torch.func`` cannot trace the decoder (one warning)."""
    use_traced = True
    step = z.shape[0] if chunk_size is None else chunk_size
    for start in range(0, z.shape[0], step):
        rows = slice(start, start + step)
        c_rows = None if condition is None else condition[rows]
        if use_traced:
            try:
                yield traced(z[rows], c_rows, rows)
                continue
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
        yield loop(z[rows], c_rows, rows)


def _traced_jacobian(decoder: Callable, z: Tensor, condition: Tensor | None, forward: bool) -> Tensor:
    def one_sample(z_n: Tensor, c_n: Tensor | None) -> Tensor:
        c = None if c_n is None else c_n.unsqueeze(0)
        return call_decoder(decoder, z_n.unsqueeze(0), c).squeeze(0)

    jacobian_of = jacfwd if forward else jacrev
    in_dims = (0, None if condition is None else 0)
    return vmap(jacobian_of(one_sample), in_dims=in_dims)(z, condition)


def _loop_jacobian(decoder: Callable, z: Tensor, condition: Tensor | None, forward: bool, create_graph: bool) -> Tensor:
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
                    out = call_decoder(decoder, forward_ad.make_dual(z, tangent), condition)
                columns.append(forward_ad.unpack_dual(out).tangent)
        return torch.stack(columns, dim=-1)
    with torch.enable_grad():
        z_ = z if z.requires_grad and create_graph else z.detach().requires_grad_(True)
        out = call_decoder(decoder, z_, condition)
        flat = out.reshape(n, -1)
        rows = [
            torch.autograd.grad(
                flat[:, k].sum(), z_, retain_graph=True, create_graph=create_graph, allow_unused=True, materialize_grads=True
            )[0]
            for k in range(flat.shape[1])
        ]
    return torch.stack(rows, dim=1).reshape(*out.shape, d)


def iter_decoder_jacobians(
    decoder: Callable,
    z: Tensor,
    *,
    condition: Tensor | None = None,
    mode: JacobianMode = "auto",
    chunk_size: int | None = None,
    create_graph: bool = False,
) -> Iterator[Tensor]:
    """Yield the per-sample Jacobians of :func:`decoder_jacobian` chunk by chunk, ``chunk_size`` samples at a time.

    This is what the metrics use to keep memory at ``chunk_size x D x d`` however many samples are evaluated.
    Arguments are those of :func:`decoder_jacobian`.
    """
    check_latents(z, condition)
    check_mode(mode)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    check_eval_mode(decoder)
    probe = _probe(decoder, z, condition)
    forward = mode == "forward" or (mode in ("auto", "loop") and probe[0].numel() > z.shape[1])
    grad_context = torch.enable_grad if create_graph else torch.no_grad

    def traced(z_rows: Tensor, c_rows: Tensor | None, rows: slice) -> Tensor:
        with grad_context():
            return _traced_jacobian(decoder, z_rows, c_rows, forward)

    def loop(z_rows: Tensor, c_rows: Tensor | None, rows: slice) -> Tensor:
        with grad_context():
            return _loop_jacobian(decoder, z_rows, c_rows, forward, create_graph)

    chunks = _chunked(z, condition, chunk_size, loop if mode == "loop" else traced, loop, fallback=mode == "auto")
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
) -> Tensor:
    r"""Per-sample Jacobian :math:`J(z) = \partial g / \partial z` of a decoder at each latent sample.

    Each sample is differentiated on its own (``torch.func.vmap`` over samples), so the result is exact for any
    decoder whose samples do not interact. The decoder's train/eval mode is left as it is; normalization layers
    (BatchNorm) in training mode mix samples and cannot be traced, so they raise a ``ValueError`` asking for
    ``decoder.eval()``. Dropout in training mode cannot be traced by ``vmap`` either: ``mode="auto"`` then falls
    back to ``"loop"`` with a warning (and the Jacobian is that of one random dropout mask per sample).

    Args:
        decoder: a callable ``z -> x`` or, with ``condition``, ``(z, condition) -> x``; ``z`` is ``(N, d)`` and
            ``x`` is ``(N, *output_shape)`` or a tuple whose first element is. Use :func:`as_decoder` for
            invertible networks.
        z: latent points, shape ``(N, d)``, floating point (float32 or float64, any device).
        condition: optional per-sample condition, shape ``(N, ...)``.
        mode: ``"forward"`` (``jacfwd``, ``d`` JVPs a sample), ``"reverse"`` (``jacrev``, ``D`` VJPs a sample),
            ``"auto"`` (forward when the flattened output ``D`` exceeds ``d``, reverse otherwise; falls back to
            ``"loop"`` with a warning when ``torch.func`` cannot trace the decoder) or ``"loop"`` (plain
            ``torch.autograd``: ``d`` forward-mode passes or ``D`` backward passes over the batch).
        chunk_size: samples differentiated at once; bounds peak memory at about ``chunk_size`` times one
            sample's cost. ``None`` does all samples at once.
        create_graph: keep the autograd graph so that the result can be differentiated (e.g. for a training
            penalty). By default no graph is kept and the result is detached, whatever the grad mode.

    Returns:
        The Jacobian in torch's layout, shape ``(N, *output_shape, d)``, dtype and device of the decoder output.

    Raises:
        TypeError: if ``z`` or ``condition`` are not tensors, ``z`` is not floating point, or the decoder does not
            return a tensor.
        ValueError: for a wrong shape of ``z`` or ``condition``, an unknown ``mode``, a bad ``chunk_size``, or
            normalization layers in training mode.

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
    chunks = iter_decoder_jacobians(decoder, z, condition=condition, mode=mode, chunk_size=chunk_size, create_graph=create_graph)
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
) -> Iterator[Tensor]:
    r"""Yield the sampled columns :math:`J_{S_n} = \partial g / \partial z_{S_n}`, ``chunk_size`` samples at a time.

    Sample ``n`` is pushed forward along the ``k`` latents ``columns[n]`` only (``k`` forward-mode JVPs instead of
    ``d``), e.g. with the design of :func:`lightning_mem.functional.estimators.sample_latent_columns`. Where
    ``torch.func`` cannot trace the decoder, a loop of ``torch.autograd.forward_ad`` passes is used (one warning).

    Args:
        decoder, z, condition, chunk_size: as for :func:`decoder_jacobian`.
        columns: ``(N, k)`` long, the latents differentiated for each sample.

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
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    if not isinstance(columns, Tensor) or columns.ndim != 2 or columns.shape[0] != z.shape[0] or columns.is_floating_point():
        raise ValueError(f"Expected `columns` of shape ({z.shape[0]}, k), integer, but got {getattr(columns, 'shape', columns)!r}.")
    check_eval_mode(decoder)
    output_shape = _probe(decoder, z, condition).shape[1:]

    def as_columns(out: Tensor) -> Tensor:  # (k, n, *output_shape) -> (n, *output_shape, k)
        return out.movedim(0, -1).reshape(out.shape[1], *output_shape, out.shape[0])

    def traced(z_rows: Tensor, c_rows: Tensor | None, rows: slice) -> Tensor:
        def push_forward(tangent: Tensor) -> Tensor:
            return jvp(lambda z_: call_decoder(decoder, z_, c_rows), (z_rows,), (tangent,))[1]

        with torch.no_grad():
            return as_columns(vmap(push_forward)(_column_tangents(z_rows, columns[rows])))

    def loop(z_rows: Tensor, c_rows: Tensor | None, rows: slice) -> Tensor:
        outputs = []
        with torch.no_grad(), forward_ad.dual_level():
            for tangent in _column_tangents(z_rows, columns[rows]):
                outputs.append(forward_ad.unpack_dual(call_decoder(decoder, forward_ad.make_dual(z_rows, tangent), c_rows)).tangent)
        return as_columns(torch.stack(outputs))

    yield from _chunked(z, condition, chunk_size, traced, loop, fallback=True)
