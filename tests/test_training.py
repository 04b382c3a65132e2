import os
from functools import cache, partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diemlib.em import checkpoint
from diemlib.diffusion.denoiser import Denoiser, denoising_loss
from diemlib.nn.mlp import MLP
from diemlib.diffusion.schedule import VESchedule
from diemlib.em.sharding import batch_sharding
from diemlib.em.training import TrainState, ema_update, fit, make_train_step, optimizer

SCHEDULE = VESchedule(1e-3, 1e1)
EMB = 16


@cache
def make_model():
    return Denoiser(MLP(2, emb_features=EMB, hidden=64, layers=2, key=jax.random.key(1)), EMB)


def gaussian_data(key, n=1024):
    scale = jnp.array([[1.0, 0.0], [0.8, 0.3]])
    return jax.random.normal(key, (n, 2)) @ scale.T + jnp.array([1.0, -0.5])


def quick_loss(model, x, key):
    """A cheap denoising loss (log-uniform sigma) for tests that do not need the Beta draw."""
    key_sigma, key_z = jax.random.split(key)
    sigma = jnp.exp(jax.random.uniform(key_sigma, x.shape[:1], minval=-4.0, maxval=2.0))
    x_t = x + sigma[:, None] * jax.random.normal(key_z, x.shape)
    return jnp.mean((1 / sigma[:, None] ** 2 + 1) * (model(x_t, sigma) - x) ** 2)


OPT = optimizer(1e-3)
STEP = make_train_step(OPT, quick_loss, ema_decay=0.99)


def leaves_equal(a, b):
    a, b = eqx.filter(a, eqx.is_array), eqx.filter(b, eqx.is_array)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_linear_schedule():
    # With a constant unit gradient Adam's step is lr / (1 + eps): it reads the schedule.
    opt = optimizer(1e-2, steps=4, schedule="linear", final_learning_rate=2e-3)
    params = jnp.zeros(1)
    state, update_fn = opt.init(params), jax.jit(opt.update)
    steps = []
    for _ in range(6):
        update, state = update_fn(jnp.ones(1), state, params)
        steps.append(-float(update[0]) * (1 + 1e-8))
    np.testing.assert_allclose(steps, [1e-2, 8e-3, 6e-3, 4e-3, 2e-3, 2e-3], rtol=1e-6)
    with pytest.raises(ValueError):
        optimizer(1e-2, schedule="linear")


def test_clipping_bounds_the_gradient():
    opt = optimizer(1e-1, clip=1.0)
    params = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
    grads = {"a": jnp.full(3, 1e10), "b": jnp.full(2, -1e12)}
    updates, state = jax.jit(opt.update)(grads, opt.init(params), params)
    first_moment = state[1][0].mu  # (1 - b1) times the clipped gradient
    norm = optax.tree.norm(first_moment) / 0.1
    np.testing.assert_allclose(norm, 1.0, rtol=1e-12)
    assert optax.tree.norm(updates) <= 1e-1 * np.sqrt(5) * (1 + 1e-12)


def test_ema_update_is_exact():
    ema = {"w": jnp.array([1.0, -2.0]), "n": jnp.array(3), "f": jax.nn.silu}
    model = {"w": jnp.array([3.0, 2.0]), "n": jnp.array(7), "f": jax.nn.silu}
    out = ema_update(ema, model, 0.75)
    assert np.array_equal(out["w"], [1.5, -1.0])
    assert int(out["n"]) == 3 and out["f"] is jax.nn.silu


def test_train_state_and_step():
    model = make_model()
    state = TrainState.create(model, OPT, ema=True)
    assert int(state.step) == 0 and leaves_equal(state.ema, model)
    assert TrainState.create(model, OPT).ema is None
    x = gaussian_data(jax.random.key(1), 8)
    new, loss = STEP(state, x, jax.random.key(2))
    assert int(new.step) == 1 and jnp.isfinite(loss)
    expected = ema_update(state.ema, new.model, 0.99)
    for a, b in zip(jax.tree.leaves(new.ema), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-14)


def test_training_lowers_the_denoising_loss():
    # Excess error over the optimal (analytic Gaussian) denoiser at a few noise levels.
    data = gaussian_data(jax.random.key(0))
    mean, cov = jnp.mean(data, 0), jnp.cov(data.T, bias=True)
    sigmas = jnp.array([0.03, 0.1, 0.3, 1.0, 3.0])

    def optimal(x_t, sigma):
        solve = jax.vmap(lambda x, s: jnp.linalg.solve(cov + s**2 * jnp.eye(2), x - mean))
        return x_t - sigma[:, None] ** 2 * solve(x_t, sigma)

    @eqx.filter_jit
    def excess(model):
        z = jax.random.normal(jax.random.key(9), sigmas.shape + data.shape)

        def error(denoiser, s, z):
            x_t = data + s * z
            return jnp.mean((denoiser(x_t, jnp.full(len(data), s)) - data) ** 2) / s**2

        return jnp.sum(jax.vmap(lambda s, z: error(model, s, z) - error(optimal, s, z))(sigmas, z))

    opt = optimizer(1e-2)
    state = TrainState.create(make_model(), opt, ema=True)
    step_fn = make_train_step(opt, partial(denoising_loss, schedule=SCHEDULE), ema_decay=0.99)
    state, losses = fit(state, data, jax.random.key(2), steps=256, batch_size=128, step_fn=step_fn)
    before = excess(make_model())
    assert losses.shape == (256,) and int(state.step) == 256 and before > 0.5
    assert excess(state.model) < 0.1 * before
    assert excess(state.ema) < 0.1 * before


def test_fit_is_reproducible_and_resumable():
    data = gaussian_data(jax.random.key(0), 64)
    state = TrainState.create(make_model(), OPT, ema=True)
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
                    step_fn=step_fn, start=0, augment=lambda k, b: -b, chunk=4,
                    sharding=batch_sharding())
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
    state = TrainState.create(make_model(), OPT, ema=True)
    return STEP(state, gaussian_data(jax.random.key(0), 8), jax.random.key(2))[0]


def state_like():
    return eqx.filter_eval_shape(TrainState.create, make_model(), OPT, ema=True)


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
    wider = eqx.filter_eval_shape(
        lambda: Denoiser(MLP(3, emb_features=EMB, hidden=64, layers=2, key=jax.random.key(0)), EMB)
    )
    with pytest.raises(ValueError, match="does not match"):
        checkpoint.load(path, TrainState(wider, None, None, jnp.int32(0)))
    checkpoint.atomic_write_text(path, "not a checkpoint\n")
    with pytest.raises(ValueError, match="not a diemlib checkpoint"):
        checkpoint.load(path, state_like())


def test_checkpoint_with_more_leaves_than_like_is_refused(tmp_path):
    """A file holding more leaves than `like` (whose leaves match the file's first ones) must not
    load silently as its prefix: e.g. `state.eqx` = (model, mean) loaded into the model alone."""
    path = tmp_path / "state.eqx"
    model = make_model()
    checkpoint.save(path, (model, jnp.zeros(2)), metadata={"lap": 0})
    loaded, _ = checkpoint.load(path, (model, jnp.ones(2)))  # the full structure loads
    assert leaves_equal(loaded[0], model)
    with pytest.raises(ValueError, match="more leaves"):
        checkpoint.load(path, model)
    checkpoint.save(path, (jnp.arange(3.0), jnp.ones(2), jnp.int32(7)), metadata={})
    for like in [(jnp.zeros(3),), (jnp.zeros(3), jnp.zeros(2))]:
        with pytest.raises(ValueError, match="more leaves"):
            checkpoint.load(path, like)


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
