"""Closed-form tests of the EDM preconditioning, noise embedding and denoising loss (method.md §1.2-1.3)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from diemlib.denoiser import Denoiser, denoising_loss, loss_weight, noise_embedding, preconditioning
from diemlib.gaussian import DPLR, GaussianDenoiser
from diemlib.schedule import VESchedule

LOSS = eqx.filter_jit(denoising_loss)
SIGMAS = np.array([1e-3, 0.1, 0.5, 1.0, 3.0, 1e2])


class ZeroNet(eqx.Module):
    def __call__(self, x, emb, *, key=None):
        return jnp.zeros_like(x)


class EchoNet(eqx.Module):
    """F(x, emb) = x + emb[:d]: exposes both inputs of the network in the output."""

    def __call__(self, x, emb, *, key=None):
        return x + emb[: x.shape[0]]


def test_preconditioning_coefficients_match_edm_formulas():
    c_skip, c_out, c_in, c_noise = preconditioning(SIGMAS)
    np.testing.assert_allclose(c_skip, 1 / (SIGMAS**2 + 1), rtol=1e-14)
    np.testing.assert_allclose(c_out, SIGMAS / np.sqrt(SIGMAS**2 + 1), rtol=1e-14)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(SIGMAS**2 + 1), rtol=1e-14)
    np.testing.assert_allclose(c_noise, np.log(SIGMAS), rtol=1e-14)
    # sigma_data = 1: c_skip + c_out^2 = 1.
    np.testing.assert_allclose(c_skip + c_out**2, 1.0, rtol=1e-14)


def test_noise_embedding_sines_first_with_geometric_frequencies():
    features, u = 8, 0.7
    emb = np.asarray(noise_embedding(u, features))
    half = features // 2
    omega = (1e-4) ** (np.arange(half) / (half - 1))
    np.testing.assert_allclose(omega[[0, -1]], [1.0, 1e-4], rtol=1e-14)
    np.testing.assert_allclose(emb[:half], np.sin(omega * u), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(emb[half:], np.cos(omega * u), rtol=1e-13, atol=1e-15)
    assert emb.shape == (features,)
    # At u = 0 the sines vanish and the cosines are one.
    np.testing.assert_array_equal(noise_embedding(0.0, 64), np.r_[np.zeros(32), np.ones(32)])


def test_zero_network_denoiser_returns_c_skip_x():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)))
    denoiser = Denoiser(ZeroNet(), 8)
    np.testing.assert_allclose(denoiser(x, 0.5), x / (0.25 + 1), rtol=1e-14)
    sigma = jnp.array([1e-3, 0.3, 1.0, 10.0])  # per-sample noise levels
    np.testing.assert_allclose(denoiser(x, sigma), x / (sigma[:, None] ** 2 + 1), rtol=1e-14)


def test_denoiser_feeds_c_in_x_and_embedding_of_log_sigma():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)))
    sigma = jnp.array([0.05, 1.0, 7.0])
    out = Denoiser(EchoNet(), 8)(x, sigma)
    for b in range(3):
        s = float(sigma[b])
        emb = np.asarray(noise_embedding(np.log(s), 8))
        c_skip, c_out, c_in = 1 / (s**2 + 1), s / np.sqrt(s**2 + 1), 1 / np.sqrt(s**2 + 1)
        expected = c_skip * x[b] + c_out * (c_in * x[b] + emb[:4])
        np.testing.assert_allclose(out[b], expected, rtol=1e-13)


def _hand_loss(denoise, x, key, schedule):
    """method.md §1.2 recomputed with the same draws: t ~ Beta(3,3), z ~ N(0, I)."""

    @jax.jit
    def draws(key):
        key_t, key_z, _ = jax.random.split(key, 3)
        return jax.random.beta(key_t, 3.0, 3.0, (x.shape[0],), dtype=x.dtype), jax.random.normal(key_z, x.shape, x.dtype)

    t, z = map(np.asarray, draws(key))
    sigma = schedule.sigma_min * (schedule.sigma_max / schedule.sigma_min) ** t
    x_t = np.asarray(x) + sigma[:, None] * z
    error = np.mean((np.asarray(denoise(x_t, sigma)) - np.asarray(x)) ** 2, axis=1)
    return np.mean((1 / sigma**2 + 1) * error), sigma


def _gaussian(d=5, r=2):
    """A prior N(mu, S) with S = 0.2 I + U U^T far from the identity."""
    rng = np.random.default_rng(0)
    u = rng.normal(size=(d, r))
    mean = rng.normal(size=d) * 2
    return mean, DPLR(jnp.full(d, 0.2), jnp.asarray(u))


def test_loss_weight_is_edm_weight():
    np.testing.assert_allclose(loss_weight(SIGMAS), 1 / SIGMAS**2 + 1, rtol=1e-14)


def test_denoising_loss_equals_hand_computation():
    schedule = VESchedule(1e-3, 1e1)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(16, 5)) * 2 + 1)
    key = jax.random.key(3)
    denoiser = Denoiser(EchoNet(), 8)
    expected, _ = _hand_loss(lambda xt, s: denoiser(jnp.asarray(xt), jnp.asarray(s)), x, key, schedule)
    np.testing.assert_allclose(LOSS(denoiser, x, key, schedule), expected, rtol=1e-12)


def test_exact_gaussian_denoiser_has_bayes_loss_below_zero_network():
    """For x ~ N(mu, S), conditionally on the drawn sigmas, the loss of E[x | x_t] is
    mean_b lambda_b tr(S - S (S + s_b^2)^-1 S) / d, and that of the zero network
    D = x_t / (1 + s^2) is mean_b lambda_b (s^2 d + s^4 E|x|^2) / ((1 + s^2)^2 d)."""
    schedule = VESchedule(1e-3, 1e1)
    mean, dplr = _gaussian()
    cov = np.asarray(dplr.dense())
    d, n = 5, 8192
    x = jnp.asarray(mean + np.random.default_rng(4).normal(size=(n, d)) @ np.linalg.cholesky(cov).T)
    key = jax.random.key(5)
    exact = GaussianDenoiser(jnp.asarray(mean), dplr)
    zero = Denoiser(ZeroNet(), 8)
    loss_exact = float(LOSS(lambda xt, s, key=None: exact(xt, s), x, key, schedule))
    loss_zero = float(LOSS(zero, x, key, schedule))
    _, sigma = _hand_loss(lambda xt, s: xt, x, key, schedule)
    lam = 1 / sigma**2 + 1
    eig = np.linalg.eigvalsh(cov)  # tr(S - S (S + s^2)^-1 S) = sum_i l_i s^2 / (l_i + s^2)
    bayes = np.sum(eig * sigma[:, None] ** 2 / (eig + sigma[:, None] ** 2), axis=1) / d
    second_moment = np.trace(cov) + mean @ mean
    naive = (sigma**2 * d + sigma**4 * second_moment) / ((1 + sigma**2) ** 2 * d)
    assert np.isfinite(loss_exact) and np.isfinite(loss_zero)
    np.testing.assert_allclose(loss_exact, np.mean(lam * bayes), rtol=0.05)
    np.testing.assert_allclose(loss_zero, np.mean(lam * naive), rtol=0.05)
    assert loss_exact < 0.9 * loss_zero, (loss_exact, loss_zero)
