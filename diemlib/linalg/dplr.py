r"""Diagonal-plus-low-rank (DPLR) matrices: the covariance algebra of Gaussian priors over images.

A DPLR matrix is $\Sigma = \operatorname{diag}(D) + U V$ with $U \in \mathbb{R}^{d \times r}$,
$V \in \mathbb{R}^{r \times d}$ (docs/conventions.md, "DPLR algebra"). Its inverse is again DPLR by Woodbury's
identity and its determinant follows from the $r \times r$ capacitance matrix, so a Gaussian
prior over $d = 3 \cdot 32^2$ or $320^2$ pixels with $r = 64$ costs $O(d r^2)$, never $O(d^3)$.
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float


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
