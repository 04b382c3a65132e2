"""Progress bars: plain lines in logs, and jitted loops (sampler steps, training steps) counted."""

import jax
import jax.numpy as jnp
import optax
import pytest

from diemlib import progress as progress_module
from diemlib.diffusion import DDIM, GaussianDenoiser, VESchedule
from diemlib.em import EStep, posterior_samples, prior_samples
from diemlib.em.training import TrainState, fit, make_train_step
from diemlib.inverse import operators
from diemlib.linalg import DPLR, solvers
from diemlib.progress import counting, progress, tick


@pytest.fixture
def log_mode(monkeypatch):
    monkeypatch.setenv("DIEMLIB_PROGRESS", "log")
    monkeypatch.setenv("DIEMLIB_PROGRESS_INTERVAL", "0")


def test_log_mode_writes_plain_lines(log_mode, capsys):
    with progress(total=3, desc="work", unit="step") as bar:
        for _ in range(3):
            bar.update(1)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[0].startswith("work:") and "0/3" in lines[0]
    assert "3/3" in lines[-1]
    assert "\r" not in err and "\x1b" not in err


def test_mode_rejects_unknown(monkeypatch):
    monkeypatch.setenv("DIEMLIB_PROGRESS", "loud")
    with pytest.raises(ValueError, match="DIEMLIB_PROGRESS='loud'"):
        progress_module.mode()


def test_off_mode_is_silent(monkeypatch, capsys):
    monkeypatch.setenv("DIEMLIB_PROGRESS", "off")
    with counting(4, "quiet"):
        jax.block_until_ready(_scan(4)(jnp.ones(2)))
    assert capsys.readouterr().err == ""


def _scan(n):
    @jax.jit
    def f(x):
        def body(c, _):
            tick()
            return 2 * c, None

        return jax.lax.scan(body, x, None, length=n)[0]

    return f


def test_tick_counts_scan_steps_without_recompiling(log_mode):
    f = _scan(5)
    with counting(5, "first") as first:
        jax.block_until_ready(f(jnp.ones(3)))
    with counting(5, "second") as second:
        jax.block_until_ready(f(jnp.ones(3)))
    assert (first.n, second.n) == (5, 5)
    assert f._cache_size() == 1
    jax.block_until_ready(f(jnp.ones(3)))  # no bar open: ticks are dropped
    assert second.n == 5


def test_estep_and_prior_samples_count_sampler_steps(log_mode, capsys):
    schedule = VESchedule()
    n, steps = 6, 4
    A = operators.broadcast(operators.Matrix(jnp.eye(3)[:2]), n)
    y = jax.random.normal(jax.random.key(0), (n, 2))
    prior = GaussianDenoiser(jnp.zeros(3), DPLR(jnp.ones(3), jnp.zeros((3, 1))))
    estep = EStep(DDIM(schedule, steps), solvers.CG(2), batch_size=4)
    posterior_samples(jax.random.key(1), prior, A, y, 1e-4, estep, event_shape=(3,), desc="E")
    prior_samples(jax.random.key(2), prior, DDIM(schedule, steps), 5, event_shape=(3,), batch_size=2, desc="P")
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith("E:") and "8/8" in line for line in lines)  # 2 batches x 4 steps
    assert any(line.startswith("P:") and "12/12" in line for line in lines)  # 3 batches x 4 steps


def test_fit_counts_training_steps_and_shows_loss(log_mode, capsys):
    model = jnp.zeros(2)
    opt = optax.sgd(0.1)
    step_fn = make_train_step(opt, lambda m, x, k: jnp.mean((x - m) ** 2))
    state = TrainState.create(model, opt)
    data = jnp.ones((8, 2))
    fit(state, data, jax.random.key(0), steps=10, batch_size=4, step_fn=step_fn, chunk=4, desc="train")
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("train:") and "10/10" in lines[-1] and "loss=" in lines[-1]
