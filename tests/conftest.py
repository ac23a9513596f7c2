"""Truths the tests compare the package against, written once: none of them calls the code under test.

Plain functions, imported by the test modules as ``from conftest import ...`` (pytest puts ``tests/`` on
``sys.path``). Each one is the slow, obvious way: per-sample ``torch.autograd.functional.jacobian``, metrics by loops
straight from the formulas, closed forms of a linear decoder, latents drawn as the docs describe them.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable, Iterable, Sequence

import torch
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn

__all__ = [
    "H0",
    "CaptureLogger",
    "autograd_jacobian",
    "documented_latents",
    "free_port",
    "freia_flow",
    "linear_closed_form",
    "naive_cross",
    "naive_metrics",
    "tanh_subnet",
]

H0 = 0.5 * (1.0 + math.log(2.0 * math.pi))
"""Entropy of N(0, 1) in nats, written out again: the constant is part of what is tested."""

F64 = torch.float64


# ------------------------------------------------------------------------------------------------ Jacobians


def autograd_jacobian(decoder: Callable[..., object], z: Tensor, condition: Tensor | None = None, *, create_graph: bool = False) -> Tensor:
    """``torch.autograd.functional.jacobian`` of one sample at a time, stacked to ``(N, *output_shape, d)``.

    ``decoder`` maps a batch ``(1, d)`` (and a condition ``(1, ...)``) to ``(1, *output_shape)``, or to a tuple whose
    first element is that. ``create_graph`` keeps the graph, for gradients of the Jacobian.
    """
    jacobians = []
    for n in range(z.shape[0]):
        c = None if condition is None else condition[n : n + 1]

        def one(v: Tensor, c: Tensor | None = c) -> Tensor:
            output = decoder(v[None]) if c is None else decoder(v[None], c)
            return (output[0] if isinstance(output, tuple) else output)[0]

        jacobians.append(torch.autograd.functional.jacobian(one, z[n], create_graph=create_graph))
    return torch.stack(jacobians)


# ------------------------------------------------------------------------------------------------- metrics


def naive_metrics(jacobians: Iterable[Tensor], std: Tensor | float | None = None, sigma: Tensor | None = None) -> dict[str, Tensor]:
    """Straight from the formulas: a loop over samples, a double loop over pairs, 2x2 determinants.

    ``jacobians``: per-sample Jacobians ``(*output_shape, d)`` (a list, or a stacked tensor). ``std`` scales the
    outputs, ``sigma`` the latent columns. Returns ``entropy_per_dim`` (H_i), ``entropy`` (H), ``total_correlation``
    and ``pairwise_mutual_information`` (zero diagonal), all float64.
    """
    jacobians = list(jacobians)
    d = jacobians[0].shape[-1]
    sum_log_diag = [0.0] * d
    sum_log_det = 0.0
    sum_pair = [[0.0] * d for _ in range(d)]
    for jacobian in jacobians:
        j = jacobian.reshape(-1, d)
        if std is not None:
            j = j * torch.as_tensor(std, dtype=F64).reshape(-1, 1)
        if sigma is not None:
            j = j * sigma.reshape(1, -1)
        g = j.T @ j
        for i in range(d):
            sum_log_diag[i] += math.log(g[i, i])
        sum_log_det += float(torch.logdet(g))
        for i in range(d):
            for k in range(d):
                if i != k:
                    block = g[[i, k]][:, [i, k]]  # Gram matrix of columns i and k: H_i + H_k - H_ik
                    sum_pair[i][k] += 0.5 * (math.log(g[i, i]) + math.log(g[k, k]) - math.log(float(torch.det(block))))
    n = len(jacobians)
    entropy_per_dim = torch.tensor([H0 + 0.5 * s / n for s in sum_log_diag], dtype=F64)
    entropy = d * H0 + 0.5 * sum_log_det / n
    return {
        "entropy_per_dim": entropy_per_dim,
        "entropy": torch.tensor(entropy, dtype=F64),
        "total_correlation": entropy_per_dim.sum() - entropy,
        "pairwise_mutual_information": torch.tensor(sum_pair, dtype=F64) / n,
    }


def naive_cross(jacobians: Iterable[Tensor], reference: Iterable[Tensor]) -> Tensor:
    """MCPMI straight from the formula: per sample, per pair (i, j), the 2x2 Gram matrix of [a_i, b_j]."""
    jacobians, reference = list(jacobians), list(reference)
    d, d_ref = jacobians[0].shape[-1], reference[0].shape[-1]
    total = torch.zeros(d, d_ref, dtype=F64)
    for ja, jb in zip(jacobians, reference, strict=True):
        ja, jb = ja.reshape(-1, d), jb.reshape(-1, d_ref)
        for i in range(d):
            for k in range(d_ref):
                block = torch.stack([ja[:, i], jb[:, k]], dim=1)
                g = block.T @ block
                total[i, k] += 0.5 * (math.log(g[0, 0]) + math.log(g[1, 1]) - math.log(float(torch.det(g))))
    return total / len(jacobians)


def linear_closed_form(a: Tensor) -> dict[str, Tensor]:
    """Every metric of ``x = A z`` from the columns of ``A`` (all non-zero): ``H_i = h0 + log |a_i|``,
    ``H = d h0 + 1/2 log det(A^T A)``, ``MPMI_ij = -1/2 log(1 - cos^2(a_i, a_j))``; keys as :func:`naive_metrics`."""
    d = a.shape[1]
    norms = a.norm(dim=0)
    log_det = torch.logdet(a.T @ a)
    cos = (a.T @ a) / (norms[:, None] * norms[None, :])
    mi = -0.5 * torch.log(1 - cos**2)
    mi.fill_diagonal_(0)
    return {
        "entropy_per_dim": H0 + torch.log(norms),
        "entropy": d * H0 + 0.5 * log_det,
        "total_correlation": torch.log(norms).sum() - 0.5 * log_det,
        "pairwise_mutual_information": mi,
    }


def documented_latents(num_samples: int, latent_dim: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The latents the docs promise: ``num_samples`` float64 draws from N(0, I) by a ``torch.Generator`` seeded with
    ``seed``, then cast to the model's ``dtype``."""
    return torch.randn(num_samples, latent_dim, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


# --------------------------------------------------------------------------------------------------- models


def tanh_subnet(c_in: int, c_out: int) -> nn.Module:
    """The coupling subnet of every test flow: ``Linear(c_in, 16) -> Tanh -> Linear(16, c_out)``."""
    return nn.Sequential(nn.Linear(c_in, 16), nn.Tanh(), nn.Linear(16, c_out))


def freia_flow(
    dim: int,
    block: str = "GLOWCouplingBlock",
    num_blocks: int = 3,
    *,
    seed: int | None = None,
    permute_seeds: Sequence[int] = (),
    condition_dim: int | None = None,
    dtype: torch.dtype = F64,
    **block_options,
) -> nn.Module:
    """A FrEIA ``SequenceINN`` of ``num_blocks`` blocks ``FrEIA.modules.<block>`` with :func:`tanh_subnet` couplings.

    ``seed`` seeds the global torch RNG first (``None``: use it as it is); block ``k`` is followed by
    ``PermuteRandom(seed=permute_seeds[k])`` while ``permute_seeds`` has an entry for it; ``condition_dim`` makes
    every block conditional on one ``(N, condition_dim)`` condition. FrEIA is imported here, so the suite loads
    without it.
    """
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    if seed is not None:
        torch.manual_seed(seed)
    condition = {} if condition_dim is None else {"cond": 0, "cond_shape": (condition_dim,)}
    inn = Ff.SequenceINN(dim)
    for k in range(num_blocks):
        inn.append(getattr(Fm, block), subnet_constructor=tanh_subnet, **condition, **block_options)
        if k < len(permute_seeds):
            inn.append(Fm.PermuteRandom, seed=permute_seeds[k])
    return inn.to(dtype)


# ---------------------------------------------------------------------------------------------- processes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a gloo process group)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------ loggers


class CaptureLogger(Logger):
    """Records every ``log_metrics`` call, by step; its experiment cannot draw figures."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def scalar(self, name: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every logged ``mem/<name>``."""
        return [(step, metrics[f"mem/{name}"]) for step, metrics in self.logged if f"mem/{name}" in metrics]
