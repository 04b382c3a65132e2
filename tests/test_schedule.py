"""Closed-form tests of the variance-exploding schedule (method.md §1.1, §2)."""

import jax
import numpy as np

from diemlib.schedule import VESchedule


def test_sigma_is_log_linear_between_sigma_min_and_sigma_max():
    a, b = 1e-3, 1e2
    schedule = VESchedule(a, b)
    np.testing.assert_allclose(schedule(0.0), a, rtol=1e-12)
    np.testing.assert_allclose(schedule(0.5), np.sqrt(a * b), rtol=1e-12)  # geometric mid-point
    np.testing.assert_allclose(schedule(1.0), b, rtol=1e-12)
    t = np.linspace(0, 1, 11)
    np.testing.assert_allclose(schedule(t), a * (b / a) ** t, rtol=1e-12)


def test_sigma_min_is_never_zero_and_manifold_values():
    schedule = VESchedule(1e-3, 1e1)
    assert float(schedule(0.0)) > 0
    np.testing.assert_allclose(schedule(0.25), 1e-3 * (1e4) ** 0.25, rtol=1e-12)
    # Default values are the image schedule.
    assert VESchedule().sigma_min == 1e-3 and VESchedule().sigma_max == 1e2


def test_time_grid_is_uniform_from_one_to_zero_and_geometric_in_sigma():
    schedule = VESchedule(1e-3, 1e2)
    steps = 4
    grid = schedule.time_grid(steps)
    np.testing.assert_allclose(grid, [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-15)
    sigmas = np.asarray(schedule(grid))
    np.testing.assert_allclose(sigmas[0], 1e2, rtol=1e-12)
    np.testing.assert_allclose(sigmas[-1], 1e-3, rtol=1e-12)
    # Constant ratio sigma_{i+1} / sigma_i = (a / b)^(1 / steps).
    np.testing.assert_allclose(sigmas[1:] / sigmas[:-1], (1e-5) ** (1 / steps), rtol=1e-12)


def test_schedule_is_jittable():
    schedule = VESchedule(1e-3, 1e2)
    np.testing.assert_allclose(jax.jit(schedule)(0.5), schedule(0.5), rtol=1e-14)
