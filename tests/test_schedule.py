"""The variance-exploding schedule against its closed form sigma_t = a (b / a)^t (paper §2, Appendix D).

Every expected value below is computed from the formula in numpy, independently of the code:
sigma_0 = a = 1e-3, sigma_1 = b (1e2 for images, 1e1 for the manifold), log sigma_t affine in t,
d sigma / dt = sigma_t log(b / a) > 0, and the sampling grid uniform in t (geometric in sigma).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diemlib.diffusion.schedule import VESchedule

IMAGES, MANIFOLD = (1e-3, 1e2), (1e-3, 1e1)


def closed_form(a, b, t):
    return a * (b / a) ** np.asarray(t, dtype=np.float64)


@pytest.mark.parametrize("a, b", [IMAGES, MANIFOLD, (0.02, 80.0)], ids=["images", "manifold", "edm"])
def test_sigma_matches_the_closed_form(a, b):
    schedule = VESchedule(a, b)
    t = np.linspace(0.0, 1.0, 101)
    sigma = np.asarray(schedule(jnp.asarray(t)))
    assert sigma.shape == t.shape
    np.testing.assert_allclose(sigma, closed_form(a, b, t), rtol=1e-12)
    np.testing.assert_allclose(float(schedule(0.0)), a, rtol=1e-12)
    np.testing.assert_allclose(float(schedule(1.0)), b, rtol=1e-12)
    np.testing.assert_allclose(float(schedule(0.5)), np.sqrt(a * b), rtol=1e-12)  # geometric mid-point
    # Any array shape: elementwise.
    grid = jnp.asarray(t[:100].reshape(4, 25))
    np.testing.assert_allclose(schedule(grid), closed_form(a, b, t[:100]).reshape(4, 25), rtol=1e-12)


def test_default_is_the_image_schedule_and_the_manifold_schedule_ends_at_ten():
    """The defaults are checked through the schedule's values, not its attributes."""
    default = VESchedule()
    np.testing.assert_allclose(float(default(0.0)), 1e-3, rtol=1e-12)
    np.testing.assert_allclose(float(default(1.0)), 1e2, rtol=1e-12)
    np.testing.assert_allclose(float(default(0.2)), 1e-3 * 1e5**0.2, rtol=1e-12)  # = 1e-2
    manifold = VESchedule(sigma_max=1e1)
    np.testing.assert_allclose(float(manifold(0.0)), 1e-3, rtol=1e-12)
    np.testing.assert_allclose(float(manifold(1.0)), 1e1, rtol=1e-12)
    np.testing.assert_allclose(float(manifold(0.25)), 1e-2, rtol=1e-12)  # 1e-3 * (1e4)^(1/4)
    assert float(default(0.0)) > 0  # sigma_0 is never exactly zero


def test_log_sigma_is_affine_in_t_and_sigma_is_increasing():
    a, b = IMAGES
    schedule = VESchedule(a, b)
    t = np.sort(np.random.default_rng(0).uniform(0, 1, 64))
    log_sigma = np.log(np.asarray(schedule(jnp.asarray(t))))
    slope, intercept = np.polyfit(t, log_sigma, 1)
    np.testing.assert_allclose(slope, np.log(b / a), rtol=1e-12)
    np.testing.assert_allclose(intercept, np.log(a), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(log_sigma, intercept + slope * t, rtol=0, atol=1e-12)
    dense = np.asarray(schedule(jnp.linspace(0.0, 1.0, 1001)))
    assert np.all(np.diff(dense) > 0)


def test_derivative_is_sigma_times_log_ratio():
    a, b = MANIFOLD
    schedule = VESchedule(a, b)
    t = jnp.linspace(0.0, 1.0, 9)
    derivative = jax.vmap(jax.grad(lambda s: schedule(s)))(t)
    np.testing.assert_allclose(derivative, closed_form(a, b, t) * np.log(b / a), rtol=1e-12)


def test_time_grid_is_uniform_from_one_to_zero_and_geometric_in_sigma():
    a, b = IMAGES
    schedule = VESchedule(a, b)
    for steps in (1, 4, 64):
        grid = np.asarray(schedule.time_grid(steps))
        assert grid.shape == (steps + 1,)
        np.testing.assert_allclose(grid, 1 - np.arange(steps + 1) / steps, rtol=0, atol=1e-15)
        sigmas = np.asarray(schedule(jnp.asarray(grid)))
        np.testing.assert_allclose(sigmas[0], b, rtol=1e-12)
        np.testing.assert_allclose(sigmas[-1], a, rtol=1e-12)
        # A constant ratio sigma_{i+1} / sigma_i = (a / b)^(1 / steps).
        np.testing.assert_allclose(sigmas[1:] / sigmas[:-1], (a / b) ** (1 / steps), rtol=1e-12)


def test_jitted_schedule_matches_the_closed_form():
    """Under jit (the samplers' scan), with the schedule as a traced argument."""
    a, b = IMAGES
    t = jnp.linspace(0.0, 1.0, 7)
    out = jax.jit(lambda schedule, t: schedule(t))(VESchedule(a, b), t)
    np.testing.assert_allclose(out, closed_form(a, b, t), rtol=1e-12)
