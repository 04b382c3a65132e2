r"""Gaussian priors: diagonal-plus-low-rank (DPLR) covariance algebra and the analytic denoiser.

A DPLR matrix is $\Sigma = \operatorname{diag}(D) + U V$ with $U \in \mathbb{R}^{d \times r}$,
$V \in \mathbb{R}^{r \times d}$ (method.md §4.3); its inverse is again DPLR by Woodbury's identity,
so the analytic Gaussian denoiser (method.md §1.4) scales to $d = 10^5$ with $r = 64$.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from .denoiser import broadcast_sigma


class DPLR(eqx.Module):
    r"""A $d \times d$ matrix $\operatorname{diag}(D) + U V$.

    **Arguments:**

    - `diagonal`: $D$, shape `(d,)`.
    - `u`: $U$, shape `(d, r)`.
    - `v`: $V$, shape `(r, d)`; defaults to $U^\top$ (symmetric, as a covariance).
    """

    diagonal: Float[Array, " d"]
    u: Float[Array, "d r"]
    v: Float[Array, "r d"]

    def __init__(self, diagonal: ArrayLike, u: ArrayLike, v: ArrayLike | None = None):
        self.u = jnp.asarray(u)
        self.v = self.u.T if v is None else jnp.asarray(v)
        self.diagonal = jnp.broadcast_to(jnp.asarray(diagonal), self.u.shape[:1])

    @property
    def dim(self) -> int:
        return self.diagonal.shape[0]

    def __add__(self, other: ArrayLike) -> "DPLR":
        """Adds a scalar times the identity, or a diagonal given as a vector."""
        return DPLR(self.diagonal + other, self.u, self.v)

    def __mul__(self, scale: ArrayLike) -> "DPLR":
        return DPLR(scale * self.diagonal, scale * self.u, self.v)

    __rmul__ = __mul__

    def __matmul__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        """Matrix-vector product on the last axis (batched over leading axes)."""
        return self.diagonal * x + (x @ self.v.T) @ self.u.T

    def dense(self) -> Float[Array, "d d"]:
        return jnp.diag(self.diagonal) + self.u @ self.v

    def diag(self) -> Float[Array, " d"]:
        return self.diagonal + jnp.einsum("ir,ri->i", self.u, self.v)

    def _capacitance(self) -> Float[Array, "r r"]:
        r"""$C = I_r + V D^{-1} U$."""
        return jnp.eye(self.u.shape[1], dtype=self.u.dtype) + (self.v / self.diagonal) @ self.u

    def inv(self) -> "DPLR":
        r"""Woodbury: $(D + UV)^{-1} = D^{-1} - D^{-1} U C^{-1} V D^{-1}$, again DPLR."""
        d_inv = 1 / self.diagonal
        return DPLR(d_inv, -d_inv[:, None] * self.u, jnp.linalg.solve(self._capacitance(), self.v * d_inv))

    def solve(self, b: Float[Array, "... d"]) -> Float[Array, "... d"]:
        r"""$(D + UV)^{-1} b$ on the last axis, without forming the inverse."""
        d_inv_b = b / self.diagonal
        w = jnp.linalg.solve(self._capacitance(), (d_inv_b @ self.v.T)[..., None])[..., 0]
        return d_inv_b - (w @ self.u.T) / self.diagonal

    def slogdet(self) -> tuple[Array, Array]:
        r"""Sign and $\log|\det|$ by $\det(D + UV) = \det D \, \det(I_r + V D^{-1} U)$."""
        sign_c, logdet_c = jnp.linalg.slogdet(self._capacitance())
        sign = sign_c * jnp.prod(jnp.sign(self.diagonal))
        return sign, logdet_c + jnp.sum(jnp.log(jnp.abs(self.diagonal)))


class GaussianDenoiser(eqx.Module):
    r"""The exact denoiser $\mathbb{E}[x \mid x_t]$ of a Gaussian prior $x \sim \mathcal{N}(\mu, \Sigma)$.

    $$D(x_t, \sigma) = x_t - \sigma^2 (\Sigma + \sigma^2 I)^{-1} (x_t - \mu), \qquad
    \frac{\partial D}{\partial x_t} = I - \sigma^2 (\Sigma + \sigma^2 I)^{-1}$$ (method.md §1.4).

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
