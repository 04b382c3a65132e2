r"""Random smooth manifolds (after Zenke & Vogels' randman), the latent of experiments 01 and 02.

An $m$-dimensional manifold in $\mathbb{R}^n$ with smoothness $\alpha$ and cutoff
$K = \lceil \epsilon^{-1/\alpha} \rceil$ draws $a, b, c \sim \mathcal{U}[0, 1)^{n \times m \times K}$
once; a point $z \sim \mathcal{U}[0, 1)^m$ maps to

$$x_j = \prod_{l=1}^m \sum_{k=1}^K \frac{a_{jlk}}{k^\alpha} \sin\big(2\pi (k\, b_{jlk} z_l + c_{jlk})\big).$$

Data sets are then min-max normalised per coordinate to $[-2, 2]$.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


class RandomManifold(eqx.Module):
    """A random smooth manifold: the map $z \\mapsto x$ above.

    **Arguments:** `a`, `b`, `c` of shape `(n, m, K)` and the smoothness `alpha`.
    """

    a: Float[Array, "n m K"]
    b: Float[Array, "n m K"]
    c: Float[Array, "n m K"]
    alpha: float = 3.0

    def __call__(self, z: Float[Array, "N m"]) -> Float[Array, "N n"]:
        k = jnp.arange(1, self.a.shape[-1] + 1)
        phase = 2 * jnp.pi * (k * self.b * z[:, None, :, None] + self.c)  # (N, n, m, K)
        return jnp.prod(jnp.sum(self.a / k**self.alpha * jnp.sin(phase), axis=-1), axis=-1)


def random_manifold(
    key: PRNGKeyArray, n: int = 5, m: int = 1, alpha: float = 3.0, epsilon: float = 1e-3
) -> RandomManifold:
    """Draws a manifold of dimension `m` in $\\mathbb{R}^n$ (paper §5.1: $K = 10$)."""
    cutoff = math.ceil(epsilon ** (-1 / alpha))
    a, b, c = jax.random.uniform(key, (3, n, m, cutoff))
    return RandomManifold(a, b, c, alpha)


def normalise(x: Float[Array, "N n"]) -> Float[Array, "N n"]:
    """Min-max normalises every coordinate over the set to $[0, 1]$, then maps it to $[-2, 2]$."""
    low, high = x.min(axis=0), x.max(axis=0)
    return 4 * (x - low) / (high - low) - 2


def sample_manifold(key: PRNGKeyArray, manifold: RandomManifold, count: int) -> Float[Array, "N n"]:
    """`count` points $z \\sim \\mathcal{U}[0, 1)^m$ mapped to the manifold, normalised to $[-2, 2]$."""
    z = jax.random.uniform(key, (count, manifold.a.shape[1]))
    return normalise(manifold(z))
