r"""Posterior samplers MMPS is compared with (paper App. E): DPS, ΠGDM, TMPD and DiffPIR.

All of them guide the same sampler, DDPM (DDIM with $\eta = 1$, as the benchmark), with the same
prior denoiser $\hat{x} = D(x_t, \sigma)$, $J = \partial \hat{x} / \partial x_t$, for
$y = A x + \eta$, $\eta \sim \mathcal{N}(0, \Sigma_y)$ and $r = y - A \hat{x}$. Translated to
our variance-exploding process ($\alpha_t = 1$; docs/conventions.md, 'Posterior-sampling
baselines'), each but DPS is a *posterior denoiser* $x̂ + \Delta$ that the sampler consumes as it
consumes MMPS; four of them share one form,

$$\mathbb{E}[x \mid x_t, y] \approx \hat{x} + G A^\top v, \qquad (\Sigma_y + A V A^\top)\, v = r,$$

and differ in the covariance $V$ of $p(x \mid x_t)$ they assume inside the solve and in the
direction $G$ of the correction:

| method | $V$ in the solve | $G$ | cost per step |
|---|---|---|---|
| MMPS (the paper) | $\sigma^2 J$ | $\sigma^2 J^\top$ | $1F + (k + 1)B$ |
| ΠGDM (Song et al. 2023) | $\frac{\sigma^2}{1 + \sigma^2} I$ | $\sigma^2 J^\top$ | $1F + 1B$ |
| TMPD (Boys et al. 2023) | $\operatorname{diag}(\sigma^2 J^\top \mathbf{1})$ | $\sigma^2 J^\top$ | $1F + 2B$ |
| DiffPIR (Zhu et al. 2023) | $\rho I$, $\rho = \sigma^2 / \lambda$ | $\rho I$ | $1F$ |

DPS (Chung et al. 2023) changes the transition instead: after the step,
$x_s \gets x_s - \zeta \nabla_{x_t} \|y - A \hat{x}\|_2$ ($1F + 1B$).
"""

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, ArrayLike

from ..diffusion.denoiser import broadcast_sigma
from ..diffusion.samplers import DDPM
from ..diffusion.schedule import VESchedule
from ..linalg.solvers import CG, GMRES
from .mmps import Covariance, MMPSDenoiser, SigmaOver1p, Tweedie
from .operators import LinearOperator, adjoint, apply


class Clip(eqx.Module):
    r"""The denoiser $\operatorname{clip}(D(x_t, \sigma), -b, b)$: the benchmark clamps $\hat{x}$ to the
    data range before any Jacobian is taken (so $J$ is 0 where $\hat{x}$ is clamped)."""

    denoiser: Callable
    bound: float = 2.0

    def __call__(self, x_t, sigma):
        return jnp.clip(self.denoiser(x_t, sigma), -self.bound, self.bound)


class DPS(DDPM):
    r"""Diffusion posterior sampling (Chung et al. 2023, Algorithm 1): DDPM, then a step down the
    gradient of the residual's norm,

    $$x_s \gets x_s - \zeta \, \nabla_{x_t} \big\| y - A \hat{x}(x_t) \big\|_2 ,$$

    the **non-squared** norm, as in the official code. One VJP of the denoiser gives both
    $\hat{x}$ and the gradient. The final denoiser call of the sampler is unguided.

    **Arguments:** as [`DDPM`][], plus

    - `A`: the observation operators, one per sample (a leading batch axis).
    - `y`: the observations, `(B, *obs)`.
    - `zeta`: the step size $\zeta$ (benchmark: 0.5 for images in $[-1, 1]$, i.e. 1 for our
      latents in $[-2, 2]$: the gradient of a norm does not change with the data's scale, the
      step does).
    """

    A: LinearOperator
    y: Array
    zeta: float = 1.0

    def step(self, denoiser, x_t, t, s, key):
        sigma_t = self.schedule(t)

        def residual_norm(x):
            x_hat = denoiser(x, sigma_t)
            r = (self.y - apply(self.A, x_hat)).reshape(x.shape[0], -1)
            return jnp.sum(jnp.linalg.norm(r, axis=1)), x_hat  # per-sample norms: per-sample gradients

        grad, x_hat = jax.grad(residual_norm, has_aux=True)(x_t)
        x_s, info = super().step(lambda x, sigma: x_hat, x_t, t, s, key)
        return x_s - self.zeta * grad, info


def pigdm(denoiser: Callable, A: LinearOperator, y: Array, var_y: ArrayLike, solver=GMRES(5)) -> MMPSDenoiser:
    r"""ΠGDM (Song et al. 2023): pseudo-inverse guidance with $V = r_t^2 I$, $r_t^2 = \sigma^2 / (1 + \sigma^2)$.

    $$\hat{x} + \sigma^2 J^\top A^\top v, \qquad (\Sigma_y + r_t^2 A A^\top)\, v = y - A \hat{x}.$$

    $r_t^2$ is the posterior variance of $x$ given $x_t$ for a prior $\mathcal{N}(\mu, I)$, so
    ΠGDM is exact for that prior. It is MMPS with the `sigma_over_1p` covariance: the solve
    involves $A$ only, the correction one VJP.
    """
    return MMPSDenoiser(denoiser, A, y, var_y, SigmaOver1p(), solver)


class RowSum(Covariance):
    r"""TMPD's diagonal covariance $V = \operatorname{diag}(\sigma^2 J^\top \mathbf{1})$ (Boys et al. 2023).

    The row sums of Tweedie's covariance $\sigma^2 J$ (equal to its column sums for an exact,
    symmetric $J$), from one VJP with a vector of ones per denoiser call; exact when $J$ is
    diagonal (a prior with independent pixels).
    """

    diagonal: Array | None = None

    def at(self, x_t, sigma, vjp):
        return RowSum(sigma**2 * vjp(jnp.ones_like(x_t)))

    def __call__(self, u, sigma, vjp):
        return self.diagonal * u


def tmpd(denoiser: Callable, A: LinearOperator, y: Array, var_y: ArrayLike, solver=GMRES(5)) -> MMPSDenoiser:
    r"""TMPD (Boys et al. 2023): Tweedie moment projection with a diagonal covariance ([`RowSum`][]).

    $$\hat{x} + \sigma^2 J^\top A^\top v, \qquad (\Sigma_y + A \operatorname{diag}(d) A^\top)\, v = y - A \hat{x},
    \qquad d = \sigma^2 J^\top \mathbf{1}.$$
    """
    return MMPSDenoiser(denoiser, A, y, var_y, RowSum(), solver)


def mmps(denoiser: Callable, A: LinearOperator, y: Array, var_y: ArrayLike, solver=GMRES(5)) -> MMPSDenoiser:
    r"""MMPS with Tweedie's covariance and GMRES, as the benchmark runs it (paper §4, App. E)."""
    return MMPSDenoiser(denoiser, A, y, var_y, Tweedie(), solver)


class DiffPIRDenoiser(eqx.Module):
    r"""DiffPIR (Zhu et al. 2023): a proximal step of the data term from $\hat{x}$, no network Jacobian.

    $$\hat{x} + \Delta, \qquad \Delta = \arg\min_\Delta \tfrac{1}{2} \|y - A(\hat{x} + \Delta)\|^2_{\Sigma_y^{-1}}
    + \tfrac{1}{2 \rho} \|\Delta\|^2 = \rho A^\top v, \quad (\Sigma_y + \rho A A^\top)\, v = y - A\hat{x},$$

    with $\rho = \sigma^2 / \lambda$ (the benchmark's $\rho_t = \sigma_t^2 / (\lambda \alpha_t^2)$
    with $\alpha_t = 1$; the second form is the first by the push-through identity). The solve
    involves $A$ only; it is exact in two CG iterations for a mask.

    **Arguments:**

    - `denoiser`, `A`, `y`, `var_y`: as [`MMPSDenoiser`][].
    - `lam`: $\lambda$ (benchmark: 8).
    - `solver`: a lineax solver for the symmetric positive-definite system.
    """

    denoiser: Callable
    A: LinearOperator
    y: Array
    var_y: Array
    lam: float = 8.0
    solver: lx.AbstractLinearSolver = CG(20, 1e-4)

    def __call__(self, x_t, sigma):
        sigma = broadcast_sigma(sigma, x_t.shape[0]).astype(x_t.dtype)
        x_hat = self.denoiser(x_t, sigma)
        var_y = jnp.broadcast_to(jnp.asarray(self.var_y, self.y.dtype), self.y.shape)

        def prox(x, s, y, a, var):
            rho = s**2 / self.lam
            A_T = adjoint(a, x)
            matvec = lambda v: var * v + rho * a(A_T(v))
            structure = jax.ShapeDtypeStruct(y.shape, y.dtype)
            operator = lx.FunctionLinearOperator(matvec, structure, lx.positive_semidefinite_tag)
            v = lx.linear_solve(operator, y - a(x), self.solver, throw=False).value
            return x + rho * A_T(v)

        return jax.vmap(prox)(x_hat, sigma, self.y, self.A, var_y)


METHODS = ("dps", "pigdm", "tmpd", "diffpir", "mmps")


def posterior_sampler(
    method: str,
    denoiser: Callable,
    A: LinearOperator,
    y: Array,
    var_y: ArrayLike,
    schedule: VESchedule,
    steps: int,
    *,
    zeta: float = 1.0,
    lam: float = 8.0,
    iterations: int = 5,
) -> tuple[DDPM, Callable]:
    """The sampler and the denoiser it runs, `sampler(denoiser, shape, key)`, for one `method` of [`METHODS`][].

    Every method runs DDPM over `steps` steps; `iterations` are the GMRES iterations of ΠGDM,
    TMPD and MMPS, `zeta` DPS's step size, `lam` DiffPIR's $\\lambda$.
    """
    solver = GMRES(iterations)
    if method == "dps":
        return DPS(schedule, steps, A, y, zeta), denoiser
    if method == "diffpir":
        return DDPM(schedule, steps), DiffPIRDenoiser(denoiser, A, y, var_y, lam)
    builders = {"pigdm": pigdm, "tmpd": tmpd, "mmps": mmps}
    if method not in builders:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return DDPM(schedule, steps), builders[method](denoiser, A, y, var_y, solver)


def posterior_samples(
    method: str,
    denoiser: Callable,
    A: LinearOperator,
    y: Array,
    var_y: ArrayLike,
    schedule: VESchedule,
    steps: int,
    key,
    *,
    event_shape: tuple[int, ...],
    batch_size: int,
    mean: ArrayLike = 0.0,
    **hyper,
) -> Array:
    """One posterior sample per observation with [`posterior_sampler`][], `batch_size` observations at a time.

    The batches run one after the other inside one program (`jax.lax.map`), so a jitted call
    compiles once and its memory is that of one batch. Batch `b` uses `fold_in(key, b)`.
    `batch_size` must divide the number of observations; `hyper` goes to [`posterior_sampler`][].
    """
    n = y.shape[0]
    if n % batch_size:
        raise ValueError(f"batch_size {batch_size} does not divide the {n} observations")
    split = lambda a: a.reshape((n // batch_size, batch_size) + a.shape[1:])

    def one(args):
        A, y, b = args
        sampler, posterior = posterior_sampler(method, denoiser, A, y, var_y, schedule, steps, **hyper)
        return sampler(posterior, (batch_size, *event_shape), jax.random.fold_in(key, b), mean=mean)

    batches = (jax.tree.map(split, A), split(y), jnp.arange(n // batch_size))
    return jax.lax.map(one, batches).reshape((n, *event_shape))
