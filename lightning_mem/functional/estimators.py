"""Unbiased estimators of the manifold entropic metrics from a random subset of decoder Jacobian columns per sample."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple, cast

import torch
from torch import Tensor

from lightning_mem._checks import check_eval_mode, check_latents, check_positive_float, check_positive_int, check_scale
from lightning_mem.decoders import InvertibleDecoder
from lightning_mem.functional.gram import jacobian_gram
from lightning_mem.functional.statistics import DEFAULT_EPS, STANDARD_NORMAL_ENTROPY, GramStatistics, batch_statistics, pairwise_terms
from lightning_mem.jacobian import call_decoder, iter_decoder_jacobian_columns, iter_decoder_jacobians

__all__ = [
    "SampledGramStatistics",
    "estimate_manifold_entropy",
    "estimate_manifold_pairwise_mutual_information",
    "estimate_manifold_total_correlation",
    "finish_sampled_entropy",
    "finish_sampled_pairwise_mutual_information",
    "finish_sampled_total_correlation",
    "sample_latent_columns",
    "sampled_gram_statistics",
]

LogAbsDet = Tensor | Callable[..., Tensor] | bool | None
"""Per-sample :math:`\\log|\\det J(z)|` of a bijective decoder: a ``(N,)`` tensor, a callable ``z -> (N,)`` (or
``(z, condition) -> (N,)``), ``True`` for a decoder made by :func:`lightning_mem.as_decoder`, or ``None``."""


class SampledGramStatistics(NamedTuple):
    """Float64 sums over samples of the Gram quantities of the sampled columns, with their counts (all summable)."""

    count: Tensor  # type: ignore[assignment]  # () samples; shadows tuple.count, a public field name
    column_count: Tensor  # (d,) samples in which latent i was drawn
    log_diag: Tensor  # (d,) sum over those samples of log max(G_ii, eps)
    num_inactive: Tensor  # (d,) of those samples, the ones with G_ii <= eps
    pair_count: Tensor  # (d, d) samples in which latents i and j were drawn together, zero diagonal
    pairwise: Tensor  # (d, d) sum over those samples of -1/2 log(1 - rho_ij^2), zero diagonal
    log_det_count: Tensor  # () samples whose log det G is known (all of them, or none)
    log_det: Tensor  # () sum of log det G


def sample_latent_columns(
    num_samples: int,
    latent_dim: int,
    num_columns: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Which ``num_columns`` latents each sample differentiates: a balanced, exchangeable random design.

    The samples are dealt random permutations of the ``d`` latents, ``k = num_columns`` at a time (one permutation
    per *sweep* of :math:`\lceil d/k \rceil` samples, wrapping around at its end, so that a sweep draws every latent
    at least once), and then shuffled. Every row is therefore a uniformly random set of ``k`` distinct latents, the
    design does not depend on ``z``, and its distribution does not change when the samples are permuted.

    Args:
        num_samples: ``N``.
        latent_dim: ``d``.
        num_columns: ``k`` in ``[1, d]``.
        generator: source of randomness (CPU generator; a fixed seed gives a fixed design).
        device: device of the result.

    Returns:
        ``(N, k)`` long tensor; the entries of a row are distinct.

    Raises:
        ValueError: if a size is not a positive int or ``num_columns > latent_dim``.

    Example:
        >>> columns = sample_latent_columns(4, 6, 3, generator=torch.Generator().manual_seed(0))
        >>> columns.shape, sorted(set(columns.flatten().tolist())), all(len(set(row)) == 3 for row in columns.tolist())
        (torch.Size([4, 3]), [0, 1, 2, 3, 4, 5], True)

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
    """
    for name, value in (("num_samples", num_samples), ("latent_dim", latent_dim), ("num_columns", num_columns)):
        check_positive_int(value, name)
    if num_columns > latent_dim:
        raise ValueError(f"Expected `num_columns` in [1, latent_dim={latent_dim}], but got {num_columns}.")
    per_sweep = math.ceil(latent_dim / num_columns)
    num_sweeps = math.ceil(num_samples / per_sweep)
    # float64 keys: ties (which would bias argsort towards low indices) have probability ~ d^2 2^-54
    permutations = torch.rand(num_sweeps, latent_dim, generator=generator, dtype=torch.float64).argsort(dim=1)
    slots = (torch.arange(per_sweep)[:, None] * num_columns + torch.arange(num_columns)[None, :]) % latent_dim
    columns = permutations[:, slots].reshape(-1, num_columns)[:num_samples]
    columns = columns[torch.randperm(num_samples, generator=generator)]
    return columns.to(device) if device is not None else columns


def _log_abs_det_of(log_abs_det: LogAbsDet, decoder: Callable, z: Tensor, condition: Tensor | None, rows: slice) -> Tensor:
    if isinstance(log_abs_det, Tensor):
        values = log_abs_det[rows]
    elif callable(log_abs_det):
        values = log_abs_det(z) if condition is None else log_abs_det(z, condition)
    else:  # True, for an InvertibleDecoder (checked by _check_log_abs_det)
        conditions = [] if condition is None else [condition]
        values = cast(InvertibleDecoder, decoder).inn(z, c=conditions, rev=True, jac=True)[1]
    if not isinstance(values, Tensor) or values.shape != (z.shape[0],):
        raise ValueError(
            f"Expected `log_abs_det` to give one value per sample, shape ({z.shape[0]},), but got "
            f"{tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__}."
        )
    if not bool(torch.isfinite(values).all()):
        raise ValueError("Expected `log_abs_det` to be finite, but it holds NaN or inf.")
    return values.detach().to(torch.float64)


def _check_log_abs_det(log_abs_det: LogAbsDet, decoder: Callable, n: int, d: int, big_d: int) -> None:
    if log_abs_det is None or log_abs_det is False:
        return
    if big_d != d:
        raise ValueError(
            f"Expected a square (bijective) decoder with `log_abs_det`, but the decoder maps d={d} latents to D={big_d} outputs."
        )
    if log_abs_det is True and not isinstance(decoder, InvertibleDecoder):
        raise TypeError(
            "Expected a decoder made by `lightning_mem.as_decoder(inn)` with `log_abs_det=True`, but got "
            f"{type(decoder).__name__}; pass a callable z -> log|det J(z)| or a tensor of shape ({n},) instead."
        )
    if isinstance(log_abs_det, Tensor):
        if log_abs_det.shape != (n,):
            raise ValueError(f"Expected `log_abs_det` of shape ({n},) (one value per sample), but got {tuple(log_abs_det.shape)}.")
    elif not (log_abs_det is True or callable(log_abs_det)):
        raise TypeError(f"Expected `log_abs_det` to be a tensor, a callable, True or None, but got {type(log_abs_det).__name__}.")


def _log_scale(std: Tensor | float | None, sigma: Tensor | None, big_d: int) -> float:
    """:math:`\\log|\\det|` of the data and latent scalings, ``log|det(diag(std) J diag(sigma))| - log|det J|``."""
    total = 0.0
    if std is not None:
        std = check_scale(std, "std")
        total += big_d * float(std.log()) if std.numel() == 1 else float(std.log().sum())
    if sigma is not None:
        total += float(sigma.log().sum())
    return total


def sampled_gram_statistics(
    decoder: Callable,
    z: Tensor,
    *,
    num_columns: int | None = None,
    generator: torch.Generator | None = None,
    condition: Tensor | None = None,
    log_abs_det: LogAbsDet = None,
    std: Tensor | float | None = None,
    sigma: Tensor | None = None,
    eps: float = DEFAULT_EPS,
    chunk_size: int | None = None,
) -> SampledGramStatistics:
    r"""Summable statistics of the decoder Jacobian from ``num_columns`` sampled columns per sample.

    For sample ``n`` with drawn latents :math:`S_n` (:func:`sample_latent_columns`), only the columns
    :math:`J_{S_n} = \partial g / \partial z_{S_n}` are computed, by ``k`` forward-mode JVPs (``torch.func.jvp``)
    instead of ``d``, and their small Gram matrix :math:`G_{S_n} = J_{S_n}^\top J_{S_n}` gives
    :math:`\log G_{ii}` for :math:`i \in S_n` and :math:`-\tfrac12\log(1-\rho_{ij}^2)` for the pairs
    :math:`i \ne j` in :math:`S_n`; each is summed per latent (per pair) together with the number of samples that
    drew it. :math:`\log\det G = 2\log|\det J| + 2\log|\det\mathrm{scales}|` comes from ``log_abs_det`` where given.
    With ``num_columns=None`` (or ``d``) every column is computed by the exact engine and :math:`\log\det G` from the
    full Gram matrix: the exact statistics.

    Args:
        decoder: a callable ``z -> x`` (or ``(z, condition) -> x``) as for :func:`lightning_mem.decoder_jacobian`.
        z: latent points ``(N, d)``.
        num_columns: ``k``, columns per sample; ``None`` for all ``d``.
        generator: randomness of the design; ``None`` uses a generator seeded with 0 (a fixed design).
        condition: optional per-sample condition ``(N, ...)``.
        log_abs_det: for a bijective decoder (``D == d``), :math:`\log|\det J(z)|` per sample: a ``(N,)`` tensor, a
            callable ``z -> (N,)`` (or ``(z, condition) -> (N,)``), e.g. ``lambda z: inn(z, rev=True)[1]`` for a
            FrEIA network, or ``True`` for a decoder made by :func:`lightning_mem.as_decoder`.
        std, sigma: data scale (scalar or per output entry) and latent scale ``(d,)``, as in
            :func:`lightning_mem.functional.jacobian_gram`.
        eps: with all columns, the relative floor of :func:`~lightning_mem.functional.manifold_entropy`
            (:math:`G_{ii} \le \epsilon \max_j G_{jj}`); with sampled columns, an absolute floor on :math:`G_{ii}`
            (a sample's other columns are not computed, so its largest is unknown).
        chunk_size: samples pushed forward at once (``k`` JVPs each); ``None`` for all.

    Returns:
        :class:`SampledGramStatistics`, float64.

    Raises:
        ValueError: for a bad ``z``, ``condition``, ``num_columns``, ``chunk_size``, ``eps`` or ``log_abs_det`` (or
            ``log_abs_det`` with a non-square decoder).
        TypeError: for ``log_abs_det=True`` with a decoder not made by :func:`lightning_mem.as_decoder`.

    Example:
        >>> decoder = torch.nn.Linear(3, 5)
        >>> statistics = sampled_gram_statistics(decoder, torch.randn(8, 3), num_columns=2)
        >>> statistics.column_count.sum(), statistics.pair_count.sum()  # 8 samples x 2 columns, x 2 ordered pairs
        (tensor(16., dtype=torch.float64), tensor(16., dtype=torch.float64))

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
    """
    check_latents(z, condition)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    check_positive_float(eps, "eps")
    check_eval_mode(decoder)
    n, d = z.shape
    if num_columns is not None and (isinstance(num_columns, bool) or not isinstance(num_columns, int) or not 1 <= num_columns <= d):
        raise ValueError(f"Expected `num_columns` to be an int in [1, d={d}] or None, but got {num_columns!r}.")
    if sigma is not None:
        sigma = check_scale(sigma, "sigma", d).to(z.device).reshape(d)
    with torch.no_grad():
        big_d = call_decoder(decoder, z[:1], None if condition is None else condition[:1])[0].numel()
    _check_log_abs_det(log_abs_det, decoder, n, d, big_d)
    step = n if chunk_size is None else chunk_size
    chunks = [slice(start, start + step) for start in range(0, n, step)]
    cond = (lambda rows: None) if condition is None else (lambda rows: condition[rows])

    log_det = z.new_zeros((), dtype=torch.float64)
    if log_abs_det is not None and log_abs_det is not False:
        with torch.no_grad():
            for rows in chunks:
                log_det = log_det + 2.0 * _log_abs_det_of(log_abs_det, decoder, z[rows], cond(rows), rows).sum()
        log_det = log_det + 2.0 * n * _log_scale(std, sigma, big_d)
        log_det_count = torch.tensor(float(n), dtype=torch.float64, device=z.device)
    else:
        log_det_count = torch.zeros((), dtype=torch.float64, device=z.device)

    if num_columns is None or num_columns == d:
        exact: GramStatistics | None = None
        for jacobian in iter_decoder_jacobians(decoder, z, condition=condition, chunk_size=chunk_size):
            part = batch_statistics(jacobian, std=std, sigma=sigma, eps=eps)
            exact = part if exact is None else GramStatistics(*(a + b for a, b in zip(exact, part, strict=True)))
        assert exact is not None  # z has at least one sample (check_latents), so at least one chunk
        off_diagonal = 1.0 - torch.eye(d, dtype=torch.float64, device=z.device)
        count = exact.count[0]
        if log_abs_det is None or log_abs_det is False:
            log_det, log_det_count = exact.log_det[0], count
        return SampledGramStatistics(
            count=count,
            column_count=count.expand(d).clone(),
            log_diag=exact.log_diag[0],
            num_inactive=exact.num_inactive[0],
            pair_count=count * off_diagonal,
            pairwise=exact.pairwise[0],
            log_det_count=log_det_count,
            log_det=log_det,
        )

    generator = torch.Generator().manual_seed(0) if generator is None else generator
    columns = sample_latent_columns(n, d, num_columns, generator=generator, device=z.device)
    column_count = torch.zeros(d, dtype=torch.float64, device=z.device)
    log_diag = torch.zeros(d, dtype=torch.float64, device=z.device)
    num_inactive = torch.zeros(d, dtype=torch.float64, device=z.device)
    pair_count = torch.zeros(d * d, dtype=torch.float64, device=z.device)
    pairwise = torch.zeros(d * d, dtype=torch.float64, device=z.device)
    distinct = ~torch.eye(num_columns, dtype=torch.bool, device=z.device)
    sampled = iter_decoder_jacobian_columns(decoder, z, columns, condition=condition, chunk_size=chunk_size)
    for rows, jacobian in zip(chunks, sampled, strict=True):
        drawn = columns[rows]
        gram = jacobian_gram(jacobian, std=std)
        if sigma is not None:
            scale = sigma[drawn]
            gram = gram * (scale[:, :, None] * scale[:, None, :])
        diag = gram.diagonal(dim1=-2, dim2=-1)
        floored = diag.clamp_min(eps)
        flat_drawn = drawn.reshape(-1)
        column_count.index_add_(0, flat_drawn, torch.ones_like(floored).reshape(-1))
        log_diag.index_add_(0, flat_drawn, floored.log().reshape(-1))
        num_inactive.index_add_(0, flat_drawn, (diag <= eps).to(torch.float64).reshape(-1))
        pairs = (drawn[:, :, None] * d + drawn[:, None, :])[:, distinct]
        live = diag > eps  # as on the exact path, a pair with an inactive column adds no dependence
        terms = torch.where(live[:, :, None] & live[:, None, :], pairwise_terms(gram, floored, floored), 0.0)[:, distinct]
        pair_count.index_add_(0, pairs.reshape(-1), torch.ones_like(terms).reshape(-1))
        pairwise.index_add_(0, pairs.reshape(-1), terms.reshape(-1))
    return SampledGramStatistics(
        count=torch.tensor(float(n), dtype=torch.float64, device=z.device),
        column_count=column_count,
        log_diag=log_diag,
        num_inactive=num_inactive,
        pair_count=pair_count.reshape(d, d),
        pairwise=pairwise.reshape(d, d),
        log_det_count=log_det_count,
        log_det=log_det,
    )


def _latent_means(statistics: SampledGramStatistics) -> Tensor:
    undrawn = int((statistics.column_count == 0).sum())
    if undrawn:
        warnings.warn(
            f"{undrawn} of {statistics.column_count.numel()} latents were never drawn (N * num_columns < d?); "
            "their per-latent values are NaN.",
            RuntimeWarning,
            stacklevel=3,
        )
    return statistics.log_diag / statistics.column_count


def finish_sampled_entropy(statistics: SampledGramStatistics, *, per_dim: bool = False) -> tuple[Tensor, Tensor]:
    r"""Per-latent manifold entropies ``(d,)`` and the total ``()`` from :class:`SampledGramStatistics`.

    :math:`\hat H_i = h_0 + \tfrac12 \cdot` (mean of :math:`\log G_{ii}` over the samples that drew latent ``i``), NaN
    (with a warning) for a latent never drawn; :math:`\hat H = d\,h_0 + \tfrac12` mean :math:`\log\det G`, NaN where
    no log-determinant was recorded (a non-bijective decoder sampled with ``num_columns < d``). ``per_dim`` divides
    the total by ``d``.
    """
    d = statistics.log_diag.shape[-1]
    entropy_per_latent = STANDARD_NORMAL_ENTROPY + 0.5 * _latent_means(statistics)
    total = d * STANDARD_NORMAL_ENTROPY + 0.5 * statistics.log_det / statistics.log_det_count
    return entropy_per_latent, total / d if per_dim else total


def finish_sampled_total_correlation(statistics: SampledGramStatistics, *, per_dim: bool = False) -> Tensor:
    r""":math:`\widehat{\mathrm{MTC}} = \sum_i \hat H_i - \hat H` ``()`` from :class:`SampledGramStatistics`.

    Raises:
        ValueError: if no log-determinant was recorded (pass ``log_abs_det`` for a bijective decoder, or
            ``num_columns=None``).
    """
    if not bool(statistics.log_det_count > 0):
        raise ValueError(
            "Expected statistics with log det G to estimate the total correlation, but none was recorded: pass "
            "`log_abs_det` (a bijective decoder) or `num_columns=None` (all columns)."
        )
    d = statistics.log_diag.shape[-1]
    total_correlation = 0.5 * (_latent_means(statistics).sum() - statistics.log_det / statistics.log_det_count)
    return total_correlation / d if per_dim else total_correlation


def finish_sampled_pairwise_mutual_information(statistics: SampledGramStatistics) -> Tensor:
    """MPMI matrix ``(d, d)`` from :class:`SampledGramStatistics`: NaN for pairs never drawn together, zero diagonal."""
    d = statistics.pairwise.shape[-1]
    matrix = statistics.pairwise / statistics.pair_count
    return matrix.masked_fill(torch.eye(d, dtype=torch.bool, device=matrix.device), 0.0)


def estimate_manifold_entropy(
    decoder: Callable,
    z: Tensor,
    *,
    num_columns: int | None = None,
    generator: torch.Generator | None = None,
    condition: Tensor | None = None,
    log_abs_det: LogAbsDet = None,
    std: Tensor | float | None = None,
    sigma: Tensor | None = None,
    per_dim: bool = False,
    eps: float = DEFAULT_EPS,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Unbiased estimate of the per-latent manifold entropies (and the total) from ``num_columns`` JVPs per sample.

    .. math::
        \hat H_i = h_0 + \frac{1}{2 m_i} \sum_{n:\, i \in S_n} \log G_{ii}(z_n), \qquad
        \hat H = d\,h_0 + \frac1N \sum_n \log|\det J(z_n)| \ \text{(bijective decoders)}.

    Each sample differentiates only the ``k`` latents :math:`S_n` of a random design
    (:func:`sample_latent_columns`), so the cost is ``k`` instead of ``d`` JVPs per sample. **Unbiasedness:** the
    design is independent of ``z`` and exchangeable across samples, so given that latent ``i`` was drawn
    :math:`m_i \ge 1` times, the samples that drew it are a uniformly random :math:`m_i`-subset of the ``N``; the
    mean over them has expectation equal to the mean over all ``N`` samples, i.e. the exact :math:`H_i` of
    :func:`~lightning_mem.functional.manifold_entropy` on the same ``z`` (and hence to :math:`H_i` itself for
    i.i.d. ``z``). With :math:`N \ge \lceil d/k \rceil` every latent is drawn. The variance is about
    :math:`\mathrm{Var}_z[\tfrac12\log G_{ii}] / m_i` with :math:`m_i \approx Nk/d`. The total needs
    :math:`\log\det G`, which the sampled columns do not give: it is taken from ``log_abs_det`` (a bijective flow's
    own log-determinant, exact) and is NaN without it unless ``num_columns`` is ``None`` (exact path).

    Args:
        decoder, z, num_columns, generator, condition, log_abs_det, std, sigma, eps, chunk_size: as in
            :func:`sampled_gram_statistics`.
        per_dim: divide the total by ``d`` (nats/dim).

    Returns:
        ``(entropy_per_latent, total)`` of shapes ``(d,)`` and ``()``, float64, like
        :func:`~lightning_mem.functional.manifold_entropy`. A latent never drawn gives NaN (with a warning).

    Raises:
        ValueError, TypeError: as :func:`sampled_gram_statistics`.

    Example:
        >>> decoder = torch.nn.Linear(3, 4, bias=False)  # linear: G is the same at every z
        >>> with torch.no_grad():
        ...     _ = decoder.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]]))
        >>> per_latent, _ = estimate_manifold_entropy(decoder, torch.randn(6, 3), num_columns=1)
        >>> per_latent - STANDARD_NORMAL_ENTROPY  # log of the column norms, from one JVP per sample
        tensor([0.0000, 0.6931, 1.0986], dtype=torch.float64)

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
    """
    statistics = sampled_gram_statistics(
        decoder,
        z,
        num_columns=num_columns,
        generator=generator,
        condition=condition,
        log_abs_det=log_abs_det,
        std=std,
        sigma=sigma,
        eps=eps,
        chunk_size=chunk_size,
    )
    return finish_sampled_entropy(statistics, per_dim=per_dim)


def estimate_manifold_total_correlation(
    decoder: Callable,
    z: Tensor,
    *,
    num_columns: int | None = None,
    generator: torch.Generator | None = None,
    condition: Tensor | None = None,
    log_abs_det: LogAbsDet = None,
    std: Tensor | float | None = None,
    sigma: Tensor | None = None,
    per_dim: bool = False,
    eps: float = DEFAULT_EPS,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Unbiased estimate of the manifold total correlation of a bijective decoder from ``num_columns`` JVPs per sample.

    .. math::
        \widehat{\mathrm{MTC}} = \sum_i \hat H_i - \hat H
        = \sum_i \frac{1}{2 m_i} \sum_{n:\, i \in S_n} \log G_{ii}(z_n) - \frac1N \sum_n \log|\det J(z_n)|,

    a sum of unbiased terms (see :func:`estimate_manifold_entropy`), hence unbiased; only the sampled columns and
    the flow's own log-determinant are needed.

    Args:
        decoder, z, num_columns, generator, condition, log_abs_det, std, sigma, eps, chunk_size: as in
            :func:`sampled_gram_statistics`; ``log_abs_det`` is required unless ``num_columns`` is ``None``.
        per_dim: divide by ``d`` (nats/dim).

    Returns:
        Scalar float64 tensor (NaN, with a warning, if some latent was never drawn).

    Raises:
        ValueError: without ``log_abs_det`` for ``num_columns < d``, or as :func:`sampled_gram_statistics`.

    Example:
        >>> decoder = torch.nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = decoder.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))  # det 1, columns at 45 degrees
        >>> z = torch.randn(4, 2)
        >>> estimate_manifold_total_correlation(decoder, z, num_columns=1, log_abs_det=torch.zeros(4))  # 1/2 log 2
        tensor(0.3466, dtype=torch.float64)

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
    """
    statistics = sampled_gram_statistics(
        decoder,
        z,
        num_columns=num_columns,
        generator=generator,
        condition=condition,
        log_abs_det=log_abs_det,
        std=std,
        sigma=sigma,
        eps=eps,
        chunk_size=chunk_size,
    )
    return finish_sampled_total_correlation(statistics, per_dim=per_dim)


def estimate_manifold_pairwise_mutual_information(
    decoder: Callable,
    z: Tensor,
    *,
    num_columns: int | None = None,
    generator: torch.Generator | None = None,
    condition: Tensor | None = None,
    std: Tensor | float | None = None,
    sigma: Tensor | None = None,
    eps: float = DEFAULT_EPS,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Unbiased estimate of the manifold pairwise mutual information from pairs of latents drawn together.

    .. math::
        \widehat{\mathrm{MPMI}}_{ij} = -\frac{1}{2 m_{ij}} \sum_{n:\, i, j \in S_n} \log(1 - \rho_{ij}^2(z_n)),

    with :math:`m_{ij}` the number of samples that drew both latents (each sample gives :math:`k(k-1)/2` pairs).
    Unbiased given :math:`m_{ij} \ge 1`, by the argument of :func:`estimate_manifold_entropy`. Pairs never drawn
    together are NaN: about :math:`N k^2 / d^2` samples cover a given pair, so a full matrix needs
    :math:`N \gtrsim d^2/k^2`; the mean over the drawn pairs is an unbiased estimate of the mean off-diagonal MPMI.

    Args:
        decoder, z, num_columns, generator, condition, std, sigma, eps, chunk_size: as in
            :func:`sampled_gram_statistics`.

    Returns:
        ``(d, d)`` float64, symmetric, zero diagonal, NaN for pairs never drawn together.

    Raises:
        ValueError, TypeError: as :func:`sampled_gram_statistics`.

    Example:
        >>> decoder = torch.nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = decoder.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
        >>> estimate_manifold_pairwise_mutual_information(decoder, torch.randn(3, 2), num_columns=2)
        tensor([[0.0000, 0.3466],
                [0.3466, 0.0000]], dtype=torch.float64)

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
    """
    statistics = sampled_gram_statistics(
        decoder, z, num_columns=num_columns, generator=generator, condition=condition, std=std, sigma=sigma, eps=eps, chunk_size=chunk_size
    )
    return finish_sampled_pairwise_mutual_information(statistics)
