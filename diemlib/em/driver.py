r"""Expectation-maximization for diffusion priors: DiEM (paper §3, Algorithm 1; docs/conventions.md,
'The DiEM loop').

Given observations $y_i = A_i x_i + \eta_i$, $\eta_i \sim \mathcal{N}(0, \Sigma_y)$, every lap $k$
1. **E-step**: draws one posterior sample $x_i \sim q_k(x \mid y_i, A_i)$ per observation with
   [`MMPSDenoiser`][] inside a sampler ([`posterior_samples`][]);
2. **M-step**: trains the denoiser on those samples with the denoising loss, warm-started from the
   previous lap, with a fresh Adam state ([`maximize`][]).
$q_0$ is a Gaussian fitted by the same EM with the analytic denoiser and a PPCA M-step
([`fit_gaussian`][]). The mean of each lap's samples (the PPCA mean) starts the next lap's sampler.

[`diem`][] runs it all in a run directory: every lap is checkpointed atomically, so a killed run
continues from its last finished lap and ends with the same result. Every key is
`fold_in(key, ...)` of one key (stage, lap, batch), never global state. In a multi-process run
(`distributed.py`) every process computes, but only process 0 reads and writes the run
directory; what it reads is broadcast to the others.
"""

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from ..compilation import compilations
from ..diffusion.denoiser import denoising_loss
from ..diffusion.gaussian import GaussianDenoiser
from ..diffusion.schedule import VESchedule
from ..inverse.operators import take
from ..linalg.dplr import DPLR
from ..linalg.ppca import ppca
from . import checkpoint, distributed
from .estep import EStep, posterior_samples, warn_if_diverged
from .mstep import MStep, maximize
from .sharding import replicate
from .training import make_train_step


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
    r"""Fits the initial Gaussian prior $q_0 = \mathcal{N}(\mu, \Sigma)$ by Monte-Carlo EM
    (docs/conventions.md, 'Initial Gaussian prior').

    Starts from $\mu = 0$, $\Sigma = I$; every iteration draws one posterior sample per
    observation with the analytic [`GaussianDenoiser`][] and MMPS (exact covariance), then fits
    [`ppca`][] of rank `rank` to the samples. `callback(i, mean, cov, info)` after iteration `i`.
    """
    d = math.prod(event_shape)
    mean, cov = replicate((jnp.zeros(event_shape, y.dtype), DPLR(jnp.ones(d, y.dtype), jnp.zeros((d, rank), y.dtype))))
    for i in range(iterations):
        prior = GaussianDenoiser(mean, cov)
        x, info = posterior_samples(
            jax.random.fold_in(key, i), prior, A, y, var_y, estep, event_shape=event_shape, mean=mean,
            desc=f"q0 iteration {i + 1}/{iterations}, E-step",
        )
        mean, cov = replicate(ppca(x, rank, key=jax.random.fold_in(key, iterations + i)))
        if callback is not None:
            callback(i, mean, cov, info)
    return mean, cov


class RunConflict(RuntimeError):
    """The run directory holds a run with other parameters."""


# Parameters that may change between invocations of the same run: more laps extend it.
_EXTENDABLE = ("laps",)


def _check_config(run_dir: Path, config: dict, overwrite: bool) -> None:
    """Process 0 checks and writes `config.json`; every process raises the same `RunConflict`."""
    conflict = None
    if distributed.is_main():
        try:
            _check_config_main(run_dir, config, overwrite)
        except RunConflict as error:
            conflict = str(error)
    conflict = distributed.broadcast_json(conflict)
    if conflict is not None:
        raise RunConflict(conflict)


def _load(path: Path, like, accept: Callable[[dict], bool] = lambda metadata: True):
    """`checkpoint.load(path, like)` as process 0 reads it, in every process; `None` if absent
    or if `accept(metadata)` is false."""
    found = checkpoint.load(path, like) if distributed.is_main() and path.exists() else None
    if found is not None and not accept(found[1]):
        found = None
    header = distributed.broadcast_json({"found": found is not None, "metadata": found and found[1]})
    if not header["found"]:
        return None
    return distributed.broadcast(like if found is None else found[0]), header["metadata"]


def _write_json(path: Path, obj) -> None:
    if distributed.is_main():
        checkpoint.atomic_write_json(path, obj)


def _save(path: Path, tree, metadata: dict) -> None:
    if distributed.is_main():
        checkpoint.save(path, tree, metadata=metadata)


def _check_config_main(run_dir: Path, config: dict, overwrite: bool) -> None:
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
    evaluate: Callable[[int, eqx.Module, Array, Array | None], dict] | None = None,
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
    - `evaluate`: `evaluate(lap, model, mean, samples) -> dict` of numbers added to the lap's
      metrics, after the lap's M-step (`samples`: its E-step's posterior samples); for $q_0$ it
      is called with lap $-1$, the Gaussian denoiser and `samples=None`. Its wall time is
      recorded as `eval_time`.
    - `config`: the run's parameters (JSON); a directory holding a run with other parameters is
      refused with [`RunConflict`][] unless `overwrite` (then it is cleared). `laps` may grow.
    - `log`: where progress lines go.

    **Returns:** `{"q0": {...}, "laps": [{...}, ...]}`, also written to `run_dir/metrics.json`.
    Each lap's entry counts the programs the lap built (`diemlib.compilation`): `compiles` by
    XLA, `cache_loads` from the persistent cache, `compile_time` in seconds; a lap that reuses
    the programs of the lap before builds none.

    **Raises:** `FloatingPointError` naming the lap and step of a non-finite loss; the last good
    checkpoint stays as it was.
    """
    run_dir = Path(run_dir)
    _check_config(run_dir, dict(config or {}), overwrite)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if distributed.is_main() and metrics_path.exists() else None
    metrics = distributed.broadcast_json(metrics) or {"q0": {}, "laps": []}

    d = math.prod(event_shape)
    q0_like = (jnp.zeros(event_shape, y.dtype), DPLR(jnp.zeros(d, y.dtype), jnp.zeros((d, gaussian_rank), y.dtype)))
    saved = _load(run_dir / "q0.eqx", q0_like)
    if saved is not None:
        q0_mean, q0_cov = replicate(saved[0])
    else:
        start = time.perf_counter()
        n = y.shape[0] if gaussian_observations is None else gaussian_observations
        history = []

        def report(i, mean, cov, info):
            history.append(info)
            log(f"q0 iteration {i + 1}/{gaussian_iterations}: residual {info['residual']:.2e}")

        q0_mean, q0_cov = fit_gaussian(
            jax.random.fold_in(key, 0), take(A, slice(0, n)), y[:n], var_y, gaussian_estep,
            event_shape=event_shape, rank=gaussian_rank, iterations=gaussian_iterations, callback=report,
        )
        metrics["q0"] = {"iterations": history, "time": time.perf_counter() - start}
        if evaluate is not None:
            start = time.perf_counter()
            metrics["q0"].update(evaluate(-1, GaussianDenoiser(q0_mean, q0_cov), q0_mean, None))  # lap -1: q0
            metrics["q0"]["eval_time"] = time.perf_counter() - start
        _write_json(metrics_path, metrics)  # first: q0.eqx marks q0 as done
        _save(run_dir / "q0.eqx", (q0_mean, q0_cov), metadata={})

    # The state after lap k: the model lap k + 1 starts from and samples with, and the mean of
    # lap k's samples. Before lap 0 the prior is q0 itself.
    state_like = (model, jnp.zeros(event_shape, y.dtype))
    saved = _load(run_dir / "state.eqx", state_like)
    if saved is not None:
        (model, mean), meta = saved
        first = meta["lap"] + 1
        log(f"resuming after lap {meta['lap']}")
    else:
        mean, first = q0_mean, 0
    model, mean = replicate((model, mean))
    metrics["laps"] = metrics["laps"][:first]
    step_fn = make_train_step(mstep.optimizer(), lambda m, x, k: denoising_loss(m, x, k, schedule), mstep.ema_decay)
    samples_like = jnp.zeros((y.shape[0] * estep.samples_per_observation, *event_shape), y.dtype)

    for lap in range(first, laps):
        built = compilations()  # the programs this lap compiles or loads, counted at its end
        lap_key = jax.random.fold_in(key, 1 + lap)
        prior = GaussianDenoiser(q0_mean, q0_cov) if lap == 0 else model
        start = time.perf_counter()
        estep_path = run_dir / "estep.eqx"
        saved = _load(estep_path, samples_like, accept=lambda metadata, lap=lap: metadata["lap"] == lap)
        if saved is not None:  # a resumed run: its warning, if any, again
            samples, info = saved[0], saved[1]["info"]
            warn_if_diverged(info["residual"], estep, f"lap {lap} E-step")
        else:
            samples, info = posterior_samples(
                jax.random.fold_in(lap_key, 0), prior, A, y, var_y, estep,
                event_shape=event_shape, mean=mean, prior_cov=q0_cov, desc=f"lap {lap} E-step",
            )
            _save(estep_path, samples, metadata={"lap": lap, "info": info})
        estep_time = time.perf_counter() - start

        start = time.perf_counter()
        try:
            model, losses = maximize(jax.random.fold_in(lap_key, 1), model, samples, mstep, step_fn, desc=f"lap {lap} M-step")
        except FloatingPointError as error:
            last = f"lap {lap - 1}" if lap > 0 else "q0"
            raise FloatingPointError(f"lap {lap}: {error}; the checkpoints of {last} are intact") from error
        model, mean = replicate((model, jnp.mean(samples, axis=0)))
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
            start = time.perf_counter()
            lap_metrics.update(evaluate(lap, model, mean, samples))
            lap_metrics["eval_time"] = time.perf_counter() - start
        built = compilations() - built  # a lap that reuses the previous lap's programs builds none
        lap_metrics.update(compiles=built.compiled, cache_loads=built.loaded, compile_time=built.seconds)
        metrics["laps"].append(lap_metrics)
        _write_json(metrics_path, metrics)  # first: state.eqx marks the lap as done
        _save(run_dir / "state.eqx", (model, mean), metadata={"lap": lap})
        log(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in lap_metrics.items()))
    return metrics


