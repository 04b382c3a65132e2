r"""Linear observation operators $A$ as equinox modules, one per observation.

An operator maps one sample $x$ to one observation $A x$. A batch of observations is one module
whose array leaves carry a leading batch axis (vmapped with the samples). The adjoint $A^\top$ is
never written by hand: [`adjoint`][] transposes any linear callable with `jax.linear_transpose`;
[`LinearOperator.T`][] and MMPS both use it. Mask *generators*
(e.g. [`kspace_mask`][]) are functions, separate from the operators that apply them.
"""

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, PRNGKeyArray


def adjoint(A: Callable[[Array], Array], like) -> Callable[[Array], Array]:
    r"""The adjoint $v \mapsto A^\top v$ of a linear callable $A$, by `jax.linear_transpose`.

    `like` fixes the input space: an array (or a tracer, or a `jax.ShapeDtypeStruct`) with the
    shape and dtype of what $A$ takes. $A$ is traced once, here; the returned closure can be
    called many times (MMPS calls it inside every solver iteration). $A$ may be one operator
    on one sample, or any linear map, e.g. a batch of operators applied to a batch of samples.
    """
    transpose = jax.linear_transpose(A, jax.ShapeDtypeStruct(like.shape, like.dtype))
    return lambda v: transpose(v)[0]


class LinearOperator(eqx.Module):
    """A linear map from one sample to one observation."""

    def __call__(self, x: Array) -> Array:
        raise NotImplementedError

    def T(self, y: Array, like: Array) -> Array:
        """The adjoint $A^\\top y$ ([`adjoint`][]); `like` is a sample (or its shape and dtype) fixing
        the input space."""
        return adjoint(self, like)(y)


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
    """A matrix with i.i.d. normal entries and rows normalised to unit norm (manifold, paper §5.1)."""
    a = jax.random.normal(key, (m, d))
    return Matrix(a / jnp.linalg.norm(a, axis=-1, keepdims=True))


def pixel_mask(key: PRNGKeyArray, shape: tuple[int, int], rho: float) -> Float[Array, "H W"]:
    """Keeps every pixel with probability $1 - \\rho$ (corrupted CIFAR-10, paper §5.2)."""
    return jax.random.bernoulli(key, 1 - rho, shape).astype(float)


def kspace_mask(key: PRNGKeyArray, acceleration: float, size: int = 320) -> Bool[Array, " size"]:
    r"""A random column mask of $N$ = `size` k-space columns at acceleration $R$ (accelerated MRI, paper §5.3).

    The fastMRI convention for single-coil knee scans of $N = 320$ columns keeps a fully sampled
    band of about $120 / R$ low-frequency columns around the centre and samples every column at
    random so that about $N / R$ columns are kept on average. Here the band width scales with $N$
    (its fraction of the columns, $0.375 / R$, is that of $N = 320$) and the sampling probability
    does not depend on $N$:

    - the centre columns $[c - h, c + h)$, $c = \lfloor N / 2 \rfloor$,
      $h = \lceil (60 / 320) N / R \rceil$ (so $h = \lceil 60 / R \rceil$ at $N = 320$), are
      always on;
    - every column is on with probability $p = 200 / (320 R - 120)$.

    The expected number of columns on is $2h + (N - 2h) p \approx N / R$ (exactly $N / R$ without
    the rounding of $h$). For $N = 320$ this is the fastMRI mask, bit for bit as before the
    scaling.
    """
    half = math.ceil(60 / 320 * size / acceleration)  # 60 / 320 = 0.1875 exactly: N = 320 gives ceil(60 / R)
    centre = size // 2
    columns = jnp.arange(size)
    always = (columns >= centre - half) & (columns < centre + half)
    return always | jax.random.bernoulli(key, 200 / (320 * acceleration - 120), (size,))


def broadcast(operator: LinearOperator, batch: int) -> LinearOperator:
    """The same operator for `batch` observations (a leading batch axis on every array leaf)."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch,) + a.shape), operator)


def take(operator: LinearOperator, index) -> LinearOperator:
    """The operators `operator[index]` of a batch of operators (an index, a slice or an index array)."""
    return jax.tree.map(lambda a: a[index], operator)


def apply(operator: LinearOperator, x: Float[Array, "B ..."]) -> Array:
    """Applies a batch of operators to a batch of samples."""
    return jax.vmap(lambda a, xi: a(xi))(operator, x)


def simulate_observations(key: PRNGKeyArray, A, x: Array, var_y) -> Array:
    r"""$y = A_i x_i + \eta_i$, $\eta_i \sim \mathcal{N}(0, \Sigma_y)$, for a batch of operators and latents."""
    y = apply(A, x)
    return y + jnp.sqrt(jnp.asarray(var_y, y.dtype)) * jax.random.normal(key, y.shape, y.dtype)


def log_likelihood(A: LinearOperator, x: Array, y: Array, var_y: ArrayLike) -> Float[Array, ""]:
    r"""$\log p(y \mid x) = \log \mathcal{N}(y \mid A x, \Sigma_y)$ for one operator and one sample.

    The density of the model [`simulate_observations`][] draws from; $\Sigma_y$ is diagonal,
    `var_y` a scalar or an array broadcastable to `y`. Vmap it over samples (and operators).
    """
    residual = y - A(x)
    var = jnp.broadcast_to(jnp.asarray(var_y, residual.dtype), residual.shape)
    return -0.5 * (jnp.sum(residual**2 / var) + jnp.sum(jnp.log(2 * jnp.pi * var)))
