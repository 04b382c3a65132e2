r"""The Tweedie covariance study (paper §4.2, Figs. 1–2): which $\mathbb{V}[x \mid x_t]$ makes
$q(y \mid x_t)$ right?

MMPS replaces the intractable likelihood $p(y \mid x_t) = \int p(y \mid x)\, p(x \mid x_t)\, dx$
of $y = W x + \eta$, $\eta \sim \mathcal{N}(0, \Sigma_y I)$, by moment matching
$q(x \mid x_t) = \mathcal{N}(\mathbb{E}[x \mid x_t], V)$:

$$q(y \mid x_t) = \mathcal{N}\big(y \mid W\, \mathbb{E}[x \mid x_t],\ \Sigma_y + W V W^\top\big).$$

For a Gaussian-mixture prior ([`GaussianMixture`][]) everything else is exact, so the quality of
$q(x_t \mid y) \propto p(x_t)\, q(y \mid x_t)$ isolates the choice of $V$ (paper §4.2; the choices are
those of docs/conventions.md, 'Covariance choices'):
`zero` ($0$), `sigma` ($\sigma^2 I$), `sigma_over_1p`, `prior`
($\sigma^2 I - \sigma^4 (\Sigma_x + \sigma^2 I)^{-1}$ with the empirical prior covariance) and
`tweedie` (the exact $\mathbb{V}[x \mid x_t] = \sigma^2 \nabla \mathbb{E}[x \mid x_t]$).

The observation is a [`Matrix`][] operator $W$ (one row in the paper), an observation `y` and the
scalar noise variance `var_y`: the operators' observation model, as everywhere in the library.
Every distribution is represented by samples (paper §4.2, Fig. 2):

- the true posterior $p(x \mid y)$: prior samples importance-resampled with weights $p(y \mid x)$;
  the true $p(x_t \mid y)$ adds $\sigma z$ to them;
- the approximation $q(x_t \mid y)$: noised prior samples $x_t = x + \sigma z \sim p(x_t)$
  importance-resampled with weights $q(y \mid x_t)$;
- the estimator floor: the same resampling with the exact likelihood
  $p(y \mid x_t) = \sum_k r_k(x_t)\, \mathcal{N}(y \mid W m_k, \Sigma_y + c\, W W^\top)$ (the mixture of
  [`GaussianMixture`][]'s component posteriors), i.e. an independent set of true $p(x_t \mid y)$
  samples drawn exactly like the approximations: the value a perfect $V$ would score.

The score is the reference's Sinkhorn number ([`sinkhorn_divergence`][]) between a true set and
an approximate set, debiased by a second, independent true set.
"""

from typing import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from ..data.mixture import GaussianMixture, manifold_mixture
from ..inverse.mmps import Covariance, covariance
from ..inverse.operators import (
    Matrix, broadcast, log_likelihood, random_projection, simulate_observations,
)
from ..linalg.dplr import DPLR
from ..linalg.ppca import ppca
from .sinkhorn import sinkhorn_divergences

EXACT = "exact"
"""The name of the exact likelihood $p(y \\mid x_t)$ among the weights: the estimator floor."""

CHOICES = ("zero", "sigma", "sigma_over_1p", "prior", "tweedie")
"""The covariance choices (docs/conventions.md, 'Covariance choices') that the study can compare."""


def random_observation(
    key: PRNGKeyArray, mixture: GaussianMixture, var_y: float = 1e-4, rows: int = 1
) -> tuple[Matrix, Float[Array, " rows"]]:
    r"""The observation of paper §4.2: a [`random_projection`][] $W$ (rows $\sim \mathcal{N}(0, I)$
    normalised to the unit sphere), the true $x$ the first component mean, and
    $y \sim \mathcal{N}(W x, \Sigma_y I)$ by [`simulate_observations`][].

    **Returns:** the operator $W$ and `y` of shape `(rows,)`.
    """
    key_w, key_y = jax.random.split(key)
    W = random_projection(key_w, rows, mixture.dim)
    return W, simulate_observations(key_y, broadcast(W, 1), mixture.means[:1], var_y)[0]


def resample(
    key: PRNGKeyArray, samples: Float[Array, "N n"], log_weights: Float[Array, " N"], count: int
) -> Float[Array, "count n"]:
    r"""Importance resampling: `count` draws, with replacement, of `samples[i]` with probability
    $w_i / \sum_j w_j$, by inverting the cumulative sum of $w_i = \exp(\log w_i - \max_j \log w_j)$.

    The cumulative sum runs in the dtype of `log_weights`: float64 (`jax_enable_x64`) keeps it
    exact over $2^{20}$ weights.
    """
    weights = jnp.exp(log_weights - jnp.max(log_weights))
    cumulative = jnp.cumsum(weights)
    u = jax.random.uniform(key, (count,), cumulative.dtype) * cumulative[-1]
    index = jnp.searchsorted(cumulative, u, side="right")
    return samples[jnp.minimum(index, samples.shape[0] - 1)]


def true_posterior(
    key: PRNGKeyArray, prior: Float[Array, "N n"], A: Matrix, y: Array, var_y: ArrayLike, count: int
) -> Float[Array, "count n"]:
    r"""`count` samples of $p(x \mid y) \propto p(x)\, p(y \mid x)$: prior samples resampled with
    weights $p(y \mid x)$ ([`log_likelihood`][])."""
    log_w = jax.vmap(lambda x: log_likelihood(A, x, y, var_y))(prior)
    return resample(key, prior, log_w, count)


def prior_covariance(samples: Float[Array, "N n"]) -> DPLR:
    r"""The sample covariance $\Sigma_x$ of the prior samples (with Bessel's $1 / (N - 1)$), as the
    [`DPLR`][] [`mmps.Prior`][] takes: the full-rank [`ppca`][] fit, rescaled by $N / (N - 1)$.

    At rank $r = d$, PPCA returns $10^{-6} I + Q \operatorname{diag}(L - 10^{-6}) Q^\top$, with
    $(L, Q)$ the eigenpairs of $C = X^\top X / N$: exactly $C$ whenever every $L_j \ge 10^{-6}$
    (true of the study's priors, spread over $[-2, 2]^n$), and $C$ with its eigenvalues floored at
    $10^{-6}$ otherwise.
    """
    n = samples.shape[0]
    _, cov = ppca(samples, samples.shape[1])
    return cov * (n / (n - 1))


def covariances(choices: Sequence[str], prior: Float[Array, "N n"] | None = None) -> dict[str, Covariance]:
    """The covariance choices by name ([`mmps.covariance`][]); `prior` uses the sample covariance
    of the `prior` samples ([`prior_covariance`][])."""
    cov_x = prior_covariance(prior) if "prior" in choices else None
    return {name: covariance(name, cov_x) for name in choices}


def log_likelihoods(
    mixture: GaussianMixture,
    A: Matrix,
    y: Float[Array, " m"],
    var_y: ArrayLike,
    x_t: Float[Array, " n"],
    sigma: ArrayLike,
    covs: dict[str, Covariance],
) -> dict[str, Array]:
    r"""$\log q(y \mid x_t)$ for one $x_t$ and every covariance choice, and the exact
    $\log p(y \mid x_t)$ under the name [`EXACT`][].

    Each choice gets the closure $u \mapsto J^\top u$ of the exact denoiser, here
    $J^\top u = \mathbb{V}[x \mid x_t]\, u / \sigma^2$ in closed form ($J$ is symmetric), so
    [`mmps.Tweedie`][] applies exactly $\sigma^2 J^\top u = \mathbb{V}[x \mid x_t]\, u$. Then
    $W V W^\top$ has columns $W (V W_j^\top)$ and
    $\log q(y \mid x_t) = \log \mathcal{N}(y \mid W\, \mathbb{E}[x \mid x_t], \Sigma_y I + W V W^\top)$.
    """
    sigma = jnp.asarray(sigma, x_t.dtype)
    W = A.matrix
    eye = jnp.eye(y.shape[0], dtype=x_t.dtype)
    r, x_hat, V = mixture.moments(x_t, sigma)
    vjp = lambda u: V @ u / sigma**2  # Jᵀ = J = V / σ²

    out = {}
    for name, cov in covs.items():
        VW = jax.vmap(lambda w: cov(w, sigma, vjp))(W)  # rows: (V W_jᵀ)ᵀ
        out[name] = _log_normal(y, A(x_hat), var_y * eye + W @ VW.T)

    # exact: p(y | x_t) = Σ_k r_k N(y | W m_k, Σ_y + c W Wᵀ)
    s2, v = mixture.std**2, mixture.std**2 + sigma**2
    W_m = (sigma**2 * mixture.means @ W.T + s2 * W @ x_t) / v  # (K, m)
    cov_e = var_y * eye + (s2 * sigma**2 / v) * W @ W.T
    out[EXACT] = logsumexp(_log_normal(y, W_m, cov_e), b=r)
    return out


def _log_normal(y: Array, mean: Float[Array, "... m"], cov: Float[Array, "m m"]) -> Array:
    r"""$\log \mathcal{N}(y \mid \text{mean}, \text{cov})$ for one covariance and any batch of means
    (closed form when $m = 1$: batched $1 \times 1$ Cholesky factorisations are slow on CPU)."""
    m = y.shape[0]
    if m == 1:
        var = cov[0, 0]
        return -0.5 * ((y[0] - mean[..., 0]) ** 2 / var + jnp.log(2 * jnp.pi * var))
    chol = jnp.linalg.cholesky(cov)
    z = jax.scipy.linalg.solve_triangular(chol, (y - mean).T, lower=True)
    return -0.5 * (jnp.sum(z**2, 0) + m * jnp.log(2 * jnp.pi)) - jnp.sum(jnp.log(jnp.diag(chol)))


@eqx.filter_jit
def noised_posteriors(
    key: PRNGKeyArray,
    mixture: GaussianMixture,
    A: Matrix,
    y: Float[Array, " m"],
    var_y: ArrayLike,
    prior: Float[Array, "N n"],
    sigma: ArrayLike,
    covs: dict[str, Covariance],
    count: int,
    chunk: int = 8192,
) -> dict[str, Float[Array, "count n"]]:
    r"""`count` samples of $q(x_t \mid y) \propto p(x_t)\, q(y \mid x_t)$ for every choice in `covs`,
    and of the exact $p(x_t \mid y)$ under [`EXACT`][].

    The noised prior samples $x_t = x + \sigma z$ (one draw shared by all choices) are resampled
    with weights $q(y \mid x_t)$ from [`log_likelihoods`][], computed `chunk` samples at a time.
    """
    key_z, key_r = jax.random.split(key)
    x_t = prior + sigma * jax.random.normal(key_z, prior.shape, prior.dtype)
    one = lambda x: log_likelihoods(mixture, A, y, var_y, x, sigma, covs)
    log_w = jax.lax.map(one, x_t, batch_size=min(chunk, x_t.shape[0]))
    return {name: resample(jax.random.fold_in(key_r, i), x_t, log_w[name], count)
            for i, name in enumerate(sorted(log_w))}


def posterior_sets(
    key: PRNGKeyArray,
    mixture: GaussianMixture,
    A: Matrix,
    y: Float[Array, " m"],
    var_y: ArrayLike,
    sigma: float,
    choices: Sequence[str] = ("zero", "sigma", "prior", "tweedie"),
    *,
    prior_samples: int = 2**20,
    count: int = 65536,
    chunk: int = 8192,
) -> dict[str, Float[Array, "count n"]]:
    r"""Paper Fig. 1 at one $\sigma_t$: `count` samples of the true $p(x_t \mid y)$ (name `"true"`:
    true posterior samples plus $\sigma_t z$), of $q(x_t \mid y)$ for every choice, and of the exact
    resampling (name [`EXACT`][]), all from one set of `prior_samples` prior samples."""
    key_prior, key_post, key_noise, key_q = jax.random.split(key, 4)
    prior = mixture.sample(key_prior, prior_samples)
    sigma = jnp.asarray(sigma, prior.dtype)
    true = _noised(key_noise, true_posterior(key_post, prior, A, y, var_y, count), sigma)
    approx = noised_posteriors(
        key_q, mixture, A, y, var_y, prior, sigma, covariances(choices, prior), count, chunk
    )
    return {"true": true, **approx}


@eqx.filter_jit
def _noised(key: PRNGKeyArray, x: Array, sigma: ArrayLike) -> Array:
    """$x + \\sigma z$."""
    return x + sigma * jax.random.normal(key, x.shape, x.dtype)


def study_seed(
    key: PRNGKeyArray,
    sigmas: Sequence[float],
    choices: Sequence[str] = ("zero", "sigma", "prior", "tweedie"),
    *,
    n: int = 3,
    components: int = 256,
    std: float = 0.01,
    var_y: float = 1e-4,
    prior_samples: int = 2**20,
    divergence_samples: int = 16384,
    reg: float = 1e-3,
    max_iter: int = 1024,
    stop: float = 1e-3,
    chunk: int = 8192,
    ot_dtype: jnp.dtype | str = "float32",
    callback: Callable[[], None] | None = None,
) -> dict[str, np.ndarray]:
    r"""One seed of paper Fig. 2: a fresh manifold mixture, observation and prior sample set, then
    for every $\sigma_t$ the Sinkhorn number of each choice and of the floor.

    For each $\sigma_t$: $x^{(1)}, x^{(2)}$ are two independent sets of true $p(x_t \mid y)$
    samples (true posterior samples plus fresh noise), $\pi$ the approximate set, and
    $S(\pi) = \max(\mathrm{OT}_\lambda(x^{(1)}, \pi) - \mathrm{OT}_\lambda(x^{(1)}, x^{(2)}), 10^{-6})$,
    i.e. [`sinkhorn_divergences`][], its debiasing term computed once for all choices.

    Sample sets are drawn in the default dtype (float64 under `jax_enable_x64`); the Sinkhorn
    iterations run in `ot_dtype` (float32 costs 2 to 4 times less on CPU).

    **Returns:** `{name: array of len(sigmas)}` for every choice and [`EXACT`][] (the floor).
    `callback` (if any) is called after every $\sigma_t$ (progress bars).
    """
    for name in choices:
        if name not in CHOICES:
            raise ValueError(f"unknown covariance choice {name!r}; choose from {CHOICES}")
    key_mix, key_obs, key_prior, key_post, key_sigma = jax.random.split(key, 5)
    mixture = manifold_mixture(key_mix, n=n, components=components, std=std)
    A, y = random_observation(key_obs, mixture, var_y)
    prior = mixture.sample(key_prior, prior_samples)
    covs = covariances(choices, prior)
    reference = true_posterior(key_post, prior, A, y, var_y, 2 * divergence_samples)
    x1, x2 = reference[:divergence_samples], reference[divergence_samples:]

    out = {name: np.empty(len(sigmas)) for name in (*choices, EXACT)}
    for i, sigma in enumerate(sigmas):
        sigma = jnp.asarray(sigma, prior.dtype)  # traced, not static: one compilation for all σ
        key_i = jax.random.fold_in(key_sigma, i)
        key_1, key_2, key_q = jax.random.split(key_i, 3)
        u1, u2 = _noised(key_1, x1, sigma), _noised(key_2, x2, sigma)
        approx = noised_posteriors(
            key_q, mixture, A, y, var_y, prior, sigma, covs, divergence_samples, chunk
        )
        scores = sinkhorn_divergences(
            u1, u2, approx, reg=reg, max_iter=max_iter, stop=stop, dtype=ot_dtype
        )
        for name in out:
            out[name][i] = scores[name]
        if callback is not None:
            callback()
    return out


def summarise(per_seed: dict[str, np.ndarray], quantiles: Sequence[float] = (0.25, 0.5, 0.75)) -> dict:
    r"""Quantiles over seeds, per $\sigma_t$: `{name: {"q25": [...], "median": [...], "q75": [...]}}`
    from `{name: array (seeds, len(sigmas))}`."""
    label = {0.25: "q25", 0.5: "median", 0.75: "q75"}
    return {
        name: {label.get(q, f"q{round(100 * q)}"): np.quantile(values, q, axis=0).tolist() for q in quantiles}
        for name, values in per_seed.items()
    }


def tweedie_advantage(summary: dict, heuristics: Sequence[str]) -> tuple[list[str], list[float]]:
    r"""Per $\sigma_t$, the heuristic with the lowest median and the ratio of its median to
    `tweedie`'s (how many times more accurate Tweedie's covariance is; $> 1$ favours Tweedie)."""
    medians = np.array([summary[name]["median"] for name in heuristics])  # (choices, sigmas)
    best = np.argmin(medians, axis=0)
    ratio = medians[best, np.arange(medians.shape[1])] / np.asarray(summary["tweedie"]["median"])
    return [heuristics[b] for b in best], ratio.tolist()
