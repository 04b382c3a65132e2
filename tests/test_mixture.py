"""Gaussian mixtures (diemlib.mixture) and the Tweedie covariance study (diemlib.covariance_study).

Every closed form is checked against autodiff or Monte Carlo; the study's resampling against the
analytic posterior of a single Gaussian, where Tweedie's moment matching is exact.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diemlib.eval import covariance_study as cs
from diemlib.linalg.dplr import DPLR
from diemlib.data.mixture import GaussianMixture, helix_mixture, manifold_mixture
from diemlib.inverse.mmps import Prior, Tweedie
from diemlib.eval.sinkhorn import sinkhorn_divergence, sinkhorn_divergences
from diemlib.inverse.operators import Matrix, log_likelihood

SIGMAS = [0.01, 0.1, 1.0, 10.0]


@pytest.fixture
def mixture():
    """A small random mixture in R^3 whose components overlap at moderate noise."""
    means = jax.random.uniform(jax.random.key(0), (6, 3), minval=-1.0, maxval=1.0)
    return GaussianMixture(means, 0.2)


def near(mixture, sigma, count=7, key=1):
    """Noised points around the mixture (some between components)."""
    k1, k2 = jax.random.split(jax.random.key(key))
    return mixture.sample(k1, count) + sigma * jax.random.normal(k2, (count, mixture.dim))


def single_gaussian(n=3, std=0.5, var_y=0.1, key=3):
    """One component: the mixture is N(mu, s² I); with one unit row W the posterior is Gaussian."""
    k_mu, k_obs = jax.random.split(jax.random.key(key))
    mixture = GaussianMixture(jax.random.normal(k_mu, (1, n)), std)
    A, y = cs.random_observation(k_obs, mixture, var_y)
    obs = (A, y, var_y)
    W, s2 = A.matrix, std**2
    gain = s2 * W.T / (var_y + s2 * jnp.sum(W**2))  # (n, 1)
    mean = mixture.means[0] + gain @ (y - W @ mixture.means[0])
    cov = s2 * jnp.eye(n) - gain @ (s2 * W)
    return mixture, obs, mean, cov


# ---------------------------------------------------------------------- the mixture


def test_constructors():
    helix = helix_mixture()
    assert helix.means.shape == (256, 3) and float(helix.std) == 0.01
    np.testing.assert_allclose(helix.means[0], [0.0, 2.0, -2.0], atol=1e-12)
    np.testing.assert_allclose(helix.means[-1], [0.0, 2.0, 2.0], atol=1e-12)
    np.testing.assert_allclose(jnp.linalg.norm(helix.means[:, :2], axis=1), 2.0, rtol=1e-12)
    manifold = manifold_mixture(jax.random.key(0), n=4, components=64)
    assert manifold.means.shape == (64, 4)
    np.testing.assert_allclose(manifold.means.min(0), -2.0)
    np.testing.assert_allclose(manifold.means.max(0), 2.0)


def test_sample_and_log_prob_normalised():
    mixture = GaussianMixture(jnp.array([[-1.0], [0.5]]), 0.3)
    grid = jnp.linspace(-6, 6, 20001)[:, None]
    for sigma in [0.0, 0.5]:
        density = jnp.exp(mixture.log_prob(grid, sigma))
        np.testing.assert_allclose(jnp.trapezoid(density, grid[:, 0]), 1.0, rtol=1e-8)
        np.testing.assert_allclose(mixture.marginal(sigma).log_prob(grid), mixture.log_prob(grid, sigma))
    x = mixture.sample(jax.random.key(0), 100_000)
    np.testing.assert_allclose(x.mean(), -0.25, atol=0.01)
    np.testing.assert_allclose(x.var(), 0.3**2 + 0.75**2, rtol=0.02)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_score_is_gradient_of_log_marginal(mixture, sigma):
    x_t = near(mixture, sigma)
    grad = jax.vmap(jax.grad(lambda x: mixture.log_prob(x, sigma)))(x_t)
    np.testing.assert_allclose(mixture.score(x_t, sigma), grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_denoiser_is_tweedie(mixture, sigma):
    x_t = near(mixture, sigma)
    np.testing.assert_allclose(mixture(x_t, sigma), x_t + sigma**2 * mixture.score(x_t, sigma), rtol=1e-9, atol=1e-12)


def test_noise_level_per_sample(mixture):
    x_t = near(mixture, 0.5, count=4)
    sigma = jnp.array(SIGMAS)
    one_by_one = jnp.stack([mixture.denoise(x[None], s)[0] for x, s in zip(x_t, sigma)])
    np.testing.assert_allclose(mixture.denoise(x_t, sigma), one_by_one, rtol=1e-12)
    cov_one = jnp.stack([mixture.covariance(x, s) for x, s in zip(x_t, sigma)])
    np.testing.assert_allclose(mixture.covariance(x_t, sigma), cov_one, rtol=1e-12)


def test_denoiser_matches_monte_carlo():
    """E[x | x_t] = ∫ x p(x) N(x_t | x, σ² I) dx / p_t(x_t), by self-normalised importance sampling."""
    mixture = GaussianMixture(jnp.array([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.0]]), 0.3)
    sigma = 0.6
    x = mixture.sample(jax.random.key(0), 2**20)
    for x_t in jnp.array([[0.2, 0.1], [-0.8, -0.6]]):
        log_w = -jnp.sum((x_t - x) ** 2, -1) / (2 * sigma**2)
        w = jnp.exp(log_w - log_w.max())
        w = w / w.sum()
        mean = w @ x
        cov = (x - mean).T @ ((x - mean) * w[:, None])
        np.testing.assert_allclose(mixture.denoise(x_t, sigma), mean, atol=5e-3)
        np.testing.assert_allclose(mixture.covariance(x_t, sigma), cov, atol=5e-3)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_covariance_is_tweedie_hessian(mixture, sigma):
    x_t = near(mixture, sigma)
    hessian = jax.vmap(jax.hessian(lambda x: mixture.log_prob(x, sigma)))(x_t)
    tweedie = sigma**2 * jnp.eye(3) + sigma**4 * hessian
    cov = mixture.covariance(x_t, sigma)
    np.testing.assert_allclose(cov, tweedie, rtol=1e-7, atol=1e-12 + 1e-9 * sigma**2)
    # σ² ∂E[x | x_t]/∂x_t, the form MMPS uses
    jacobian = jax.vmap(jax.jacfwd(lambda x: mixture.denoise(x, sigma)))(x_t)
    np.testing.assert_allclose(cov, sigma**2 * jacobian, rtol=1e-7, atol=1e-12 + 1e-9 * sigma**2)
    np.testing.assert_allclose(cov, jnp.swapaxes(cov, -1, -2), atol=1e-15)
    eigenvalues = jnp.linalg.eigvalsh(cov)
    assert jnp.all(eigenvalues > 0)
    # the within-component floor c = s² σ² / (s² + σ²) bounds it below
    c = mixture.std**2 * sigma**2 / (mixture.std**2 + sigma**2)
    assert jnp.all(eigenvalues >= c * (1 - 1e-9))


# ---------------------------------------------------------------------- the study


def test_resample_follows_weights():
    samples = jnp.array([[0.0], [1.0], [2.0]])
    log_w = jnp.log(jnp.array([0.25, 0.75, 0.0]))
    x = cs.resample(jax.random.key(0), samples, log_w, 100_000)
    assert not jnp.any(x == 2.0)
    np.testing.assert_allclose(jnp.mean(x == 1.0), 0.75, atol=0.01)


def test_observation_likelihood():
    A = Matrix(jnp.array([[1.0, 0.0, 2.0]]))
    x = jnp.array([[0.1, 0.2, 0.3], [1.0, -1.0, 0.0]])
    expected = jax.scipy.stats.norm.logpdf(0.5, x @ jnp.array([1.0, 0.0, 2.0]), jnp.sqrt(0.1))
    np.testing.assert_allclose(jax.vmap(lambda xi: log_likelihood(A, xi, jnp.array([0.5]), 0.1))(x), expected, rtol=1e-12)


def test_importance_resampling_gives_gaussian_posterior():
    mixture, obs, mean, cov = single_gaussian()
    prior = mixture.sample(jax.random.key(10), 2**18)
    x = cs.true_posterior(jax.random.key(11), prior, *obs, 2**16)
    np.testing.assert_allclose(x.mean(0), mean, atol=0.02)
    np.testing.assert_allclose(jnp.cov(x.T), cov, atol=0.01)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_tweedie_closure_is_denoiser_vjp(mixture, sigma):
    """log_likelihoods hands the choices u ↦ V u / σ²: the VJP of the exact denoiser."""
    x_t, u = near(mixture, sigma, count=1)[0], jnp.array([0.3, -1.0, 0.5])
    _, vjp = jax.vjp(lambda x: mixture.denoise(x, sigma), x_t)
    np.testing.assert_allclose(mixture.covariance(x_t, sigma) @ u / sigma**2, vjp(u)[0], rtol=1e-7, atol=1e-12)


def test_exact_likelihood_matches_monte_carlo(mixture):
    """p(y | x_t) = E_{x ~ p(x | x_t)}[N(y | W x, Σ_y)], sampling p(x | x_t) component by component."""
    A, y = cs.random_observation(jax.random.key(5), mixture, 0.05)
    sigma = 0.4
    x_t = near(mixture, sigma, count=1, key=6)[0]
    exact = cs.log_likelihoods(mixture, A, y, 0.05, x_t, sigma, {})[cs.EXACT]
    s2, v = mixture.std**2, mixture.std**2 + sigma**2
    k1, k2 = jax.random.split(jax.random.key(7))
    k = jax.random.categorical(k1, jnp.log(mixture.responsibilities(x_t, sigma)), shape=(2**20,))
    m_k = (sigma**2 * mixture.means + s2 * x_t) / v
    x = m_k[k] + jnp.sqrt(s2 * sigma**2 / v) * jax.random.normal(k2, (2**20, 3))
    monte_carlo = jnp.log(jnp.mean(jnp.exp(jax.vmap(lambda xi: log_likelihood(A, xi, y, 0.05))(x))))
    np.testing.assert_allclose(exact, monte_carlo, atol=0.01)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_tweedie_is_exact_for_one_gaussian(sigma):
    """One component: p(x | x_t) is Gaussian, so moment matching loses nothing, and the `prior`
    heuristic with the true Σ_x = s² I coincides with it (docs/conventions.md, 'Covariance choices')."""
    mixture, obs, _, _ = single_gaussian()
    covs = {"tweedie": Tweedie(), "prior": Prior(DPLR(jnp.zeros(3), mixture.std * jnp.eye(3)))}
    x_t = near(mixture, sigma, count=5)
    log_q = jax.vmap(lambda x: cs.log_likelihoods(mixture, *obs, x, sigma, covs))(x_t)
    np.testing.assert_allclose(log_q["tweedie"], log_q[cs.EXACT], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(log_q["prior"], log_q[cs.EXACT], rtol=1e-9, atol=1e-9)


def test_tweedie_posterior_moments_for_one_gaussian():
    """q(x_t | y) by resampling noised prior samples has the moments of p(x_t | y) = N(m, C + σ² I)."""
    mixture, obs, mean, cov = single_gaussian()
    sigma = 0.5
    prior = mixture.sample(jax.random.key(20), 2**18)
    covs = cs.covariances(("tweedie", "zero"), prior)
    sets = cs.noised_posteriors(jax.random.key(21), mixture, *obs, prior, sigma, covs, 2**16)
    for name in ("tweedie", cs.EXACT):
        np.testing.assert_allclose(sets[name].mean(0), mean, atol=0.03)
        np.testing.assert_allclose(jnp.cov(sets[name].T), cov + sigma**2 * jnp.eye(3), atol=0.03)
    # ignoring V overweights the x_t whose denoised mean fits y: the spread along W shrinks
    W = obs[0].matrix[0]
    var_along_w = lambda x: jnp.var(x @ W)
    assert var_along_w(sets["zero"]) < 0.9 * var_along_w(sets["tweedie"])


def test_prior_covariance_is_full_rank_ppca():
    x = jax.random.normal(jax.random.key(0), (1000, 3)) @ jnp.array([[1.0, 0, 0], [0.5, 2.0, 0], [0, 0.3, 0.2]])
    np.testing.assert_allclose(cs.prior_covariance(x).dense(), jnp.cov(x.T), rtol=1e-10)


def test_divergences_share_the_debiasing_term():
    k = jax.random.split(jax.random.key(0), 4)
    ref, other, a, b = (jax.random.normal(ki, (64, 3)) for ki in k)
    b = b + 0.5
    kwargs = dict(reg=1e-2, max_iter=200, stop=1e-3)
    scores = sinkhorn_divergences(ref, other, {"a": a, "b": b}, **kwargs)
    assert scores["a"] == pytest.approx(sinkhorn_divergence(ref, other, a, **kwargs))
    assert scores["b"] == pytest.approx(sinkhorn_divergence(ref, other, b, **kwargs))
    assert scores["b"] > scores["a"]


def test_study_seed_returns_finite_numbers():
    sigmas = [0.05, 1.0]
    choices = ("zero", "sigma", "sigma_over_1p", "prior", "tweedie")
    calls = []
    out = cs.study_seed(
        jax.random.key(0), sigmas, choices, components=32, prior_samples=2**12, divergence_samples=64,
        max_iter=64, chunk=1000, callback=lambda: calls.append(1),
    )
    assert set(out) == {*choices, cs.EXACT}
    for name, values in out.items():
        assert values.shape == (2,) and np.all(np.isfinite(values)) and np.all(values >= 1e-6), name
    assert len(calls) == 2
    summary = cs.summarise({name: np.stack([v, 2 * v]) for name, v in out.items()})
    assert set(summary["tweedie"]) == {"q25", "median", "q75"}
    best, ratio = cs.tweedie_advantage(summary, ["zero", "sigma", "prior"])
    assert len(best) == len(ratio) == 2 and all(b in ("zero", "sigma", "prior") for b in best)
    with pytest.raises(ValueError, match="unknown covariance"):
        cs.study_seed(jax.random.key(0), sigmas, ("bogus",))


def test_posterior_sets_for_figure_one():
    helix = helix_mixture(components=64)
    A = Matrix(jnp.array([[1.0, 0.0, 2.0]]))
    sets = cs.posterior_sets(jax.random.key(0), helix, A, jnp.array([0.0]), 1e-4, 0.25, ("zero", "tweedie"), prior_samples=2**12, count=256)
    assert set(sets) == {"true", "zero", "tweedie", cs.EXACT}
    assert all(x.shape == (256, 3) and bool(jnp.all(jnp.isfinite(x))) for x in sets.values())
