"""Per-sample decoder Jacobians and Gram matrices, built on ``torch.func``."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.func import jacfwd, jacrev, vmap

__all__ = ["as_decoder", "decoder_gram", "decoder_jacobian", "iter_decoder_jacobians"]

JacobianMode = Literal["auto", "forward", "reverse", "loop"]
_MODES = ("auto", "forward", "reverse", "loop")


class InvertibleDecoder(nn.Module):
    """Decoder view ``z -> inn(z, rev=True)[0]`` of an invertible network (e.g. a FrEIA ``SequenceINN``)."""

    def __init__(self, inn: nn.Module) -> None:
        super().__init__()
        self.inn = inn

    def forward(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        conditions = [] if condition is None else [condition]
        return self.inn(z, c=conditions, rev=True, jac=False)[0]


def as_decoder(inn: nn.Module) -> InvertibleDecoder:
    """Wrap an invertible network so that it can be used as a decoder ``z -> x``.

    The decoder direction of a normalizing flow is its reverse pass: ``x = inn(z, rev=True)[0]``.
    A condition, if given to the decoder, is passed on as ``c=[condition]``.

    Args:
        inn: an invertible network whose ``forward`` takes ``(x_or_z, c=..., rev=..., jac=...)`` and returns
            ``(output, log_jac_det)``, as FrEIA's ``SequenceINN`` and ``GraphINN`` do.

    Returns:
        An ``nn.Module`` sharing ``inn``'s parameters (train/eval mode follows ``inn``'s own).

    Raises:
        TypeError: if ``inn`` is not an ``nn.Module``.

    Example:
        >>> import FrEIA.modules as Fm
        >>> import FrEIA.framework as Ff
        >>> _ = torch.manual_seed(0)
        >>> def subnet(c_in, c_out):
        ...     return nn.Sequential(nn.Linear(c_in, 16), nn.Tanh(), nn.Linear(16, c_out))
        >>> inn = Ff.SequenceINN(4)
        >>> inn.append(Fm.AllInOneBlock, subnet_constructor=subnet)
        >>> decoder = as_decoder(inn)
        >>> decoder_jacobian(decoder, torch.randn(3, 4)).shape
        torch.Size([3, 4, 4])

    References:
        L. Ardizzone et al., *Framework for Easily Invertible Architectures (FrEIA)*, 2018-2022.
    """
    if not isinstance(inn, nn.Module):
        raise TypeError(f"Expected `inn` to be a torch.nn.Module (an invertible network), but got {type(inn).__name__}.")
    return InvertibleDecoder(inn)


def _first_output(output: object) -> Tensor:
    if isinstance(output, (tuple, list)):
        if not output:
            raise TypeError("Expected the decoder to return a tensor or a non-empty tuple, but got an empty sequence.")
        output = output[0]
    if not isinstance(output, Tensor):
        raise TypeError(f"Expected the decoder to return a tensor (or a tuple starting with one), got {type(output).__name__}.")
    return output


def _call(decoder: Callable, z: Tensor, condition: Tensor | None) -> Tensor:
    return _first_output(decoder(z) if condition is None else decoder(z, condition))


def _modules_of(decoder: Callable) -> list[nn.Module]:
    owner = decoder if isinstance(decoder, nn.Module) else getattr(decoder, "__self__", None)
    return list(owner.modules()) if isinstance(owner, nn.Module) else []


def _check_batch_norm(decoder: Callable) -> None:
    training = [type(m).__name__ for m in _modules_of(decoder) if isinstance(m, nn.modules.batchnorm._NormBase) and m.training]
    if training:
        raise ValueError(
            f"Expected the decoder's normalization layers to be in eval mode, but {training[0]} is in training mode: "
            "its output would depend on the whole batch and its running statistics would change. "
            "Call `decoder.eval()` first (and `decoder.train()` afterwards to restore it)."
        )


def _validate(z: Tensor, condition: Tensor | None, mode: str, chunk_size: int | None) -> None:
    if not isinstance(z, Tensor):
        raise TypeError(f"Expected `z` to be a torch.Tensor, but got {type(z).__name__}.")
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
    if mode not in _MODES:
        raise ValueError(f"Expected `mode` to be one of {_MODES}, but got {mode!r}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"Expected `chunk_size` to be a positive int or None, but got {chunk_size!r}.")


def _traced_jacobian(decoder: Callable, z: Tensor, condition: Tensor | None, forward: bool) -> Tensor:
    def one_sample(z_n: Tensor, c_n: Tensor | None) -> Tensor:
        c = None if c_n is None else c_n.unsqueeze(0)
        return _call(decoder, z_n.unsqueeze(0), c).squeeze(0)

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
                    out = _call(decoder, forward_ad.make_dual(z, tangent), condition)
                columns.append(forward_ad.unpack_dual(out).tangent)
        return torch.stack(columns, dim=-1)
    with torch.enable_grad():
        z_ = z if z.requires_grad and create_graph else z.detach().requires_grad_(True)
        out = _call(decoder, z_, condition)
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
    _validate(z, condition, mode, chunk_size)
    _check_batch_norm(decoder)
    with torch.no_grad():
        probe = _call(decoder, z[:1], None if condition is None else condition[:1])
    if probe.shape[0] != 1:
        raise ValueError(
            f"Expected the decoder to keep the batch dimension (1 sample in, 1 out), but got output shape {tuple(probe.shape)}."
        )
    forward = mode == "forward" or (mode in ("auto", "loop") and probe[0].numel() > z.shape[1])
    traced = mode != "loop"
    step = z.shape[0] if chunk_size is None else chunk_size
    grad_context = torch.enable_grad if create_graph else torch.no_grad
    for start in range(0, z.shape[0], step):
        z_chunk = z[start : start + step]
        c_chunk = None if condition is None else condition[start : start + step]
        with grad_context():
            if traced:
                try:
                    jacobian = _traced_jacobian(decoder, z_chunk, c_chunk, forward)
                except (RuntimeError, NotImplementedError, ValueError, TypeError) as error:
                    if mode != "auto" or start > 0:
                        raise
                    warnings.warn(
                        f"torch.func could not trace the decoder ({type(error).__name__}: {str(error).splitlines()[0]}); "
                        "falling back to mode='loop' (plain autograd, slower). Pass mode='loop' to silence this warning.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    traced = False
            if not traced:
                jacobian = _loop_jacobian(decoder, z_chunk, c_chunk, forward, create_graph)
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
        >>> decoder = nn.Linear(2, 3, bias=False)
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


def decoder_gram(
    decoder: Callable,
    z: Tensor,
    *,
    condition: Tensor | None = None,
    mode: JacobianMode = "auto",
    chunk_size: int | None = None,
    std: Tensor | float | None = None,
    sigma: Tensor | None = None,
) -> Tensor:
    r"""Per-sample Gram matrices :math:`G = J^\top J` in float64, computed ``chunk_size`` samples at a time.

    Only ``chunk_size x D x d`` Jacobian entries exist at once; the result is ``N x d x d``.

    Args:
        decoder, z, condition, mode, chunk_size: as for :func:`decoder_jacobian`.
        std: data scale (scalar, or per output entry with the decoder's output shape or flattened); see
            :func:`lightning_mem.functional.jacobian_gram`.
        sigma: latent scale per latent dim, shape ``(d,)``.

    Returns:
        Tensor of shape ``(N, d, d)``, float64, symmetric positive semi-definite.

    Example:
        >>> decoder = nn.Linear(2, 3, bias=False)
        >>> with torch.no_grad():
        ...     _ = decoder.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
        >>> decoder_gram(decoder, torch.zeros(1, 2))
        tensor([[[2., 1.],
                 [1., 5.]]], dtype=torch.float64)
    """
    from lightning_mem.functional.statistics import jacobian_gram

    chunks = iter_decoder_jacobians(decoder, z, condition=condition, mode=mode, chunk_size=chunk_size)
    return torch.cat([jacobian_gram(jacobian, std=std, sigma=sigma) for jacobian in chunks], dim=0)
