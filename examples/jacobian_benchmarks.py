"""Timings of the decoder kinds of issue 15: a MAF in both directions, an ODE decoder, an attention decoder.

Each ``*_case`` function builds its decoder, times the routes to its Jacobians (the median of ``repeats`` runs after
one warm-up) and checks their values; it returns a flat dict of numbers, for ``benchmarks/bench.py`` to put in its
table. ``python examples/jacobian_benchmarks.py`` runs all three at benchmark size (about two minutes on 2 CPU
cores); ``--quick`` at the test suite's size.

- :func:`maf_directions_case`: zuko's MAF, the decoder (sampling) direction differentiated by the engine (forward
  and reverse mode) against :class:`lightning_mem.inverse.InverseJacobianDecoder` (decode once without gradients,
  differentiate the encoder, invert); the values agree to float64 rounding.
- :func:`ode_jacobian_case`: :class:`lightning_mem.ode.ODEDecoder` (dopri5) on an MLP velocity: the tangent-ODE
  Jacobian against its floor (the velocity's bare ``vmap(jvp)`` evaluations it needs, without the solver), a plain
  solve, and the engine's reverse-mode loop through the solver; accuracy against the closed form of a linear ODE.
- :func:`attention_jacobian_case`: a transformer decoder (``nn.TransformerEncoder``) in forward mode with the math
  attention kernel, against the bare ``vmap(jacfwd)`` floor and reverse mode; accuracy against float64 autograd.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jacfwd, jvp, vmap

from lightning_mem import decoder_jacobian
from lightning_mem.functional import manifold_entropy
from lightning_mem.inverse import InverseJacobianDecoder
from lightning_mem.jacobian import forward_mode_kernels
from lightning_mem.ode import ODEDecoder

F64 = torch.float64


def _timed(methods: dict[str, Callable[[Tensor], Any]], z: Tensor, warmup: Tensor, repeats: int) -> dict[str, float]:
    """Median wall time of each ``method(z)`` over ``repeats`` runs, methods alternating, after a warm-up ``method(warmup)``."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for method in methods.values():
        method(warmup)
    for _ in range(repeats):
        for name, method in methods.items():
            start = time.perf_counter()
            method(z)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _latents(n: int, d: int, dtype: torch.dtype, seed: int = 0) -> Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


# --------------------------------------------------------------------------------------------- MAF


def maf_directions_case(
    *,
    features: int = 64,
    transforms: int = 3,
    hidden_features: Sequence[int] = (64, 64),
    num_samples: int = 256,
    chunk_size: int = 64,
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """zuko MAF: the decoder direction by the engine (forward, reverse) vs the inverted encoder Jacobian.

    Returns seconds for ``decoder_forward``, ``decoder_reverse``, ``fast`` (decode + encoder Jacobian + inverse) and
    its ``fast_sampling`` part (the no-gradient decode alone); ``speedup`` = the faster decoder route / ``fast``;
    ``max_abs_difference`` of the Jacobians and ``entropy_difference`` of ``H`` between the two directions, both
    in float64 on ``min(num_samples, 32)`` samples.
    """
    import zuko

    torch.manual_seed(seed)
    flow = zuko.flows.MAF(features=features, transforms=transforms, hidden_features=tuple(hidden_features)).eval()

    def slow(z: Tensor) -> Tensor:  # the sampling direction: `features` sequential passes per transform
        return flow().transform.inv(z)

    fast = InverseJacobianDecoder(slow, lambda x: flow().transform(x))  # the density direction: one pass

    def chunks(jacobian_of: Callable[[Tensor], Tensor], z: Tensor) -> None:
        for chunk in z.split(chunk_size):
            jacobian_of(chunk)

    def sampling(z: Tensor) -> None:
        with torch.no_grad():
            for chunk in z.split(chunk_size):
                fast(chunk)

    flow.to(dtype)
    z = _latents(num_samples, features, dtype, seed)
    times = _timed(
        {
            "decoder_forward": lambda z: chunks(lambda c: decoder_jacobian(slow, c, mode="forward"), z),
            "decoder_reverse": lambda z: chunks(lambda c: decoder_jacobian(slow, c, mode="reverse"), z),
            "fast": lambda z: chunks(fast.decoder_jacobian, z),
            "fast_sampling": sampling,
        },
        z,
        z[:2],
        repeats,
    )
    flow.to(F64)
    z64 = _latents(min(num_samples, 32), features, F64, seed)
    reference = decoder_jacobian(slow, z64, mode="forward")
    inverted = fast.decoder_jacobian(z64)
    return {
        "d": features,
        "num_samples": num_samples,
        "chunk_size": chunk_size,
        **times,
        "speedup": min(times["decoder_forward"], times["decoder_reverse"]) / times["fast"],
        "max_abs_difference": float((reference - inverted).abs().max()),
        "entropy_difference": float((manifold_entropy(reference)[1] - manifold_entropy(inverted)[1]).abs()),
    }


# --------------------------------------------------------------------------------------------- ODE


class _Counted(nn.Module):
    """An MLP velocity ``v(t, x)`` that counts its calls (the solver's function evaluations)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, dim))
        self.calls = 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.calls += 1
        return self.net(torch.cat([x, t.reshape(1, 1).expand(x.shape[0], 1).to(x.dtype)], dim=1))


def ode_jacobian_case(
    *,
    dim: int = 16,
    hidden: int = 128,
    num_samples: int = 256,
    chunk_size: int = 64,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """:class:`~lightning_mem.ode.ODEDecoder` (dopri5): the tangent-ODE Jacobian and what it costs.

    Returns seconds for ``jacobian`` (tangent ODE), ``floor`` (its function evaluations as bare ``vmap(jvp)`` calls of
    the velocity: the JVP work without the solver), ``solve`` (a plain no-gradient decode) and ``loop_reverse`` (the
    engine's plain-autograd route: one backward pass through the solver per output); ``ratio_floor`` =
    ``jacobian / floor``; the function evaluations ``nfe_solve`` and ``nfe_jacobian``; and ``max_abs_error`` of the
    Jacobian of a linear ODE ``dx/dt = A x`` against ``expm(A)`` (float64, rtol = atol = 1e-10).
    """
    torch.manual_seed(seed)
    velocity = _Counted(dim, hidden).to(dtype)
    decoder = ODEDecoder(velocity, rtol=rtol, atol=atol)
    z = _latents(num_samples, dim, dtype, seed)

    with torch.no_grad():
        velocity.calls = 0
        decoder(z[:chunk_size])
        nfe_solve = velocity.calls
        velocity.calls = 0
        decoder.decoder_jacobian(z[:chunk_size])
        nfe_jacobian = velocity.calls

    def floor(z: Tensor) -> None:
        t = torch.tensor(0.5, dtype=dtype)
        for chunk in z.split(chunk_size):
            tangents = torch.eye(dim, dtype=dtype).expand(chunk.shape[0], dim, dim)
            for _ in range(nfe_jacobian):
                vmap(lambda u, chunk=chunk: jvp(lambda x: velocity(t, x), (chunk,), (u,)), in_dims=-1, out_dims=(None, -1))(tangents)

    def chunks(method: Callable[[Tensor], Any], z: Tensor) -> None:
        with torch.no_grad():
            for chunk in z.split(chunk_size):
                method(chunk)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the engine's fallback warning
        times = _timed(
            {
                "jacobian": lambda z: chunks(decoder.decoder_jacobian, z),
                "floor": floor,
                "solve": lambda z: chunks(decoder, z),
                "loop_reverse": lambda z: chunks(lambda c: decoder_jacobian(decoder, c, mode="loop"), z),
            },
            z,
            z[:2],
            repeats,
        )
    a = 0.5 * torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    linear = ODEDecoder(lambda t, x: x @ a.T, rtol=1e-10, atol=1e-10)
    error = (linear.decoder_jacobian(_latents(8, dim, F64, seed)) - torch.linalg.matrix_exp(a)).abs().max()
    return {
        "d": dim,
        "num_samples": num_samples,
        "chunk_size": chunk_size,
        **times,
        "ratio_floor": times["jacobian"] / times["floor"],
        "nfe_solve": nfe_solve,
        "nfe_jacobian": nfe_jacobian,
        "max_abs_error": float(error),
    }


# -------------------------------------------------------------------------------------- attention


class TokenDecoder(nn.Module):
    """``d = tokens * token_dim`` latents -> embedding -> ``nn.TransformerEncoder`` -> ``tokens * output_dim`` outputs."""

    def __init__(self, tokens: int, token_dim: int, width: int, output_dim: int, layers: int = 2) -> None:
        super().__init__()
        self.tokens, self.token_dim = tokens, token_dim
        self.embed = nn.Linear(token_dim, width)
        self.positions = nn.Parameter(0.5 * torch.randn(tokens, width))
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.readout = nn.Linear(width, output_dim)

    def forward(self, z: Tensor) -> Tensor:
        return self.readout(self.blocks(self.embed(z.reshape(z.shape[0], self.tokens, self.token_dim)) + self.positions))


def attention_jacobian_case(
    *,
    tokens: int = 16,
    token_dim: int = 4,
    width: int = 64,
    output_dim: int = 48,
    num_samples: int = 256,
    chunk_size: int = 64,
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """A transformer decoder: the engine in forward mode (math attention kernel) vs its floor and reverse mode.

    Returns seconds for ``forward`` (``decoder_jacobian(mode="forward")`` inside :func:`lightning_mem.jacobian.forward_mode_kernels`),
    ``floor`` (bare ``vmap(jacfwd)`` inside it) and ``reverse``; ``ratio_floor`` = ``forward / floor``; and
    ``max_abs_error`` against ``torch.autograd.functional.jacobian`` in float64 (4 samples).
    """
    torch.manual_seed(seed)
    decoder = TokenDecoder(tokens, token_dim, width, output_dim).to(dtype).eval()
    d = tokens * token_dim
    z = _latents(num_samples, d, dtype, seed)

    def floor(z: Tensor) -> None:
        with torch.no_grad(), forward_mode_kernels():
            for chunk in z.split(chunk_size):
                vmap(jacfwd(lambda v: decoder(v[None])[0]))(chunk)

    def engine(mode: str, z: Tensor) -> None:
        with forward_mode_kernels():
            for chunk in z.split(chunk_size):
                decoder_jacobian(decoder, chunk, mode=mode)

    times = _timed(
        {"forward": lambda z: engine("forward", z), "floor": floor, "reverse": lambda z: engine("reverse", z)}, z, z[:2], repeats
    )
    decoder.to(F64)
    z64 = _latents(4, d, F64, seed)
    with forward_mode_kernels():
        jacobian = decoder_jacobian(decoder, z64, mode="forward")
    truth = torch.stack([torch.autograd.functional.jacobian(lambda v: decoder(v[None])[0], z_n) for z_n in z64])
    return {
        "d": d,
        "D": tokens * output_dim,
        "num_samples": num_samples,
        "chunk_size": chunk_size,
        **times,
        "ratio_floor": times["forward"] / times["floor"],
        "max_abs_error": float((jacobian - truth).abs().max()),
    }


# ------------------------------------------------------------------------------------------- main

QUICK = {
    "maf_directions": {"features": 16, "num_samples": 32, "chunk_size": 16, "repeats": 1},
    "ode_jacobian": {"dim": 4, "hidden": 32, "num_samples": 32, "chunk_size": 16, "repeats": 1},
    "attention_jacobian": {"tokens": 4, "token_dim": 2, "width": 16, "output_dim": 6, "num_samples": 16, "chunk_size": 8, "repeats": 1},
}
CASES = {"maf_directions": maf_directions_case, "ode_jacobian": ode_jacobian_case, "attention_jacobian": attention_jacobian_case}


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Run every case (``--quick``: the test suite's sizes) and print one line of numbers per case."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (seconds)")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    args = parser.parse_args(argv)
    rows = {}
    for name in args.cases:
        rows[name] = CASES[name](**(QUICK[name] if args.quick else {}))
        print(
            f"{name}: "
            + ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in rows[name].items())
        )
    return rows


if __name__ == "__main__":
    main()
