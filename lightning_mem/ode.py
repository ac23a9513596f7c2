r"""ODE decoders: the flow map of :math:`\dot x = v(t, x)` as a decoder ``z -> x``, and its Jacobian by the tangent ODE.

Continuous normalizing flows, flow-matching models and the probability-flow ODE of a diffusion model decode a latent
``z`` by integrating a velocity field from :math:`x(t_0) = z` to :math:`x(t_1)`. The decoder Jacobian
:math:`J(t) = \partial x(t) / \partial z` solves the *tangent* (variational) ODE along the trajectory:

.. math::
    \dot x = v(t, x), \quad x(t_0) = z; \qquad \dot J = \frac{\partial v}{\partial x}(t, x)\, J, \quad J(t_0) = I_d.

:func:`ode_decoder_jacobian` integrates both together with ``torchdiffeq.odeint`` (the same solver, grid and
tolerances as the decoder): each right-hand side evaluation is one velocity call and ``d`` Jacobian-vector products
of the velocity (``torch.func.jvp``, vectorised with ``vmap`` over the ``d`` columns; a loop where ``vmap`` cannot
trace the velocity). The solver itself is never differentiated. Why this route:

- ``torch.func`` cannot trace ``torchdiffeq``'s solvers (they write into pre-allocated tensors in place), so the
  Jacobian engine's vectorised path fails on any ``odeint`` decoder; its fallback, plain forward-mode AD through the
  solver, works for fixed-step solvers but not for adaptive ones (their step-size control runs a custom
  ``autograd.Function`` without a forward-mode rule), nor for ``odeint_adjoint`` (ditto).
- For an explicit Runge-Kutta method on a fixed grid (``euler``, ``midpoint``, ``rk4``, ...), the tangent ODE
  integrated by the same method *is* the derivative of the discrete solver map (Runge-Kutta methods commute with
  linearisation): the Jacobian equals that of differentiating the solver, to rounding.
- For an adaptive solver (``dopri5``, ...), the tangent ODE is under the same error control as the state (the
  solver's norm covers both), so the Jacobian is that of the exact flow map to the solver's tolerance. It is not the
  derivative of the step-size controller, which differentiating the solver would add. The step sizes are shared by
  the samples integrated together, as in any batched ``odeint``; each sample's Jacobian involves its own trajectory
  only.
- The adjoint method (``odeint_adjoint``, :class:`ODEDecoder` with ``adjoint=True``) is a way to train with little
  memory; it has no forward mode. :class:`ODEDecoder` uses it for ``forward`` only: its Jacobians always come from
  the tangent ODE. A decoder of your own that calls ``odeint_adjoint`` fails in forward mode with torch's
  ``NotImplementedError`` ("You must implement the jvp function for custom autograd.Function to use it with
  forward mode AD"); wrap its velocity in :class:`ODEDecoder` instead (or use ``mode="reverse"``/``"loop"``: one
  adjoint solve per output entry).

Cost per chunk of ``n`` samples: the trajectory's function evaluations, each ``1 + d`` velocity evaluations' worth
(``n * (1 + d)`` rows), and memory ``n * d * d`` for the tangents.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap

from lightning_mem._checks import check_latents, check_positive_float, check_positive_int

__all__ = ["DEFAULT_ATOL", "DEFAULT_METHOD", "DEFAULT_RTOL", "ODEDecoder", "ode_decoder_jacobian"]

DEFAULT_METHOD = "dopri5"
"""The default solver: Dormand-Prince 5(4), adaptive (torchdiffeq's default too)."""

DEFAULT_RTOL = 1e-7
"""Default relative tolerance of adaptive solvers (torchdiffeq's)."""

DEFAULT_ATOL = 1e-9
"""Default absolute tolerance of adaptive solvers (torchdiffeq's)."""

_UNVECTORISABLE = (RuntimeError, NotImplementedError, ValueError, TypeError)
"""What ``torch.func.vmap`` raises on a velocity it cannot trace (in-place updates, data-dependent control flow)."""


def _check_solver(t0: Any, t1: Any, method: Any, rtol: Any, atol: Any, options: Any) -> None:
    """Check the integration settings, and that torchdiffeq knows the solver (a tiny solve, before any real one)."""
    for name, value in (("t0", t0), ("t1", t1)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"Expected `{name}` to be a finite float, but got {value!r}.")
    if t0 == t1:
        raise ValueError(f"Expected `t0` != `t1` (an integration interval), but got t0 = t1 = {t0!r}.")
    check_positive_float(rtol, "rtol")
    check_positive_float(atol, "atol")
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"Expected `options` to be a mapping of solver options (e.g. {{'step_size': 0.05}}) or None, but got {options!r}.")
    if not isinstance(method, str):
        raise TypeError(f"Expected `method` to be the name of a torchdiffeq solver such as 'dopri5' or 'rk4', but got {method!r}.")
    from torchdiffeq import odeint

    try:
        odeint(
            lambda t, y: -y,
            torch.ones(1, dtype=torch.float64),
            torch.tensor([0.0, 1.0], dtype=torch.float64),
            method=method,
            options=dict(options or {}),
        )
    except ValueError as error:
        raise ValueError(f"Expected `method` to be a torchdiffeq solver, but got {method!r}: {error}") from None


class _TangentField:
    """The right-hand side of the tangent ODE, :math:`(x, J) \\mapsto (v(t, x), \\partial_x v(t, x) J)`.

    Vectorised over the ``d`` columns of ``J`` with ``vmap(jvp)``; where the first call cannot be vectorised, one
    warning and a loop of ``d`` JVPs from then on.
    """

    def __init__(self, velocity: Callable[..., Tensor], condition: Tensor | None) -> None:
        self.velocity = velocity
        self.extra = () if condition is None else (condition,)
        self.vectorised: bool | None = None  # None: not tried yet

    def __call__(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, tangents = state

        def field(x_: Tensor) -> Tensor:
            return self.velocity(t, x_, *self.extra)

        def push_forward(u: Tensor) -> tuple[Tensor, Tensor]:
            velocity, pushed = jvp(field, (x,), (u,))[:2]
            return velocity, pushed

        if self.vectorised is not False:
            try:
                # the velocity does not depend on the tangent: out_dims None keeps one copy of it
                velocity, pushed = vmap(push_forward, in_dims=-1, out_dims=(None, -1))(tangents)  # type: ignore[arg-type]
                self.vectorised = True
                return velocity, pushed
            except _UNVECTORISABLE as error:
                if self.vectorised:
                    raise
                warnings.warn(
                    f"torch.func.vmap could not vectorise the velocity's Jacobian-vector products ({type(error).__name__}: "
                    f"{str(error).splitlines()[0]}); the tangent ODE uses a loop of {tangents.shape[-1]} JVPs instead (slower).",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self.vectorised = False
        columns = [push_forward(tangents[..., i]) for i in range(tangents.shape[-1])]
        return columns[0][0], torch.stack([pushed for _, pushed in columns], dim=-1)


def _tangent_solve(
    velocity: Callable[..., Tensor],
    z: Tensor,
    condition: Tensor | None,
    times: Tensor,
    solver: Mapping[str, Any],
    initial: Tensor | None = None,
) -> Tensor:
    """``J(t1) V`` of the tangent ODE from ``J(t0) V = V``, ``(n, d, k)``; ``V = I`` (``k = d``) by default."""
    from torchdiffeq import odeint

    n, d = z.shape
    if initial is None:
        initial = torch.eye(d, dtype=z.dtype, device=z.device).expand(n, d, d)
    _, tangents = odeint(_TangentField(velocity, condition), (z, initial), times, **solver)
    return tangents[-1]


def _solver_arguments(method: str, rtol: float, atol: float, options: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"method": method, "rtol": rtol, "atol": atol, "options": dict(options or {})}


def ode_decoder_jacobian(
    velocity: Callable[..., Tensor],
    z: Tensor,
    *,
    condition: Tensor | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    method: str = DEFAULT_METHOD,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    options: Mapping[str, Any] | None = None,
    chunk_size: int | None = None,
    create_graph: bool = False,
) -> Tensor:
    r"""Jacobian :math:`\partial x(t_1) / \partial z` of the ODE decoder :math:`\dot x = v(t, x)`, :math:`x(t_0) = z`.

    Integrates the state and its tangents together (:math:`\dot J = \partial_x v\, J`, :math:`J(t_0) = I`) with
    ``torchdiffeq.odeint``; see the module docstring for why this route and what it equals for fixed-step and
    adaptive solvers.

    Args:
        velocity: ``v(t, x) -> dx/dt`` with ``t`` a 0-dim tensor and ``x`` ``(n, d)`` (torchdiffeq's convention), or
            ``v(t, x, condition)`` when ``condition`` is given. Samples must not interact (no BatchNorm in
            training mode).
        z: latents ``(N, d)``, floating point.
        condition: optional per-sample condition ``(N, ...)`` passed to ``velocity``.
        t0, t1: integration interval (``t1 < t0`` integrates backwards).
        method, rtol, atol, options: the ``torchdiffeq.odeint`` solver and its settings. Fixed-step solvers need
            ``options={"step_size": h}``; without it torchdiffeq takes a single step from ``t0`` to ``t1``.
        chunk_size: samples integrated at once (memory ``chunk_size * d * d``); ``None``: all.
        create_graph: keep the graph (backpropagation through the solver), to differentiate the result.

    Returns:
        ``(N, d, d)``, dtype and device of ``z``.

    Raises:
        TypeError, ValueError: for bad latents or solver settings.

    Example:
        >>> a = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)  # a rotation field: x(1) = expm(A) z
        >>> jacobian = ode_decoder_jacobian(lambda t, x: x @ a.T, torch.zeros(1, 2, dtype=torch.float64), rtol=1e-10, atol=1e-10)
        >>> bool(torch.allclose(jacobian[0], torch.linalg.matrix_exp(a), atol=1e-8))
        True

    References:
        R. T. Q. Chen et al., *Neural Ordinary Differential Equations*, NeurIPS 2018.
        E. Hairer, S. P. Nørsett, G. Wanner, *Solving Ordinary Differential Equations I*, Sec. II.6 (variational
        equation; Runge-Kutta methods and differentiation), Springer 1993.
    """
    if not callable(velocity):
        raise TypeError(f"Expected `velocity` to be a callable v(t, x), but got {type(velocity).__name__}.")
    check_latents(z, condition)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    _check_solver(t0, t1, method, rtol, atol, options)
    times = torch.tensor([t0, t1], dtype=z.dtype, device=z.device)
    solver = _solver_arguments(method, rtol, atol, options)
    step = z.shape[0] if chunk_size is None else chunk_size
    chunks = []
    with torch.set_grad_enabled(create_graph):
        for start in range(0, z.shape[0], step):
            c_rows = None if condition is None else condition[start : start + step]
            chunks.append(_tangent_solve(velocity, z[start : start + step], c_rows, times, solver))
    jacobian = torch.cat(chunks, dim=0)
    return jacobian if create_graph else jacobian.detach()


class ODEDecoder(nn.Module):
    r"""A decoder ``z -> x`` that integrates :math:`\dot x = v(t, x)` from :math:`x(t_0) = z` to :math:`x(t_1)`.

    ``forward`` solves the ODE with ``torchdiffeq.odeint`` (or ``odeint_adjoint`` with ``adjoint=True``: memory-lean
    training); :meth:`encode` solves it backwards (``t1 -> t0``), the flow's density direction.
    :meth:`decoder_jacobian` integrates the tangent ODE (:func:`ode_decoder_jacobian`); the Jacobian engine
    (:func:`lightning_mem.decoder_jacobian`, the metrics, the callback) uses it in ``mode="auto"``.

    Args:
        velocity: ``v(t, x) -> dx/dt`` (or ``v(t, x, condition)``); a module is registered as a submodule (its
            parameters are this decoder's). For flow matching, the learned velocity field.
        t0, t1: the latent's time and the data's time (flow matching: ``0`` noise, ``1`` data).
        method, rtol, atol, options: the solver (default ``dopri5`` with torchdiffeq's tolerances). Fixed-step
            solvers need ``options={"step_size": h}``; without it torchdiffeq takes a single step.
        adjoint: solve ``forward`` and :meth:`encode` with ``odeint_adjoint`` (training memory independent of the
            number of steps; ``velocity`` must then be a module, or a method of one, whose parameters are
            trained). The Jacobian is unaffected: it never differentiates the solver.

    Raises:
        TypeError, ValueError: for a non-callable velocity or bad solver settings (checked here, before any solve).

    Example:
        >>> a = torch.tensor([[-1.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
        >>> decoder = ODEDecoder(lambda t, x: x @ a.T, rtol=1e-10, atol=1e-10)
        >>> z = torch.ones(1, 2, dtype=torch.float64)
        >>> decoder(z)  # exp(-1), exp(0.5)
        tensor([[0.3679, 1.6487]], dtype=torch.float64)
        >>> decoder.decoder_jacobian(z).diagonal(dim1=1, dim2=2)
        tensor([[0.3679, 1.6487]], dtype=torch.float64)

    References:
        R. T. Q. Chen et al., *Neural Ordinary Differential Equations*, NeurIPS 2018.
        Y. Lipman et al., *Flow Matching for Generative Modeling*, ICLR 2023.
    """

    def __init__(
        self,
        velocity: Callable[..., Tensor],
        *,
        t0: float = 0.0,
        t1: float = 1.0,
        method: str = DEFAULT_METHOD,
        rtol: float = DEFAULT_RTOL,
        atol: float = DEFAULT_ATOL,
        options: Mapping[str, Any] | None = None,
        adjoint: bool = False,
    ) -> None:
        super().__init__()
        if not callable(velocity):
            raise TypeError(f"Expected `velocity` to be a callable v(t, x), but got {type(velocity).__name__}.")
        _check_solver(t0, t1, method, rtol, atol, options)
        if not isinstance(adjoint, bool):
            raise TypeError(f"Expected `adjoint` to be a bool, but got {adjoint!r}.")
        if adjoint and not isinstance(velocity, nn.Module) and not isinstance(getattr(velocity, "__self__", None), nn.Module):
            raise TypeError(
                "Expected `velocity` to be a torch.nn.Module (or a method of one) with adjoint=True: the adjoint method "
                f"differentiates the parameters it can find, but got {type(velocity).__name__}. Pass adjoint=False to "
                "backpropagate through the solver instead."
            )
        self.velocity = velocity
        self.t0, self.t1 = float(t0), float(t1)
        self.method, self.rtol, self.atol = method, float(rtol), float(atol)
        self.options = dict(options or {})
        self.adjoint = adjoint

    def extra_repr(self) -> str:
        options = f", options={self.options}" if self.options else ""
        return f"t0={self.t0}, t1={self.t1}, method={self.method!r}, rtol={self.rtol}, atol={self.atol}{options}, adjoint={self.adjoint}"

    def _solver(self) -> dict[str, Any]:
        return _solver_arguments(self.method, self.rtol, self.atol, self.options)

    def _solve(self, y: Tensor, condition: Tensor | None, start: float, end: float) -> Tensor:
        from torchdiffeq import odeint, odeint_adjoint

        times = torch.tensor([start, end], dtype=y.dtype, device=y.device)
        extra = () if condition is None else (condition,)

        def field(t: Tensor, x: Tensor) -> Tensor:
            return self.velocity(t, x, *extra)

        if self.adjoint:
            owner = self.velocity if isinstance(self.velocity, nn.Module) else getattr(self.velocity, "__self__")  # noqa: B009 - checked in __init__
            return odeint_adjoint(field, y, times, adjoint_params=tuple(owner.parameters()), **self._solver())[-1]
        return odeint(field, y, times, **self._solver())[-1]

    def forward(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        """Decode: ``x(t1)`` from ``x(t0) = z``, shape ``(N, d)``."""
        return self._solve(z, condition, self.t0, self.t1)

    def encode(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        """Encode: ``z = x(t0)`` from ``x(t1) = x`` (the ODE solved backwards), shape ``(N, d)``."""
        return self._solve(x, condition, self.t1, self.t0)

    def decoder_jacobian(self, z: Tensor, condition: Tensor | None = None, *, create_graph: bool = False) -> Tensor:
        """``(N, d, d)`` decoder Jacobians at ``z`` by the tangent ODE (:func:`ode_decoder_jacobian`, this decoder's solver)."""
        check_latents(z, condition)
        times = torch.tensor([self.t0, self.t1], dtype=z.dtype, device=z.device)
        with torch.set_grad_enabled(create_graph):
            jacobian = _tangent_solve(self.velocity, z, condition, times, self._solver())
        return jacobian if create_graph else jacobian.detach()

    def decoder_jacobian_columns(self, z: Tensor, columns: Tensor, condition: Tensor | None = None) -> Tensor:
        r"""``(N, d, k)`` sampled columns :math:`\partial x(t_1) / \partial z_{\mathrm{columns}[n, j]}`: the tangent ODE
        with ``k`` tangents per sample instead of ``d`` (cost and memory ``k / d`` of :meth:`decoder_jacobian`).

        ``columns`` is ``(N, k)`` long, as for :func:`lightning_mem.iter_decoder_jacobian_columns` (e.g. the design of
        :func:`lightning_mem.functional.estimators.sample_latent_columns`). The error control covers the ``k``
        tangents, so the columns agree with :meth:`decoder_jacobian`'s to the solver's tolerance.

        Raises:
            ValueError: for ``columns`` that are not ``(N, k)`` integer indices into the ``d`` latents.
        """
        check_latents(z, condition)
        n, d = z.shape
        if (
            not isinstance(columns, Tensor)
            or columns.ndim != 2
            or columns.shape[0] != n
            or columns.is_floating_point()
            or (columns.numel() > 0 and not (0 <= int(columns.min()) and int(columns.max()) < d))
        ):
            raise ValueError(f"Expected `columns` of shape ({n}, k), integers in [0, {d}), but got {getattr(columns, 'shape', columns)!r}.")
        initial = torch.zeros(n, d, columns.shape[1], dtype=z.dtype, device=z.device)
        initial.scatter_(1, columns.to(z.device).unsqueeze(1), 1.0)
        times = torch.tensor([self.t0, self.t1], dtype=z.dtype, device=z.device)
        with torch.no_grad():
            return _tangent_solve(self.velocity, z, condition, times, self._solver(), initial)
