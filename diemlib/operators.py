r"""Linear observation operators $A$ as equinox modules, one per observation.

An operator maps one sample $x$ to one observation $A x$. A batch of observations is one module
whose array leaves carry a leading batch axis (vmapped with the samples). The adjoint $A^\top$ is
never written by hand: [`LinearOperator.T`][] is `jax.linear_transpose` of $A$. Mask *generators*
(e.g. [`kspace_mask`][]) are functions, separate from the operators that apply them.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray


class LinearOperator(eqx.Module):
    """A linear map from one sample to one observation."""

    def __call__(self, x: Array) -> Array:
        raise NotImplementedError

    def T(self, y: Array, like: Array) -> Array:
        """The adjoint $A^\\top y$; `like` is a sample (or its shape/dtype) fixing the input space."""
        return jax.linear_transpose(self, jax.ShapeDtypeStruct(like.shape, like.dtype))(y)[0]


class Matrix(LinearOperator):
    r"""A dense matrix: $A x$ with $A \in \mathbb{R}^{m \times d}$ (the manifold's random projections)."""

    matrix: Float[Array, "m d"]

    def __call__(self, x):
        return self.matrix @ x


class PixelMask(LinearOperator):
    r"""Pixel deletion: $A x = m \odot x$, a mask of shape `(H, W)` shared by the channels of `(C, H, W)`."""

    mask: Float[Array, "H W"]

    def __call__(self, x):
        return self.mask * x


class MaskedFFT(LinearOperator):
    r"""Under-sampled single-coil k-space: a column mask on the centred orthonormal 2-D FFT.

    $$A x = m \odot [\operatorname{Re} k, \operatorname{Im} k], \qquad
    k = \operatorname{fftshift}(\operatorname{fft2}(\operatorname{ifftshift}(x)))$$ (orthonormal),
    for an image `(1, H, W)` and a column mask $m$ of shape `(W,)`; the output is `(2, H, W)`.
    """

    mask: Float[Array, " W"]

    def __call__(self, x):
        k = jnp.fft.fftshift(jnp.fft.fft2(jnp.fft.ifftshift(x[0]), norm="ortho"))
        return self.mask * jnp.stack([k.real, k.imag])


def random_projection(key: PRNGKeyArray, m: int, d: int) -> Matrix:
    """A matrix with i.i.d. normal entries and rows normalised to unit norm (manifold, experiments.md §01)."""
    a = jax.random.normal(key, (m, d))
    return Matrix(a / jnp.linalg.norm(a, axis=-1, keepdims=True))


def pixel_mask(key: PRNGKeyArray, shape: tuple[int, int], rho: float) -> Float[Array, "H W"]:
    """Keeps every pixel with probability $1 - \\rho$ (CIFAR, experiments.md §03)."""
    return jax.random.bernoulli(key, 1 - rho, shape).astype(float)


def kspace_mask(key: PRNGKeyArray, acceleration: float, size: int = 320) -> Bool[Array, " size"]:
    r"""A random column mask at acceleration $R$ (fastMRI, experiments.md §04).

    The centre columns $[c - \lceil 60/R \rceil, c + \lceil 60/R \rceil)$, $c = $ `size // 2`, are
    always on; every column is on with probability $200 / (320 R - 120)$ (for `size = 320`: about
    $320 / R$ columns on average).
    """
    half = math.ceil(60 / acceleration)
    centre = size // 2
    columns = jnp.arange(size)
    always = (columns >= centre - half) & (columns < centre + half)
    return always | jax.random.bernoulli(key, 200 / (320 * acceleration - 120), (size,))


def broadcast(operator: LinearOperator, batch: int) -> LinearOperator:
    """The same operator for `batch` observations (a leading batch axis on every array leaf)."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch,) + a.shape), operator)


def apply(operator: LinearOperator, x: Float[Array, "B ..."]) -> Array:
    """Applies a batch of operators to a batch of samples."""
    return jax.vmap(lambda a, xi: a(xi))(operator, x)
