"""Samplers (docs/conventions.md, 'Samplers'): update formulas by hand, NFE and noise levels of every denoiser call,
and exact sampling of a Gaussian prior with its analytic denoiser."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diemlib.compilation import Compilations, compilations
from diemlib.diffusion.gaussian import GaussianDenoiser
from diemlib.linalg.dplr import DPLR
from diemlib.diffusion.samplers import DDIM, DDPM, PC, sampler
from diemlib.diffusion.schedule import VESchedule
from diemlib.progress import counting

SCHEDULE = VESchedule(1e-3, 1e2)


def affine(x, sigma):
    """A simple linear denoiser: E[x | x_t] of N(1, I)."""
    sigma = jnp.reshape(jnp.asarray(sigma), (-1,) + (1,) * (x.ndim - 1))
    return 1.0 + (x - 1.0) / (1 + sigma**2)


def _affine_np(x, sigma):
    return 1.0 + (x - 1.0) / (1 + sigma**2)


def _initial_and_keys(key, shape, steps, mean):
    key_init, key_steps = jax.random.split(key)
    x = mean + SCHEDULE.sigma_max * np.asarray(jax.random.normal(key_init, shape, jnp.float64))
    return x, jax.random.split(key_steps, steps)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "pc"])
def test_updates_match_the_formulas_by_hand(name):
    steps, shape, mean, key = 3, (4, 2), 0.5, jax.random.key(0)
    out = sampler(name, SCHEDULE, steps)(affine, shape, key, mean=mean)
    x, keys = _initial_and_keys(key, shape, steps, mean)
    sig = SCHEDULE.sigma_min * (SCHEDULE.sigma_max / SCHEDULE.sigma_min) ** np.linspace(1, 0, steps + 1)
    for i in range(steps):
        st, ss = sig[i], sig[i + 1]
        x_hat = _affine_np(x, st)
        if name == "ddpm":
            tau = 1 - ss**2 / st**2
            eps = np.asarray(jax.random.normal(keys[i], shape, jnp.float64))
            x = x - tau * (x - x_hat) + ss * np.sqrt(tau) * eps
        else:
            x = x - (1 - ss / st) * (x - x_hat)
        if name == "pc":
            (k,) = jax.random.split(keys[i], 1)
            eps = np.asarray(jax.random.normal(k, shape, jnp.float64))
            x = x - 0.1 * (x - _affine_np(x, ss)) + ss * np.sqrt(2 * 0.1) * eps
    expected = _affine_np(x, sig[-1])  # one extra denoiser call at sigma(0)
    np.testing.assert_allclose(out, expected, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize(
    "cls, kwargs, calls_per_step", [(DDPM, {}, 1), (DDIM, {}, 1), (PC, {}, 2), (PC, {"corrections": 3}, 4)]
)
def test_nfe_and_noise_level_of_every_denoiser_call(cls, kwargs, calls_per_step):
    """Counts the calls at run time (a debug callback fires once per executed call, also inside
    the jitted scan): T + 1 for DDPM/DDIM, (1 + corrections) T + 1 for PC, and checks each sigma."""
    steps = 5
    sigmas = []

    def counting(x, sigma):
        jax.debug.callback(lambda s: sigmas.append(float(np.ravel(s)[0])), sigma, ordered=True)
        return affine(x, sigma)

    run = eqx.filter_jit(lambda key: cls(SCHEDULE, steps, **kwargs)(counting, (3, 2), key))
    jax.block_until_ready(run(jax.random.key(0)))
    jax.effects_barrier()
    assert len(sigmas) == calls_per_step * steps + 1
    grid = np.asarray(SCHEDULE(SCHEDULE.time_grid(steps)))
    expected = []
    for i in range(steps):
        expected += [grid[i]] + [grid[i + 1]] * (calls_per_step - 1)  # PC corrections at level s
    expected.append(grid[-1])
    np.testing.assert_allclose(sigmas, expected, rtol=1e-12)


def _prior():
    """N(mu, S) on d = 5 with eigenvalues of S in [0.25, 4] (sigma_max = 100 >> prior scale)."""
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.normal(size=(5, 5)))[0]
    eig = np.array([0.25, 0.5, 1.0, 2.0, 4.0])
    # S = 0.25 I + U U^T with U = Q diag(sqrt(eig - 0.25)).
    u = q * np.sqrt(eig - 0.25)
    mean = rng.normal(size=5) * 2
    cov = q @ np.diag(eig) @ q.T
    return GaussianDenoiser(jnp.asarray(mean), DPLR(jnp.full(5, 0.25), jnp.asarray(u))), mean, cov


@pytest.mark.parametrize("cls", [DDPM, DDIM, PC])
def test_gaussian_prior_samples_match_mean_and_covariance(cls):
    """Whitened by S^-1/2, the samples must have mean 0 (|.| <= 5/sqrt(N)) and covariance I
    (entries within 6 sqrt(2/N)). With T = 256 the discretisation bias of the variance is
    about -4 % (DDPM), -2 % (DDIM), +1 % (PC), inside that tolerance."""
    denoiser, mean, cov = _prior()
    n = 8000
    np.testing.assert_allclose(denoiser.cov.dense(), cov, atol=1e-12)
    run = eqx.filter_jit(lambda key: cls(SCHEDULE, 256)(denoiser, (n, 5), key, mean=denoiser.mean))
    x = np.asarray(run(jax.random.key(1)))
    values, vectors = np.linalg.eigh(cov)
    whiten = vectors @ np.diag(values**-0.5) @ vectors.T
    w = (x - mean) @ whiten.T
    assert np.all(np.abs(w.mean(0)) < 5 / np.sqrt(n)), w.mean(0)
    w_cov = np.cov(w.T, bias=True)
    assert np.all(np.abs(w_cov - np.eye(5)) < 6 * np.sqrt(2 / n)), w_cov


def test_same_key_same_samples_and_different_key_different_samples():
    denoiser, mean, _ = _prior()
    run = eqx.filter_jit(lambda key: DDPM(SCHEDULE, 8)(denoiser, (4, 5), key, mean=denoiser.mean))
    a, b, c = run(jax.random.key(3)), run(jax.random.key(3)), run(jax.random.key(4))
    np.testing.assert_array_equal(a, b)
    assert np.max(np.abs(np.asarray(a) - np.asarray(c))) > 1e-3


def test_return_info_averages_denoiser_diagnostics_per_step():
    class WithInfo(eqx.Module):
        def __call__(self, x, sigma):
            return affine(x, sigma)

        def with_info(self, x, sigma):
            return affine(x, sigma), {"sigma": jnp.broadcast_to(sigma, x.shape[:1])}

    steps = 4
    x, info = DDIM(SCHEDULE, steps)(WithInfo(), (3, 2), jax.random.key(0), return_info=True)
    assert x.shape == (3, 2)
    np.testing.assert_allclose(info["sigma"], np.mean(SCHEDULE(SCHEDULE.time_grid(steps)[:-1])), rtol=1e-12)


@pytest.mark.parametrize("cls", [DDPM, DDIM, PC])
def test_one_program_for_every_step_count(cls):
    """The number of steps is data: a jitted sampler compiles once for 3 and 7 steps, and
    gives what a sampler built for that count gives outside `jit`; the progress bar counts
    the steps run."""
    run = eqx.filter_jit(lambda sampler, key: sampler(affine, (3, 2), key, mean=0.5))
    key = jax.random.key(0)
    jax.block_until_ready(run(cls(SCHEDULE, 3), key))
    before = compilations()
    with counting(7, "seven") as bar:
        x = jax.block_until_ready(run(cls(SCHEDULE, 7), key))
        jax.effects_barrier()
    assert compilations() - before == Compilations()  # nothing new: not compiled, not loaded
    assert bar.n == 7
    np.testing.assert_allclose(x, cls(SCHEDULE, 7)(affine, (3, 2), key, mean=0.5), rtol=1e-12)


@pytest.mark.parametrize("steps", [0, -2, 2.5, [3]])
def test_a_step_count_below_one_or_not_whole_is_refused(steps):
    with pytest.raises(ValueError, match="whole number of steps"):
        DDPM(SCHEDULE, steps)


def test_unknown_sampler_raises():
    with pytest.raises(ValueError):
        sampler("nope", SCHEDULE, 4)
