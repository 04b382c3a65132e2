import os
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diemlib import checkpoint
from diemlib.denoiser import Denoiser, denoising_loss
from diemlib.schedule import VESchedule
from diemlib.training import (
    TrainState,
    ema_update,
    fit,
    make_train_step,
    optimizer,
    train_step,
)

SCHEDULE = VESchedule(1e-3, 1e1)
EMB = 16


class TinyNet(eqx.Module):
    """A small per-sample network with the call signature of `diemlib.networks.MLP`."""

    mlp: eqx.nn.MLP

    def __init__(self, features, *, key):
        self.mlp = eqx.nn.MLP(features + EMB, features, 64, 2, activation=jax.nn.silu, key=key)

    def __call__(self, x, emb, *, key=None):
        return self.mlp(jnp.concatenate([x, emb]))


def make_model(key, features=2):
    return Denoiser(TinyNet(features, key=key), EMB)


def gaussian_data(key, n=1024):
    scale = jnp.array([[1.0, 0.0], [0.8, 0.3]])
    return jax.random.normal(key, (n, 2)) @ scale.T + jnp.array([1.0, -0.5])


OPT = optimizer(1e-3)
LOSS = partial(denoising_loss, schedule=SCHEDULE)
STEP = make_train_step(OPT, LOSS, ema_decay=0.99)


def leaves_equal(a, b):
    a, b = eqx.filter(a, eqx.is_array), eqx.filter(b, eqx.is_array)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_linear_schedule():
    # With a constant unit gradient Adam's step is lr / (1 + eps): it reads the schedule.
    opt = optimizer(1e-2, steps=4, schedule="linear", final_learning_rate=2e-3)
    params = jnp.zeros(1)
    state = opt.init(params)
    steps = []
    for _ in range(6):
        update, state = opt.update(jnp.ones(1), state, params)
        steps.append(-float(update[0]) * (1 + 1e-8))
    np.testing.assert_allclose(steps, [1e-2, 8e-3, 6e-3, 4e-3, 2e-3, 2e-3], rtol=1e-12)
    with pytest.raises(ValueError):
        optimizer(1e-2, schedule="linear")


def test_clipping_bounds_the_gradient():
    opt = optimizer(1e-1, clip=1.0)
    params = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
    grads = {"a": jnp.full(3, 1e10), "b": jnp.full(2, -1e12)}
    updates, state = opt.update(grads, opt.init(params), params)
    first_moment = state[1][0].mu  # (1 - b1) times the clipped gradient
    norm = optax.global_norm(first_moment) / 0.1
    np.testing.assert_allclose(norm, 1.0, rtol=1e-12)
    assert optax.global_norm(updates) <= 1e-1 * np.sqrt(5) * (1 + 1e-12)


def test_ema_update_is_exact():
    ema = {"w": jnp.array([1.0, -2.0]), "n": jnp.array(3), "f": jax.nn.silu}
    model = {"w": jnp.array([3.0, 2.0]), "n": jnp.array(7), "f": jax.nn.silu}
    out = ema_update(ema, model, 0.75)
    assert np.array_equal(out["w"], [1.5, -1.0])
    assert int(out["n"]) == 3 and out["f"] is jax.nn.silu


def test_train_state_and_step():
    model = make_model(jax.random.key(0))
    state = TrainState.create(model, OPT, ema=True)
    assert int(state.step) == 0 and leaves_equal(state.ema, model)
    assert TrainState.create(model, OPT).ema is None
    x = gaussian_data(jax.random.key(1), 8)
    new, loss = STEP(state, x, jax.random.key(2))
    assert int(new.step) == 1 and jnp.isfinite(loss)
    expected = ema_update(state.ema, new.model, 0.99)
    assert leaves_equal(new.ema, expected)
    plain, _ = train_step(state, x, jax.random.key(2), optimizer=OPT, loss_fn=LOSS)
    assert leaves_equal(plain.model, new.model) and leaves_equal(plain.ema, state.ema)


def test_training_lowers_the_denoising_loss():
    data = gaussian_data(jax.random.key(0))
    state = TrainState.create(make_model(jax.random.key(1)), optimizer(3e-3), ema=True)
    step_fn = make_train_step(optimizer(3e-3), LOSS, ema_decay=0.99)

    def evaluate(model):
        keys = jax.random.split(jax.random.key(9), 16)
        return float(jnp.mean(jax.vmap(lambda k: LOSS(model, data, k))(keys)))

    before = evaluate(state.model)
    state, losses = fit(state, data, jax.random.key(2), steps=512, batch_size=128, step_fn=step_fn)
    after = evaluate(state.model)
    assert losses.shape == (512,) and int(state.step) == 512
    assert after < 0.5 * before, (before, after)
    assert evaluate(state.ema) < 0.5 * before


def test_fit_is_reproducible_and_resumable():
    data = gaussian_data(jax.random.key(0), 64)
    state = TrainState.create(make_model(jax.random.key(1)), OPT, ema=True)
    run = partial(fit, data=data, key=jax.random.key(2), batch_size=8, step_fn=STEP, chunk=8)
    calls = []
    one, losses = run(state, steps=20, callback=lambda *args: calls.append(args[0]))
    again, losses_again = run(state, steps=20)
    half, first = run(state, steps=7)
    resumed, second = run(half, steps=13)  # starts at half.step = 7
    assert calls == [8, 16, 20]
    assert leaves_equal(one, again) and np.array_equal(losses, losses_again)
    assert leaves_equal(one, resumed)
    assert np.array_equal(losses, np.concatenate([first, second]))
    # An explicit start draws the same batches and keys whatever the state's counter.
    explicit, _ = run(eqx.tree_at(lambda s: s.step, half, jnp.int32(0)), steps=13, start=7)
    assert leaves_equal(explicit.model, one.model)


def test_fit_augments_every_batch():
    def step_fn(state, batch, key):
        return state + 1, jnp.sum(batch)

    data = jnp.ones((10, 3))
    _, losses = fit(jnp.int32(0), data, jax.random.key(0), steps=5, batch_size=4,
                    step_fn=step_fn, start=0, augment=lambda k, b: -b, chunk=4)
    assert np.array_equal(losses, np.full(5, -12.0))


def test_fit_raises_at_the_first_non_finite_loss():
    def step_fn(count, batch, key):
        return count + 1, jnp.where(count >= 13, jnp.nan, 0.0)

    data = jnp.zeros((4, 1))
    with pytest.raises(FloatingPointError, match="non-finite loss at step 13"):
        fit(jnp.int32(0), data, jax.random.key(0), steps=20, batch_size=2, step_fn=step_fn,
            start=0, chunk=4)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 23"):
        fit(jnp.int32(10), data, jax.random.key(0), steps=20, batch_size=2, step_fn=step_fn,
            start=20, chunk=4)


def trained_state():
    state = TrainState.create(make_model(jax.random.key(1)), OPT, ema=True)
    return STEP(state, gaussian_data(jax.random.key(0), 8), jax.random.key(2))[0]


def state_like():
    return eqx.filter_eval_shape(
        lambda: TrainState.create(make_model(jax.random.key(1)), OPT, ema=True)
    )


def test_checkpoint_round_trip(tmp_path):
    state = trained_state()
    metadata = {"lap": 3, "losses": [0.5, 0.25], "name": "manifold"}
    path = tmp_path / "ckpt" / "state.eqx"
    checkpoint.save(path, state, metadata=metadata)
    loaded, meta = checkpoint.load(path, state_like())
    assert meta == metadata
    assert jax.tree.structure(loaded) == jax.tree.structure(state)  # static fields included
    assert leaves_equal(loaded, state)
    assert loaded.model.emb_features == EMB and int(loaded.opt_state[1][0].count) == 1
    assert os.listdir(path.parent) == ["state.eqx"]


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load(tmp_path / "missing.eqx", state_like())
    path = tmp_path / "state.eqx"
    checkpoint.save(path, trained_state(), metadata={})
    wider = eqx.filter_eval_shape(lambda: make_model(jax.random.key(0), features=3))
    with pytest.raises(ValueError, match="does not match"):
        checkpoint.load(path, TrainState(wider, None, None, jnp.int32(0)))
    checkpoint.atomic_write_text(path, "not a checkpoint\n")
    with pytest.raises(ValueError, match="not a diemlib checkpoint"):
        checkpoint.load(path, state_like())


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "state.eqx"
    state = trained_state()
    checkpoint.save(path, state, metadata={"lap": 1})

    def crash(f, tree):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.eqx, "tree_serialise_leaves", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, state, metadata={"lap": 2})
    monkeypatch.undo()
    loaded, meta = checkpoint.load(path, state_like())
    assert meta == {"lap": 1} and leaves_equal(loaded, state)
    assert os.listdir(tmp_path) == ["state.eqx"]


def test_atomic_write_json(tmp_path):
    path = tmp_path / "metrics.json"
    checkpoint.atomic_write_json(path, {"fid": 1.5})
    checkpoint.atomic_write_json(path, {"fid": 1.25})
    assert path.read_text() == '{\n  "fid": 1.25\n}\n'
    assert os.listdir(tmp_path) == ["metrics.json"]
