r"""The evidence check: how well a prior explains the observations, without ground truth."""

import numpy as np
from jaxtyping import Array, PRNGKeyArray

from ..inverse.operators import simulate_observations, take
from .sinkhorn import sinkhorn_divergence


def evidence_divergence(key: PRNGKeyArray, x: Array, A, y: Array, var_y, **kwargs) -> float:
    r"""The evidence check: the Sinkhorn number between observed and simulated observations.

    Simulates $y'_i = A_{n+i} x'_i + \eta_i$ from prior samples $x'_1, \dots, x'_n$ and returns
    the [`sinkhorn_divergence`][] of $y'$ against $y_{1..n}$, debiased by $y_{n+1..2n}$ (needs $2n$
    observations). $y'$ and $y_{n+1..2n}$ share their operators, and both are independent of
    $y_{1..n}$, so the two costs compare like with like. It is the empirical-Bayes objective: small when
    $q(y \mid A) = \int p(y \mid x, A) q(x) dx$ matches the evidence.
    """
    n = x.shape[0]
    if y.shape[0] < 2 * n:
        raise ValueError(f"the evidence check of {n} samples needs {2 * n} observations, got {y.shape[0]}")
    simulated = simulate_observations(key, take(A, slice(n, 2 * n)), x, var_y)
    flat = lambda v: np.asarray(v).reshape(v.shape[0], -1)
    return sinkhorn_divergence(flat(y[:n]), flat(y[n : 2 * n]), flat(simulated), **kwargs)
