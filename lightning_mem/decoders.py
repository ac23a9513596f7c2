"""The decoder resolver: turns what a user hands us (a module and a name, a flow, a callable) into ``z -> x``."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal
from torch.func import functional_call

from lightning_mem.inverse import InverseJacobianDecoder, prefers_encoder_jacobian
from lightning_mem.jacobian import OutputKey, call_decoder, check_latent_shape, check_output_key

__all__ = [
    "DEFAULT_DECODER_NAMES",
    "FLOW_NAMES",
    "LATENT_DIM_NAMES",
    "InvertibleDecoder",
    "NormflowsDecoder",
    "ResolvedDecoder",
    "ZukoFlowDecoder",
    "as_decoder",
    "buffer_names",
    "decoder_with_state",
    "is_invertible_network",
    "is_known_flow",
    "resolve_decoder",
    "resolve_latent_dim",
    "state_snapshot",
]

DEFAULT_DECODER_NAMES = (
    "decoder",
    "decode",
    "generator",
    "dec",
    "model.decoder",
    "model.decode",
    "model.generator",
    "vae.decoder",
    "vae.decode",
    "net.decoder",
    "net.decode",
)
"""Attribute or method paths searched, in order, for a module's decoder (a non-callable attribute is passed over)."""

FLOW_NAMES = ("flow", "inn", "model", "net")
"""Attribute paths searched next, in order, for a known flow (FrEIA, zuko, normflows), used through :func:`as_decoder`."""

LATENT_DIM_NAMES = ("latent_dim", "latent_size", "latent_dims", "z_dim", "nz")
"""Attribute (or hyperparameter) names searched, in order, for the latent size: on the module and its ``hparams``,
then on the objects along the decoder's path and the module that owns the decoder."""


# ---------------------------------------------------------------- known flows


def _freia_invertible_module() -> type | None:
    try:
        from FrEIA.modules import InvertibleModule
    except ModuleNotFoundError:  # FrEIA is an optional dependency
        return None
    return InvertibleModule


def _zuko_lazy_distribution() -> type | None:
    try:
        from zuko.lazy import LazyDistribution
    except ModuleNotFoundError:  # zuko is an optional dependency
        return None
    return LazyDistribution


def _normflows_flow() -> type | None:
    try:
        from normflows import NormalizingFlow
    except ModuleNotFoundError:  # normflows is an optional dependency
        return None
    return NormalizingFlow


def is_invertible_network(module: object) -> bool:
    """True for a FrEIA invertible network (its decoder direction is the reverse pass)."""
    invertible = _freia_invertible_module()
    return invertible is not None and isinstance(module, invertible)


def is_known_flow(module: object) -> bool:
    """True for a flow :func:`as_decoder` knows: a FrEIA invertible network, a zuko lazy flow, a normflows ``NormalizingFlow``."""
    kinds = [kind for kind in (_freia_invertible_module(), _zuko_lazy_distribution(), _normflows_flow()) if kind is not None]
    return isinstance(module, tuple(kinds))


def _standard_normal_to_base(base: Distribution, name: str) -> tuple[Tensor, Tensor]:
    """``(loc, scale)`` of a diagonal Gaussian base distribution (``Normal``, or ``Independent`` of one)."""
    inner = base
    while isinstance(inner, Independent):
        inner = inner.base_dist
    if not isinstance(inner, Normal):
        raise TypeError(
            f"Expected {name}'s base distribution to be a diagonal Gaussian (the metrics are taken w.r.t. standard-normal latents), "
            f"but got {type(base).__name__}. Pass a decoder of your own: `decoder=lambda module, z: ...`."
        )
    return inner.loc, inner.scale


class InvertibleDecoder(nn.Module):
    """Decoder view ``z -> inn(z, rev=True)[0]`` of an invertible network (e.g. a FrEIA ``SequenceINN``)."""

    def __init__(self, inn: nn.Module) -> None:
        super().__init__()
        self.inn = inn

    @property
    def latent_dim(self) -> int | None:
        """The size of the network's (single) input, when it says."""
        dims = getattr(self.inn, "dims_in", None)
        return math.prod(dims[0]) if isinstance(dims, list) and len(dims) == 1 else None

    def forward(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        conditions = [] if condition is None else [condition]
        return self.inn(z, c=conditions, rev=True, jac=False)[0]


class ZukoFlowDecoder(nn.Module):
    r"""Decoder view of a zuko lazy flow (``zuko.flows.NSF``, ``MAF``, any ``zuko.lazy.Flow``): its sampling direction.

    A zuko flow ``flow(c)`` is the distribution of :math:`x = f^{-1}(u)` with :math:`u` from the base distribution
    :math:`N(\mu, \mathrm{diag}\,\sigma^2)`; the decoder is :math:`\varepsilon \mapsto f^{-1}(\mu + \sigma \varepsilon)`,
    so the metrics are taken w.r.t. standard-normal :math:`\varepsilon` (for zuko's default base, :math:`\mu = 0`,
    :math:`\sigma = 1`, that is :math:`u` itself).
    """

    def __init__(self, flow: nn.Module) -> None:
        super().__init__()
        self.flow = flow

    @property
    def latent_dim(self) -> int | None:
        """The size of the base distribution's event, when it does not need a context."""
        flow: Any = self.flow
        try:
            event_shape = flow.base(None).event_shape
        except Exception:  # a conditional base needs its context
            return None
        return math.prod(event_shape) if event_shape else None

    def forward(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        distribution = self.flow(condition)
        loc, scale = _standard_normal_to_base(distribution.base, type(self.flow).__name__)
        return distribution.transform.inv(loc + scale * z.reshape(z.shape[0], *loc.shape[-1:]))

    def encode(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        """The density direction, the inverse of ``forward``: ``eps = (f(x) - mu) / sigma``, flat ``(N, d)``."""
        distribution = self.flow(condition)
        loc, scale = _standard_normal_to_base(distribution.base, type(self.flow).__name__)
        return ((distribution.transform(x) - loc) / scale).reshape(x.shape[0], -1)


class NormflowsDecoder(nn.Module):
    r"""Decoder view of a normflows ``NormalizingFlow``: its sampling direction ``flow.forward`` from the base ``q0``.

    normflows' ``DiagGaussian`` base is :math:`N(\mu, \mathrm{diag}\,\sigma^2)` with learnable :math:`\mu` and
    :math:`\log\sigma` (and an optional ``temperature``); the decoder is
    :math:`\varepsilon \mapsto \mathrm{flow.forward}(\mu + \sigma \varepsilon)`, so the latents are the model's own
    prior and the metrics are taken w.r.t. standard-normal :math:`\varepsilon` (the convention of ``sigma``). The
    flat latent ``(N, d)`` is reshaped to the base's shape (e.g. an image flow's ``(C, H, W)``).
    """

    def __init__(self, flow: nn.Module) -> None:
        super().__init__()
        self.flow = flow

    @property
    def latent_dim(self) -> int | None:
        """The size of the base distribution's sample."""
        shape = getattr(self.flow.q0, "shape", None)
        return math.prod(shape) if isinstance(shape, tuple) and shape else None

    def _base(self) -> tuple[Tensor, Tensor]:
        from normflows.distributions import DiagGaussian  # a NormflowsDecoder exists only where normflows is installed

        q0 = self.flow.q0
        if not isinstance(q0, DiagGaussian):
            raise TypeError(
                f"Expected the normflows flow's base distribution `q0` to be a DiagGaussian (the metrics are taken w.r.t. "
                f"standard-normal latents), but got {type(q0).__name__}. Pass a decoder of your own: `decoder=lambda module, z: ...`."
            )
        log_scale = q0.log_scale if q0.temperature is None else q0.log_scale + math.log(q0.temperature)
        return q0.loc, log_scale.exp()

    def forward(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        loc, scale = self._base()
        u = loc + scale * z.reshape(z.shape[0], *loc.shape[1:])
        return self.flow.forward(u) if condition is None else self.flow.forward(u, context=condition)


def as_decoder(flow: nn.Module) -> nn.Module:
    """Wrap an invertible network or a normalizing flow so that it can be used as a decoder ``z -> x``.

    The decoder is the flow's sampling direction:

    - a FrEIA network (``SequenceINN``, ``GraphINN``, or any module with FrEIA's calling convention): its reverse pass
      ``x = inn(z, c=[condition], rev=True)[0]`` (:class:`InvertibleDecoder`);
    - a zuko flow (``zuko.flows.NSF``, ``MAF``, ... any ``zuko.lazy.Flow``): the inverse transform of the flow's
      distribution applied to base samples (:class:`ZukoFlowDecoder`). Where that direction samples sequentially
      (masked autoregressive transforms: MAF, NSF; see :func:`lightning_mem.inverse.prefers_encoder_jacobian`), the
      decoder is wrapped in an :class:`~lightning_mem.inverse.InverseJacobianDecoder` whose Jacobians invert the
      fast density direction's (same values, about ``d`` times cheaper);
    - a normflows ``NormalizingFlow``: its ``forward`` applied to base samples (:class:`NormflowsDecoder`).

    A zuko or normflows base distribution :math:`N(\\mu, \\mathrm{diag}\\,\\sigma^2)` that is not :math:`N(0, I)`
    (e.g. normflows' learnable ``DiagGaussian``) is folded into the decoder, ``eps -> g(mu + sigma * eps)``: standard
    normal latents are then draws from the model's own prior, and the metrics are w.r.t. the standard-normal ``eps``
    (as with ``sigma`` elsewhere). Other base distributions raise a ``TypeError`` when the decoder is called.

    Args:
        flow: the network or flow; a condition given to the decoder is passed on as its context.

    Returns:
        An ``nn.Module`` sharing ``flow``'s parameters (train/eval mode follows ``flow``'s own); its ``latent_dim``
        is the flow's latent size where the flow tells it.

    Raises:
        TypeError: if ``flow`` is not an ``nn.Module``.

    Example:
        >>> import FrEIA.modules as Fm
        >>> import FrEIA.framework as Ff
        >>> import torch
        >>> from lightning_mem import decoder_jacobian
        >>> _ = torch.manual_seed(0)
        >>> def subnet(c_in, c_out):
        ...     return nn.Sequential(nn.Linear(c_in, 16), nn.Tanh(), nn.Linear(16, c_out))
        >>> inn = Ff.SequenceINN(4)
        >>> inn.append(Fm.AllInOneBlock, subnet_constructor=subnet)
        >>> decoder = as_decoder(inn)
        >>> decoder_jacobian(decoder, torch.randn(3, 4)).shape, decoder.latent_dim
        (torch.Size([3, 4, 4]), 4)

    References:
        L. Ardizzone et al., *Framework for Easily Invertible Architectures (FrEIA)*, 2018-2022.
        F. Rozet et al., *Zuko: normalizing flows in PyTorch*, 2022.
        V. Stimper et al., *normflows: A PyTorch Package for Normalizing Flows*, JOSS 8(86), 2023.
    """
    if not isinstance(flow, nn.Module):
        raise TypeError(f"Expected `inn` to be a torch.nn.Module (an invertible network or flow), but got {type(flow).__name__}.")
    if isinstance(flow, (InvertibleDecoder, ZukoFlowDecoder, NormflowsDecoder, InverseJacobianDecoder)):
        return flow
    zuko_flow, normflows_flow = _zuko_lazy_distribution(), _normflows_flow()
    if zuko_flow is not None and isinstance(flow, zuko_flow):
        decoder = ZukoFlowDecoder(flow)
        if prefers_encoder_jacobian(flow):  # MAF, NSF: sampling takes d sequential passes, the density direction one
            return InverseJacobianDecoder(decoder, decoder.encode)
        return decoder
    if normflows_flow is not None and isinstance(flow, normflows_flow):
        return NormflowsDecoder(flow)
    return InvertibleDecoder(flow)


# ---------------------------------------------------------------- the resolver


class ResolvedDecoder(NamedTuple):
    """A decoder ``(z[, condition]) -> x`` found on a module, with the module that owns its weights.

    ``latent_dim`` is the latent size the decoder itself tells (a flow's base, ``latent_shape``, a size attribute on
    the objects along its path, an ``nn.Sequential`` decoder's first ``nn.Linear``), or ``None``.
    """

    function: Callable[..., Any]
    owner: nn.Module
    name: str
    latent_dim: int | None = None


def _lookup(module: nn.Module, path: str) -> tuple[Any, list[Any], str | None]:
    """Follow a dotted ``path`` from ``module``: ``(found or None, the objects along the way, the missing part)``."""
    found: Any = module
    parents: list[Any] = []
    for part in path.split("."):
        parents.append(found)
        found = getattr(found, part, None)
        if found is None:
            return None, parents, part
    return found, parents, None


def _size_attribute(source: Any) -> int | None:
    """The first positive int among :data:`LATENT_DIM_NAMES` on ``source``, if any."""
    for name in LATENT_DIM_NAMES:
        value = getattr(source, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None


def _first_linear_inputs(decoder: Any) -> int | None:
    """``in_features`` of an ``nn.Sequential`` decoder's first layer when it is an ``nn.Linear`` (nested Sequentials too)."""
    while isinstance(decoder, nn.Sequential) and len(decoder) > 0:
        decoder = decoder[0]
    return decoder.in_features if isinstance(decoder, nn.Linear) else None


def _adapt(function: Callable[..., Any], latent_shape: tuple[int, ...] | None, output_key: OutputKey | None) -> Callable[..., Any]:
    if latent_shape is None and output_key is None:
        return function  # the engine adapts distribution and single-tensor mapping outputs by itself

    def decode(z: Tensor, *condition: Tensor) -> Tensor:
        return call_decoder(function, z, *condition, latent_shape=latent_shape, output_key=output_key)

    return decode


def resolve_decoder(
    module: nn.Module,
    decoder: str | Callable[..., Any] | None = None,
    *,
    output_key: OutputKey | None = None,
    latent_shape: Sequence[int] | None = None,
) -> ResolvedDecoder:
    """Find a module's decoder: the one place that turns a module and a decoder spec into ``(z[, condition]) -> x``.

    Search order without ``decoder``: the paths of :data:`DEFAULT_DECODER_NAMES` (``decoder``, ``decode``,
    ``generator``, ``dec``, ``model.decoder``, ``model.decode``, ``model.generator``, ``vae.decoder``, ``vae.decode``,
    ``net.decoder``, ``net.decode``; the first callable one wins), then :data:`FLOW_NAMES` (``flow``, ``inn``,
    ``model``, ``net``) where they hold a known flow. A known flow (FrEIA, zuko, normflows) found on any path is used
    through :func:`as_decoder`, its sampling direction.

    Args:
        module: the model (e.g. a LightningModule).
        decoder: the attribute or method path of the decoder (dotted: ``"model.decode"``, ``"vae.decoder"``), or a
            callable ``(module, z) -> x`` / ``(module, z, condition) -> x``; ``None`` searches as above.
        output_key: which part of a mapping or tuple output to measure (see :func:`lightning_mem.jacobian.decoder_output`).
        latent_shape: the shape of one latent as the decoder takes it, e.g. ``(100, 1, 1)``; the returned function
            takes flat ``(N, d)`` latents.

    Returns:
        :class:`ResolvedDecoder`: ``function``; ``owner``, the module holding its weights (the decoder itself when it
        is a module, the module of a bound method, else ``module``); ``name``, for reports; ``latent_dim``, the latent
        size the decoder tells, if any.

    Raises:
        TypeError: if ``decoder`` is neither a path, a callable nor ``None``, the attribute is not callable, or
            ``output_key`` is not a str or int.
        ValueError: if ``module`` has no such attribute (the message names the missing part), or ``latent_shape`` is
            not a tuple of positive ints.

    Example:
        >>> class Autoencoder(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.model = nn.Module()
        ...         self.model.decoder = nn.Linear(2, 4)
        >>> resolved = resolve_decoder(Autoencoder())
        >>> resolved.name, type(resolved.owner).__name__, resolved.latent_dim
        ('model.decoder', 'Linear', 2)
    """
    check_output_key(output_key)
    shape = check_latent_shape(latent_shape)
    shape_dim = None if shape is None else math.prod(shape)
    if decoder is not None and not isinstance(decoder, str):
        if not callable(decoder):
            raise TypeError(
                f"Expected `decoder` to be an attribute name, a callable (module, z) -> x or None, but got {type(decoder).__name__}."
            )
        function = decoder
        name = getattr(function, "__qualname__", type(function).__name__)
        return ResolvedDecoder(_adapt(lambda z, *c: function(module, z, *c), shape, output_key), module, name, shape_dim)
    if isinstance(decoder, str):
        found, parents, missing = _lookup(module, decoder)
        if missing is not None:
            where = "it has none" if len(parents) == 1 else f"`{'.'.join(decoder.split('.')[: len(parents) - 1])}` has no `{missing}`"
            raise ValueError(
                f"Expected {type(module).__name__} to expose a decoder z -> x as an attribute or method `{decoder}`, but {where}. "
                "Name the decoder's path: `decoder='name_of_your_decoder'` (dotted paths such as 'model.decode' work; "
                "--decoder on the command line), or pass `decoder=lambda module, z: ...`."
            )
        if not callable(found):
            raise TypeError(
                f"Expected `{type(module).__name__}.{decoder}` to be a decoder z -> x, but it is a {type(found).__name__}. "
                "Pass `decoder=` the path of a module or method z -> x, or a callable (module, z) -> x."
            )
        return _resolved(found, parents, module, decoder, shape, output_key)
    for path in DEFAULT_DECODER_NAMES:
        found, parents, missing = _lookup(module, path)
        if missing is None and callable(found):
            return _resolved(found, parents, module, path, shape, output_key)
    for path in FLOW_NAMES:
        found, parents, missing = _lookup(module, path)
        if missing is None and is_known_flow(found):
            return _resolved(found, parents, module, path, shape, output_key)
    raise ValueError(
        f"Expected {type(module).__name__} to expose a decoder z -> x as an attribute or method `decoder` or `decode` "
        f"(also searched: {', '.join(f'`{name}`' for name in DEFAULT_DECODER_NAMES[2:])}, and a FrEIA, zuko or normflows flow "
        f"at {', '.join(f'`{name}`' for name in FLOW_NAMES)}), but it has none. Add a `self.decoder` module (or a `decode(z)` "
        "method), or name it: `decoder='name_of_your_decoder'` (dotted paths such as 'model.decode' work; --decoder on the "
        "command line) or `decoder=lambda module, z: ...`."
    )


def _resolved(
    found: Any,
    parents: list[Any],
    module: nn.Module,
    name: str,
    latent_shape: tuple[int, ...] | None,
    output_key: OutputKey | None,
) -> ResolvedDecoder:
    """The :class:`ResolvedDecoder` of ``found`` (reached from ``module`` through ``parents``)."""
    if is_known_flow(found):
        found = as_decoder(found)
    if isinstance(found, nn.Module):
        owner = found
    else:
        bound_to = getattr(found, "__self__", None)
        owner = bound_to if isinstance(bound_to, nn.Module) else module
    latent_dim: int | None
    if latent_shape is not None:
        latent_dim = math.prod(latent_shape)
    else:
        told = getattr(found, "latent_dim", None) if isinstance(found, (InvertibleDecoder, ZukoFlowDecoder, NormflowsDecoder)) else None
        sources = [*parents[1:], owner] if owner is not module else parents[1:]
        latent_dim = told or next((size for size in map(_size_attribute, sources) if size is not None), None)
        latent_dim = latent_dim or _first_linear_inputs(found)
    return ResolvedDecoder(_adapt(found, latent_shape, output_key), owner, name, latent_dim)


def resolve_latent_dim(
    module: nn.Module,
    latent_dim: int | None = None,
    latents: Tensor | None = None,
    *,
    resolved: ResolvedDecoder | None = None,
    latent_shape: Sequence[int] | None = None,
) -> int:
    """The latent size ``d``, from the first that says, in this order.

    ``latent_dim``; the product of ``latent_shape``; an attribute of :data:`LATENT_DIM_NAMES` (``latent_dim``,
    ``latent_size``, ``latent_dims``, ``z_dim``, ``nz``) on ``module``, then in ``module.hparams``; what the resolved
    decoder tells (:attr:`ResolvedDecoder.latent_dim`: a flow's base, the same names along the decoder's path and on
    its owner, an ``nn.Sequential`` decoder's first ``nn.Linear``); the width of ``latents``.

    Raises:
        ValueError: if none is known, a value found is not a positive int, or sizes disagree (``latent_dim`` with
            ``latent_shape``, or either with ``latents``).
    """
    shape = check_latent_shape(latent_shape)
    hparams = getattr(module, "hparams", None)
    candidates: list[tuple[str, Any]] = [("`latent_dim`", latent_dim)]
    if shape is not None:
        candidates.append(("`latent_shape`", math.prod(shape)))
    for name in LATENT_DIM_NAMES:
        candidates.append((f"`{type(module).__name__}.{name}`", getattr(module, name, None)))
        candidates.append((f"`hparams.{name}`", hparams.get(name) if isinstance(hparams, Mapping) else getattr(hparams, name, None)))
    if resolved is not None:
        candidates.append((f"the decoder `{resolved.name}`", resolved.latent_dim))
    if latents is not None:
        candidates.append(("`latents`", latents.shape[1]))
    for source, value in candidates:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"Expected the latent size {source} to be a positive int, but got {value!r}. Pass `latent_dim=...` "
                "(--latent-dim on the command line)."
            )
        if shape is not None and math.prod(shape) != value:
            raise ValueError(f"Expected `latent_shape` with {value} entries in all (the latent size), but got {shape}.")
        if latents is not None and latents.shape[1] != value:
            raise ValueError(f"Expected `latents` of shape (N, {value}) (the latent size), but got {tuple(latents.shape)}.")
        return value
    raise ValueError(
        f"Expected the latent size of {type(module).__name__}'s decoder, but none was found: pass `latent_dim=...` "
        "(--latent-dim on the command line), set `self.latent_dim` in the module, or call `self.save_hyperparameters()` "
        "with a `latent_dim` argument."
    )


# ---------------------------------------------------------------- state


def state_snapshot(module: nn.Module) -> dict[str, Tensor]:
    """A CPU copy of a module's parameters and buffers (e.g. to evaluate its decoder again later)."""
    state = itertools.chain(module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False))
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state}


class _Bound(nn.Module):
    """``(z[, condition]) -> decode(z[, condition])`` with ``owner`` as a submodule, so ``functional_call`` can swap its weights."""

    _decode: Callable[..., Any]  # set with object.__setattr__, so nn.Module does not register it

    def __init__(self, owner: nn.Module, decode: Callable[..., Any]) -> None:
        super().__init__()
        self.owner = owner
        object.__setattr__(self, "_decode", decode)  # not a submodule: `owner` already holds its parameters

    def forward(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        return call_decoder(self._decode, z, condition)


def decoder_with_state(resolved: ResolvedDecoder, state: Mapping[str, Tensor]) -> Callable[..., Tensor]:
    """The decoder with (some of) its owner's parameters and buffers replaced by ``state``, the module untouched.

    ``state`` maps names of ``resolved.owner.state_dict()`` (e.g. a :func:`state_snapshot`) to tensors on the
    owner's device.
    """
    bound = _Bound(resolved.owner, resolved.function)
    renamed = {f"owner.{name}": tensor for name, tensor in state.items()}
    return lambda *args: functional_call(bound, renamed, args)


def buffer_names(module: nn.Module) -> list[str]:
    """Names of a module's buffers (e.g. BatchNorm running statistics), duplicates included."""
    return [name for name, _ in module.named_buffers(remove_duplicate=False)]
