r"""MMPS: moment matching posterior sampling, a posterior denoiser for linear-Gaussian observations.

For $y = A x + \eta$, $\eta \sim \mathcal{N}(0, \Sigma_y)$, approximate the denoising posterior by
$q(x \mid x_t) = \mathcal{N}(\hat{x}, V)$ with $\hat{x} = D(x_t, \sigma)$ and Tweedie's covariance
$V = \sigma^2 J$, $J = \partial \hat{x} / \partial x_t$. Then (paper §4)

$$\mathbb{E}[x \mid x_t, y] \approx \hat{x} + \sigma^2 J^\top A^\top v, \qquad
(\Sigma_y + A V A^\top) \, v = y - A \hat{x}.$$

Per call (docs/conventions.md, 'MMPS'): one VJP gives $\hat{x}$ and the closure $u \mapsto J^\top u$,
reused for every product; $A^\top$ is the [`adjoint`][] of $A$ (`jax.linear_transpose`, traced
once); the system is solved matrix-free by a Krylov solver. With $k$ solver iterations the cost
is one forward pass and $k + 1$ VJPs.
"""

import abc
from typing import Callable, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, ArrayLike, Float

from ..diffusion.denoiser import broadcast_sigma
from ..linalg.dplr import DPLR
from .operators import LinearOperator, adjoint, apply
from ..linalg.solvers import CG, KrylovSolver


class Covariance(eqx.Module):
    """A choice of the covariance $V$ of $q(x \\mid x_t)$ inside the solve (paper §4.2;
    docs/conventions.md, 'Covariance choices')."""

    def at(self, x_t: Array, sigma: Array, vjp: Callable[[Array], Array]) -> "Covariance":
        """The choice ready for one denoiser call at `x_t`: what it computes once per call, before
        the solve (e.g. TMPD's diagonal, `diemlib.inverse.baselines`). By default, itself."""
        return self

    @abc.abstractmethod
    def __call__(self, u: Array, sigma: Array, vjp: Callable[[Array], Array]) -> Array:
        """Returns $V u$; `vjp` is the closure $u \\mapsto J^\\top u$ of the denoiser."""


class Tweedie(Covariance):
    r"""Tweedie's covariance $V = \sigma^2 J$ (the paper's method), applied as $\sigma^2 J^\top u$.

    For the exact denoiser $J = I + \sigma^2 \nabla^2 \log p_t$ is symmetric, so $J^\top u = J u$
    and one vector-Jacobian product serves both the solve and the final step. A trained network's
    $J$ is only nearly symmetric; like the reference implementation, we then solve
    $(\Sigma_y + \sigma^2 A J^\top A^\top) v = y - A \hat{x}$, which costs one VJP per iteration
    (forward-mode $J u$ would need a second, JVP-traced network). The tests check this form
    against a dense solve with a non-symmetric $J$.
    """

    def __call__(self, u, sigma, vjp):
        return sigma**2 * vjp(u)


class Zero(Covariance):
    r"""$V = 0$ (DPS-like)."""

    def __call__(self, u, sigma, vjp):
        return jnp.zeros_like(u)


class Sigma(Covariance):
    r"""$V = \Sigma_t = \sigma^2 I$."""

    def __call__(self, u, sigma, vjp):
        return sigma**2 * u


class SigmaOver1p(Covariance):
    r"""$V = (I + \Sigma_t^{-1})^{-1} = \frac{\sigma^2}{1 + \sigma^2} I$ (ΠGDM-style)."""

    def __call__(self, u, sigma, vjp):
        return sigma**2 / (1 + sigma**2) * u


class Prior(Covariance):
    r"""$V = (\Sigma_x^{-1} + \Sigma_t^{-1})^{-1} = \sigma^2 I - \sigma^4 (\Sigma_x + \sigma^2 I)^{-1}$.

    **Arguments:**

    - `cov`: $\Sigma_x$ (a [`DPLR`][] over the flattened event), from a Gaussian fit of the prior.
    """

    cov: DPLR

    def __call__(self, u, sigma, vjp):
        def one(s2, w):
            return s2 * w - s2**2 * (self.cov + s2).solve(w)

        sigma2 = jnp.ravel(sigma**2)  # one noise level per sample: 1 (per-sample solve) or B
        flat = u.reshape(sigma2.size, self.cov.dim)
        return jax.vmap(one)(sigma2, flat).reshape(u.shape)


COVARIANCES = {"tweedie": Tweedie, "zero": Zero, "sigma": Sigma, "sigma_over_1p": SigmaOver1p, "prior": Prior}


def covariance(name: str, prior_cov: DPLR | None = None) -> Covariance:
    """Builds a covariance choice by name (the names params files use); `prior` needs `prior_cov`."""
    if name not in COVARIANCES:
        raise ValueError(f"unknown covariance {name!r}; choose one of {sorted(COVARIANCES)}")
    if name == "prior":
        if prior_cov is None:
            raise ValueError("covariance 'prior' needs the prior covariance Σ_x (prior_cov)")
        return Prior(prior_cov)
    return COVARIANCES[name]()


def posterior_mean(
    denoise: Callable[[Array], Array],
    x_t: Array,
    sigma: Array,
    y: Array,
    A: Callable[[Array], Array],
    var_y: Array,
    cov: Covariance,
    solver: lx.AbstractLinearSolver,
    systems: int = 1,
) -> tuple[Array, dict]:
    r"""$\hat{x} + \sigma^2 J^\top A^\top v$ with $(\Sigma_y + A V A^\top) v = y - A\hat{x}$.

    `x_t` is a batch and `A` applies every sample's operator. With `systems = 1` the batch is one
    system, its inner products global over the batch (the reference's form); with `systems = G`,
    the batch splits into $G$ equal groups of consecutive samples, each its own system: the
    denoiser acts on each sample alone, so the operator is block diagonal and our solvers
    (`diemlib.linalg.solvers`) take every inner product per group while one batched VJP serves
    all groups. Other lineax solvers know only one system: call them with `systems = 1`.
    """
    x_hat, vjp_fn = jax.vjp(denoise, x_t)
    vjp = lambda u: vjp_fn(u)[0]
    A_T = adjoint(A, x_t)
    cov = cov.at(x_t, sigma, vjp)

    def matvec(v):
        return var_y * v + A(cov(A_T(v), sigma, vjp))

    structure = jax.ShapeDtypeStruct(y.shape, y.dtype)
    operator = lx.FunctionLinearOperator(matvec, structure, lx.positive_semidefinite_tag)
    b = y - A(x_hat)
    solution = lx.linear_solve(operator, b, solver, options={"systems": systems}, throw=False)
    v = solution.value
    if "residual" in solution.stats:  # our solvers: free
        residual = solution.stats["residual"]
    else:  # lineax's own solvers report none: one more operator product (one VJP)
        b_norm = jnp.linalg.norm(b)
        residual = jnp.linalg.norm(b - matvec(v)) / jnp.where(b_norm > 0, b_norm, 1)
    info = {"residual": residual, "iterations": solution.stats.get("num_steps", jnp.asarray(0))}
    return x_hat + sigma**2 * vjp(A_T(v)), info


class MMPSDenoiser(eqx.Module):
    r"""The MMPS posterior denoiser $\mathbb{E}[x \mid x_t, y]$ wrapping any batched denoiser.

    **Arguments:**

    - `denoiser`: the prior denoiser $D(x_t, \sigma) \approx \mathbb{E}[x \mid x_t]$ (batched).
    - `A`: the observation operators, one per sample (a [`LinearOperator`][] whose array leaves
      carry a leading batch axis; see [`broadcast`][] for a shared operator).
    - `y`: observations, shape `(B, *obs)`.
    - `var_y`: the diagonal of $\Sigma_y$: a scalar or an array broadcastable to `y`.
    - `cov`: the covariance choice of $V$ ([`Tweedie`][] by default).
    - `solver`: a lineax solver (default [`CG`][] with 3 iterations).
    - `scope`: `"sample"` (default): every sample solves its own system, so results do not depend
      on batch composition or sharding; `"batch"`: one system over the whole batch, with global
      inner products (the reference's `jax.scipy.sparse.linalg.cg`; docs/conventions.md, 'Solver
      semantics'); an integer $g$: every $g$ consecutive samples share one system, all groups
      solved at once (`"sample"` is $g = 1$, `"batch"` is $g = B$; $g$ divides $B$). A batch of
      8192 with $g = 256$ solves the reference's 32 systems of 256 in one call. With our
      solvers ([`CG`][], [`GMRES`][]) every scope costs the same: one batched VJP per operator
      product, inner products per group; other lineax solvers are vmapped over the groups.
    """

    denoiser: Callable
    A: LinearOperator
    y: Array
    var_y: Array
    cov: Covariance = Tweedie()
    solver: lx.AbstractLinearSolver = CG(3)
    scope: Literal["sample", "batch"] | int = eqx.field(static=True, default="sample")

    def __check_init__(self):
        if self.scope not in ("sample", "batch") and not (isinstance(self.scope, int) and self.scope > 0):
            raise ValueError(f"scope must be 'sample', 'batch' or a group size > 0, got {self.scope!r}")

    def group_size(self, batch: int) -> int:
        """The number of samples per system for a batch of `batch`."""
        group = {"sample": 1, "batch": batch}.get(self.scope, self.scope)
        if batch % group:
            raise ValueError(f"a batch of {batch} does not split into groups of {group}")
        return group

    def __call__(self, x_t: Float[Array, "B ..."], sigma: ArrayLike) -> Float[Array, "B ..."]:
        return self.with_info(x_t, sigma)[0]

    def with_info(self, x_t: Float[Array, "B ..."], sigma: ArrayLike) -> tuple[Array, dict]:
        """The posterior mean and solver diagnostics: `residual` (relative) and `iterations`."""
        batch = x_t.shape[0]
        group = self.group_size(batch)
        sigma = broadcast_sigma(sigma, batch).astype(x_t.dtype)
        var_y = jnp.broadcast_to(jnp.asarray(self.var_y, self.y.dtype), self.y.shape)

        def solve(x, s, y, a, var, systems):
            denoise = lambda z: self.denoiser(z, s)
            A = lambda z: apply(a, z)
            s_x = s.reshape(s.shape + (1,) * (x.ndim - 1))  # broadcasts against x
            return posterior_mean(denoise, x, s_x, y, A, var, self.cov, self.solver, systems)

        if group == batch or isinstance(self.solver, KrylovSolver):  # one call, batch // group systems
            x, info = solve(x_t, sigma, self.y, self.A, var_y, batch // group)
        else:  # a lineax solver: one vmapped call per group
            split = lambda leaf: leaf.reshape(batch // group, group, *leaf.shape[1:])
            x, info = jax.vmap(lambda *args: solve(*args, 1))(*jax.tree.map(split, (x_t, sigma, self.y, self.A, var_y)))
            x = x.reshape(x_t.shape)
        return x, jax.tree.map(lambda v: jnp.repeat(jnp.ravel(v), batch // jnp.size(v)), info)
