r"""Isotropic Gaussian mixtures: a prior whose denoising posterior is known in closed form.

The prior of experiment 02 (paper §4.2) is a uniform mixture of $K$ isotropic Gaussians,

$$p(x) = \frac{1}{K} \sum_{k=1}^K \mathcal{N}(x \mid \mu_k, s^2 I).$$

Noising $x_t = x + \sigma z$ keeps it a mixture with a wider variance $v = s^2 + \sigma^2$:
$p_t(x_t) = \frac{1}{K} \sum_k \mathcal{N}(x_t \mid \mu_k, v I)$. Given $x_t$, component $k$ has
the responsibility $r_k(x_t) = \operatorname{softmax}_k\big(-\lVert x_t - \mu_k \rVert^2 / 2v\big)$ and,
within it, $x \mid x_t, k \sim \mathcal{N}(m_k, c I)$ with

$$m_k = \frac{\sigma^2 \mu_k + s^2 x_t}{v}, \qquad c = \frac{s^2 \sigma^2}{v}.$$

So everything MMPS approximates is exact here: the score, the denoiser $\mathbb{E}[x \mid x_t]$ and
the denoising covariance $\mathbb{V}[x \mid x_t]$ (the law of total variance over components),
which equals Tweedie's $\sigma^2 I + \sigma^4 \nabla^2 \log p_t(x_t)$ (paper eq. 9–10).
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .manifold import random_manifold, sample_manifold


class GaussianMixture(eqx.Module):
    r"""The uniform mixture $p(x) = \frac{1}{K} \sum_k \mathcal{N}(x \mid \mu_k, s^2 I)$.

    Methods taking `x_t` and `sigma` work on any leading batch shape: `x_t` has shape `(..., n)`
    and `sigma` broadcasts against `x_t.shape[:-1]` (a scalar, or one noise level per sample).
    `sigma = 0` gives the clean prior. The instance is itself a batched denoiser:
    `mixture(x_t, sigma)` is [`denoise`][].

    **Arguments:**

    - `means`: $\mu_k$, shape `(K, n)`.
    - `std`: the component standard deviation $s$ (a scalar).
    """

    means: Float[Array, "K n"]
    std: Float[Array, ""]

    def __init__(self, means: ArrayLike, std: ArrayLike):
        self.means = jnp.asarray(means)
        self.std = jnp.asarray(std, self.means.dtype)

    @property
    def components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, key: PRNGKeyArray, count: int) -> Float[Array, "count n"]:
        """`count` samples: a uniform component $k$, then $\\mu_k + s z$."""
        key_k, key_z = jax.random.split(key)
        k = jax.random.randint(key_k, (count,), 0, self.components)
        return self.means[k] + self.std * jax.random.normal(key_z, (count, self.dim), self.means.dtype)

    def _variance(self, sigma: ArrayLike) -> Array:
        r"""$v = s^2 + \sigma^2$, the component variance of $p_t$."""
        return self.std**2 + jnp.asarray(sigma, self.means.dtype) ** 2

    def _logits(self, x_t: Array, sigma: ArrayLike) -> tuple[Array, Array]:
        r"""$-\lVert x_t - \mu_k \rVert^2 / 2v$, shape `(..., K)`, and $v$ broadcast to `(..., 1)`."""
        v = jnp.broadcast_to(self._variance(sigma), x_t.shape[:-1])[..., None]
        distance = jnp.sum((x_t[..., None, :] - self.means) ** 2, axis=-1)  # exact, no cancellation
        return -distance / (2 * v), v

    def log_prob(self, x_t: Float[Array, "... n"], sigma: ArrayLike = 0.0) -> Float[Array, "..."]:
        r"""$\log p_t(x_t) = \operatorname{LSE}_k\big(-\lVert x_t - \mu_k \rVert^2 / 2v\big)
        - \log K - \frac{n}{2} \log(2 \pi v)$; $\sigma = 0$ gives $\log p(x)$."""
        logits, v = self._logits(x_t, sigma)
        n = self.dim
        return logsumexp(logits, axis=-1) - math.log(self.components) - n / 2 * jnp.log(2 * jnp.pi * v[..., 0])

    def marginal(self, sigma: ArrayLike) -> "GaussianMixture":
        r"""The noised marginal $p_t$ at one noise level: the same means, std $\sqrt{s^2 + \sigma^2}$."""
        return GaussianMixture(self.means, jnp.sqrt(self._variance(sigma)))

    def responsibilities(self, x_t: Float[Array, "... n"], sigma: ArrayLike) -> Float[Array, "... K"]:
        r"""$r_k(x_t) = p(k \mid x_t) = \operatorname{softmax}_k\big(-\lVert x_t - \mu_k \rVert^2 / 2v\big)$."""
        return jax.nn.softmax(self._logits(x_t, sigma)[0], axis=-1)

    def score(self, x_t: Float[Array, "... n"], sigma: ArrayLike) -> Float[Array, "... n"]:
        r"""$\nabla \log p_t(x_t) = \sum_k r_k \frac{\mu_k - x_t}{v} = \frac{\bar{\mu} - x_t}{v}$,
        with $\bar{\mu} = \sum_k r_k \mu_k$."""
        mu_bar = self.responsibilities(x_t, sigma) @ self.means
        return (mu_bar - x_t) / self._variance(sigma)[..., None]

    def denoise(self, x_t: Float[Array, "... n"], sigma: ArrayLike) -> Float[Array, "... n"]:
        r"""$\mathbb{E}[x \mid x_t] = \sum_k r_k m_k = \frac{\sigma^2 \bar{\mu} + s^2 x_t}{v}$.

        Equal to Tweedie's formula $x_t + \sigma^2 \nabla \log p_t(x_t)$ (paper eq. 9).
        """
        return self.moments(x_t, sigma)[1]

    def __call__(self, x_t: Float[Array, "B n"], sigma: ArrayLike) -> Float[Array, "B n"]:
        r"""The batched denoiser $D(x_t, \sigma) = \mathbb{E}[x \mid x_t]$ (see [`denoise`][])."""
        return self.denoise(x_t, sigma)

    def covariance(self, x_t: Float[Array, "... n"], sigma: ArrayLike) -> Float[Array, "... n n"]:
        r"""The exact denoising covariance, by the law of total variance over components:

        $$\mathbb{V}[x \mid x_t] = c I + \Big(\frac{\sigma^2}{v}\Big)^2
        \sum_k r_k (\mu_k - \bar{\mu})(\mu_k - \bar{\mu})^\top,$$

        the within-component part $c = s^2 \sigma^2 / v$ plus the spread of the $m_k$. It equals
        Tweedie's covariance $\sigma^2 \nabla_{x_t} \mathbb{E}[x \mid x_t]
        = \sigma^2 I + \sigma^4 \nabla^2 \log p_t(x_t)$ (paper eq. 10).
        """
        return self.moments(x_t, sigma)[2]

    def moments(
        self, x_t: Float[Array, "... n"], sigma: ArrayLike
    ) -> tuple[Float[Array, "... K"], Float[Array, "... n"], Float[Array, "... n n"]]:
        r"""The responsibilities $r_k$, $\mathbb{E}[x \mid x_t]$ and $\mathbb{V}[x \mid x_t]$ in one
        pass over the components (what [`denoise`][] and [`covariance`][] return).

        The spread is computed as $\sum_k r_k \mu_k \mu_k^\top - \bar{\mu} \bar{\mu}^\top$ (two matrix
        products); unused outputs cost nothing under `jax.jit`.
        """
        sigma2 = jnp.broadcast_to(jnp.asarray(sigma, self.means.dtype) ** 2, x_t.shape[:-1])[..., None]
        v = self.std**2 + sigma2  # (..., 1)
        r = self.responsibilities(x_t, jnp.sqrt(sigma2[..., 0]))
        mu_bar = r @ self.means
        mean = (sigma2 * mu_bar + self.std**2 * x_t) / v
        n = self.dim
        outer = (self.means[:, :, None] * self.means[:, None, :]).reshape(-1, n * n)
        spread = (r @ outer).reshape(*r.shape[:-1], n, n) - mu_bar[..., :, None] * mu_bar[..., None, :]
        eye = jnp.eye(n, dtype=self.means.dtype)
        cov = (self.std**2 * sigma2 / v)[..., None] * eye + ((sigma2 / v) ** 2)[..., None] * spread
        return r, mean, cov


def manifold_mixture(
    key: PRNGKeyArray, n: int = 3, components: int = 256, std: float = 0.01
) -> GaussianMixture:
    """The prior of experiment 02: `components` points of a random smooth 1-D manifold in
    $\\mathbb{R}^n$ ([`random_manifold`][], smoothness 3, cutoff 10), min-max normalised to
    $[-2, 2]$ over the means, each the centre of an isotropic Gaussian of std `std`."""
    key_manifold, key_points = jax.random.split(key)
    manifold = random_manifold(key_manifold, n=n, m=1)
    return GaussianMixture(sample_manifold(key_points, manifold, components), std)


def helix_mixture(components: int = 256, radius: float = 2.0, std: float = 0.01) -> GaussianMixture:
    r"""The helix of paper Fig. 1: $\mu_k = (r \sin\theta_k, r \cos\theta_k, h_k)$ with
    $\theta_k$ evenly spaced over $[0, 2\pi]$ and depth $h_k$ over $[-2, 2]$."""
    theta = jnp.linspace(0.0, 2 * jnp.pi, components)
    depth = jnp.linspace(-2.0, 2.0, components)
    means = jnp.stack((radius * jnp.sin(theta), radius * jnp.cos(theta), depth), axis=-1)
    return GaussianMixture(means, std)
