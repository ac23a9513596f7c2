"""The manifold entropic metrics of Galperin & Köthe (2025) as pure functions of decoder Jacobians."""

from __future__ import annotations

from torch import Tensor

from lightning_mem.functional.active import active_latents
from lightning_mem.functional.statistics import (
    DEFAULT_EPS,
    batch_statistics,
    cross_statistics,
    finish_entropy,
    finish_mutual_information,
    finish_total_correlation,
)

__all__ = [
    "entropy_spectrum",
    "manifold_cross_mutual_information",
    "manifold_entropy",
    "manifold_pairwise_mutual_information",
    "manifold_total_correlation",
    "num_active_latents",
]


def manifold_entropy(
    jacobian: Tensor | None = None,
    *,
    gram: Tensor | None = None,
    std: Tensor | float | None = None,
    sigma: Tensor | None = None,
    per_dim: bool = False,
    eps: float = DEFAULT_EPS,
    labels: Tensor | None = None,
    num_classes: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Per-latent manifold entropies and the total manifold entropy, in nats.

    .. math::
        H_i = h_0 + \tfrac12 \mathbb{E}_z[\log G_{ii}], \qquad H = d\,h_0 + \tfrac12 \mathbb{E}_z[\log\det G],
        \qquad G = J^\top J,\ h_0 = \tfrac12(1 + \log 2\pi).

    :math:`H_i` measures how much latent ``i`` moves the data (the "non-linear standard deviation"); for a bijective
    flow :math:`H = d\,h_0 + \mathbb{E}[\log|\det J|]` is the entropy of the generated distribution.

    Args:
        jacobian: decoder Jacobians ``(N, *output_shape, d)`` (e.g. from :func:`lightning_mem.decoder_jacobian`).
        gram: alternatively, their Gram matrices ``(N, d, d)`` (symmetric, non-negative diagonal,
            :math:`|G_{ij}| \le \sqrt{G_{ii}G_{jj}}`). Only the Gram route exists then: ill-conditioned samples
            (condition number of the unit-column Jacobian beyond about 1e5) lose accuracy, see below.
        std: data scale (scalar or per output entry): metrics in original data units for a decoder of
            standardized data. A scalar adds ``log std`` to every :math:`H_i`.
        sigma: latent scale ``(d,)`` for a prior :math:`N(\mu, \mathrm{diag}(\sigma^2))`.
        per_dim: divide the total by ``d`` (nats/dim). :math:`H_i` is per dim already.
        eps: relative floor: in each sample, column ``i`` is *inactive* when :math:`G_{ii} \le \epsilon \max_j G_{jj}`
            (norm at most :math:`\sqrt\epsilon` times the sample's largest column; :math:`\epsilon` itself for an all-zero
            Jacobian). Its :math:`\log G_{ii}` is taken at the floor (finite, instead of :math:`-\infty`), and it is
            left out of the dependence terms (orthogonal to the rest). Scale-free: :math:`cJ` gives :math:`H_i + \log c`
            for every latent, and the same MTC and MPMI, for any :math:`c > 0`.
        labels, num_classes: class-conditional mode: the metric of each class, averaged over the classes present.

    Returns:
        ``(entropy_per_dim, total)`` of shapes ``(d,)`` and ``()``, float64.

    Accuracy: :math:`\log\det G` is taken from the Cholesky factor of :math:`G` where that is accurate, and from the
    Jacobian itself where forming :math:`G` (which squares the condition number) would lose digits: a QR
    factorisation refined with a twice-precision residual, or the singular values where the columns are numerically
    dependent (:func:`~lightning_mem.functional.statistics.batch_statistics` has the details). For a float64 Jacobian
    :math:`H` is then within about 1e-8 nats of the exact value of the Jacobian given, up to condition numbers of
    1e12 and entries from 1e-300 to 1e300. A float32 Jacobian is used exactly as given, but it carries its own
    rounding: relative to the float64 decoder its :math:`\log\det` is off by up to about :math:`6\cdot10^{-8}\kappa`
    nats (:math:`\kappa` the condition number of the unit-column Jacobian; measured: 5e-8 nats at :math:`\kappa = 10^2`,
    2e-5 at :math:`10^4`, 3e-4 at :math:`10^6`; from about :math:`10^7` on its smallest singular direction is rounding).
    Evaluate ill-conditioned decoders in float64.

    Raises:
        ValueError: on a wrong shape, an empty batch, non-finite entries, a meta tensor, both/neither of ``jacobian``
            and ``gram``, or a ``gram`` that is not a batch of Gram matrices (asymmetric, a negative diagonal,
            :math:`|\rho_{ij}| > 1` beyond rounding).
        TypeError: on an integer dtype or a non-tensor (e.g. a list).

    Example:
        >>> import torch
        >>> from lightning_mem.functional import STANDARD_NORMAL_ENTROPY
        >>> a = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # a linear decoder x = A z
        >>> entropy_per_dim, total = manifold_entropy(a)
        >>> entropy_per_dim - STANDARD_NORMAL_ENTROPY  # log of the column norms
        tensor([0.0000, 0.6931], dtype=torch.float64)
        >>> round(float(total - 2 * STANDARD_NORMAL_ENTROPY), 10)  # log |det A|
        0.6931471806

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
    """
    statistics = batch_statistics(jacobian, gram, std=std, sigma=sigma, eps=eps, labels=labels, num_classes=num_classes)
    return finish_entropy(statistics, per_dim=per_dim)


def manifold_total_correlation(
    jacobian: Tensor | None = None,
    *,
    gram: Tensor | None = None,
    std: Tensor | float | None = None,
    sigma: Tensor | None = None,
    per_dim: bool = False,
    eps: float = DEFAULT_EPS,
    labels: Tensor | None = None,
    num_classes: int | None = None,
) -> Tensor:
    r"""Manifold total correlation of the latents, in nats.

    .. math::
        \mathrm{MTC} = \sum_i H_i - H = \tfrac12 \mathbb{E}_z\Big[\sum_i \log G_{ii} - \log\det G\Big] \ \ge 0,

    zero exactly when the decoder's Jacobian columns are orthogonal everywhere (Hadamard's inequality). It equals
    the IMA contrast of Gresele et al. (2021). Data and latent scaling leave it unchanged, and so does scaling
    :math:`J` by any constant (inactive columns are found relative to each sample's largest). Accuracy as for
    :func:`manifold_entropy`; for ``d = 2`` it equals the pairwise mutual information of the two latents.

    Args:
        jacobian, gram, std, sigma, eps, labels, num_classes: as in :func:`manifold_entropy`.
        per_dim: divide by ``d`` (nats/dim).

    Returns:
        Scalar float64 tensor.

    Example:
        >>> import torch
        >>> a = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])  # columns at 45 degrees
        >>> manifold_total_correlation(a)  # -1/2 log(1 - cos^2 45deg) = 1/2 log 2
        tensor(0.3466, dtype=torch.float64)

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
        L. Gresele et al., *Independent mechanism analysis, a new concept?*, NeurIPS 2021.
    """
    statistics = batch_statistics(jacobian, gram, std=std, sigma=sigma, eps=eps, labels=labels, num_classes=num_classes)
    return finish_total_correlation(statistics, per_dim=per_dim)


def manifold_pairwise_mutual_information(
    jacobian: Tensor | None = None,
    *,
    gram: Tensor | None = None,
    std: Tensor | float | None = None,
    sigma: Tensor | None = None,
    eps: float = DEFAULT_EPS,
    labels: Tensor | None = None,
    num_classes: int | None = None,
) -> Tensor:
    r"""Manifold pairwise mutual information between every two latents, in nats.

    .. math::
        \mathrm{MPMI}_{ij} = H_i + H_j - H_{ij} = -\tfrac12 \mathbb{E}_z[\log(1 - \rho_{ij}^2)],
        \qquad \rho_{ij} = \frac{G_{ij}}{\sqrt{G_{ii}G_{jj}}},

    a "non-linear cosine similarity" of the two latents' effects on the data. Symmetric, non-negative, with the
    diagonal reported as zero, and zero for a pair with an inactive latent (see ``eps``). Computed for all pairs at
    once (no loop over pairs). For nearly collinear columns (:math:`1 - \rho^2 < 10^{-4}`) :math:`1 - \rho^2` is taken
    from the Jacobian's unit columns as :math:`\|u_i - u_j\|^2\|u_i + u_j\|^2/4`, free of cancellation; it is floored
    at the float64 epsilon :math:`u` (collinear columns: :math:`-\tfrac12\log u = 18.0` nats).

    Args:
        jacobian, gram, std, sigma, eps, labels, num_classes: as in :func:`manifold_entropy`.

    Returns:
        ``(d, d)`` float64.

    Example:
        >>> import torch
        >>> a = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]])
        >>> manifold_pairwise_mutual_information(a)
        tensor([[0.0000, 0.3466, 0.0000],
                [0.3466, 0.0000, 0.0000],
                [0.0000, 0.0000, 0.0000]], dtype=torch.float64)

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
    """
    # Only the pairwise terms: no log-determinants (no Cholesky factorisation) for this metric alone
    statistics = batch_statistics(jacobian, gram, std=std, sigma=sigma, eps=eps, labels=labels, num_classes=num_classes, pairwise_only=True)
    return finish_mutual_information(statistics)


def manifold_cross_mutual_information(
    jacobian: Tensor,
    reference_jacobian: Tensor,
    *,
    std: Tensor | float | None = None,
    sigma: Tensor | None = None,
    reference_sigma: Tensor | None = None,
    eps: float = DEFAULT_EPS,
    labels: Tensor | None = None,
    num_classes: int | None = None,
) -> Tensor:
    r"""Manifold cross-pairwise mutual information between the latents of two decoders, in nats.

    .. math::
        \mathrm{MCPMI}_{ij} = -\tfrac12 \mathbb{E}[\log(1 - \rho_{ij}^2)],
        \qquad \rho_{ij} = \frac{\langle a_i, b_j \rangle}{\|a_i\|\,\|b_j\|},

    with :math:`a_i` column ``i`` of ``jacobian`` (the model) and :math:`b_j` column ``j`` of ``reference_jacobian``
    (e.g. a ground-truth generator, or the same model earlier in training), both at the same data point. One
    dominant entry per row means the model's latents are aligned with the reference's.

    Args:
        jacobian: ``(N, *output_shape, d)``.
        reference_jacobian: ``(N, *output_shape, d_ref)``, the same ``N`` samples and output shape.
        std: data scale shared by both decoders.
        sigma, reference_sigma: latent scales ``(d,)`` and ``(d_ref,)`` (they cancel in :math:`\rho`, but take part in
            deciding which columns are inactive).
        eps, labels, num_classes: as in :func:`manifold_entropy`; each decoder's columns are measured against its own
            largest column, and a pair with an inactive column contributes 0. Nearly collinear pairs as in
            :func:`manifold_pairwise_mutual_information`.

    Returns:
        ``(d, d_ref)`` float64.

    Raises:
        ValueError: if the two Jacobians differ in ``N`` or output shape, or as :func:`manifold_entropy`.

    Example:
        >>> import torch
        >>> a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        >>> b = torch.tensor([[[1.0], [1.0]]])
        >>> manifold_cross_mutual_information(a, b)  # each axis at 45 degrees to the reference direction
        tensor([[0.3466],
                [0.3466]], dtype=torch.float64)

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025.
    """
    statistics = cross_statistics(
        jacobian, reference_jacobian, std=std, sigma=sigma, reference_sigma=reference_sigma, eps=eps, labels=labels, num_classes=num_classes
    )
    return finish_mutual_information(statistics)


def entropy_spectrum(entropy_per_dim: Tensor) -> tuple[Tensor, Tensor]:
    r"""The entropy spectrum: per-latent manifold entropies sorted in descending order, and the sort order.

    The analogue of PCA's sorted eigenvalue spectrum: a steep spectrum means a few "core" latents carry most of
    the variation (alignment).

    Args:
        entropy_per_dim: ``(d,)`` per-latent entropies, e.g. the first output of :func:`manifold_entropy`.

    Returns:
        ``(spectrum, order)``: ``spectrum = entropy_per_dim[order]``, descending; ``order`` is long.

    Example:
        >>> import torch
        >>> entropy_spectrum(torch.tensor([0.5, 2.0, 1.0]))
        (tensor([2.0000, 1.0000, 0.5000]), tensor([1, 2, 0]))
    """
    if not hasattr(entropy_per_dim, "ndim") or entropy_per_dim.ndim != 1:
        raise ValueError(f"Expected `entropy_per_dim` of shape (d,), but got {tuple(getattr(entropy_per_dim, 'shape', ()))}.")
    spectrum, order = entropy_per_dim.sort(descending=True, stable=True)
    return spectrum, order


def num_active_latents(entropy_per_dim: Tensor, threshold: float | None = None, *, eps: float = DEFAULT_EPS) -> Tensor:
    r"""Number of active latents: above the plateau of switched-off latents of the spectrum, or above a threshold.

    By default (``threshold=None``) the count of :func:`~lightning_mem.functional.active_latents`: the latents above
    the widest gap that separates a bunched plateau from the rest of the spectrum, all latents when there is none.
    It depends only on differences of the :math:`H_i`, so neither on the number of output dims nor on the data
    scale. A positive ``threshold`` keeps the absolute rule, :math:`\exp(H_i - h_0) > \mathrm{threshold}` (the
    geometric-mean column norm in data units; :data:`~lightning_mem.functional.DEFAULT_ACTIVE_THRESHOLD` is 0.01),
    which depends on both: on a 784-pixel VAE the switched-off latents' columns are still 0.1-0.2 long.

    Args:
        entropy_per_dim: ``(d,)`` per-latent entropies :math:`H_i`.
        threshold: ``None`` (the spectrum's shape), or a positive column-norm level.
        eps: the floor the entropies were computed with (latents at the floor are dead, never active).

    Returns:
        Scalar long tensor.

    Raises:
        ValueError: if ``threshold`` is not ``None`` or a positive finite number, or ``entropy_per_dim`` is not a
            non-empty ``(d,)`` tensor of finite values.
        TypeError: if ``entropy_per_dim`` is not a floating point tensor.

    Example:
        >>> import torch
        >>> from lightning_mem.functional import STANDARD_NORMAL_ENTROPY
        >>> entropy = STANDARD_NORMAL_ENTROPY + torch.tensor([0.4, 0.0, -0.5, -3.0, -3.1, -3.2])  # a plateau near -3
        >>> num_active_latents(entropy)
        tensor(3)
        >>> num_active_latents(entropy, threshold=0.01)  # log 0.01 = -4.6: the plateau counts too
        tensor(6)
    """
    return active_latents(entropy_per_dim, threshold=threshold, eps=eps).num_active
