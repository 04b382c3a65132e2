"""Closed-form tests of the EDM preconditioning, noise embedding and denoising loss (docs/conventions.md, 'Denoiser preconditioning', 'Training loss')."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from diemlib.diffusion.denoiser import Denoiser, denoising_loss, loss_weight, noise_embedding, preconditioning
from diemlib.diffusion.gaussian import GaussianDenoiser
from diemlib.linalg.dplr import DPLR
from diemlib.diffusion.schedule import VESchedule

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


def _gaussian(d=5, r=2):
    """A prior N(mu, S) with S = 0.2 I + U U^T far from the identity."""
    rng = np.random.default_rng(0)
    u = rng.normal(size=(d, r))
    mean = rng.normal(size=d) * 2
    return mean, DPLR(jnp.full(d, 0.2), jnp.asarray(u))


SCHEDULE = VESchedule(1e-3, 1e1)


@pytest.fixture(scope="module")
def losses():
    """One compiled run: the loss of three denoisers on the same data and key, with the inputs
    (x_t, sigma) every denoiser received, recorded by a debug callback."""
    mean, dplr = _gaussian()
    cov = np.asarray(dplr.dense())
    n, d = 8192, 5
    x = jnp.asarray(mean + np.random.default_rng(4).normal(size=(n, d)) @ np.linalg.cholesky(cov).T)
    exact = GaussianDenoiser(jnp.asarray(mean), dplr)
    echo, zero = Denoiser(EchoNet(), 8), Denoiser(ZeroNet(), 8)
    seen = {}

    def recording(name, denoiser):
        def call(x_t, sigma, key=None):
            jax.debug.callback(lambda a, b: seen.setdefault(name, (np.asarray(a), np.asarray(b))), x_t, sigma)
            return denoiser(x_t, sigma)

        return call

    @jax.jit
    def run(x, key):
        return {
            "echo": denoising_loss(recording("echo", echo), x, key, SCHEDULE),
            "zero": denoising_loss(recording("zero", zero), x, key, SCHEDULE),
            "exact": denoising_loss(recording("exact", exact), x, key, SCHEDULE),
        }

    key = jax.random.key(5)
    values = jax.block_until_ready(run(x, key))
    jax.effects_barrier()
    return {"values": values, "seen": seen, "x": np.asarray(x), "key": key, "mean": mean, "cov": cov}


def test_loss_weight_is_edm_weight():
    np.testing.assert_allclose(loss_weight(SIGMAS), 1 / SIGMAS**2 + 1, rtol=1e-14)


def test_denoising_loss_draws_t_from_beta33_and_z_from_the_key(losses):
    """sigma_b = a (b/a)^t_b with t ~ Beta(3, 3) (checked in law: mean 1/2, variance 1/28, KS) and
    x_t = x + sigma z with z = normal(split(key, 3)[1]) exactly; one draw per example, the same
    for every denoiser at a fixed key."""
    x_t, sigma = losses["seen"]["echo"]
    for name in ("zero", "exact"):
        np.testing.assert_array_equal(losses["seen"][name][1], sigma)
        np.testing.assert_array_equal(losses["seen"][name][0], x_t)
    assert sigma.shape == (len(x_t),)
    t = np.log(sigma / 1e-3) / np.log(1e1 / 1e-3)
    assert 0 < t.min() and t.max() < 1
    n = len(t)
    assert abs(t.mean() - 0.5) < 5 * np.sqrt(1 / 28 / n)
    np.testing.assert_allclose(t.var(), 1 / 28, rtol=0.05)
    assert scipy.stats.kstest(t, scipy.stats.beta(3, 3).cdf).pvalue > 1e-3
    _, key_z, _ = jax.random.split(losses["key"], 3)
    z = np.asarray(jax.random.normal(key_z, x_t.shape, jnp.float64))
    np.testing.assert_allclose((x_t - losses["x"]) / sigma[:, None], z, atol=1e-8)


def test_denoising_loss_equals_hand_computation(losses):
    """mean_b (1/s_b^2 + 1) mean_d (D(x_t_b, s_b) - x_b)_d^2 on the draws the loss made."""
    x = losses["x"]
    x_t, sigma = losses["seen"]["echo"]
    x_hat = np.asarray(Denoiser(EchoNet(), 8)(jnp.asarray(x_t), jnp.asarray(sigma)))
    expected = np.mean((1 / sigma**2 + 1) * np.mean((x_hat - x) ** 2, axis=1))
    np.testing.assert_allclose(losses["values"]["echo"], expected, rtol=1e-10)


def test_exact_gaussian_denoiser_has_bayes_loss_below_zero_network(losses):
    """For x ~ N(mu, S), conditionally on the drawn sigmas, the loss of E[x | x_t] is
    mean_b lambda_b tr(S - S (S + s_b^2)^-1 S) / d, and that of the zero network
    D = x_t / (1 + s^2) is mean_b lambda_b (s^2 d + s^4 E|x|^2) / ((1 + s^2)^2 d)."""
    mean, cov, d = losses["mean"], losses["cov"], 5
    loss_exact, loss_zero = float(losses["values"]["exact"]), float(losses["values"]["zero"])
    sigma = losses["seen"]["exact"][1]
    lam = 1 / sigma**2 + 1
    eig = np.linalg.eigvalsh(cov)  # tr(S - S (S + s^2)^-1 S) = sum_i l_i s^2 / (l_i + s^2)
    bayes = np.sum(eig * sigma[:, None] ** 2 / (eig + sigma[:, None] ** 2), axis=1) / d
    second_moment = np.trace(cov) + mean @ mean
    naive = (sigma**2 * d + sigma**4 * second_moment) / ((1 + sigma**2) ** 2 * d)
    assert np.isfinite(loss_exact) and np.isfinite(loss_zero)
    np.testing.assert_allclose(loss_exact, np.mean(lam * bayes), rtol=0.05)
    np.testing.assert_allclose(loss_zero, np.mean(lam * naive), rtol=0.05)
    assert loss_exact < 0.9 * loss_zero, (loss_exact, loss_zero)
