"""The DiEM driver `diemlib.em` (paper §3, Algorithm 1; docs/conventions.md, 'The DiEM loop'): the Gaussian q0 fit, the E-step, and `diem` runs.

`fit_gaussian` is checked on Gaussian latents (fully observed: it returns the latents' sample
moments; partially observed: it recovers the true covariance). The E-step's batch scope is checked
against the per-sample scope and the exact posterior, and its one-iteration CG step size by hand;
`prior_samples` against the prior's moments and its per-batch keys; the evidence check on a true
and two wrong priors; `maximize` returns the EMA weights when there is an EMA. `diem` runs on the
tiny problem of `tests/tiny_em.py` (d = 3, N = 256): it is reproducible, resumes (in-process,
after an interrupted M-step, after a kill between `metrics.json` and `state.eqx` or `q0.eqx`, and
at the notebook's `ci` profile after a real SIGKILL) to the result of an uninterrupted run, fits
q0 on the first `gaussian_observations` only, starts every lap from the previous lap's (EMA)
weights, refuses a directory holding a run with other parameters, reports a non-finite loss
without touching the last checkpoint, and gives the same numbers on one or two (simulated) devices.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diemlib.em import checkpoint
from diemlib import em
from diemlib.inverse import operators
from diemlib.inverse.operators import simulate_observations
from diemlib.linalg import solvers
from diemlib.diffusion.denoiser import denoising_loss
from diemlib.diffusion.gaussian import GaussianDenoiser
from diemlib.linalg.dplr import DPLR
from diemlib.diffusion.samplers import DDIM, DDPM
from diemlib.diffusion.schedule import VESchedule
from diemlib.em.training import TrainState, fit, make_train_step
from diemlib.eval.evidence import evidence_divergence
from diemlib.eval.sinkhorn import sinkhorn_divergence

import tiny_em
from tiny_em import without_times

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = VESchedule(1e-3, 10.0)
FILES = ("config.json", "metrics.json", "q0.eqx", "estep.eqx", "state.eqx")

# Gaussian latents x ~ N(mu, L L^T) in R^3.
MU = jnp.array([1.0, -2.0, 0.5])
L = jnp.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [-0.5, 0.3, 0.4]])
SIGMA = L @ L.T


def gaussian_latents(key, n):
    return MU + jax.random.normal(key, (n, 3)) @ L.T


def snapshot(directory: Path) -> dict:
    """Every file under `directory` (names relative to it) with its bytes."""
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def header(path: Path) -> dict:
    """The metadata of a checkpoint file (its first line)."""
    with path.open("rb") as f:
        return json.loads(f.readline())["metadata"]


# --- fit_gaussian ---------------------------------------------------------------------------


def test_fit_gaussian_fully_observed_matches_sample_moments():
    """A = I and var_y tiny: every posterior sample is its observation, so PPCA of full rank
    returns the latents' sample mean and (biased) sample covariance."""
    n, var_y = 1024, 1e-8
    x = gaussian_latents(jax.random.key(0), n)
    A = operators.broadcast(operators.Matrix(jnp.eye(3)), n)
    y = simulate_observations(jax.random.key(1), A, x, var_y)
    estep = em.EStep(DDIM(SCHEDULE, 32), solvers.CG(3), batch_size=512)
    calls = []
    mean, cov = em.fit_gaussian(
        jax.random.key(2), A, y, var_y, estep, event_shape=(3,), rank=3, iterations=3,
        callback=lambda i, m, c, info: calls.append((i, info)),
    )
    assert [i for i, _ in calls] == [0, 1, 2]
    assert all(set(info) == {"residual", "iterations"} for _, info in calls)
    assert isinstance(cov, DPLR) and cov.u.shape == (3, 3)
    np.testing.assert_allclose(mean, x.mean(0), atol=1e-4)
    np.testing.assert_allclose(cov.dense(), np.cov(x, rowvar=False, bias=True), atol=1e-4)


def test_fit_gaussian_partially_observed_recovers_covariance():
    """Random 2 x 3 projections of 4096 latents: Monte-Carlo EM from N(0, I) moves the fit to the
    true N(mu, Sigma): the relative Frobenius error of Sigma drops from 0.72 (the identity) to
    below 0.1 (measured: about 0.02 after 10 iterations, with sampling noise of about 0.02)."""
    n, var_y = 4096, 1e-4
    x = gaussian_latents(jax.random.key(0), n)
    A = jax.vmap(lambda k: operators.random_projection(k, 2, 3))(jax.random.split(jax.random.key(3), n))
    y = simulate_observations(jax.random.key(1), A, x, var_y)
    estep = em.EStep(DDPM(SCHEDULE, 32), solvers.CG(2), batch_size=2048)
    error = lambda c: float(jnp.linalg.norm(c - SIGMA) / jnp.linalg.norm(SIGMA))
    history = []
    mean, cov = em.fit_gaussian(
        jax.random.key(2), A, y, var_y, estep, event_shape=(3,), rank=3, iterations=10,
        callback=lambda i, m, c, info: history.append(error(c.dense())),
    )
    initial = error(jnp.eye(3))
    assert initial > 0.7
    assert error(cov.dense()) < 0.1, history
    assert error(cov.dense()) < initial / 7, history
    assert history[0] > 2 * history[-1], history  # EM improves over its iterations
    # The EM fixed point is the latents' sample mean (measured distance 0.01; 0.78 after the first
    # iteration); the sample mean itself is 0.054 from MU (Monte-Carlo error, about 0.025 per sqrt(tr S / n)).
    assert float(jnp.linalg.norm(mean - x.mean(0))) < 0.05
    assert float(jnp.linalg.norm(mean - MU)) < 0.1


# --- posterior_samples ----------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [4, 8], ids=["divides", "padded"])
def test_posterior_samples_rows(batch_size):
    """N = 10 observations, S = 2 samples each, batches of 4 (20 rows: 5 full batches) or 8
    (3 batches, the last padded). Only the first two coordinates are observed, with tiny noise:
    rows iS..iS+S-1 match observation i there, and the S draws differ in the third coordinate."""
    n, s, var_y = 10, 2, 1e-8
    x = gaussian_latents(jax.random.key(0), n)
    A = operators.broadcast(operators.Matrix(jnp.eye(3)[:2]), n)
    y = simulate_observations(jax.random.key(1), A, x, var_y)
    estep = em.EStep(DDIM(SCHEDULE, 16), solvers.CG(2), batch_size=batch_size, samples_per_observation=s)
    prior = GaussianDenoiser(MU, DPLR(jnp.zeros(3), L))
    samples, info = em.posterior_samples(
        jax.random.key(2), prior, A, y, var_y, estep, event_shape=(3,), mean=MU
    )
    assert samples.shape == (n * s, 3)
    assert bool(jnp.all(jnp.isfinite(samples)))
    assert set(info) == {"residual", "iterations"}
    assert all(isinstance(v, float) and np.isfinite(v) for v in info.values())
    assert info["iterations"] == 2.0
    np.testing.assert_allclose(samples[:, :2], jnp.repeat(y, s, axis=0), atol=1e-3)
    pairs = samples.reshape(n, s, 3)
    assert bool(jnp.all(jnp.abs(pairs[:, 0, 2] - pairs[:, 1, 2]) > 1e-6))


def test_posterior_samples_every_batch_is_full():
    """Every batch has `batch_size` rows (a multiple of the device count), even when N * S is
    less than half a batch: N = 3, batch 8 gives a batch of 6 rows, which does not split over
    4 devices. Fix: `index = jnp.resize(index, batches * size)` instead of the concatenate."""
    n = 3
    A = operators.broadcast(operators.Matrix(jnp.eye(3)), n)
    y = jnp.zeros((n, 3))
    estep = em.EStep(DDIM(SCHEDULE, 4), solvers.CG(3), batch_size=8)
    prior = GaussianDenoiser(jnp.zeros(3), DPLR(jnp.ones(3), jnp.zeros((3, 3))))
    sizes = []
    original = em.estep._sample_batch

    def recording(key, denoiser, A, y, *args):
        sizes.append(y.shape[0])
        return original(key, denoiser, A, y, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(em.estep, "_sample_batch", recording)
        samples, _ = em.posterior_samples(jax.random.key(0), prior, A, y, 1e-4, estep, event_shape=(3,))
    assert samples.shape == (n, 3)
    assert sizes == [8]


def gaussian_posterior(A, y, var_y):
    """Mean and covariance of x | y for x ~ N(MU, SIGMA), y = A x + N(0, var_y I) (dense numpy)."""
    A, y, sigma, mu = np.asarray(A), np.asarray(y), np.asarray(SIGMA), np.asarray(MU)
    gain = sigma @ A.T @ np.linalg.inv(A @ sigma @ A.T + var_y * np.eye(A.shape[0]))
    return mu + gain @ (y - A @ mu), sigma - gain @ A @ sigma


def projections(key, n):
    return jax.vmap(lambda k: operators.random_projection(k, 2, 3))(jax.random.split(key, n))


def test_batch_scope_with_an_exact_solve_samples_the_per_sample_posterior():
    """N = 512 distinct observations (2 x 3 projections) of the Gaussian prior N(MU, SIGMA), one
    sample each, batches of 256. The batch scope solves one 512 x 512 system per batch (CG to a
    relative residual of 1e-12, about 36 iterations), the per-sample scope 2 x 2 systems (CG(2) is
    exact): with the same key the samples agree, and whitened by each observation's exact
    posterior they are N(0, I): mean within 5 / sqrt(N), covariance within 6 sqrt(2 / N) (DDPM's
    discretisation shrinks the variance by a few % at 256 steps; by 35 % at 32 steps)."""
    n, var_y = 512, 0.1
    A = projections(jax.random.key(3), n)
    y = simulate_observations(jax.random.key(1), A, gaussian_latents(jax.random.key(0), n), var_y)
    prior = GaussianDenoiser(MU, DPLR(jnp.zeros(3), L))
    sampler = DDPM(VESchedule(1e-3, 1e2), 256)
    sample = em.EStep(sampler, solvers.CG(2), scope="sample", batch_size=256)
    batch = em.EStep(sampler, solvers.CG(1000, rtol=1e-12), scope="batch", batch_size=256)
    run = lambda estep: em.posterior_samples(jax.random.key(2), prior, A, y, var_y, estep, event_shape=(3,), mean=MU)
    (x_sample, _), (x_batch, info) = run(sample), run(batch)
    assert info["residual"] <= 1e-12 and 2 < info["iterations"] < 1000  # a real global solve
    np.testing.assert_allclose(x_batch, x_sample, rtol=0, atol=1e-7)
    w = []
    for a, yi, xi in zip(np.asarray(A.matrix), np.asarray(y), np.asarray(x_batch)):
        m, c = gaussian_posterior(a, yi, var_y)
        w.append(np.linalg.solve(np.linalg.cholesky(c), xi - m))
    w = np.array(w)
    assert np.all(np.abs(w.mean(0)) < 5 / np.sqrt(n)), w.mean(0)
    assert np.all(np.abs(np.cov(w.T, bias=True) - np.eye(3)) < 6 * np.sqrt(2 / n)), np.cov(w.T, bias=True)


class OneCall(eqx.Module):
    """A stand-in sampler: one call of the posterior denoiser at a fixed `x_t` and `sigma`."""

    x_t: jax.Array
    sigma: float
    steps: int = eqx.field(static=True, default=1)  # what progress bars count

    def __call__(self, denoiser, shape, key, *, mean=0.0, dtype=None, return_info=False):
        out, info = denoiser.with_info(self.x_t, self.sigma)
        return (out, info) if return_info else out


def test_batch_scope_cg1_uses_one_step_size_for_the_whole_batch():
    """One CG iteration from v = 0 is v = (<b, b> / <b, M b>) b. With `scope="batch"` the inner
    products run over the whole batch (one step size), with `scope="sample"` over each sample;
    both are computed by hand (dense numpy) for one MMPS call made through the E-step."""
    n, var_y, sigma = 6, 0.05, 0.7
    A = projections(jax.random.key(3), n)
    y = simulate_observations(jax.random.key(1), A, gaussian_latents(jax.random.key(0), n), var_y)
    x_t = np.asarray(MU + 2 * jax.random.normal(jax.random.key(4), (n, 3)))
    prior = GaussianDenoiser(MU, DPLR(jnp.zeros(3), L))
    s2, cov, mu = sigma**2, np.asarray(SIGMA), np.asarray(MU)
    jac = np.eye(3) - s2 * np.linalg.inv(cov + s2 * np.eye(3))  # the Gaussian denoiser's Jacobian
    x_hat = mu + (x_t - mu) @ jac.T
    a = np.asarray(A.matrix)
    b = np.asarray(y) - np.einsum("nij,nj->ni", a, x_hat)
    mb = var_y * b + s2 * np.einsum("nij,jk,nlk,nl->ni", a, jac, a, b)  # (Sigma_y + s^2 A J A^T) b
    step = {"batch": np.sum(b * b) / np.sum(b * mb), "sample": np.sum(b * b, 1) / np.sum(b * mb, 1)}
    outs = {}
    for scope in ("batch", "sample"):
        estep = em.EStep(OneCall(jnp.asarray(x_t), sigma), solvers.CG(1), scope=scope, batch_size=n)
        outs[scope], info = em.posterior_samples(jax.random.key(2), prior, A, y, var_y, estep, event_shape=(3,))
        v = np.reshape(step[scope], (-1, 1)) * b
        expected = x_hat + s2 * np.einsum("ij,nki,nk->nj", jac, a, v)  # x_hat + s^2 J^T A^T v
        np.testing.assert_allclose(outs[scope], expected, rtol=1e-10, atol=1e-12)
        assert info["iterations"] == 1
    assert np.ptp(step["sample"]) > 0.1 * np.mean(step["sample"])  # the per-sample steps differ...
    assert np.max(np.abs(outs["batch"] - outs["sample"])) > 1e-3  # ...so the two scopes do too


def test_prior_samples_have_the_gaussian_moments():
    """4000 samples of N(MU, SIGMA) in 4 batches, whitened by L^-1: mean within 5 / sqrt(N),
    covariance within 6 sqrt(2 / N) of I."""
    n = 4000
    prior = GaussianDenoiser(MU, DPLR(jnp.zeros(3), L))
    x = em.prior_samples(jax.random.key(0), prior, DDPM(VESchedule(1e-3, 1e2), 128), n,
                         event_shape=(3,), mean=MU, batch_size=1000)
    assert x.shape == (n, 3)
    w = np.linalg.solve(np.asarray(L), np.asarray(x - MU).T).T
    assert np.all(np.abs(w.mean(0)) < 5 / np.sqrt(n)), w.mean(0)
    assert np.all(np.abs(np.cov(w.T, bias=True) - np.eye(3)) < 6 * np.sqrt(2 / n)), np.cov(w.T, bias=True)


def test_prior_samples_batch_b_uses_fold_in_key_b():
    """count = 10 in batches of 4: batch b is the sampler's draw with `fold_in(key, b)` (the last
    one cut to 2 rows); without `batch_size`, one batch of `count` with `fold_in(key, 0)`."""
    prior = GaussianDenoiser(MU, DPLR(jnp.zeros(3), L))
    sampler, key = DDPM(SCHEDULE, 8), jax.random.key(5)
    x = em.prior_samples(key, prior, sampler, 10, event_shape=(3,), mean=MU, batch_size=4)
    draw = eqx.filter_jit(lambda key, shape: sampler(prior, shape, key, mean=MU))
    draws = [draw(jax.random.fold_in(key, b), (4, 3)) for b in range(3)]
    assert x.shape == (10, 3)
    np.testing.assert_allclose(x, jnp.concatenate(draws)[:10], rtol=1e-12, atol=1e-12)
    whole = em.prior_samples(jax.random.key(6), prior, sampler, 4, event_shape=(3,), mean=MU)
    np.testing.assert_allclose(whole, draw(jax.random.fold_in(jax.random.key(6), 0), (4, 3)), rtol=1e-12)
    assert np.max(np.abs(np.asarray(x[4:8] - x[:4]))) > 0.1  # the batches are different draws


# --- the evidence check ---------------------------------------------------------------------


def test_evidence_divergence_small_for_the_true_prior_large_for_a_wrong_one():
    """2n = 256 observations of N(MU, SIGMA) through 2 x 3 projections. Samples of the true prior
    give a divergence at its floor (measured 1e-6: the debiased cost is noise); N(0, I), or the
    true prior's samples spread twice as wide (same mean), give 0.41 and 0.97. It is exactly the
    Sinkhorn divergence of y_1..n against observations simulated with the operators n+1..2n,
    debiased by y_n+1..2n; fewer than 2n observations are refused."""
    n, var_y = 128, 1e-2
    kwargs = dict(reg=0.1, max_iter=1000, stop=1e-4)  # converges in about 300 iterations
    A = projections(jax.random.key(3), 2 * n)
    y = simulate_observations(jax.random.key(1), A, gaussian_latents(jax.random.key(0), 2 * n), var_y)
    true = gaussian_latents(jax.random.key(4), n)
    wrong = {"standard": jax.random.normal(jax.random.key(5), (n, 3)), "wide": MU + 2 * (true - MU)}
    key = jax.random.key(6)
    d_true = evidence_divergence(key, true, A, y, var_y, **kwargs)
    assert d_true < 0.05
    for name, x in wrong.items():
        d_wrong = evidence_divergence(key, x, A, y, var_y, **kwargs)
        assert d_wrong > 0.3 and d_wrong > 10 * d_true, (name, d_wrong, d_true)
        simulated = simulate_observations(key, operators.take(A, slice(n, 2 * n)), x, var_y)
        assert d_wrong == pytest.approx(sinkhorn_divergence(y[:n], y[n:], simulated, **kwargs), rel=1e-12)
    with pytest.raises(ValueError, match="needs 256 observations, got 255"):
        evidence_divergence(key, true, A, y[:-1], var_y, **kwargs)


# --- the M-step -----------------------------------------------------------------------------


def test_maximize_returns_the_ema_weights_when_there_is_an_ema(prob):
    """Without EMA, `maximize` returns the raw weights: theta_1 after one step, theta_2 after two
    (step n uses `fold_in(key, n)`, so the two runs share their first step). With `ema_decay = d`
    it returns the average e_n = e_(n-1) + (1 - d)(theta_n - e_(n-1)), e_0 = theta_0:
    e_2 = d^2 theta_0 + d (1 - d) theta_1 + (1 - d) theta_2, computed here by hand."""
    model, samples, key, d = prob["model"], prob["x"], jax.random.key(7), 0.8
    loss = lambda m, x, k: denoising_loss(m, x, k, tiny_em.SCHEDULE)
    raw_step = make_train_step(em.MStep(1, 32, 1e-2).optimizer(), loss)
    ema_step = make_train_step(em.MStep(1, 32, 1e-2).optimizer(), loss, d)
    params = lambda m: jax.tree.leaves(eqx.filter(m, eqx.is_inexact_array))
    theta_1, losses = em.maximize(key, model, samples, em.MStep(1, 32, 1e-2), raw_step)
    theta_2, _ = em.maximize(key, model, samples, em.MStep(2, 32, 1e-2), raw_step)
    e_2, ema_losses = em.maximize(key, model, samples, em.MStep(2, 32, 1e-2, ema_decay=d), ema_step)
    assert losses.shape == (1,) and ema_losses.shape == (2,)
    for t0, t1, t2, e in zip(params(model), params(theta_1), params(theta_2), params(e_2), strict=True):
        np.testing.assert_allclose(e, d**2 * t0 + d * (1 - d) * t1 + (1 - d) * t2, rtol=1e-10, atol=1e-13)
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(params(e_2), params(theta_2)))
    assert gap > 1e-4  # the EMA is not the raw weights


# --- diem: tiny runs --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prob():
    return tiny_em.problem()


@pytest.fixture(scope="module")
def fresh3(prob, tmp_path_factory):
    """An uninterrupted 3-lap run: its directory, metrics, log lines and files."""
    run_dir = tmp_path_factory.mktemp("fresh3") / "run"
    log = []
    metrics = tiny_em.run(run_dir, prob, laps=3, log=log.append)
    return {"dir": run_dir, "metrics": metrics, "log": log, "files": snapshot(run_dir)}


def test_discard_outside_replaces_outliers_by_valid_samples():
    x = jnp.array([[0.0, 1.0], [5.0, 0.0], [-1.0, -2.0], [0.0, -3.5], [2.9, 2.9]])
    kept, fraction = em.discard_outside(jax.random.key(0), x, 3.0)
    assert fraction == pytest.approx(2 / 5)
    valid = np.array([0, 2, 4])
    np.testing.assert_array_equal(kept[valid], x[valid])
    for row in np.asarray(kept[np.array([1, 3])]):  # outliers became copies of valid rows
        assert any(np.array_equal(row, x[v]) for v in valid)
    with pytest.raises(FloatingPointError, match="outside"):
        em.discard_outside(jax.random.key(0), 10 + x, 3.0)


def test_diem_fresh_run_layout(fresh3):
    metrics, run_dir = fresh3["metrics"], fresh3["dir"]
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(FILES)
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert json.loads((run_dir / "config.json").read_text()) == {"seed": 0}
    assert [m["lap"] for m in metrics["laps"]] == [0, 1, 2]
    assert len(metrics["q0"]["iterations"]) == 2
    for lap in metrics["laps"]:
        assert set(lap) == {"lap", "loss", "residual", "iterations", "estep_time", "mstep_time", "compiles",
                            "cache_loads", "compile_time"}
        assert all(np.isfinite(v) for v in lap.values())
    # Lap 1 builds the E-step of the network prior (lap 0 samples with q0); lap 2 reuses every
    # program of lap 1: it neither compiles nor loads one.
    assert metrics["laps"][2]["compiles"] == metrics["laps"][2]["cache_loads"] == 0
    assert header(run_dir / "state.eqx") == {"lap": 2}
    assert header(run_dir / "estep.eqx")["lap"] == 2
    assert sum(line.startswith("q0 iteration") for line in fresh3["log"]) == 2
    assert not any("resuming" in line for line in fresh3["log"])


def test_diem_reproducible(prob, fresh3, tmp_path):
    """The same key in a fresh directory: the same metrics (but the timings) and byte-identical
    checkpoints."""
    metrics = tiny_em.run(tmp_path / "run", prob, laps=3)
    assert without_times(metrics) == without_times(fresh3["metrics"])
    files = snapshot(tmp_path / "run")
    for name in ("config.json", "q0.eqx", "estep.eqx", "state.eqx"):
        assert files[Path(name)] == fresh3["files"][Path(name)], name


def test_diem_resume_with_more_laps(prob, fresh3, tmp_path):
    """1 lap, then 3 laps in the same directory (`laps` may grow) = 3 laps at once."""
    run_dir = tmp_path / "run"
    first = tiny_em.run(run_dir, prob, laps=1, config={"seed": 0, "laps": 1})
    assert without_times(first["laps"]) == without_times(fresh3["metrics"]["laps"][:1])
    log = []
    metrics = tiny_em.run(run_dir, prob, laps=3, config={"seed": 0, "laps": 3}, log=log.append)
    assert log[0] == "resuming after lap 0"
    assert not any(line.startswith("q0") for line in log)
    assert without_times(metrics) == without_times(fresh3["metrics"])
    assert metrics["q0"] == first["q0"]  # q0 is loaded, timing included
    files = snapshot(run_dir)
    for name in ("q0.eqx", "estep.eqx", "state.eqx"):
        assert files[Path(name)] == fresh3["files"][Path(name)], name
    assert json.loads((run_dir / "config.json").read_text())["laps"] == 3


def test_diem_resume_after_interrupted_mstep(prob, fresh3, tmp_path, monkeypatch):
    """Interrupted in lap 1's M-step: the resumed run reuses lap 1's saved posterior samples
    (no new E-step for lap 1) and ends like the uninterrupted run."""
    run_dir = tmp_path / "run"
    maximize, calls = em.maximize, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # lap 1
            raise KeyboardInterrupt
        return maximize(*args, **kwargs)

    monkeypatch.setattr(em.driver, "maximize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_em.run(run_dir, prob, laps=3)
    assert header(run_dir / "state.eqx") == {"lap": 0}
    assert header(run_dir / "estep.eqx")["lap"] == 1
    monkeypatch.setattr(em.driver, "maximize", maximize)

    sample, e_steps = em.posterior_samples, []
    monkeypatch.setattr(em.driver, "posterior_samples", lambda *a, **k: e_steps.append(1) or sample(*a, **k))
    metrics = tiny_em.run(run_dir, prob, laps=3)
    assert len(e_steps) == 1  # lap 2 only
    assert without_times(metrics) == without_times(fresh3["metrics"])
    assert (run_dir / "state.eqx").read_bytes() == fresh3["files"][Path("state.eqx")]


def _killed_at(name, lap=None):
    """A `checkpoint.save` that raises KeyboardInterrupt instead of writing `name` (of `lap`)."""
    save = checkpoint.save

    def killed(path, tree, *, metadata):
        if Path(path).name == name and (lap is None or metadata.get("lap") == lap):
            raise KeyboardInterrupt
        save(path, tree, metadata=metadata)

    return killed


def test_diem_killed_after_metrics_before_state(prob, fresh3, tmp_path, monkeypatch):
    """The driver writes `metrics.json` first, then `state.eqx` (which marks the lap as done). A kill
    between the two, in lap 1, leaves lap 1's metrics on disk but `state.eqx` at lap 0: the rerun
    resumes after lap 0, redoes lap 1's M-step (its E-step samples are saved), does not duplicate
    lap 1's metrics and ends like the uninterrupted run."""
    run_dir = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "save", _killed_at("state.eqx", lap=1))
    with pytest.raises(KeyboardInterrupt):
        tiny_em.run(run_dir, prob, laps=2)
    monkeypatch.undo()
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert [m["lap"] for m in on_disk["laps"]] == [0, 1]  # the scenario: lap 1's metrics written...
    assert header(run_dir / "state.eqx") == {"lap": 0}  # ...but lap 1 not marked as done
    assert header(run_dir / "estep.eqx")["lap"] == 1

    maximize, m_steps = em.maximize, []
    monkeypatch.setattr(em.driver, "maximize", lambda *a, **k: m_steps.append(1) or maximize(*a, **k))
    log = []
    metrics = tiny_em.run(run_dir, prob, laps=2, log=log.append)
    assert log[0] == "resuming after lap 0"
    assert len(m_steps) == 1  # lap 1 is redone, once
    assert [m["lap"] for m in metrics["laps"]] == [0, 1]
    expected = {"q0": fresh3["metrics"]["q0"], "laps": fresh3["metrics"]["laps"][:2]}
    assert without_times(metrics) == without_times(expected)
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert header(run_dir / "state.eqx") == {"lap": 1}


def test_diem_killed_after_metrics_before_q0(prob, fresh3, tmp_path, monkeypatch):
    """The same for q0: a kill after `metrics.json` holds q0's metrics but before `q0.eqx` is saved.
    The rerun fits q0 again (same key: byte-identical `q0.eqx`) and ends like the uninterrupted run."""
    run_dir = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "save", _killed_at("q0.eqx"))
    with pytest.raises(KeyboardInterrupt):
        tiny_em.run(run_dir, prob, laps=1)
    monkeypatch.undo()
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert len(on_disk["q0"]["iterations"]) == 2 and on_disk["laps"] == []  # the scenario
    assert not (run_dir / "q0.eqx").exists() and not (run_dir / "state.eqx").exists()

    log = []
    metrics = tiny_em.run(run_dir, prob, laps=1, log=log.append)
    assert sum(line.startswith("q0 iteration") for line in log) == 2  # q0 is fitted again
    assert not any("resuming" in line for line in log)
    expected = {"q0": fresh3["metrics"]["q0"], "laps": fresh3["metrics"]["laps"][:1]}
    assert without_times(metrics) == without_times(expected)
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert (run_dir / "q0.eqx").read_bytes() == fresh3["files"][Path("q0.eqx")]


def test_diem_fits_q0_on_the_first_gaussian_observations(prob, fresh3, tmp_path, monkeypatch):
    """`gaussian_observations = 64`: `fit_gaussian` sees exactly y[:64] and A[:64], and `q0.eqx`
    is `fit_gaussian(fold_in(key, 0), A[:64], y[:64], ...)` computed here, not the fit on all 256
    (that of `fresh3`). `laps = 0` runs the q0 stage only."""
    n = 64
    fit_gaussian, calls = em.fit_gaussian, []

    def spy(key, A, y, *args, **kwargs):
        calls.append((A, y))
        return fit_gaussian(key, A, y, *args, **kwargs)

    monkeypatch.setattr(em.driver, "fit_gaussian", spy)
    run_dir = tmp_path / "run"
    metrics = tiny_em.run(run_dir, prob, laps=0, gaussian_observations=n)
    assert metrics["laps"] == [] and not (run_dir / "state.eqx").exists()
    [(A, y)] = calls
    np.testing.assert_array_equal(y, prob["y"][:n])
    np.testing.assert_array_equal(A.matrix, prob["A"].matrix[:n])

    like = (jnp.zeros(tiny_em.D), DPLR(jnp.zeros(tiny_em.D), jnp.zeros((tiny_em.D, tiny_em.D))))
    (mean, cov), _ = checkpoint.load(run_dir / "q0.eqx", like)
    expected_mean, expected_cov = fit_gaussian(
        jax.random.fold_in(jax.random.key(1), 0), operators.take(prob["A"], slice(0, n)), prob["y"][:n],
        tiny_em.VAR_Y, tiny_em.GAUSSIAN_ESTEP, event_shape=(tiny_em.D,), rank=tiny_em.D, iterations=2,
    )
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(cov.dense(), expected_cov.dense(), rtol=1e-12, atol=1e-14)
    (all_mean, _), _ = checkpoint.load(fresh3["dir"] / "q0.eqx", like)
    assert float(jnp.max(jnp.abs(mean - all_mean))) > 1e-3


def test_diem_next_lap_starts_from_the_ema_weights(prob, tmp_path, monkeypatch):
    """With `ema_decay`, lap 1's M-step starts from, and lap 1's E-step samples with, exactly the
    model lap 0's `maximize` returned (its EMA weights), and `state.eqx` holds them."""
    maximize, models = em.maximize, []

    def spy(key, model, *args, **kwargs):
        out, losses = maximize(key, model, *args, **kwargs)
        models.append((model, out))
        return out, losses

    sample, priors = em.posterior_samples, []
    monkeypatch.setattr(em.driver, "maximize", spy)
    monkeypatch.setattr(em.driver, "posterior_samples", lambda key, prior, *a, **k: priors.append(prior) or sample(key, prior, *a, **k))
    mstep = em.MStep(16, 64, 1e-2, ema_decay=0.5)
    tiny_em.run(tmp_path / "run", prob, laps=2, mstep=mstep)
    params = lambda m: jax.tree.leaves(eqx.filter(m, eqx.is_inexact_array))
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(params(a), params(b), strict=True))
    (start_0, out_0), (start_1, out_1) = models
    assert same(start_0, prob["model"]) and not same(out_0, start_0)
    assert same(start_1, out_0)  # lap 1 starts from lap 0's result...
    assert same(priors[-1], out_0)  # ...and samples with it
    (saved, _), meta = checkpoint.load(tmp_path / "run" / "state.eqx", (prob["model"], jnp.zeros(tiny_em.D)))
    assert meta == {"lap": 1} and same(saved, out_1)


def test_diem_config_conflict(prob, fresh3, tmp_path):
    """Another config in the directory: `RunConflict` naming the keys, files untouched;
    `overwrite=True` clears the directory and starts afresh."""
    run_dir = tmp_path / "run"
    shutil.copytree(fresh3["dir"], run_dir)
    before = snapshot(run_dir)
    with pytest.raises(em.RunConflict, match=r"seed: 0 -> 1") as error:
        tiny_em.run(run_dir, prob, laps=3, config={"seed": 1})
    assert "overwrite" in str(error.value)
    with pytest.raises(em.RunConflict, match=r"hidden: None -> 64"):
        tiny_em.run(run_dir, prob, laps=3, config={"seed": 0, "hidden": 64})
    with pytest.raises(em.RunConflict, match=r"seed: 0 -> None"):
        tiny_em.run(run_dir, prob, laps=3, config={})
    assert snapshot(run_dir) == before

    log = []
    metrics = tiny_em.run(run_dir, prob, laps=1, config={"seed": 1}, overwrite=True, log=log.append)
    assert sum(line.startswith("q0 iteration") for line in log) == 2
    assert not any("resuming" in line for line in log)
    assert json.loads((run_dir / "config.json").read_text()) == {"seed": 1}
    # the same key: the same q0 and lap 0 as the 3-lap run, and nothing of its laps 1 and 2
    assert without_times(metrics["laps"]) == without_times(fresh3["metrics"]["laps"][:1])
    assert header(run_dir / "state.eqx") == {"lap": 0}
    assert header(run_dir / "estep.eqx")["lap"] == 0


def test_diem_config_with_tuple_resumes(tmp_path):
    """A config holding a tuple (a notebook parameter `shape = (32, 32)`) conflicts with itself:
    config.json holds a list. Fix: in `_check_config`, `config = json.loads(json.dumps(config))`
    before comparing."""
    config = {"shape": (32, 32)}
    em.driver._check_config(tmp_path, config, False)
    em.driver._check_config(tmp_path, config, False)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_diem_non_finite_loss(prob, fresh3, tmp_path):
    """An absurd learning rate in lap 3 (the weights overflow after one step): FloatingPointError
    naming the lap and the step; lap 2's checkpoint and the metrics stay byte-identical."""
    run_dir = tmp_path / "run"
    shutil.copytree(fresh3["dir"], run_dir)
    absurd = em.MStep(64, 64, 1e300, schedule="linear")
    with pytest.raises(FloatingPointError, match=r"lap 3: non-finite loss at step 1\b.*lap 2 are intact"):
        tiny_em.run(run_dir, prob, laps=4, mstep=absurd)
    files = snapshot(run_dir)
    for name in ("state.eqx", "metrics.json", "q0.eqx"):
        assert files[Path(name)] == fresh3["files"][Path(name)], name
    assert header(run_dir / "state.eqx") == {"lap": 2}


# --- sharding -------------------------------------------------------------------------------


def test_sharding_two_devices_same_result(tmp_path):
    """`tests/tiny_em.py` (float32, 1 lap) on one CPU device and on two simulated ones: the
    same q0, E-step samples, M-step weights and metrics up to float32 round-off (measured:
    max relative difference ~1e-6). The E-step with the untrained network prior (GMRES) amplifies
    round-off in a few ill-conditioned samples (measured: median row difference ~2e-7, max ~1e-3)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    env["JAX_PLATFORMS"] = "cpu"
    runs = {}
    for devices in (1, 2):
        flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"} if devices == 2 else {}
        runs[devices] = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "tiny_em.py"), str(tmp_path / f"devices{devices}")],
            env={**env, **flags}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
    results = {}
    for devices, proc in runs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results[devices] = json.loads(out.strip().splitlines()[-1])
    one, two = results[1], results[2]
    assert one["device_count"] == 1 and two["device_count"] == 2
    assert one["dtype"] == two["dtype"] == "float32"

    differences = {}
    for name in ("q0_mean", "q0_cov", "samples", "mean", "weights"):
        a, b = np.asarray(one[name]), np.asarray(two[name])
        differences[name] = float(np.abs(a - b).max() / np.abs(a).max())
        assert differences[name] < 1e-5, (name, differences)
    print("max relative differences, 1 vs 2 devices:", differences)

    m1, m2 = one["metrics"], two["metrics"]
    assert len(m1["laps"]) == len(m2["laps"]) == 1
    for a, b in zip(m1["laps"] + m1["q0"]["iterations"], m2["laps"] + m2["q0"]["iterations"]):
        assert a.keys() == b.keys()
        assert a["iterations"] == b["iterations"]
        np.testing.assert_allclose(a["residual"], b["residual"], rtol=0, atol=1e-6)  # near round-off
        if "loss" in a:
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)

    a, b = np.asarray(one["network_samples"]), np.asarray(two["network_samples"])
    rows = np.abs(a - b).max(axis=1)
    print(f"network-prior E-step: median row difference {np.median(rows):.2e}, max {rows.max():.2e}")
    assert np.median(rows) < 1e-5 and rows.max() < 1e-2


# --- the notebook at profile ci, killed and resumed -----------------------------------------


def runner_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "diemlib.workbook.runner", "01_manifold", "--profile", "ci",
            "--out", str(out), "--no-progress"]


def run_runner(out: Path, log: Path) -> None:
    with log.open("w") as f:
        result = subprocess.run(runner_command(out), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    assert result.returncode == 0, log.read_text()[-3000:]


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (the papermill kernel runs in a session of its own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    """`01_manifold` at profile ci, run to completion (DIR_A)."""
    out = tmp_path_factory.mktemp("ci") / "A"
    run_runner(out, out.parent / "A.log")
    return out


@pytest.mark.slow
def test_ci_profile_resumes_after_sigkill(ci_run, tmp_path):
    """Kill the whole process tree with SIGKILL during lap 1's M-step, run the same command
    again: the metrics (but the timings), the summary and the final checkpoint equal those of
    the uninterrupted run."""
    out = tmp_path / "B"
    run = out / "run"
    with (tmp_path / "B-killed.log").open("w") as log:
        proc = subprocess.Popen(runner_command(out), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            # lap 0 finished and lap 1's posterior samples saved: lap 1's M-step runs
            if (run / "state.eqx").exists() and (run / "estep.eqx").exists() and header(run / "estep.eqx")["lap"] == 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before lap 1's M-step could be killed"
        assert time.monotonic() < deadline, "lap 1's M-step never started"
    finally:
        tree = descendants(proc.pid)
        for pid in tree:  # the kernel's own session, then the runner's group
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert tree, "the runner had no kernel process"
    assert not any(alive(pid) for pid in tree)
    assert header(run / "state.eqx") == {"lap": 0}, "killed after lap 1 ended"
    assert not (out / "metrics.json").exists()

    run_runner(out, tmp_path / "B-resumed.log")
    assert "resuming after lap 0" in (out / "01_manifold.ipynb").read_text()
    a, b = (json.loads((d / "run" / "metrics.json").read_text()) for d in (ci_run, out))
    assert len(a["laps"]) == 2
    assert without_times(b["laps"]) == without_times(a["laps"])
    assert without_times(b["q0"]) == without_times(a["q0"])
    summary = lambda d: json.loads((d / "metrics.json").read_text())["summary"]
    assert summary(out) == summary(ci_run)
    for name in ("q0.eqx", "estep.eqx", "state.eqx"):
        assert (out / "run" / name).read_bytes() == (ci_run / "run" / name).read_bytes(), name


class _IndefiniteDenoiser(eqx.Module):
    """$D(x) = s \\odot x$ with signs of both kinds: Tweedie's covariance $\\sigma^2 \\operatorname{diag}(s)$
    makes $\\Sigma_y + A V A^\\top$ indefinite, as a young network's Jacobian can."""

    s: jax.Array

    def __call__(self, x, sigma):
        return x * self.s


@pytest.mark.parametrize("solver", ["cg", "gmres"])
def test_diverged_solve_warns_with_lap_solver_residual_and_remedy(solver):
    """One CG step on an indefinite system overshoots (relative residual far above 1): the E-step
    warns, naming where, the solver, the residual and the remedy. GMRES, whose residual never
    exceeds 1 (it minimises it over a space that holds v = 0), solves the same system quietly."""
    n, d, var_y = 64, 4, 1e-4
    x = jax.random.normal(jax.random.key(0), (n, d))
    A = operators.broadcast(operators.Matrix(jnp.eye(d)), n)
    y = simulate_observations(jax.random.key(1), A, x, var_y)
    estep = em.EStep(DDPM(SCHEDULE, 8), solvers.solver(solver, 1), batch_size=n)
    denoiser = _IndefiniteDenoiser(jnp.array([1.0, -1.0, 0.5, -0.5]))
    run = lambda: em.posterior_samples(jax.random.key(2), denoiser, A, y, var_y, estep, event_shape=(d,), desc="lap 3 E-step")
    if solver == "gmres":
        with warnings.catch_warnings():
            warnings.simplefilter("error", em.SolverDivergenceWarning)
            _, info = run()
        assert info["residual"] <= 1
        return
    with pytest.warns(em.SolverDivergenceWarning) as caught:
        _, info = run()
    assert info["residual"] > 1
    message = str(caught[0].message)
    for needed in ("lap 3 E-step", "CG", f"{info['residual']:.3g}", "GMRES", "'sigma' covariance"):
        assert needed in message, (needed, message)
