"""Embedded data for the demo and the examples: handwritten digits, two moons and the paper's ground-truth torus."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mem._checks import check_non_negative_float, check_positive_int, check_scale
from lightning_mem.functional import STANDARD_NORMAL_ENTROPY

__all__ = ["DIGITS_SHAPE", "TorusGenerator", "load_digits", "make_two_moons", "tensor_dataloader"]

DIGITS_SHAPE = (8, 8)
"""Image shape of scikit-learn's handwritten digits."""

_DIGITS_MAX_INTENSITY = 16.0
"""The digits' pixels are integer counts in ``[0, 16]`` (4x4 blocks of a 32x32 bitmap)."""


def load_digits(*, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    r"""The 1797 handwritten 8x8 digits bundled with scikit-learn, flattened and scaled to ``[0, 1]``.

    .. math::
        x = \mathrm{pixels} / 16 \in [0, 1]^{64}

    The images ship inside scikit-learn (``sklearn.datasets.load_digits``): nothing is downloaded.

    Args:
        dtype: floating point dtype of the images.

    Returns:
        ``(images, labels)``: images of shape ``(1797, 64)`` (row-major ``8 x 8``, see :data:`DIGITS_SHAPE`) and
        ``dtype``; labels ``(1797,)`` long in ``[0, 9]``.

    Raises:
        TypeError: if ``dtype`` is not a floating point dtype.

    Example:
        >>> images, labels = load_digits()
        >>> tuple(images.shape), tuple(labels.shape), float(images.min()), float(images.max())
        ((1797, 64), (1797,), 0.0, 1.0)

    References:
        E. Alpaydin, C. Kaynak, *Optical Recognition of Handwritten Digits*, UCI Machine Learning Repository, 1998.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"Expected `dtype` to be a floating point torch.dtype, but got {dtype!r}.")
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    images = torch.as_tensor(bunch.data, dtype=torch.float64) / _DIGITS_MAX_INTENSITY
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    return images.to(dtype), labels


def make_two_moons(
    num_samples: int,
    *,
    noise: float = 0.1,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    r"""Two interleaving half circles with isotropic Gaussian noise, as in scikit-learn's ``make_moons``.

    .. math::
        x = (\cos t, \sin t) \text{ (upper moon)}, \quad x = (1 - \cos t, \tfrac12 - \sin t) \text{ (lower moon)},
        \quad t \sim U[0, \pi], \quad x \leftarrow x + \mathrm{noise}\cdot\epsilon,\ \epsilon \sim N(0, I_2)

    The angle ``t`` is the "core" variation (along the moon) and the noise the "detail" (across it).

    Args:
        num_samples: number of points; the first ``num_samples // 2`` are on the upper moon.
        noise: standard deviation of the Gaussian noise added to every coordinate (``>= 0``).
        generator: source of randomness (default: a fresh ``torch.Generator`` seeded with 0), so that the data
            never depends on the global RNG.
        dtype: floating point dtype of the points.

    Returns:
        ``(points, labels)`` of shapes ``(num_samples, 2)`` and ``(num_samples,)`` (0 upper, 1 lower moon).

    Raises:
        ValueError: for a non-positive ``num_samples`` or a negative ``noise``.

    Example:
        >>> points, labels = make_two_moons(4, noise=0.0)
        >>> tuple(points.shape), labels.tolist()
        ((4, 2), [0, 0, 1, 1])

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025 (Sec. 5).
    """
    check_positive_int(num_samples, "num_samples")
    check_non_negative_float(noise, "noise")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    num_upper = num_samples // 2
    t = torch.rand(num_samples, generator=generator, dtype=torch.float64) * math.pi
    upper = torch.stack([t.cos(), t.sin()], dim=1)
    lower = torch.stack([1.0 - t.cos(), 0.5 - t.sin()], dim=1)
    labels = (torch.arange(num_samples) >= num_upper).long()
    points = torch.where(labels[:, None] == 0, upper, lower)
    points = points + noise * torch.randn(num_samples, 2, generator=generator, dtype=torch.float64)
    return points.to(dtype), labels


def tensor_dataloader(*tensors: Tensor, batch_size: int, seed: int = 0, shuffle: bool = True) -> DataLoader:
    """A ``DataLoader`` over in-memory tensors whose shuffling is seeded (its own ``torch.Generator``), not global.

    Args:
        tensors: tensors with the same first dimension; batches are tuples of their slices.
        batch_size: samples per batch (the last, smaller batch is dropped so that every step sees ``batch_size``).
        seed: seed of the shuffling order.
        shuffle: reshuffle every epoch.

    Raises:
        ValueError: for no tensors, mismatched lengths, or a ``batch_size`` outside ``[1, N]``.

    Example:
        >>> loader = tensor_dataloader(torch.arange(10.0), batch_size=4, shuffle=False)
        >>> [batch[0].tolist() for batch in loader]
        [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]
    """
    if not tensors:
        raise ValueError("Expected at least one tensor, but got none.")
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        raise ValueError(f"Expected `tensors` with the same first dimension, but got {[t.shape[0] for t in tensors]}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(f"Expected `batch_size` to be an int in [1, {n}], but got {batch_size!r}.")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle, drop_last=True, generator=generator)


_MAX_ANGLE_SCALE = 0.5
"""Largest default angle scale: three standard deviations stay within a half circle (no wrap-around)."""

_RADIUS_TO_ANGLE_SCALE = 0.15
"""Default radius scale of each circle relative to its angle scale (no two default scales coincide)."""


def _default_scales(num_circles: int) -> tuple[Tensor, Tensor]:
    """Angle scales log-spaced over ``[0.5, 0.05]``, radius scales 0.15 times those: a spectrum spanning 4.2 nats."""
    angle = _MAX_ANGLE_SCALE * torch.logspace(0.0, -1.0, num_circles, dtype=torch.float64)
    return angle, _RADIUS_TO_ANGLE_SCALE * angle


class TorusGenerator(nn.Module):
    r"""The paper's ground-truth decoder: a product of ``k`` circles in ``R^{2k}``, randomly rotated.

    .. math::
        t_k = \tfrac{\pi}{2} + s_k \epsilon_k, \quad r_k = 1 + u_k \epsilon'_k, \quad
        x = Q\,(r_1\cos t_1, r_1 \sin t_1, \dots, r_k \cos t_k, r_k \sin t_k), \quad Q \in O(2k)

    Latents are interleaved per circle: ``z = (eps_1, eps'_1, eps_2, eps'_2, ...)`` with ``d = D = 2k``. The
    Jacobian columns are orthogonal everywhere (angle column norm :math:`s_k r_k`, radius column norm
    :math:`u_k`), so the total correlation and every pairwise mutual information vanish, and the entropy
    spectrum is known in closed form (:meth:`entropy_per_dim`); the paper quotes it as
    :math:`h_0 + \log\sigma_i` with :math:`\sigma = (s_1, u_1, \dots)`, exact up to :math:`\mathbb{E}[\log r_k]`.

    Args:
        num_circles: ``k``; the data and latent dimension are ``2k``.
        angle_scales: ``(k,)`` positive :math:`s_k` (default: log-spaced from 0.5 to 0.05, so that the arcs stay
            within half circles).
        radius_scales: ``(k,)`` positive :math:`u_k` (default: :math:`0.15 s_k`, from 0.075 to 0.0075); keep
            them well below 1 so that radii stay positive.
        seed: seed of the random rotation :math:`Q` (QR of a Gaussian matrix).

    Raises:
        ValueError: for a non-positive ``num_circles`` or scales of the wrong shape or sign.

    Example:
        >>> torus = TorusGenerator(num_circles=2, angle_scales=torch.tensor([1.0, 0.5]), radius_scales=torch.tensor([0.1, 0.1]))
        >>> torus.sigma
        tensor([1.0000, 0.1000, 0.5000, 0.1000], dtype=torch.float64)
        >>> x = torus(torch.zeros(1, 4, dtype=torch.float64))  # all circles at angle pi/2, radius 1
        >>> round(float(x.norm()), 6)
        1.414214

    References:
        D. Galperin, U. Köthe, *Analyzing Generative Models by Manifold Entropic Metrics*, AISTATS 2025 (Sec. 5).
    """

    rotation: Tensor
    angle_scales: Tensor
    radius_scales: Tensor

    def __init__(
        self,
        num_circles: int = 10,
        *,
        angle_scales: Tensor | None = None,
        radius_scales: Tensor | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int(num_circles, "num_circles")
        default_angle, default_radius = _default_scales(num_circles)
        angle = _check_scales(default_angle if angle_scales is None else angle_scales, "angle_scales", num_circles)
        radius = _check_scales(default_radius if radius_scales is None else radius_scales, "radius_scales", num_circles)
        generator = torch.Generator().manual_seed(seed)
        gaussian = torch.randn(2 * num_circles, 2 * num_circles, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        self.num_circles = num_circles
        self.register_buffer("rotation", q * r.diagonal().sign())
        self.register_buffer("angle_scales", angle)
        self.register_buffer("radius_scales", radius)

    @property
    def latent_dim(self) -> int:
        """The latent (and data) dimension ``2k``."""
        return 2 * self.num_circles

    @property
    def sigma(self) -> Tensor:
        """Per-latent scale ``(s_1, u_1, s_2, u_2, ...)``, shape ``(2k,)``."""
        return torch.stack([self.angle_scales, self.radius_scales], dim=1).reshape(-1)

    def forward(self, z: Tensor) -> Tensor:
        """Decode ``z`` of shape ``(N, 2k)`` into points ``(N, 2k)`` of the rotated torus (dtype of ``z``)."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"Expected `z` of shape (N, {self.latent_dim}), but got {tuple(z.shape)}.")
        pairs = z.reshape(z.shape[0], self.num_circles, 2)
        angle = math.pi / 2 + self.angle_scales.to(z.dtype) * pairs[..., 0]
        radius = 1.0 + self.radius_scales.to(z.dtype) * pairs[..., 1]
        points = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=-1).reshape(z.shape[0], -1)
        return points @ self.rotation.to(z.dtype).T

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``(z, x)``: standard-normal latents ``(N, 2k)`` and their points ``(N, 2k)``, float64."""
        check_positive_int(num_samples, "num_samples")
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        z = torch.randn(num_samples, self.latent_dim, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            return z, self(z)

    def entropy_per_dim(self, *, exact: bool = True) -> Tensor:
        r"""Ground-truth per-latent manifold entropies ``(2k,)``, float64.

        .. math::
            H_{\text{angle } k} = h_0 + \log s_k + \mathbb{E}[\log r_k], \qquad H_{\text{radius } k} = h_0 + \log u_k

        Args:
            exact: include :math:`\mathbb{E}[\log(1 + u_k\epsilon)]` (by Gauss-Hermite quadrature); ``False``
                gives the paper's :math:`h_0 + \log\sigma_i`.
        """
        log_sigma = self.sigma.log()
        entropy = STANDARD_NORMAL_ENTROPY + log_sigma
        if exact:
            entropy = entropy.clone()
            entropy[0::2] += _expected_log_radius(self.radius_scales)
        return entropy


_QUADRATURE_ORDER = 64
"""Gauss-Hermite nodes used for :math:`\\mathbb{E}[\\log(1 + u\\epsilon)]`."""


def _expected_log_radius(radius_scales: Tensor) -> Tensor:
    """:math:`\\mathbb{E}_{\\epsilon \\sim N(0,1)}[\\log(1 + u\\epsilon)]` per scale ``u`` by Gauss-Hermite quadrature."""
    import numpy as np

    nodes_array, weights_array = np.polynomial.hermite_e.hermegauss(_QUADRATURE_ORDER)
    nodes = torch.as_tensor(nodes_array, dtype=torch.float64)
    weights = torch.as_tensor(weights_array, dtype=torch.float64) / math.sqrt(2 * math.pi)
    radius = (1.0 + radius_scales[:, None].to(torch.float64) * nodes[None, :]).clamp_min(torch.finfo(torch.float64).tiny)
    return (radius.log() * weights).sum(-1)


def _check_scales(scales: Tensor, name: str, num_circles: int) -> Tensor:
    return check_scale(scales, name, num_circles).reshape(-1)
