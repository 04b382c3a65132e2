r"""EDM-preconditioned denoisers and the denoising score-matching loss.

A *denoiser* here is any callable `D(x_t, sigma) -> x_hat` on a batch: `x_t` has shape
`(B, *event)`, `sigma` is a scalar or has shape `(B,)`, and `x_hat` estimates
$\mathbb{E}[x \mid x_t]$. Networks act on one sample (equinox convention);
[`Denoiser`][] vmaps them and applies the EDM preconditioning ($\sigma_\text{data} = 1$;
docs/conventions.md, 'Denoiser preconditioning'):

$$D_\theta(x_t, \sigma) = c_\text{skip} x_t + c_\text{out} F_\theta(c_\text{in} x_t,
\operatorname{emb}(c_\text{noise})),$$
$$c_\text{skip} = \frac{1}{\sigma^2 + 1}, \quad c_\text{out} = \frac{\sigma}{\sqrt{\sigma^2 + 1}},
\quad c_\text{in} = \frac{1}{\sqrt{\sigma^2 + 1}}, \quad c_\text{noise} = \ln \sigma.$$
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .schedule import VESchedule


def preconditioning(sigma: ArrayLike) -> tuple[Array, Array, Array, Array]:
    """Returns the EDM coefficients `(c_skip, c_out, c_in, c_noise)` at noise level `sigma`."""
    sigma = jnp.asarray(sigma)
    c_skip = 1 / (sigma**2 + 1)
    c_out = sigma / jnp.sqrt(sigma**2 + 1)
    c_in = 1 / jnp.sqrt(sigma**2 + 1)
    c_noise = jnp.log(sigma)
    return c_skip, c_out, c_in, c_noise


def noise_embedding(u: ArrayLike, features: int) -> Float[Array, " features"]:
    r"""Sinusoidal embedding of the scalar $u = \ln \sigma$.

    $$\omega_k = (10^{-4})^{k / (F/2 - 1)}, \quad k = 0, \dots, F/2 - 1, \qquad
    \operatorname{emb}(u) = [\sin(\omega u), \cos(\omega u)]$$ (sines first).
    """
    half = features // 2
    omega = 1e-4 ** (jnp.arange(half) / (half - 1))
    angle = omega * jnp.asarray(u)
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)])


def broadcast_sigma(sigma: ArrayLike, batch: int) -> Float[Array, " batch"]:
    """Broadcasts a scalar or per-sample noise level to shape `(batch,)`."""
    return jnp.broadcast_to(jnp.asarray(sigma), (batch,))


class Denoiser(eqx.Module):
    r"""EDM-preconditioned denoiser $D_\theta(x_t, \sigma)$ around a per-sample network.

    **Arguments:**

    - `network`: an equinox module called as `network(x, emb, key=key)` on one sample.
    - `emb_features`: size $F$ of the noise embedding (64 for the manifold, 256 for images).
    """

    network: eqx.Module
    emb_features: int = eqx.field(static=True)

    def __call__(
        self,
        x_t: Float[Array, "B ..."],
        sigma: ArrayLike,
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "B ..."]:
        """Denoises a batch. `key` enables the network's dropout (training); `None` disables it."""
        batch = x_t.shape[0]
        sigma = broadcast_sigma(sigma, batch).astype(x_t.dtype)
        keys = None if key is None else jax.random.split(key, batch)

        def one(x, s, k):
            c_skip, c_out, c_in, c_noise = preconditioning(s)
            emb = noise_embedding(c_noise, self.emb_features).astype(x.dtype)
            return c_skip * x + c_out * self.network(c_in * x, emb, key=k)

        return jax.vmap(one)(x_t, sigma, keys)


def loss_weight(sigma: ArrayLike) -> Array:
    r"""EDM weighting $\lambda(\sigma) = 1/\sigma^2 + 1$ ($\sigma_\text{data} = 1$)."""
    return 1 / jnp.asarray(sigma) ** 2 + 1


def denoising_loss(
    denoiser,
    x: Float[Array, "B ..."],
    key: PRNGKeyArray,
    schedule: VESchedule,
) -> Float[Array, ""]:
    r"""Denoising score-matching loss (paper §2; docs/conventions.md, 'Training loss').

    $$\mathcal{L} = \frac{1}{B} \sum_b \lambda(\sigma_b) \,
    \frac{1}{d} \big\| D_\theta(x_b + \sigma_b z_b, \sigma_b) - x_b \big\|^2,
    \quad t_b \sim \mathrm{Beta}(3, 3), \; \sigma_b = \sigma_{t_b}, \; z_b \sim \mathcal{N}(0, I).$$

    `denoiser` is called with `key=` for its dropout. $t \sim \mathrm{Beta}(3, 3)$ is drawn as the
    median of 5 uniforms (the 3rd of 5 order statistics is exactly Beta(3, 3)), which compiles
    several times faster than `jax.random.beta`.
    """
    key_t, key_z, key_dropout = jax.random.split(key, 3)
    batch = x.shape[0]
    t = jnp.median(jax.random.uniform(key_t, (batch, 5), dtype=x.dtype), axis=1)
    sigma = schedule(t)
    z = jax.random.normal(key_z, x.shape, dtype=x.dtype)
    x_t = x + sigma.reshape((batch,) + (1,) * (x.ndim - 1)) * z
    x_hat = denoiser(x_t, sigma, key=key_dropout)
    error = jnp.mean(((x_hat - x) ** 2).reshape(batch, -1), axis=1)
    return jnp.mean(loss_weight(sigma) * error)
