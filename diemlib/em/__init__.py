"""Expectation-maximization (paper §3, Algorithm 1): E-step, M-step, the DiEM driver.

`checkpoint`, `sharding` and `training` are the run machinery the driver builds on.
"""

from .driver import RunConflict, diem, fit_gaussian
from .estep import EStep, SolverDivergenceWarning, discard_outside, posterior_samples, prior_samples, warn_if_diverged
from .mstep import MStep, maximize

__all__ = [
    "EStep", "MStep", "RunConflict", "SolverDivergenceWarning", "diem", "discard_outside", "fit_gaussian",
    "maximize", "posterior_samples", "prior_samples", "warn_if_diverged",
]
