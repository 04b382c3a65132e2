r"""Krylov solvers for MMPS, written as lineax solvers so they plug in like lineax's own.

Both start from $v_0 = 0$, so the initial residual is $b$ and costs no operator product:
$k$ iterations cost exactly $k$ products $M p$. (lineax's shipped `CG` and `GMRES` evaluate
$b - M v_0$ first, one product more: for MMPS, one network VJP more per call.) Both report the
relative residual $\|b - M v_k\|/\|b\|$ from quantities they already hold, in `stats["residual"]`.

**Independent systems in one solve.** With `options={"systems": G}` in `lineax.linear_solve`,
the vector's leaves carry a leading axis that splits into $G$ equal blocks, and the operator is
block diagonal: $G$ independent systems. Every inner product, norm and coefficient is then
taken per block, so the result equals $G$ separate solves (or a `jax.vmap` over them), while
the operator is applied once to all blocks. For MMPS this means one batched network VJP per
iteration for every sample's own system, instead of a vmapped VJP per sample
(`diemlib.inverse.mmps.MMPSDenoiser`, `scope`). Stats are then per block, shape `(G,)` (scalars without the option, as lineax's).
"""

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import lineax as lx
from equinox import field


def _blocks(leaf, systems):
    return leaf.reshape(systems, -1)


def _dot(a, b, systems):
    """Inner products per system, shape `(systems,)`."""
    return sum(jnp.sum(_blocks(x, systems) * _blocks(y, systems), axis=1) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _axpy(alpha, x, y):
    """$\\alpha x + y$ on pytrees, with one $\\alpha$ per system (`alpha` of shape `(systems,)`)."""
    return jax.tree.map(lambda xi, yi: (alpha[:, None] * _blocks(xi, alpha.size)).reshape(xi.shape) + yi, x, y)


def _safe_div(num, den):
    return jnp.where(den != 0, num / jnp.where(den != 0, den, 1), 0)


class KrylovSolver(lx.AbstractLinearSolver):
    """What lineax needs beyond `compute`, shared by our solvers (real operators only); they take
    `options={"systems": G}` (see above)."""

    def init(self, operator, options):
        return operator

    def transpose(self, state, options):
        return state.transpose(), options

    def conj(self, state, options):
        return state, options

    def assume_full_rank(self):
        return True


def _systems(options) -> int:
    """The number of independent systems a solve holds (`options["systems"]`, default 1)."""
    return (options or {}).get("systems", 1)


def _stats(options, **stats) -> dict:
    """Per-system stats, or scalars (as lineax's) when `options` name no systems."""
    return stats if "systems" in (options or {}) else {k: v[0] for k, v in stats.items()}


class CG(KrylovSolver):
    r"""Conjugate gradients from $v_0 = 0$ for a symmetric positive-definite $M$.

    $$\alpha_k = \frac{r_k^\top r_k}{p_k^\top M p_k}, \quad v_{k+1} = v_k + \alpha_k p_k, \quad
    r_{k+1} = r_k - \alpha_k M p_k, \quad p_{k+1} = r_{k+1} + \frac{r_{k+1}^\top r_{k+1}}{r_k^\top r_k} p_k.$$

    **Arguments:**

    - `max_steps`: the number of iterations $k$ (exactly $k$ when `rtol = 0`).
    - `rtol`: stop early once $\|r_k\| \le$ `rtol` $\|b\|$ (the reference uses 1e-3); with several
      systems, each stops on its own residual (as `jax.vmap` over separate solves would).
    """

    max_steps: int = field(static=True)
    rtol: float = field(static=True, default=0.0)

    def compute(self, state, vector, options) -> tuple[Any, lx.RESULTS, dict]:
        operator, n = state, _systems(options)
        b_norm2 = _dot(vector, vector, n)
        v = jax.tree.map(jnp.zeros_like, vector)
        init = (jnp.zeros(n, jnp.int32), v, vector, vector, b_norm2)

        def active(carry):
            steps, *_, gamma = carry
            return (steps < self.max_steps) & (gamma > self.rtol**2 * b_norm2)

        def body(carry):
            steps, v, r, p, gamma = carry
            mp = operator.mv(p)
            alpha = _safe_div(gamma, _dot(p, mp, n))
            v_next = _axpy(alpha, p, v)
            r_next = _axpy(-alpha, mp, r)
            gamma_next = _dot(r_next, r_next, n)
            p_next = _axpy(_safe_div(gamma_next, gamma), p, r_next)
            return steps + 1, v_next, r_next, p_next, gamma_next

        if self.rtol == 0:  # a Python loop: unrolled, no loop-carried copies of the VJP's residuals
            carry = init
            for _ in range(self.max_steps):
                carry = body(carry)
        else:  # converged systems keep their values while others iterate
            def masked_body(carry):
                keep = active(carry)
                select = lambda new, old: (jnp.where(keep[:, None], _blocks(new, n), _blocks(old, n))).reshape(old.shape)
                return jax.tree.map(select, body(carry), carry)

            carry = jax.lax.while_loop(lambda c: jnp.any(active(c)), masked_body, init)
        steps, v, _, _, gamma = carry
        return v, lx.RESULTS.successful, _stats(options, num_steps=steps, residual=jnp.sqrt(_safe_div(gamma, b_norm2)))


class GMRES(KrylovSolver):
    r"""GMRES with $k$ Arnoldi steps from $v_0 = 0$, no restart, for any non-singular $M$.

    Builds an orthonormal basis $Q_k$ of the Krylov space $\mathcal{K}_k(M, b)$ with the Hessenberg
    matrix $H$ ($M Q_k = Q_{k+1} H$) and returns $v = Q_k y$ with
    $y = \arg\min_y \|\, \|b\| e_1 - H y \|$. Recommended when the denoiser's Jacobian is not
    symmetric (a trained network), where CG may diverge (docs/conventions.md, 'Solver semantics').
    With several systems, each has its own basis, $H$ and $y$.

    **Arguments:**

    - `max_steps`: the number of iterations $k$.
    """

    max_steps: int = field(static=True)

    def compute(self, state, vector, options) -> tuple[Any, lx.RESULTS, dict]:
        operator, n, k = state, _systems(options), self.max_steps
        leaves, treedef = jax.tree.flatten(vector)
        sizes = [_blocks(leaf, n).shape[1] for leaf in leaves]

        def flatten(tree):  # (n, m): one row per system
            return jnp.concatenate([_blocks(leaf, n) for leaf in jax.tree.leaves(tree)], axis=1)

        def unflatten(rows):
            parts = jnp.split(rows, list(itertools.accumulate(sizes))[:-1], axis=1)
            return jax.tree.unflatten(treedef, [p.reshape(leaf.shape) for p, leaf in zip(parts, leaves)])

        flat = flatten(vector)
        beta = jnp.linalg.norm(flat, axis=1)
        basis = jnp.zeros((k + 1, *flat.shape), flat.dtype).at[0].set(_safe_div(flat, beta[:, None]))
        hessenberg = jnp.zeros((n, k + 1, k), flat.dtype)

        for j in range(k):  # Arnoldi, unrolled: k is small and static
            w = flatten(operator.mv(unflatten(basis[j])))
            for _ in range(2):  # Gram-Schmidt twice: orthogonal to working precision
                h = jnp.einsum("jnm,nm->nj", basis[: j + 1], w)
                w = w - jnp.einsum("nj,jnm->nm", h, basis[: j + 1])
                hessenberg = hessenberg.at[:, : j + 1, j].add(h)
            norm = jnp.linalg.norm(w, axis=1)
            hessenberg = hessenberg.at[:, j + 1, j].set(norm)
            basis = basis.at[j + 1].set(_safe_div(w, norm[:, None]))
        y, residual = jax.vmap(_hessenberg_least_squares)(hessenberg, beta)
        stats = _stats(options, num_steps=jnp.full(n, k), residual=_safe_div(residual, beta))
        return unflatten(jnp.einsum("nj,jnm->nm", y, basis[:k])), lx.RESULTS.successful, stats


def _hessenberg_least_squares(h, beta):
    r"""$\arg\min_y \|\beta e_1 - H y\|$ and its residual, for an upper Hessenberg $(k + 1) \times k$ $H$.

    Givens rotations make $H$ upper triangular, then back substitution: a few scalar operations
    per sample instead of a batched SVD. A zero pivot (a happy breakdown) gives a zero coefficient.
    """
    k = h.shape[1]
    g = jnp.zeros(k + 1, h.dtype).at[0].set(beta)
    for j in range(k):
        a, b = h[j, j], h[j + 1, j]
        r = jnp.hypot(a, b)
        c, s = jnp.where(r > 0, a / jnp.where(r > 0, r, 1), 1.0), _safe_div(b, r)
        rows = jnp.stack([c * h[j] + s * h[j + 1], -s * h[j] + c * h[j + 1]])
        h = h.at[j : j + 2].set(rows)
        g = g.at[j : j + 2].set(jnp.stack([c * g[j] + s * g[j + 1], -s * g[j] + c * g[j + 1]]))
    y = jnp.zeros(k, h.dtype)
    for i in reversed(range(k)):
        y = y.at[i].set(_safe_div(g[i] - h[i, i + 1 : k] @ y[i + 1 :], h[i, i]))
    return y, jnp.abs(g[k])


def solver(name: str, max_steps: int, rtol: float = 0.0) -> lx.AbstractLinearSolver:
    """Builds a solver by name: `cg`, `gmres` (ours, from zero) or `bicgstab` (lineax's).

    `rtol > 0` stops CG early; GMRES and BiCGStab with a tolerance use lineax's own solvers.
    """
    if name == "cg":
        return CG(max_steps, rtol)
    if name == "gmres":
        return GMRES(max_steps) if rtol == 0 else lx.GMRES(rtol, 0.0, max_steps=max_steps, restart=max_steps)
    if name == "bicgstab":
        return lx.BiCGStab(rtol, 0.0, max_steps=max_steps)
    raise ValueError(f"unknown solver {name!r}; choose one of ['bicgstab', 'cg', 'gmres']")
