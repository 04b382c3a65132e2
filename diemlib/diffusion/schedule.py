r"""The variance-exploding forward process with a log-linear noise schedule.

$$x_t = x + \sigma_t z, \quad z \sim \mathcal{N}(0, I), \quad
\sigma_t = \exp\big((1 - t) \log a + t \log b\big) = a (b / a)^t, \quad t \in [0, 1].$$

There is no signal scaling ($\alpha_t = 1$) and $\sigma_0 = a$ is never exactly zero
(paper §2; docs/conventions.md, 'Noise schedule').
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float


class VESchedule(eqx.Module):
    r"""Log-linear noise levels $\sigma_t = a (b / a)^t$ of a variance-exploding process.

    **Arguments:**

    - `sigma_min`: $a = \sigma_0$ (1e-3 in the paper).
    - `sigma_max`: $b = \sigma_1$ (1e2 for images, 1e1 for the manifold).
    """

    sigma_min: float = 1e-3
    sigma_max: float = 1e2

    def __call__(self, t: ArrayLike) -> Float[Array, "..."]:
        """Returns $\\sigma_t$."""
        t = jnp.asarray(t)
        return jnp.exp((1 - t) * jnp.log(self.sigma_min) + t * jnp.log(self.sigma_max))

    def time(self, i, steps) -> Array:
        """Entry `i` of the sampling grid of `steps` steps, $t_i = 1 - i / T$ (`i`, `steps` may be traced)."""
        return 1 - jnp.asarray(i) / jnp.asarray(steps, float)

    def time_grid(self, steps: int) -> Float[Array, " steps+1"]:
        """The sampling grid: `steps` uniform steps in $t$ from 1 to 0 (geometric in $\\sigma$)."""
        return self.time(jnp.arange(steps + 1), steps)
