r"""The analytic denoiser of a Gaussian prior: the initial prior $q_0$ and the tests' ground truth.

For $x \sim \mathcal{N}(\mu, \Sigma)$ every quantity of the method has a closed form: the
denoiser, its Jacobian (symmetric), Tweedie's covariance and the exact posterior under a linear
observation. $\Sigma$ is a [`DPLR`][] matrix, so this scales to $d = 10^5$ with rank $r = 64$.
"""

import equinox as eqx
import jax
from jaxtyping import Array, ArrayLike, Float

from ..linalg.dplr import DPLR
from .denoiser import broadcast_sigma


class GaussianDenoiser(eqx.Module):
    r"""The exact denoiser $\mathbb{E}[x \mid x_t]$ of a Gaussian prior $x \sim \mathcal{N}(\mu, \Sigma)$.

    $$D(x_t, \sigma) = x_t - \sigma^2 (\Sigma + \sigma^2 I)^{-1} (x_t - \mu), \qquad
    \frac{\partial D}{\partial x_t} = I - \sigma^2 (\Sigma + \sigma^2 I)^{-1}$$
    (docs/conventions.md, 'Gaussian denoiser').

    **Arguments:**

    - `mean`: $\mu$ with the event shape of one sample (e.g. `(C, H, W)`).
    - `cov`: $\Sigma$ as a [`DPLR`][] over the flattened event.
    """

    mean: Array
    cov: DPLR

    def __call__(self, x_t: Float[Array, "B ..."], sigma: ArrayLike) -> Float[Array, "B ..."]:
        batch = x_t.shape[0]
        sigma2 = broadcast_sigma(sigma, batch).astype(x_t.dtype) ** 2
        residual = (x_t - self.mean).reshape(batch, -1)
        correction = jax.vmap(lambda s2, r: s2 * (self.cov + s2).solve(r))(sigma2, residual)
        return x_t - correction.reshape(x_t.shape)
