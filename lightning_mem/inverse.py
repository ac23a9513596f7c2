r"""Fast-direction Jacobians of invertible decoders: :math:`J_g(z) = J_f(x)^{-1}` at :math:`x = g(z)`.

An invertible decoder :math:`g` (a normalizing flow's sampling direction) has an encoder :math:`f = g^{-1}` (its
density direction), and by the inverse function theorem

.. math::
    J_g(z) = \bigl(J_f(x)\bigr)^{-1}, \qquad x = g(z).

For autoregressive flows (MAF, NSF and other masked autoregressive transforms) the encoder is one network pass and
the decoder ``d`` sequential passes, so differentiating the encoder and inverting a ``d x d`` matrix per sample is
far cheaper than differentiating the decoder: ``x = g(z)`` is computed once per chunk without gradients, then
``J_f(x)`` by the Jacobian engine (reverse mode for a square map), then one LU factorisation per sample.

Three ways in:

- :func:`inverse_jacobian` / :func:`iter_inverse_jacobians`: an encoder and data points ``x`` (e.g. samples drawn
  from the flow, ``flow().sample((n,))``): the decoder Jacobians at the latents ``z = f(x)``;
- :class:`InverseJacobianDecoder`: a decoder ``z -> x`` that knows its encoder; its :meth:`~InverseJacobianDecoder.decoder_jacobian`
  gives the decoder Jacobians at latents ``z`` (what the metrics and the callback use);
- :func:`prefers_encoder_jacobian` tells whether a flow samples sequentially (the case where this route pays); the
  decoder resolver (:func:`lightning_mem.as_decoder`) then wraps the flow in an :class:`InverseJacobianDecoder`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mem._checks import check_latents, check_mode, check_positive_int
from lightning_mem.jacobian import JacobianMode, call_decoder, decoder_jacobian

__all__ = [
    "InverseJacobianDecoder",
    "inverse_jacobian",
    "iter_inverse_jacobians",
    "prefers_encoder_jacobian",
]

SEQUENTIAL_PASSES = 2
"""A masked autoregressive transform with more inverse passes than this samples sequentially (a coupling layer has 2)."""


def _invert(encoder_jacobian: Tensor, rows: slice) -> Tensor:
    """``(n, d, d)`` inverses of square encoder Jacobians, or a ``ValueError`` naming the first singular sample."""
    inverse, info = torch.linalg.inv_ex(encoder_jacobian)
    singular = torch.nonzero(info).flatten()
    if singular.numel() > 0:
        index = (rows.start or 0) + int(singular[0])
        raise ValueError(
            f"Expected the encoder Jacobian to be invertible at every data point (a bijective flow), but it is singular at "
            f"sample {index} ({singular.numel()} singular in this chunk): the decoder direction has no finite Jacobian there."
        )
    return inverse


def iter_inverse_jacobians(
    encoder: Callable[..., Any],
    x: Tensor,
    *,
    condition: Tensor | None = None,
    mode: JacobianMode = "auto",
    chunk_size: int | None = None,
    create_graph: bool = False,
) -> Iterator[Tensor]:
    r"""Yield the decoder Jacobians :math:`J_f(x)^{-1}` at the latents :math:`z = f(x)`, ``chunk_size`` points at a time.

    Arguments are those of :func:`inverse_jacobian`; each chunk is ``(n, *x.shape[1:], d)``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected `x` to be a torch.Tensor, but got {type(x).__name__}.")
    if x.ndim < 2:
        raise ValueError(f"Expected `x` of shape (N, *data_shape), but got {tuple(x.shape)}.")
    check_latents(x.flatten(1), condition)
    check_mode(mode)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    data_shape = x.shape[1:]
    flat_x = x.flatten(1)

    def flat_encoder(x_flat: Tensor, *condition_: Tensor) -> Tensor:
        return call_decoder(encoder, x_flat.reshape(x_flat.shape[0], *data_shape), *condition_).flatten(1)

    step = x.shape[0] if chunk_size is None else chunk_size
    for start in range(0, x.shape[0], step):
        rows = slice(start, start + step)
        c_rows = None if condition is None else condition[rows]
        jacobian = decoder_jacobian(flat_encoder, flat_x[rows], condition=c_rows, mode=mode, create_graph=create_graph)
        if jacobian.shape[1] != jacobian.shape[2]:
            raise ValueError(
                f"Expected an encoder with as many outputs as inputs (a bijection of {flat_x.shape[1]} dims), but it maps "
                f"{jacobian.shape[2]} data dims to {jacobian.shape[1]} latents."
            )
        yield _invert(jacobian, rows).reshape(jacobian.shape[0], *data_shape, jacobian.shape[1])


def inverse_jacobian(
    encoder: Callable[..., Any],
    x: Tensor,
    *,
    condition: Tensor | None = None,
    mode: JacobianMode = "auto",
    chunk_size: int | None = None,
    create_graph: bool = False,
) -> Tensor:
    r"""The decoder Jacobian at :math:`z = f(x)` from the encoder's: :math:`J_g(z) = J_f(x)^{-1}`.

    For a bijective flow with encoder ``f`` (data to latent, the density direction) and decoder ``g = f^{-1}``,
    this equals :func:`lightning_mem.decoder_jacobian` of ``g`` at ``z = f(x)``, at the cost of one Jacobian of the
    encoder (:func:`lightning_mem.decoder_jacobian` of ``f``, ``mode`` chosen as there) and one matrix inverse per
    point. It pays when the decoder direction is the slow one (autoregressive flows). The prior samples a metric
    wants are the data points the flow samples: ``x = flow().sample((n,))`` gives ``z = f(x) ~ N(0, I)``.

    Args:
        encoder: ``x -> z`` (or ``(x, condition) -> z``), with as many latents as data dims.
        x: data points ``(N, *data_shape)``, floating point.
        condition: optional per-point condition ``(N, ...)``, passed to the encoder.
        mode: how the encoder is differentiated (:func:`lightning_mem.decoder_jacobian`; ``"auto"`` takes reverse
            mode for a square map).
        chunk_size: points differentiated at once (``None``: all).
        create_graph: keep the graph, to differentiate the result.

    Returns:
        ``(N, *data_shape, d)``: the decoder Jacobians in torch's layout, like :func:`lightning_mem.decoder_jacobian`.

    Raises:
        TypeError: if ``x`` is not a floating point tensor.
        ValueError: for a non-square encoder, a singular encoder Jacobian (naming the sample), or bad arguments.

    Example:
        >>> a = torch.tensor([[2.0, 1.0], [0.0, 4.0]], dtype=torch.float64)
        >>> encoder = lambda x: x @ a.T  # z = A x, so the decoder is x = A^{-1} z
        >>> inverse_jacobian(encoder, torch.zeros(1, 2, dtype=torch.float64))
        tensor([[[ 0.5000, -0.1250],
                 [ 0.0000,  0.2500]]], dtype=torch.float64)

    References:
        G. Papamakarios, T. Pavlakou, I. Murray, *Masked Autoregressive Flow for Density Estimation*, NeurIPS 2017.
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
    """
    chunks = iter_inverse_jacobians(encoder, x, condition=condition, mode=mode, chunk_size=chunk_size, create_graph=create_graph)
    return torch.cat(list(chunks), dim=0)


class InverseJacobianDecoder(nn.Module):
    r"""A decoder ``z -> x`` whose Jacobians are computed through its encoder: :math:`J_g(z) = J_f(g(z))^{-1}`.

    ``forward`` is the decoder (the sampling direction, unchanged); :meth:`decoder_jacobian` decodes the latents once
    without gradients and inverts the encoder's Jacobian there (:func:`inverse_jacobian`). The Jacobian engine uses
    :meth:`decoder_jacobian` for ``mode="auto"``; ``mode="forward"``/``"reverse"``/``"loop"`` still differentiate
    ``forward`` itself (e.g. to compare).

    Args:
        decoder: ``z -> x`` (or ``(z, condition) -> x``); a module is registered as a submodule.
        encoder: its inverse ``x -> z`` (or ``(x, condition) -> z``); a module is registered as a submodule.
        encoder_mode: how the encoder is differentiated (default ``"auto"``: reverse mode for a square map, which
            measured 6x faster than forward mode on a 64-D MAF).

    Example:
        >>> import zuko
        >>> _ = torch.manual_seed(0)
        >>> flow = zuko.flows.MAF(features=3, transforms=2).double()  # sampling: 3 sequential passes per transform
        >>> maf = InverseJacobianDecoder(lambda z: flow().transform.inv(z), lambda x: flow().transform(x))
        >>> z = torch.randn(4, 3, dtype=torch.float64)
        >>> bool(torch.allclose(maf.decoder_jacobian(z), decoder_jacobian(maf, z, mode="forward")))
        True
        >>> a = torch.tensor([[2.0, 1.0], [0.0, 4.0]], dtype=torch.float64)
        >>> decoder = InverseJacobianDecoder(lambda z: z @ torch.linalg.inv(a).T, lambda x: x @ a.T)
        >>> decoder.decoder_jacobian(torch.ones(1, 2, dtype=torch.float64))
        tensor([[[ 0.5000, -0.1250],
                 [ 0.0000,  0.2500]]], dtype=torch.float64)

    References:
        G. Papamakarios, T. Pavlakou, I. Murray, *Masked Autoregressive Flow for Density Estimation*, NeurIPS 2017.
    """

    def __init__(self, decoder: Callable[..., Any], encoder: Callable[..., Any], *, encoder_mode: JacobianMode = "auto") -> None:
        super().__init__()
        for name, value in (("decoder", decoder), ("encoder", encoder)):
            if not callable(value):
                raise TypeError(f"Expected `{name}` to be a callable, but got {type(value).__name__}.")
        check_mode(encoder_mode)
        # Modules become submodules (train/eval, .to(), parameters follow); plain callables are kept as attributes.
        self.decoder = decoder
        self.encoder = encoder
        self.encoder_mode = encoder_mode

    @property
    def latent_dim(self) -> int | None:
        """The decoder's latent size, where it tells (e.g. a wrapped flow's)."""
        return getattr(self.decoder, "latent_dim", None)

    def forward(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        """The decoder: ``x = g(z)``."""
        return call_decoder(self.decoder, z, condition)

    def encode(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        """The encoder: ``z = f(x)``."""
        return call_decoder(self.encoder, x, condition)

    def decoder_jacobian(self, z: Tensor, condition: Tensor | None = None, *, create_graph: bool = False) -> Tensor:
        r"""``(N, *data_shape, d)`` decoder Jacobians at ``z``: :math:`J_f(x)^{-1}` at :math:`x = g(z)` (computed once).

        ``x`` is decoded without gradients unless ``create_graph`` (then gradients flow through ``x`` as well).
        """
        check_latents(z, condition)
        with torch.set_grad_enabled(create_graph):
            x = self(z, condition)
        jacobian = inverse_jacobian(self.encode, x, condition=condition, mode=self.encoder_mode, create_graph=create_graph)
        return jacobian if create_graph else jacobian.detach()


def prefers_encoder_jacobian(flow: Any) -> bool:
    """True when a flow samples sequentially, so that :class:`InverseJacobianDecoder` is the faster route.

    That is a module holding a masked autoregressive transform with more than :data:`SEQUENTIAL_PASSES` inverse
    passes: zuko's ``MAF`` and ``NSF`` (``d`` passes each), not its coupling flows (``RealNVP``, ``NICE``: 2).

    Example:
        >>> import zuko
        >>> prefers_encoder_jacobian(zuko.flows.MAF(features=4)), prefers_encoder_jacobian(zuko.flows.RealNVP(features=4))
        (True, False)
    """
    if not isinstance(flow, nn.Module):
        return False
    try:
        from zuko.flows.autoregressive import MaskedAutoregressiveTransform
    except ModuleNotFoundError:  # zuko is an optional dependency
        return False
    return any(isinstance(m, MaskedAutoregressiveTransform) and m.passes > SEQUENTIAL_PASSES for m in flow.modules())
