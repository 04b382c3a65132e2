r"""The E-step of DiEM (Algorithm 1): posterior samples $x_i \sim q_k(x \mid y_i, A_i)$ for every observation.

Each sample is drawn by a diffusion sampler run on the MMPS posterior denoiser (§4), batch by
batch, each batch sharded over every device. The same machinery draws unconditional samples of
a prior (for evaluation). Batch $b$ uses the key `fold_in(key, b)`: results do not depend on the
number of devices.
"""

import math
import warnings
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, PRNGKeyArray

from ..diffusion.samplers import Sampler
from ..inverse.mmps import MMPSDenoiser, covariance
from ..inverse.operators import take
from ..linalg.dplr import DPLR
from ..progress import counting
from .distributed import gather
from .sharding import replicate, shard_batch


class EStep(eqx.Module):
    """How posterior samples are drawn: MMPS inside a sampler.

    **Arguments:**

    - `sampler`: e.g. `PC(schedule, 4096)`.
    - `solver`: the MMPS solver, e.g. `CG(3)`.
    - `cov`: the covariance choice by name (docs/conventions.md, 'Covariance choices'); `prior` uses
      $q_0$'s covariance.
    - `scope`: `"sample"` (per-sample solves), `"batch"` (the reference's global CG) or a group
      size g (one system per g consecutive observations; see [`MMPSDenoiser`][]).
    - `batch_size`: observations per batch (a multiple of the number of devices).
    - `samples_per_observation`: posterior samples per observation (fastMRI: 2).
    - `bound`: if set, samples outside $(-\text{bound}, \text{bound})^d$ are discarded (the
      reference does so for the manifold with 3): each is replaced by a valid sample drawn at
      random, so the M-step, which draws its batches with replacement, sees the valid ones only.
    """

    sampler: Sampler
    solver: lx.AbstractLinearSolver
    cov: str = eqx.field(static=True, default="tweedie")
    scope: Literal["sample", "batch"] | int = eqx.field(static=True, default="sample")
    batch_size: int = eqx.field(static=True, default=1024)
    samples_per_observation: int = eqx.field(static=True, default=1)
    bound: float | None = eqx.field(static=True, default=None)


@eqx.filter_jit
def _sample_batch(key, denoiser, A, y, var_y, estep, cov, mean, event_shape):
    posterior = MMPSDenoiser(denoiser, A, y, var_y, cov, estep.solver, estep.scope)
    shape = (y.shape[0], *event_shape)
    return estep.sampler(posterior, shape, key, mean=mean, dtype=y.dtype, return_info=True)


def posterior_samples(
    key: PRNGKeyArray,
    denoiser: Callable,
    A,
    y: Array,
    var_y,
    estep: EStep,
    *,
    event_shape: tuple[int, ...],
    mean=0.0,
    prior_cov: DPLR | None = None,
    desc: str = "E-step",
) -> tuple[Array, dict]:
    r"""The E-step: `samples_per_observation` samples $x \sim q(x \mid y_i, A_i)$ for every $i$.

    Observations are processed `estep.batch_size` at a time, each batch sharded over all devices;
    batch $b$ uses the key `fold_in(key, b)`. The last batch is padded with repeated observations
    (dropped from the samples, counted in the averaged diagnostics); with `scope="batch"` the
    padding rows also enter that batch's shared CG coefficients. A progress bar labelled `desc`
    counts sampler steps over all batches.

    **Returns:** samples of shape `(N * samples_per_observation, *event_shape)` (the samples of
    observation $i$ are rows $iS, \dots, iS + S - 1$) and the solver diagnostics averaged over
    steps and samples (`residual`, `iterations`).
    """
    repeats = estep.samples_per_observation
    index = jnp.repeat(jnp.arange(y.shape[0]), repeats)
    total, size = index.size, estep.batch_size
    batches = math.ceil(total / size)
    index = jnp.resize(index, batches * size)  # pad the last batch (cyclically: any N)
    samples, infos = [], []
    # The covariance, not `prior_cov`, enters the program: only `prior` holds it, so calls with
    # and without it share one compilation. Several processes: what every batch shares, on
    # every device of every process, once.
    denoiser, var_y, cov, mean = replicate((denoiser, var_y, covariance(estep.cov, prior_cov), mean))
    with counting(batches * estep.sampler.steps, desc) as bar:
        for b in range(batches):
            bar.set_postfix_str(f"batch {b + 1}/{batches}", refresh=False)
            rows = index[b * size : (b + 1) * size]
            A_b, y_b = shard_batch((take(A, rows), y[rows]))
            x, info = _sample_batch(
                replicate(jax.random.fold_in(key, b)), denoiser, A_b, y_b, var_y, estep, cov, mean, event_shape
            )
            samples.append(x)
            infos.append(info)
        jax.block_until_ready(samples)
        samples, infos = gather((samples, infos))  # several processes: every one gets every sample
    info = {name: float(jnp.mean(jnp.stack([i[name] for i in infos]))) for name in infos[0]}
    warn_if_diverged(info["residual"], estep, desc)
    samples = jnp.concatenate(samples)[:total]
    if estep.bound is not None:
        samples, info["discarded"] = discard_outside(jax.random.fold_in(key, batches), samples, estep.bound)
    return samples, info


class SolverDivergenceWarning(RuntimeWarning):
    """The MMPS linear solve of an E-step diverged: its relative residual grew above 1."""


def warn_if_diverged(residual: float, estep: EStep, where: str) -> bool:
    r"""Warns with [`SolverDivergenceWarning`][] when the E-step's mean relative residual
    $\|b - M v\| / \|b\|$ exceeds 1 (or is not finite); returns whether it did.

    From $v_0 = 0$ the residual starts at 1, so above 1 the solve made $v$ worse than no
    correction at all: the posterior samples are then not samples of the posterior, and an M-step
    trained on them teaches the prior noise. It happens with CG when $\Sigma_y + A V A^\top$ is
    not positive definite, which Tweedie's covariance $\sigma^2 \nabla \hat{x}$ does not
    guarantee for a network, least of all a barely trained one (the paper, §4, notes the
    Jacobian's asymmetry). The message names the remedies.
    """
    if residual <= 1:
        return False
    name = type(estep.solver).__name__
    remedy = (
        "GMRES (solver 'gmres') handles the non-symmetric, indefinite systems a young network gives"
        if "GMRES" not in name
        else "more solver iterations"
    )
    if estep.cov == "tweedie":
        remedy += "; or the 'sigma' covariance until the network has trained a lap or two"
    warnings.warn(
        f"{where}: the MMPS solve diverged ({name}, {getattr(estep.solver, 'max_steps', '?')} iterations, "
        f"'{estep.cov}' covariance): mean relative residual {residual:.3g} > 1, so these posterior samples "
        f"are not trustworthy. Remedy: {remedy}.",
        SolverDivergenceWarning,
        stacklevel=3,
    )
    return True


def discard_outside(key: PRNGKeyArray, samples: Array, bound: float) -> tuple[Array, float]:
    """Replaces the samples outside $(-\text{bound}, \text{bound})^d$ by valid ones drawn at random.

    **Returns:** the samples and the fraction replaced.
    """
    flat = samples.reshape(samples.shape[0], -1)
    valid = jnp.all(jnp.abs(flat) < bound, axis=1)
    if not jnp.any(valid):
        raise FloatingPointError(f"every posterior sample lies outside (-{bound}, {bound})^d")
    donors = jax.random.choice(key, samples.shape[0], (samples.shape[0],), p=valid / jnp.sum(valid))
    kept = jnp.where(valid.reshape((-1,) + (1,) * (samples.ndim - 1)), samples, samples[donors])
    return kept, float(1 - jnp.mean(valid))


def prior_samples(
    key: PRNGKeyArray, model, sampler: Sampler, count: int, *, event_shape, mean=0.0, batch_size=None,
    desc: str = "prior samples",
) -> Array:
    """Unconditional samples of a denoiser's prior, `batch_size` at a time (batch `b`: `fold_in(key, b)`).

    A progress bar labelled `desc` counts sampler steps over all batches.
    """
    batch_size = batch_size or count
    shape = (batch_size, *event_shape)
    n = math.ceil(count / batch_size)
    with counting(n * sampler.steps, desc):
        batches = [_prior_batch(jax.random.fold_in(key, b), model, sampler, mean, shape) for b in range(n)]
        jax.block_until_ready(batches)
    return jnp.concatenate(batches)[:count]


@eqx.filter_jit
def _prior_batch(key, model, sampler, mean, shape):
    return sampler(model, shape, key, mean=mean)
