"""Tests of the embedded data: digits, two moons, the ground-truth torus and the seeded data loader."""

import math

import numpy as np
import pytest
import torch
from conftest import autograd_jacobian
from sklearn.datasets import load_digits as sklearn_load_digits

from lightning_mem.demo.datasets import DIGITS_SHAPE, TorusGenerator, load_digits, make_two_moons, tensor_dataloader
from lightning_mem.functional import (
    STANDARD_NORMAL_ENTROPY,
    manifold_entropy,
    manifold_pairwise_mutual_information,
    manifold_total_correlation,
)


def test_load_digits_is_sklearn_scaled_to_unit_interval():
    images, labels = load_digits(dtype=torch.float64)
    reference = sklearn_load_digits()
    assert images.shape == (1797, math.prod(DIGITS_SHAPE)) and images.dtype == torch.float64
    np.testing.assert_array_equal(images.numpy() * 16.0, reference.data)
    np.testing.assert_array_equal(labels.numpy(), reference.target)
    assert images.min() == 0.0 and images.max() == 1.0


def test_load_digits_rejects_integer_dtype():
    with pytest.raises(TypeError, match="dtype"):
        load_digits(dtype=torch.int64)


def test_two_moons_without_noise_lie_on_the_two_half_circles():
    points, labels = make_two_moons(1000, noise=0.0, dtype=torch.float64)
    upper, lower = points[labels == 0], points[labels == 1]
    assert len(upper) == len(lower) == 500
    torch.testing.assert_close(upper.norm(dim=1), torch.ones(500, dtype=torch.float64))
    assert (upper[:, 1] >= 0).all()
    torch.testing.assert_close((lower - torch.tensor([1.0, 0.5], dtype=torch.float64)).norm(dim=1), torch.ones(500, dtype=torch.float64))
    assert (lower[:, 1] <= 0.5).all()


def test_two_moons_noise_level_and_seeding():
    clean, _ = make_two_moons(20000, noise=0.0, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    noisy, _ = make_two_moons(20000, noise=0.2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # same angles, independent noise: the difference is the noise itself
    assert abs(float((noisy - clean).std()) - 0.2) < 0.005
    again, _ = make_two_moons(20000, noise=0.2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    other, _ = make_two_moons(20000, noise=0.2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)


def test_two_moons_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    make_two_moons(100)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize(("kwargs", "match"), [({"num_samples": 0}, "num_samples"), ({"num_samples": 10, "noise": -1.0}, "noise")])
def test_two_moons_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_two_moons(**kwargs)


def test_torus_jacobian_has_orthogonal_columns_of_the_stated_norms():
    torus = TorusGenerator(num_circles=3, seed=1)
    z = torch.randn(16, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    jacobian = autograd_jacobian(torus, z)
    gram = jacobian.mT @ jacobian
    pairs = z.reshape(16, 3, 2)
    radius = 1.0 + torus.radius_scales * pairs[..., 1]
    expected_norms = torch.stack([torus.angle_scales * radius, torus.radius_scales.expand(16, 3)], dim=-1).reshape(16, 6)
    torch.testing.assert_close(gram.diagonal(dim1=1, dim2=2).sqrt(), expected_norms)
    off_diagonal = gram - torch.diag_embed(gram.diagonal(dim1=1, dim2=2))
    assert off_diagonal.abs().max() < 1e-12
    # the metrics of an orthogonal decoder: no total correlation, no pairwise mutual information
    assert abs(float(manifold_total_correlation(jacobian))) < 1e-10
    assert manifold_pairwise_mutual_information(jacobian).abs().max() < 1e-10


def test_torus_is_a_rotation_of_the_planar_circles():
    torus = TorusGenerator(num_circles=2, angle_scales=torch.tensor([1.0, 0.5]), radius_scales=torch.tensor([0.1, 0.2]), seed=5)
    rotation = torus.rotation
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(4, dtype=torch.float64))
    z = torch.tensor([[0.5, -1.0, 2.0, 0.3]], dtype=torch.float64)
    t1, r1 = math.pi / 2 + 1.0 * 0.5, 1.0 + 0.1 * -1.0
    t2, r2 = math.pi / 2 + 0.5 * 2.0, 1.0 + 0.2 * 0.3
    planar = torch.tensor([[r1 * math.cos(t1), r1 * math.sin(t1), r2 * math.cos(t2), r2 * math.sin(t2)]], dtype=torch.float64)
    torch.testing.assert_close(torus(z), planar @ rotation.T)


def test_torus_ground_truth_spectrum_matches_sampled_jacobians():
    torus = TorusGenerator(num_circles=10)
    z, _ = torus.sample(20000, generator=torch.Generator().manual_seed(2))
    jacobian = autograd_jacobian(torus, z[:64])  # autograd agrees with the closed form on a few samples ...
    torch.testing.assert_close(jacobian, torch.func.vmap(torch.func.jacrev(lambda v: torus(v[None])[0]))(z[:64]))
    latent_entropy, _ = manifold_entropy(torch.func.vmap(torch.func.jacrev(lambda v: torus(v[None])[0]))(z))  # ... and on many
    exact = torus.entropy_per_dim()
    torch.testing.assert_close(latent_entropy, exact, atol=2e-3, rtol=0)
    paper = torus.entropy_per_dim(exact=False)
    torch.testing.assert_close(paper, STANDARD_NORMAL_ENTROPY + torus.sigma.log())
    # E[log r] = E[log(1 + u eps)] ~ -u^2 / 2 for small u: the paper's form is off by at most that
    assert (exact - paper).abs().max() < 0.5 * float(torus.radius_scales.max()) ** 2 * 1.1


def test_torus_default_scales_and_errors():
    torus = TorusGenerator()
    assert torus.latent_dim == 20 and torus.sigma.shape == (20,)
    assert torus.sigma.unique().numel() == 20  # no ties in the ground-truth spectrum
    with pytest.raises(ValueError, match="num_circles"):
        TorusGenerator(num_circles=0)
    with pytest.raises(ValueError, match="angle_scales"):
        TorusGenerator(num_circles=2, angle_scales=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="radius_scales"):
        TorusGenerator(num_circles=2, radius_scales=torch.tensor([0.1, 0.1, 0.1]))
    with pytest.raises(ValueError, match=r"\(N, 20\)"):
        torus(torch.zeros(3, 4, dtype=torch.float64))


def test_tensor_dataloader_is_seeded_and_drops_the_last_partial_batch():
    data = torch.arange(10.0)

    def order(seed):
        return [batch[0].tolist() for batch in tensor_dataloader(data, batch_size=3, seed=seed)]

    assert order(0) == order(0) and order(0) != order(1)
    assert [len(batch) for batch in order(0)] == [3, 3, 3]
    with pytest.raises(ValueError, match="batch_size"):
        tensor_dataloader(data, batch_size=11)
    with pytest.raises(ValueError, match="same first dimension"):
        tensor_dataloader(data, torch.zeros(3), batch_size=2)
