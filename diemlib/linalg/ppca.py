r"""Probabilistic PCA: the M-step of DiEM's initial Gaussian prior (docs/conventions.md, 'PPCA').

On samples $x_1, \dots, x_N \in \mathbb{R}^d$: $\mu$ is the mean; $C = X^\top X / N$ is the
covariance of the centred samples with top-$r$ eigenpairs $(L_j, Q_j)$;
$D = (\operatorname{tr} C - \sum_{j \le r} L_j) / (d - r)$ (1e-6 if $r = d$);
$U = Q \operatorname{diag}(\sqrt{\max(L - D, 0)})$ and $\Sigma = D I + U U^\top$.
"""

import jax
import jax.numpy as jnp
from jax.experimental.sparse.linalg import lobpcg_standard
from jaxtyping import Array, Float, PRNGKeyArray

from .dplr import DPLR


def top_eigenpairs(
    x: Float[Array, "n d"], rank: int, key: PRNGKeyArray | None = None
) -> tuple[Float[Array, " rank"], Float[Array, "d rank"]]:
    r"""Top-`rank` eigenpairs of $C = X^\top X / n$, from $C$ itself or from the Gram matrix.

    When $n < d$ the eigenpairs come from the Gram matrix $G = X X^\top / n$ and are mapped back
    with $Q = X^\top P / \|X^\top P\|$. LOBPCG (matrix-free) is used when `rank` is small
    relative to the matrix (5 rank < size), `eigh` otherwise.
    """
    n, d = x.shape
    gram = n < d
    size = n if gram else d
    if 5 * rank < size:
        key = jax.random.key(0) if key is None else key
        if gram:
            matvec = lambda p: x @ (x.T @ p) / n
        else:
            matvec = lambda q: x.T @ (x @ q) / n
        guess = jax.random.normal(key, (size, rank), dtype=x.dtype)
        values, vectors, _ = lobpcg_standard(matvec, guess, m=200)
    else:
        matrix = x @ x.T / n if gram else x.T @ x / n
        values, vectors = jnp.linalg.eigh(matrix)
        values, vectors = values[::-1][:rank], vectors[:, ::-1][:, :rank]
    if gram:
        vectors = x.T @ vectors
        norms = jnp.linalg.norm(vectors, axis=0)  # 0 for a null direction of the centred data
        vectors = vectors / jnp.where(norms > 0, norms, 1)
    return values, vectors


def ppca(
    x: Float[Array, "n ..."], rank: int, key: PRNGKeyArray | None = None
) -> tuple[Array, DPLR]:
    """Fits $\\mathcal{N}(\\mu, D I + U U^\\top)$ to samples; returns `(mean, cov)`.

    **Arguments:**

    - `x`: samples, shape `(n, *event)`; the mean keeps the event shape, `cov` acts on the
      flattened event.
    - `rank`: $r \\le d$.
    - `key`: LOBPCG's initial guess (deterministic default).
    """
    n = x.shape[0]
    mean = jnp.mean(x, axis=0)
    centred = (x - mean).reshape(n, -1)
    d = centred.shape[1]
    if rank > min(n, d):
        raise ValueError(f"PPCA rank {rank} exceeds min(samples, dimension) = {min(n, d)}")
    values, vectors = top_eigenpairs(centred, rank, key)
    trace = jnp.sum(centred**2) / n
    diagonal = (trace - jnp.sum(values)) / (d - rank) if rank < d else jnp.asarray(1e-6, x.dtype)
    u = vectors * jnp.sqrt(jnp.maximum(values - diagonal, 0.0))
    return mean, DPLR(jnp.full((d,), diagonal, x.dtype), u)
