r"""Samplers of the reverse variance-exploding process (paper §2; docs/conventions.md, 'Samplers').

A sampler walks `steps` uniform steps in $t$ from 1 to 0 (geometric in $\sigma$), starting from
$x_1 = \mu + \sigma_\text{max} z$, and returns one extra denoiser call $D(x_0, \sigma_0)$.
The loop is one `jax.lax.fori_loop`; step $i$ uses the key `fold_in(key, i)` (the $i$-th key of
`split(key, steps)`) and advances the progress bar opened around the call with
`diemlib.progress.counting`, if any. Any denoiser plugs in: a network, the analytic
[`GaussianDenoiser`][], or a posterior denoiser such as [`MMPS`][].

The number of steps is data, an array leaf of the sampler, not a compile-time constant: a jitted
function that takes the sampler as an argument compiles one program for every step count (a
`fori_loop` over a traced bound is the `while` loop a `scan` compiles to, so a step costs the same).

A denoiser may report diagnostics by implementing `with_info(x_t, sigma) -> (x_hat, info)`
(a dict of per-sample arrays); samplers then return the mean of each entry over the batch and
the steps.
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Int, PRNGKeyArray

from ..progress import tick
from .schedule import VESchedule


def denoise_with_info(denoiser, x_t: Array, sigma: ArrayLike) -> tuple[Array, dict]:
    """Calls `denoiser`, with its diagnostics if it reports any (else an empty dict)."""
    if hasattr(denoiser, "with_info"):
        return denoiser.with_info(x_t, sigma)
    return denoiser(x_t, sigma), {}


def _step_count(steps):
    """The step count as an array leaf (traced under `jit`, never a compile-time constant)."""
    if isinstance(steps, jax.Array):  # a JAX array, or traced inside `jit`
        return steps
    count = np.asarray(steps)
    if count.ndim or not np.issubdtype(count.dtype, np.integer) or count < 1:
        raise ValueError(f"a sampler needs a whole number of steps >= 1, got {steps!r}")
    return count.astype(np.int32)


class Sampler(eqx.Module):
    """Base class: the loop over the time grid; subclasses define one `step` from $t$ to $s$.

    **Arguments:**

    - `schedule`: the noise schedule $\\sigma_t$.
    - `steps`: number of steps $T$ (an int, kept as an array: data, not a compile-time constant).
    """

    schedule: VESchedule
    steps: Int[ArrayLike, ""] = eqx.field(converter=_step_count)

    @abc.abstractmethod
    def step(self, denoiser, x_t: Array, t: Array, s: Array, key: PRNGKeyArray) -> tuple[Array, dict]:
        """One step from time `t` to time `s < t`; returns $x_s$ and the denoiser's diagnostics."""

    def __call__(
        self,
        denoiser,
        shape: tuple[int, ...],
        key: PRNGKeyArray,
        *,
        mean: ArrayLike = 0.0,
        dtype=None,
        return_info: bool = False,
    ):
        """Draws samples of `shape = (B, *event)`.

        **Arguments:**

        - `denoiser`: a batched denoiser `D(x_t, sigma)`.
        - `shape`: shape of the batch of samples.
        - `key`: PRNG key.
        - `mean`: $\\mu$ of the initial state $x_1 = \\mu + \\sigma_\\text{max} z$.
        - `return_info`: also return the denoiser's diagnostics, averaged over the batch and the steps.

        **Returns:** the samples, and with `return_info` a dict of scalars.
        """
        dtype = jnp.result_type(float) if dtype is None else dtype
        key_init, key_steps = jax.random.split(key)
        x = mean + self.schedule.sigma_max * jax.random.normal(key_init, shape, dtype)

        def time(i):  # entry i of `VESchedule.time_grid(steps)`
            return self.schedule.time(i, self.steps).astype(dtype)

        def step(i, x_t):  # x_s and the batch means of the diagnostics
            x_s, info = self.step(denoiser, x_t, time(i), time(i + 1), jax.random.fold_in(key_steps, i))
            return x_s, jax.tree.map(jnp.mean, info)

        def body(i, carry):
            x_t, total = carry
            x_s, info = step(i, x_t)
            tick()  # advances the progress bar counting this loop, if any
            return x_s, jax.tree.map(jnp.add, total, info) if return_info else total

        total = {}
        if return_info:  # the diagnostics' structure, from a trace of one step
            total = jax.tree.map(lambda a: jnp.zeros((), a.dtype), jax.eval_shape(step, 0, x)[1])
        x, total = jax.lax.fori_loop(0, self.steps, body, (x, total))
        x = denoiser(x, self.schedule(time(self.steps)))
        return (x, jax.tree.map(lambda a: a / self.steps, total)) if return_info else x


def ddim_update(x_t: Array, x_hat: Array, sigma_t: Array, sigma_s: Array) -> Array:
    r"""Deterministic DDIM ($\eta = 0$) update $x_s = x_t - (1 - \sigma_s / \sigma_t)(x_t - \hat{x})$."""
    return x_t - (1 - sigma_s / sigma_t) * (x_t - x_hat)


class DDPM(Sampler):
    r"""Ancestral sampler (DDIM with $\eta = 1$): the exact Gaussian bridge of the VE process.

    $$\tau = 1 - \sigma_s^2 / \sigma_t^2, \qquad
    x_s = x_t - \tau (x_t - D(x_t, \sigma_t)) + \sigma_s \sqrt{\tau} \, \varepsilon.$$
    """

    def step(self, denoiser, x_t, t, s, key):
        sigma_t, sigma_s = self.schedule(t), self.schedule(s)
        x_hat, info = denoise_with_info(denoiser, x_t, sigma_t)
        tau = 1 - (sigma_s / sigma_t) ** 2
        noise = jax.random.normal(key, x_t.shape, x_t.dtype)
        return x_t - tau * (x_t - x_hat) + sigma_s * jnp.sqrt(tau) * noise, info


class DDIM(Sampler):
    r"""Deterministic sampler (DDIM, $\eta = 0$): $x_s = x_t - (1 - \sigma_s / \sigma_t)(x_t - D(x_t, \sigma_t))$."""

    def step(self, denoiser, x_t, t, s, key):
        sigma_t, sigma_s = self.schedule(t), self.schedule(s)
        x_hat, info = denoise_with_info(denoiser, x_t, sigma_t)
        return ddim_update(x_t, x_hat, sigma_t, sigma_s), info


class PC(Sampler):
    r"""Predictor-corrector: one DDIM step $t \to s$, then Langevin corrections at level $s$.

    $$x \leftarrow x - \tau (x - D(x, \sigma_s)) + \sigma_s \sqrt{2 \tau} \, \varepsilon.$$

    **Arguments:** as [`Sampler`][], plus `corrections` (1) and `tau` (0.1).
    """

    corrections: int = eqx.field(static=True, default=1)
    tau: float = 0.1

    def step(self, denoiser, x_t, t, s, key):
        sigma_t, sigma_s = self.schedule(t), self.schedule(s)
        x_hat, info = denoise_with_info(denoiser, x_t, sigma_t)
        x = ddim_update(x_t, x_hat, sigma_t, sigma_s)
        for k in jax.random.split(key, self.corrections):
            x_hat = denoiser(x, sigma_s)
            noise = jax.random.normal(k, x.shape, x.dtype)
            x = x - self.tau * (x - x_hat) + sigma_s * jnp.sqrt(2 * self.tau) * noise
        return x, info


SAMPLERS = {"ddpm": DDPM, "ddim": DDIM, "pc": PC}


def sampler(name: str, schedule: VESchedule, steps: int, **kwargs) -> Sampler:
    """Builds a sampler by name: `ddpm`, `ddim` or `pc` (the names params files use)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name](schedule, steps, **kwargs)
