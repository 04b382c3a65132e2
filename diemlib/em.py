r"""Expectation-maximization for diffusion priors: DiEM (Algorithm 1, method.md §4).

Given observations $y_i = A_i x_i + \eta_i$, $\eta_i \sim \mathcal{N}(0, \Sigma_y)$, every lap $k$
1. **E-step**: draws one posterior sample $x_i \sim q_k(x \mid y_i, A_i)$ per observation with
   [`MMPS`][] inside a sampler ([`posterior_samples`][]);
2. **M-step**: trains the denoiser on those samples with the denoising loss, warm-started from the
   previous lap, with a fresh Adam state ([`maximize`][]).
$q_0$ is a Gaussian fitted by the same EM with the analytic denoiser and a PPCA M-step
([`fit_gaussian`][]). The mean of each lap's samples (the PPCA mean) starts the next lap's sampler.

[`diem`][] runs it all in a run directory: every lap is checkpointed atomically, so a killed run
continues from its last finished lap and ends with the same result. Every key is
`fold_in(key, ...)` of one key (stage, lap, batch), never global state.
"""

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, PRNGKeyArray

from . import checkpoint
from .denoiser import denoising_loss
from .gaussian import DPLR, GaussianDenoiser
from .mmps import MMPS, covariance
from .operators import apply
from .ppca import ppca
from .samplers import Sampler
from .schedule import VESchedule
from .sinkhorn import sinkhorn_divergence
from .sharding import batch_sharding, shard_batch
from .training import TrainState, fit, make_train_step, optimizer


class EStep(eqx.Module):
    """How posterior samples are drawn: MMPS inside a sampler.

    **Arguments:**

    - `sampler`: e.g. `PC(schedule, 4096)`.
    - `solver`: the MMPS solver, e.g. `CG(3)`.
    - `cov`: the covariance choice by name (method.md §3.4); `prior` uses $q_0$'s covariance.
    - `scope`: `"sample"` (per-sample solves) or `"batch"` (the reference's global CG).
    - `batch_size`: observations per batch (a multiple of the number of devices).
    - `samples_per_observation`: posterior samples per observation (fastMRI: 2).
    - `bound`: if set, samples outside $(-\text{bound}, \text{bound})^d$ are discarded (the
      reference does so for the manifold with 3): each is replaced by a valid sample drawn at
      random, so the M-step, which draws its batches with replacement, sees the valid ones only.
    """

    sampler: Sampler
    solver: lx.AbstractLinearSolver
    cov: str = eqx.field(static=True, default="tweedie")
    scope: Literal["sample", "batch"] = eqx.field(static=True, default="sample")
    batch_size: int = eqx.field(static=True, default=1024)
    samples_per_observation: int = eqx.field(static=True, default=1)
    bound: float | None = eqx.field(static=True, default=None)


class MStep(eqx.Module):
    """How the denoiser is trained on posterior samples (method.md §1.2, §4.4).

    **Arguments:**

    - `steps`, `batch_size`: Adam steps per lap and examples per step (drawn with replacement).
    - `learning_rate`, `schedule`, `final_learning_rate`, `clip`: see [`optimizer`][].
    - `ema_decay`: EMA of the weights (`None`: no EMA). With EMA, the next lap starts from
      and samples with the EMA weights.
    - `augment`: `augment(key, batch) -> batch` (flips, translations) or `None`.
    """

    steps: int = eqx.field(static=True)
    batch_size: int = eqx.field(static=True)
    learning_rate: float = eqx.field(static=True)
    schedule: Literal["constant", "linear"] = eqx.field(static=True, default="constant")
    final_learning_rate: float = eqx.field(static=True, default=1e-6)
    clip: float = eqx.field(static=True, default=1.0)
    ema_decay: float | None = eqx.field(static=True, default=None)
    augment: Callable | None = eqx.field(static=True, default=None)

    def optimizer(self):
        return optimizer(
            self.learning_rate,
            steps=self.steps,
            schedule=self.schedule,
            final_learning_rate=self.final_learning_rate,
            clip=self.clip,
        )


@eqx.filter_jit
def _sample_batch(key, denoiser, A, y, var_y, estep, prior_cov, mean, event_shape):
    posterior = MMPS(denoiser, A, y, var_y, covariance(estep.cov, prior_cov), estep.solver, estep.scope)
    shape = (y.shape[0], *event_shape)
    return estep.sampler(posterior, shape, key, mean=mean, dtype=y.dtype, return_info=True)


def _take(tree, index):
    return jax.tree.map(lambda leaf: leaf[index], tree)


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
    progress: Callable[[str], None] | None = None,
) -> tuple[Array, dict]:
    r"""The E-step: `samples_per_observation` samples $x \sim q(x \mid y_i, A_i)$ for every $i$.

    Observations are processed `estep.batch_size` at a time, each batch sharded over all devices;
    batch $b$ uses the key `fold_in(key, b)`. The last batch is padded with repeated observations
    (dropped from the samples, counted in the averaged diagnostics); with `scope="batch"` the
    padding rows also enter that batch's shared CG coefficients.

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
    for b in range(batches):
        rows = index[b * size : (b + 1) * size]
        A_b, y_b = shard_batch((_take(A, rows), y[rows]))
        x, info = _sample_batch(
            jax.random.fold_in(key, b), denoiser, A_b, y_b, var_y, estep, prior_cov, mean, event_shape
        )
        samples.append(x)
        infos.append(info)
        if progress is not None:
            progress(f"E-step batch {b + 1}/{batches}")
    info = {name: float(jnp.mean(jnp.stack([i[name] for i in infos]))) for name in infos[0]}
    samples = jnp.concatenate(samples)[:total]
    if estep.bound is not None:
        samples, info["discarded"] = discard_outside(jax.random.fold_in(key, batches), samples, estep.bound)
    return samples, info


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


def fit_gaussian(
    key: PRNGKeyArray,
    A,
    y: Array,
    var_y,
    estep: EStep,
    *,
    event_shape: tuple[int, ...],
    rank: int,
    iterations: int = 16,
    callback: Callable[[int, Array, DPLR, dict], None] | None = None,
) -> tuple[Array, DPLR]:
    r"""Fits the initial Gaussian prior $q_0 = \mathcal{N}(\mu, \Sigma)$ by Monte-Carlo EM (method.md §4.2).

    Starts from $\mu = 0$, $\Sigma = I$; every iteration draws one posterior sample per
    observation with the analytic [`GaussianDenoiser`][] and MMPS (exact covariance), then fits
    [`ppca`][] of rank `rank` to the samples. `callback(i, mean, cov, info)` after iteration `i`.
    """
    d = math.prod(event_shape)
    mean = jnp.zeros(event_shape, y.dtype)
    cov = DPLR(jnp.ones(d, y.dtype), jnp.zeros((d, rank), y.dtype))
    for i in range(iterations):
        prior = GaussianDenoiser(mean, cov)
        x, info = posterior_samples(
            jax.random.fold_in(key, i), prior, A, y, var_y, estep, event_shape=event_shape, mean=mean
        )
        mean, cov = ppca(x, rank, key=jax.random.fold_in(key, iterations + i))
        if callback is not None:
            callback(i, mean, cov, info)
    return mean, cov


def maximize(
    key: PRNGKeyArray, model, samples: Array, mstep: MStep, step_fn
) -> tuple[eqx.Module, Array]:
    r"""The M-step: `mstep.steps` Adam steps on the denoising loss over `samples`, Adam state fresh.

    **Returns:** the model the next lap starts from (the EMA weights if `mstep.ema_decay`, else
    the raw weights) and the loss of every step.
    """
    state = TrainState.create(model, mstep.optimizer(), ema=mstep.ema_decay is not None)
    state, losses = fit(
        state,
        samples,
        key,
        steps=mstep.steps,
        batch_size=mstep.batch_size,
        step_fn=step_fn,
        augment=mstep.augment,
        sharding=batch_sharding(),
    )
    return (state.model if state.ema is None else state.ema), losses


def prior_samples(
    key: PRNGKeyArray, model, sampler: Sampler, count: int, *, event_shape, mean=0.0, batch_size=None
) -> Array:
    """Unconditional samples of a denoiser's prior, `batch_size` at a time (batch `b`: `fold_in(key, b)`)."""
    batch_size = batch_size or count
    shape = (batch_size, *event_shape)
    batches = [
        _prior_batch(jax.random.fold_in(key, b), model, sampler, mean, shape)
        for b in range(math.ceil(count / batch_size))
    ]
    return jnp.concatenate(batches)[:count]


@eqx.filter_jit
def _prior_batch(key, model, sampler, mean, shape):
    return sampler(model, shape, key, mean=mean)


class RunConflict(RuntimeError):
    """The run directory holds a run with other parameters."""


# Parameters that may change between invocations of the same run: more laps extend it.
_EXTENDABLE = ("laps",)


def _check_config(run_dir: Path, config: dict, overwrite: bool) -> None:
    path = run_dir / "config.json"
    config = json.loads(json.dumps(config))  # compare what config.json will hold (tuples -> lists)
    if path.exists():
        old = json.loads(path.read_text())
        differ = sorted(k for k in set(old) | set(config) if k not in _EXTENDABLE and old.get(k) != config.get(k))
        if differ and not overwrite:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in differ)
            raise RunConflict(
                f"{run_dir} holds a run with other parameters ({details}); "
                "choose another output directory or pass overwrite=True to start afresh"
            )
        if differ:
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_json(path, config)


def diem(
    run_dir: str | Path,
    key: PRNGKeyArray,
    *,
    model: eqx.Module,
    A,
    y: Array,
    var_y,
    event_shape: tuple[int, ...],
    schedule: VESchedule,
    gaussian_estep: EStep,
    gaussian_observations: int | None = None,
    gaussian_rank: int,
    gaussian_iterations: int = 16,
    estep: EStep,
    mstep: MStep,
    laps: int,
    evaluate: Callable[[int, eqx.Module, Array], dict] | None = None,
    config: dict | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    r"""Runs DiEM in `run_dir`, resuming from its checkpoints; returns the metrics.

    **Arguments:**

    - `run_dir`: where checkpoints (`q0.eqx`, `estep.eqx`, `state.eqx`), `config.json` and
      `metrics.json` live.
    - `key`: the run's key; stage keys are `fold_in(key, 0)` ($q_0$) and `fold_in(key, 1 + lap)`.
    - `model`: a freshly initialised [`Denoiser`][] (lap 0 trains it from scratch; its structure
      is also what checkpoints are loaded into).
    - `A`, `y`, `var_y`, `event_shape`: the observations, their operators (batched), the diagonal
      of $\Sigma_y$ and the shape of one latent.
    - `schedule`: the noise schedule of the denoising loss.
    - `gaussian_estep`, `gaussian_observations`, `gaussian_rank`, `gaussian_iterations`: the
      $q_0$ fit (on the first `gaussian_observations` observations; all by default).
    - `estep`, `mstep`, `laps`: the E-step, M-step and the number of laps.
    - `evaluate`: `evaluate(lap, model, mean) -> dict` of numbers added to the lap's metrics.
    - `config`: the run's parameters (JSON); a directory holding a run with other parameters is
      refused with [`RunConflict`][] unless `overwrite` (then it is cleared). `laps` may grow.
    - `log`: where progress lines go.

    **Returns:** `{"q0": {...}, "laps": [{...}, ...]}`, also written to `run_dir/metrics.json`.

    **Raises:** `FloatingPointError` naming the lap and step of a non-finite loss; the last good
    checkpoint stays as it was.
    """
    run_dir = Path(run_dir)
    _check_config(run_dir, dict(config or {}), overwrite)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {"q0": {}, "laps": []}

    d = math.prod(event_shape)
    q0_like = (jnp.zeros(event_shape, y.dtype), DPLR(jnp.zeros(d, y.dtype), jnp.zeros((d, gaussian_rank), y.dtype)))
    if (run_dir / "q0.eqx").exists():
        (q0_mean, q0_cov), _ = checkpoint.load(run_dir / "q0.eqx", q0_like)
    else:
        start = time.perf_counter()
        n = y.shape[0] if gaussian_observations is None else gaussian_observations
        history = []

        def report(i, mean, cov, info):
            history.append(info)
            log(f"q0 iteration {i + 1}/{gaussian_iterations}: residual {info['residual']:.2e}")

        q0_mean, q0_cov = fit_gaussian(
            jax.random.fold_in(key, 0), _take(A, slice(0, n)), y[:n], var_y, gaussian_estep,
            event_shape=event_shape, rank=gaussian_rank, iterations=gaussian_iterations, callback=report,
        )
        metrics["q0"] = {"iterations": history, "time": time.perf_counter() - start}
        if evaluate is not None:
            metrics["q0"].update(evaluate(-1, GaussianDenoiser(q0_mean, q0_cov), q0_mean))  # lap -1: q0
        checkpoint.atomic_write_json(metrics_path, metrics)  # first: q0.eqx marks q0 as done
        checkpoint.save(run_dir / "q0.eqx", (q0_mean, q0_cov), metadata={})

    # The state after lap k: the model lap k + 1 starts from and samples with, and the mean of
    # lap k's samples. Before lap 0 the prior is q0 itself.
    state_like = (model, jnp.zeros(event_shape, y.dtype))
    if (run_dir / "state.eqx").exists():
        (model, mean), meta = checkpoint.load(run_dir / "state.eqx", state_like)
        first = meta["lap"] + 1
        log(f"resuming after lap {meta['lap']}")
    else:
        mean, first = q0_mean, 0
    metrics["laps"] = metrics["laps"][:first]
    step_fn = make_train_step(mstep.optimizer(), lambda m, x, k: denoising_loss(m, x, k, schedule), mstep.ema_decay)
    samples_like = jnp.zeros((y.shape[0] * estep.samples_per_observation, *event_shape), y.dtype)

    for lap in range(first, laps):
        lap_key = jax.random.fold_in(key, 1 + lap)
        prior = GaussianDenoiser(q0_mean, q0_cov) if lap == 0 else model
        start = time.perf_counter()
        estep_path = run_dir / "estep.eqx"
        saved = checkpoint.load(estep_path, samples_like) if estep_path.exists() else None
        if saved is not None and saved[1]["lap"] == lap:
            samples, info = saved[0], saved[1]["info"]
        else:
            samples, info = posterior_samples(
                jax.random.fold_in(lap_key, 0), prior, A, y, var_y, estep,
                event_shape=event_shape, mean=mean, prior_cov=q0_cov,
            )
            checkpoint.save(estep_path, samples, metadata={"lap": lap, "info": info})
        estep_time = time.perf_counter() - start

        start = time.perf_counter()
        try:
            model, losses = maximize(jax.random.fold_in(lap_key, 1), model, samples, mstep, step_fn)
        except FloatingPointError as error:
            last = f"lap {lap - 1}" if lap > 0 else "q0"
            raise FloatingPointError(f"lap {lap}: {error}; the checkpoints of {last} are intact") from error
        mean = jnp.mean(samples, axis=0)
        mstep_time = time.perf_counter() - start

        tail = losses[-max(1, len(losses) // 10) :]
        lap_metrics = {
            "lap": lap,
            "loss": float(jnp.mean(tail)),
            **info,  # E-step diagnostics: residual, iterations (and discarded)
            "estep_time": estep_time,
            "mstep_time": mstep_time,
        }
        if evaluate is not None:
            lap_metrics.update(evaluate(lap, model, mean))
        metrics["laps"].append(lap_metrics)
        checkpoint.atomic_write_json(metrics_path, metrics)  # first: state.eqx marks the lap as done
        checkpoint.save(run_dir / "state.eqx", (model, mean), metadata={"lap": lap})
        log(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in lap_metrics.items()))
    return metrics


def simulate_observations(key: PRNGKeyArray, A, x: Array, var_y) -> Array:
    r"""$y = A_i x_i + \eta_i$, $\eta_i \sim \mathcal{N}(0, \Sigma_y)$, for a batch of operators and latents."""
    y = apply(A, x)
    return y + jnp.sqrt(jnp.asarray(var_y, y.dtype)) * jax.random.normal(key, y.shape, y.dtype)


def evidence_divergence(key: PRNGKeyArray, x: Array, A, y: Array, var_y, **kwargs) -> float:
    r"""The evidence check: how well a prior explains the observations, without ground truth.

    Simulates $y'_i = A_{n+i} x'_i + \eta_i$ from prior samples $x'_1, \dots, x'_n$ and returns
    the [`sinkhorn_divergence`][] of $y'$ against $y_{1..n}$, debiased by $y_{n+1..2n}$ (needs $2n$
    observations). $y'$ and $y_{n+1..2n}$ share their operators, and both are independent of
    $y_{1..n}$, so the two costs compare like with like. It is the empirical-Bayes objective: small when
    $q(y \mid A) = \int p(y \mid x, A) q(x) dx$ matches the evidence.
    """
    n = x.shape[0]
    if y.shape[0] < 2 * n:
        raise ValueError(f"the evidence check of {n} samples needs {2 * n} observations, got {y.shape[0]}")
    simulated = simulate_observations(key, _take(A, slice(n, 2 * n)), x, var_y)
    flat = lambda v: np.asarray(v).reshape(v.shape[0], -1)
    return sinkhorn_divergence(flat(y[:n]), flat(y[n : 2 * n]), flat(simulated), **kwargs)
