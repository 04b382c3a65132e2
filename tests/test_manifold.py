"""The random smooth manifold of diemlib.data.manifold (after Zenke & Vogels' randman).

The map is re-implemented here in numpy from its formula,
x_j = prod_l sum_k a_jlk / k^alpha sin(2 pi (k b_jlk z_l + c_jlk)), k = 1..K, K = ceil(eps^(-1/alpha)),
and the data sets are checked to be min-max normalised to [-2, 2], deterministic given the key,
and a smooth curve of dimension 1 for m = 1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diemlib.data.manifold import RandomManifold, normalise, random_manifold, sample_manifold


def numpy_manifold(manifold, z):
    """The formula, with explicit loops over j, l, k."""
    a, b, c = (np.asarray(t) for t in (manifold.a, manifold.b, manifold.c))
    n, m, K = a.shape
    x = np.ones((len(z), n))
    for j in range(n):
        for l in range(m):
            total = 0.0
            for k in range(1, K + 1):
                total = total + a[j, l, k - 1] / k**manifold.alpha * np.sin(
                    2 * np.pi * (k * b[j, l, k - 1] * z[:, l] + c[j, l, k - 1]))
            x[:, j] *= total
    return x


def test_paper_manifold_has_ten_frequencies_drawn_uniformly():
    """Defaults (experiments of §5.1): n = 5, m = 1, alpha = 3, eps = 1e-3, so K = ceil(1e3^(1/3)) = 10;
    a, b, c ~ U[0, 1)."""
    manifold = random_manifold(jax.random.key(0))
    assert isinstance(manifold, RandomManifold) and manifold.alpha == 3.0
    for t in (manifold.a, manifold.b, manifold.c):
        assert t.shape == (5, 1, 10)
        assert float(t.min()) >= 0 and float(t.max()) < 1
    # Pooled over a larger draw the parameters look uniform: mean 1/2, variance 1/12.
    big = random_manifold(jax.random.key(1), n=64, m=2)
    pooled = np.concatenate([np.ravel(t) for t in (big.a, big.b, big.c)])
    assert abs(pooled.mean() - 0.5) < 5 * np.sqrt(1 / 12 / pooled.size)
    assert abs(pooled.var() - 1 / 12) < 0.01


@pytest.mark.parametrize("epsilon, alpha, cutoff", [(1e-2, 3.0, 5), (1e-3, 2.0, 32), (0.5, 1.0, 2)])
def test_cutoff_is_ceil_of_epsilon_to_minus_one_over_alpha(epsilon, alpha, cutoff):
    """1e-2^(-1/3) = 4.64, 1e-3^(-1/2) = 31.6, 0.5^(-1) = 2 (exact)."""
    manifold = random_manifold(jax.random.key(2), n=3, m=2, alpha=alpha, epsilon=epsilon)
    assert manifold.a.shape == (3, 2, cutoff) and manifold.alpha == alpha


@pytest.mark.parametrize("m", [1, 2])
def test_map_matches_the_formula(m):
    manifold = random_manifold(jax.random.key(3), n=4, m=m)
    z = np.random.default_rng(4).uniform(size=(50, m))
    np.testing.assert_allclose(manifold(jnp.asarray(z)), numpy_manifold(manifold, z), rtol=1e-10, atol=1e-13)


def test_samples_are_min_max_normalised_to_minus_two_two_and_deterministic():
    manifold = random_manifold(jax.random.key(5))
    x = np.asarray(sample_manifold(jax.random.key(6), manifold, 1000))
    assert x.shape == (1000, 5)
    np.testing.assert_allclose(x.min(0), -2.0, atol=1e-12)
    np.testing.assert_allclose(x.max(0), 2.0, atol=1e-12)
    # The same keys: the same manifold and samples; another key: other samples.
    again = sample_manifold(jax.random.key(6), random_manifold(jax.random.key(5)), 1000)
    np.testing.assert_array_equal(x, again)
    other = np.asarray(sample_manifold(jax.random.key(7), manifold, 1000))
    assert np.max(np.abs(other - x)) > 0.1
    assert np.max(np.abs(np.asarray(random_manifold(jax.random.key(8)).a) - np.asarray(manifold.a))) > 0.1


def test_normalise_is_the_per_coordinate_affine_map_onto_minus_two_two():
    x = np.array([[0.0, 10.0], [1.0, 30.0], [0.5, 20.0], [0.25, 15.0]])
    expected = np.array([[-2.0, -2.0], [2.0, 2.0], [0.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(normalise(jnp.asarray(x)), expected, atol=1e-12)


def test_one_dimensional_manifold_is_a_smooth_curve():
    """m = 1: z -> x is smooth (its finite differences converge to its derivative at rate h^2 and
    it obeys the Lipschitz bound sum_k a/k^alpha 2 pi k b of the formula), and the samples have
    intrinsic dimension 1: the median nearest-neighbour distance of N points falls like 1/N
    (about 4 times smaller for 4 times more points; like 1/sqrt(N), 2 times, on a surface, m = 2)."""
    manifold = random_manifold(jax.random.key(9))
    f = lambda z: manifold(jnp.reshape(z, (1, 1)))[0]
    z = jnp.linspace(0.05, 0.95, 7)
    derivative = jax.vmap(jax.jacfwd(f))(z)
    for h in (1e-2, 1e-3):
        central = jax.vmap(lambda t: (f(t + h) - f(t - h)) / (2 * h))(z)
        error = float(jnp.max(jnp.abs(central - derivative)))
        assert error < 50 * h**2, (h, error)
    a, b = np.asarray(manifold.a)[:, 0], np.asarray(manifold.b)[:, 0]
    k = np.arange(1, a.shape[-1] + 1)
    lipschitz = np.sum(a / k**manifold.alpha * 2 * np.pi * k * b, axis=-1)  # per coordinate
    grid = np.asarray(manifold(jnp.linspace(0, 1, 4001)[:, None]))
    assert np.all(np.abs(np.diff(grid, axis=0)) <= lipschitz * (1 / 4000) * (1 + 1e-9))

    def median_nn(m, count):
        x = np.asarray(sample_manifold(jax.random.key(10), random_manifold(jax.random.key(11), m=m), count))
        d2 = np.sum((x[:, None] - x[None]) ** 2, -1)
        np.fill_diagonal(d2, np.inf)
        return np.median(np.sqrt(d2.min(1)))

    curve = median_nn(1, 400) / median_nn(1, 1600)
    surface = median_nn(2, 400) / median_nn(2, 1600)
    assert 3.0 < curve < 5.5, curve
    assert 1.5 < surface < 2.7, surface
