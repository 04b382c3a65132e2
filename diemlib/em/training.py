r"""The M-step's training loop: Adam with clipping, EMA weights and a scanned `fit`.

Every key is derived from one key by `jax.random.fold_in(key, step)`, so a run is
reproducible and can be resumed at any step (docs/conventions.md, 'Optimiser and EMA' and 'Departures
from the reference').
"""

from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray, PyTree

from ..progress import counting, tick
from .distributed import gather

LossFn = Callable[[PyTree, Array, PRNGKeyArray], Float[Array, ""]]
StepFn = Callable[[PyTree, Array, PRNGKeyArray], tuple[PyTree, Float[Array, ""]]]


def optimizer(
    learning_rate: float,
    *,
    steps: int | None = None,
    schedule: Literal["constant", "linear"] = "constant",
    final_learning_rate: float = 1e-6,
    clip: float = 1.0,
) -> optax.GradientTransformation:
    r"""Adam after global-norm gradient clipping (docs/conventions.md, 'Optimiser and EMA').

    $$g \gets g \min\big(1, c / \|g\|_2\big), \qquad
    \eta_n = \eta_0 + (\eta_\text{final} - \eta_0) \min(n / N, 1) \text{ (linear)}.$$

    **Arguments:**

    - `learning_rate`: $\eta_0$.
    - `steps`: $N$, the length of the linear schedule (required for it).
    - `schedule`: `"constant"` or `"linear"`; restarted with every new optimiser state.
    - `final_learning_rate`: $\eta_\text{final}$ of the linear schedule.
    - `clip`: $c$, the maximum global norm of the gradient.
    """
    if schedule == "constant":
        lr = learning_rate
    elif schedule == "linear":
        if steps is None:
            raise ValueError("the linear schedule needs `steps`")
        lr = optax.linear_schedule(learning_rate, final_learning_rate, steps)
    else:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    return optax.chain(
        optax.clip_by_global_norm(clip), optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)
    )


class TrainState(eqx.Module):
    """What training carries from step to step.

    **Arguments:**

    - `model`: the trained pytree (e.g. a [`Denoiser`][]); its inexact arrays are trained.
    - `ema`: the exponential moving average of `model`, or `None`.
    - `opt_state`: the optimiser state.
    - `step`: the number of steps taken.
    """

    model: PyTree
    ema: PyTree | None
    opt_state: optax.OptState
    step: Int[Array, ""]

    @classmethod
    def create(
        cls, model: PyTree, optimizer: optax.GradientTransformation, *, ema: bool = False
    ) -> "TrainState":
        """A fresh state at step 0: new Adam moments, and EMA weights equal to `model`."""
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        return cls(model, model if ema else None, opt_state, jnp.zeros((), jnp.int32))


def ema_update(ema: PyTree, model: PyTree, decay: ArrayLike) -> PyTree:
    r"""One step of the exponential moving average, on inexact array leaves.

    $$\bar\theta \gets \bar\theta + (1 - \text{decay})(\theta - \bar\theta)$$
    """

    def update(e, m):
        return e + (1 - decay) * (m - e) if eqx.is_inexact_array(e) else e

    return jax.tree.map(update, ema, model)


def train_step(
    state: TrainState,
    batch: Array,
    key: PRNGKeyArray,
    *,
    optimizer: optax.GradientTransformation,
    loss_fn: LossFn,
    ema_decay: float | None = None,
) -> tuple[TrainState, Float[Array, ""]]:
    """One optimiser step on `loss_fn(model, batch, key)`; returns the new state and the loss.

    The EMA weights, if any, are updated with `ema_decay` (kept as they are when it is `None`).
    """
    loss, grads = eqx.filter_value_and_grad(loss_fn)(state.model, batch, key)
    params = eqx.filter(state.model, eqx.is_inexact_array)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    model = eqx.apply_updates(state.model, updates)
    ema = state.ema
    if ema is not None and ema_decay is not None:
        ema = ema_update(ema, model, ema_decay)
    return TrainState(model, ema, opt_state, state.step + 1), loss


def make_train_step(
    optimizer: optax.GradientTransformation, loss_fn: LossFn, ema_decay: float | None = None
) -> StepFn:
    """[`train_step`][] with its options bound, jitted: `step_fn(state, batch, key)`.

    Build it once and reuse it, so that [`fit`][] compiles once.
    """
    return eqx.filter_jit(
        partial(train_step, optimizer=optimizer, loss_fn=loss_fn, ema_decay=ema_decay)
    )


@eqx.filter_jit
def _fit_chunk(state, data, key, first, stop, *, batch_size, step_fn, augment, chunk, sharding):
    """Steps `first, ..., first + chunk - 1` in one scan; the steps from `stop` on are idle."""
    dynamic, static = eqx.partition(state, eqx.is_array)

    def active(dynamic, i):
        key_batch, key_augment, key_step = jax.random.split(jax.random.fold_in(key, i), 3)
        batch = data[jax.random.randint(key_batch, (batch_size,), 0, data.shape[0])]
        if sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, sharding)
        if augment is not None:
            batch = augment(key_augment, batch)
        state, loss = step_fn(eqx.combine(dynamic, static), batch, key_step)
        tick()  # advances the M-step's progress bar
        return eqx.filter(state, eqx.is_array), loss

    loss_shape = jax.eval_shape(active, dynamic, first)[1]

    def idle(dynamic, i):
        return dynamic, jnp.full(loss_shape.shape, jnp.nan, loss_shape.dtype)

    def body(dynamic, i):
        return jax.lax.cond(i < stop, active, idle, dynamic, i)

    dynamic, losses = jax.lax.scan(body, dynamic, first + jnp.arange(chunk, dtype=jnp.uint32))
    return eqx.combine(dynamic, static), losses


def fit(
    state: PyTree,
    data: Float[Array, "N ..."],
    key: PRNGKeyArray,
    *,
    steps: int,
    batch_size: int,
    step_fn: StepFn,
    start: int | None = None,
    augment: Callable[[PRNGKeyArray, Array], Array] | None = None,
    callback: Callable[[int, PyTree, Array], Any] | None = None,
    chunk: int = 256,
    sharding: jax.sharding.Sharding | None = None,
    desc: str = "M-step",
) -> tuple[PyTree, Float[Array, " steps"]]:
    r"""Runs `steps` training steps on batches drawn with replacement from `data`.

    Step $n$ uses the key `fold_in(key, n)` for its batch, its augmentation and `step_fn`, so
    `fit` over $n + m$ steps equals `fit` over $n$ then over $m$ from `start` $= n$.
    Steps run `chunk` at a time in one `jax.lax.scan`; the losses are checked after each chunk.

    **Arguments:**

    - `state`: what `step_fn` carries, e.g. a [`TrainState`][].
    - `data`: the training set, one example per row.
    - `key`: the run's key.
    - `steps`: the number of steps.
    - `batch_size`: the number of rows per batch.
    - `step_fn`: `step_fn(state, batch, key) -> (state, loss)`, e.g. from
        [`make_train_step`][].
    - `start`: the index of the first step (default `state.step`).
    - `augment`: `augment(key, batch) -> batch`, applied to every batch.
    - `callback`: `callback(step, state, losses)` after each chunk, with the number of steps
        done and that chunk's losses.
    - `chunk`: the number of steps per scan (all chunks share one compilation).
    - `sharding`: where each batch goes, e.g. split over devices (data parallelism).
    - `desc`: the label of the progress bar, which counts steps and shows the last chunk's
        mean loss.

    **Returns:** the final state and the loss of every step.

    **Raises:** `FloatingPointError` naming the first step with a non-finite loss.
    """
    start = int(gather(state.step)) if start is None else start
    stop = start + steps
    losses = []
    with counting(steps, desc) as bar:
        for first in range(start, stop, chunk):
            state, chunk_losses = _fit_chunk(
                state, data, key, jnp.uint32(first), jnp.uint32(stop),
                batch_size=batch_size, step_fn=step_fn, augment=augment, chunk=chunk,
                sharding=sharding,
            )
            chunk_losses = gather(chunk_losses)[: min(chunk, stop - first)]  # a local array
            bad = jnp.flatnonzero(~jnp.isfinite(chunk_losses))
            if bad.size:
                raise FloatingPointError(f"non-finite loss at step {first + int(bad[0])}")
            losses.append(chunk_losses)
            bar.set_postfix(loss=f"{float(jnp.mean(chunk_losses)):.4g}")
            if callback is not None:
                callback(first + len(chunk_losses), state, chunk_losses)
    return state, jnp.concatenate(losses) if losses else jnp.zeros((0,))
