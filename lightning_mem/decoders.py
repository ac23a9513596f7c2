"""The decoder resolver: turns what a user hands us (a module and a name, a flow, a callable) into ``z -> x``."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from torch import Tensor, nn
from torch.func import functional_call

from lightning_mem.jacobian import call_decoder

__all__ = [
    "DEFAULT_DECODER_NAMES",
    "InvertibleDecoder",
    "ResolvedDecoder",
    "as_decoder",
    "buffer_names",
    "decoder_with_state",
    "is_invertible_network",
    "resolve_decoder",
    "resolve_latent_dim",
    "state_snapshot",
]

DEFAULT_DECODER_NAMES = ("decoder", "decode")
"""Attribute or method names searched, in order, for a module's decoder."""

LATENT_DIM_NAMES = ("latent_dim",)
"""Attribute (or hyperparameter) names searched, in order, for a module's latent size."""


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
        >>> import torch
        >>> from lightning_mem import decoder_jacobian
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


def is_invertible_network(module: object) -> bool:
    """True for a FrEIA invertible network (its decoder direction is the reverse pass)."""
    try:
        from FrEIA.modules import InvertibleModule
    except ModuleNotFoundError:  # FrEIA is an optional dependency
        return False
    return isinstance(module, InvertibleModule)


class ResolvedDecoder(NamedTuple):
    """A decoder ``(z[, condition]) -> x`` found on a module, with the module that owns its weights."""

    function: Callable[..., Any]
    owner: nn.Module
    name: str


def resolve_decoder(module: nn.Module, decoder: str | Callable[..., Any] | None = None) -> ResolvedDecoder:
    """Find a module's decoder: the one place that turns a module and a decoder spec into ``(z[, condition]) -> x``.

    Args:
        module: the model (e.g. a LightningModule).
        decoder: the attribute or method name of the decoder, or a callable ``(module, z) -> x`` /
            ``(module, z, condition) -> x``; ``None`` searches :data:`DEFAULT_DECODER_NAMES` in order. A FrEIA
            invertible network found by name is used through :func:`as_decoder` (its reverse pass).

    Returns:
        :class:`ResolvedDecoder`: ``function``; ``owner``, the module holding its weights (the decoder itself when it
        is a module, else ``module``); ``name``, for reports.

    Raises:
        TypeError: if ``decoder`` is neither a name, a callable nor ``None``, or the attribute is not callable.
        ValueError: if ``module`` has no such attribute.

    Example:
        >>> class Autoencoder(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.decoder = nn.Linear(2, 4)
        >>> resolved = resolve_decoder(Autoencoder())
        >>> resolved.name, type(resolved.owner).__name__
        ('decoder', 'Linear')
    """
    if decoder is not None and not isinstance(decoder, str):
        if not callable(decoder):
            raise TypeError(
                f"Expected `decoder` to be an attribute name, a callable (module, z) -> x or None, but got {type(decoder).__name__}."
            )
        function = decoder
        name = getattr(function, "__qualname__", type(function).__name__)
        return ResolvedDecoder(lambda z, *condition: function(module, z, *condition), module, name)
    names = (decoder,) if isinstance(decoder, str) else DEFAULT_DECODER_NAMES
    for name in names:
        found = getattr(module, name, None)
        if found is None:
            continue
        if is_invertible_network(found):
            found = as_decoder(found)
        if isinstance(found, nn.Module):
            return ResolvedDecoder(found, found, name)
        if callable(found):
            return ResolvedDecoder(found, module, name)
        raise TypeError(
            f"Expected `{type(module).__name__}.{name}` to be a decoder z -> x, but it is a {type(found).__name__}. "
            "Pass `decoder=` the name of a module or method z -> x, or a callable (module, z) -> x."
        )
    tried = " or ".join(f"`{name}`" for name in names)
    raise ValueError(
        f"Expected {type(module).__name__} to expose a decoder z -> x as an attribute or method {tried}, but it has none. "
        "Add a `self.decoder` module (or a `decode(z)` method), or name it: `decoder='name_of_your_decoder'` "
        "(--decoder on the command line) or `decoder=lambda module, z: ...`."
    )


def resolve_latent_dim(module: nn.Module, latent_dim: int | None = None, latents: Tensor | None = None) -> int:
    """The latent size: ``latent_dim`` if given, else ``module.latent_dim``, ``module.hparams.latent_dim``, or the
    width of ``latents``.

    Raises:
        ValueError: if none is known, it is not a positive int, or it disagrees with ``latents``.
    """
    hparams = getattr(module, "hparams", None)
    candidates = [latent_dim]
    for name in LATENT_DIM_NAMES:
        candidates.append(getattr(module, name, None))
        candidates.append(hparams.get(name) if isinstance(hparams, Mapping) else getattr(hparams, name, None))
    if latents is not None:
        candidates.append(latents.shape[1])
    for value in candidates:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Expected the latent size `latent_dim` to be a positive int, but got {value!r}.")
        if latents is not None and latents.shape[1] != value:
            raise ValueError(f"Expected `latents` of shape (N, {value}) (the latent size), but got {tuple(latents.shape)}.")
        return value
    raise ValueError(
        f"Expected the latent size of {type(module).__name__}'s decoder, but none was found: pass `latent_dim=...` "
        "(--latent-dim on the command line), set `self.latent_dim` in the module, or call `self.save_hyperparameters()` "
        "with a `latent_dim` argument."
    )


def state_snapshot(module: nn.Module) -> dict[str, Tensor]:
    """A CPU copy of a module's parameters and buffers (e.g. to evaluate its decoder again later)."""
    state = itertools.chain(module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False))
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state}


class _Bound(nn.Module):
    """``(z[, condition]) -> decode(z[, condition])`` with ``owner`` as a submodule, so ``functional_call`` can swap its weights."""

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
