# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Why Tweedie's covariance? A study on Gaussian mixtures
#
# *Rozet, Andry, Lanusse & Louppe, Learning Diffusion Priors from Observations by
# Expectation Maximization (NeurIPS 2024), §4.2, Figs. 1 and 2.*
#
# > **Which file?** `02_tweedie_covariance.py` is this notebook's source (JupyterLab opens it as a notebook);
# > `02_tweedie_covariance.ipynb` beside it is its paired copy (JupyterLab writes both on every save). Open the `.py`.
#
# **Scale.** The defaults below are the quick interactive scale, what Run All does: a few minutes
# on a laptop CPU (3 experiments, 512-sample Sinkhorn numbers): rough medians, Tweedie's
# covariance ahead at most of the noise levels it resolves. `diem-run 02 --profile laptop`
# (about 20 minutes on 2 CPU cores, 16 experiments) is steadier; `--profile paper` is the paper's
# configuration for a GPU node (`params/02_tweedie_covariance/paper.yaml`: 64 experiments, 2^20
# prior samples, 16 384-sample Sinkhorn numbers); `--profile ci` is a smoke test whose numbers
# are noise. To use a profile in JupyterLab, copy its values into the parameters cell.
#
# To sample a posterior $p(x \mid y)$ with a diffusion prior, a sampler needs the score of the
# noised posterior,
#
# $$\nabla_{x_t} \log p(x_t \mid y) = \nabla_{x_t} \log p(x_t) + \nabla_{x_t} \log p(y \mid x_t),
# \qquad p(y \mid x_t) = \int p(y \mid x)\, p(x \mid x_t)\, dx .$$
#
# The prior score is the denoiser's; the likelihood $p(y \mid x_t)$ is intractable because
# $p(x \mid x_t)$ is. For a linear-Gaussian observation $y = A x + \eta$,
# $\eta \sim \mathcal{N}(0, \Sigma_y)$, **moment matching** replaces $p(x \mid x_t)$ by the Gaussian
# with the same first two moments,
#
# $$q(x \mid x_t) = \mathcal{N}\big(x \mid \mathbb{E}[x \mid x_t], \mathbb{V}[x \mid x_t]\big)
# \quad\Longrightarrow\quad
# q(y \mid x_t) = \mathcal{N}\big(y \mid A\, \mathbb{E}[x \mid x_t],\ \Sigma_y + A\, \mathbb{V}[x \mid x_t]\, A^\top\big).$$
#
# Both moments come from the denoiser by **Tweedie's formulae**:
#
# $$\mathbb{E}[x \mid x_t] = x_t + \sigma_t^2 \nabla_{x_t} \log p(x_t), \qquad
# \mathbb{V}[x \mid x_t] = \sigma_t^2 \nabla_{x_t} \mathbb{E}[x \mid x_t]
# = \sigma_t^2 I + \sigma_t^4 \nabla_{x_t}^2 \log p(x_t).$$
#
# Earlier posterior samplers kept the mean and replaced the covariance by a heuristic
# (paper §4.2; docs/conventions.md, 'Covariance choices'; with $\Sigma_t = \sigma_t^2 I$):
#
# | choice | $\mathbb{V}[x \mid x_t]$ | used by |
# |---|---|---|
# | `zero` | $0$ | DPS-like |
# | `sigma` | $\Sigma_t$ | Adam et al. |
# | `sigma_over_1p` | $(I + \Sigma_t^{-1})^{-1}$ | ΠGDM |
# | `prior` | $(\Sigma_x^{-1} + \Sigma_t^{-1})^{-1}$, $\Sigma_x$ the prior's covariance | Gaussian prior |
# | `tweedie` | $\sigma_t^2 \nabla_{x_t} \mathbb{E}[x \mid x_t]$ | MMPS (this paper) |
#
# How much does the covariance matter? We take a prior for which **everything is exact**, so that
# the only approximation left is the choice of $\mathbb{V}[x \mid x_t]$, and measure how far each
# $q(x_t \mid y) \propto p(x_t)\, q(y \mid x_t)$ lands from the true $p(x_t \mid y)$.

# %% tags=["parameters"]
seed = 0  # the run's seed: every key is fold_in(seed, ...) (>= 0)
seeds = 3  # independent experiments (manifold, W, y, samples) behind each curve of Fig. 2 (> 0)
n = 3  # dimension of the space around the 1-D manifold (> 1)
components = 256  # Gaussians in the mixture prior (> 0)
std = 0.01  # standard deviation of every mixture component (> 0)
var_y = 1e-4  # observation noise variance Sigma_y (> 0)
prior_samples = 2**15  # prior samples importance-resampled into posteriors (> 0)
divergence_samples = 512  # samples per set in each Sinkhorn number (> 0)
sigmas = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]  # noise levels sigma_t of Fig. 2 (> 0)
choices = ["zero", "sigma", "prior", "tweedie"]  # covariance choices compared; one of: zero, sigma, sigma_over_1p, prior, tweedie
helix_sigma = 0.25  # noise level sigma_t of Fig. 1 (> 0)
helix_samples = 8192  # samples per scatter of Fig. 1 (> 0)
sinkhorn_reg = 1e-3  # entropic regularisation lambda of the Sinkhorn number (> 0)
sinkhorn_max_iter = 1024  # Sinkhorn iterations at most (> 0)
sinkhorn_stop = 1e-3  # Sinkhorn stopping threshold on the marginal error (> 0)
sinkhorn_dtype = "float32"  # dtype of the Sinkhorn iterations (float32: 2-4x faster on CPU); one of: float32, float64
chunk = 8192  # noised prior samples weighted at once, bounds the memory (> 0)
out_dir = "../outputs/02_tweedie_covariance/interactive"  # where figures and metrics.json go (set by diem-run)

# %%
from diemlib.workbook.runner import run_config

config = run_config("02_tweedie_covariance", globals())  # every parameter, recorded in metrics.json

import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)  # posterior weights in float64: 2^20 importance weights

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from tqdm import tqdm

from diemlib.eval import covariance_study as cs
from diemlib.em.checkpoint import atomic_write_json
from diemlib.data.mixture import helix_mixture, manifold_mixture
from diemlib.eval.sinkhorn import sinkhorn_divergences
from diemlib.inverse.operators import Matrix

assert "tweedie" in choices and len(choices) > 1, "compare tweedie with at least one heuristic"
heuristics = [c for c in choices if c != "tweedie"]
out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
key = jax.random.key(seed)
keys = {name: jax.random.fold_in(key, i) for i, name in enumerate(["example", "helix", "study"])}
sinkhorn = dict(reg=sinkhorn_reg, max_iter=sinkhorn_max_iter, stop=sinkhorn_stop)
started = time.perf_counter()
print(jax.devices(), f"{seeds} seeds x {len(sigmas)} noise levels x {len(choices)} choices")

# %% [markdown]
# ## A prior with an exact denoiser: Gaussian mixtures
#
# The prior is a uniform mixture of $K$ narrow isotropic Gaussians (paper: $K = 256$, std
# $s = 0.01$) whose means lie on a random smooth 1-D curve in $\mathbb{R}^n$ ($n = 3$): a thin
# manifold, like the data diffusion models are good at. Noising keeps it a mixture with variance $v = s^2 + \sigma_t^2$,
# and given $x_t$, component $k$ has responsibility
# $r_k \propto \exp(-\lVert x_t - \mu_k \rVert^2 / 2v)$ and posterior
# $\mathcal{N}(m_k, c I)$, $m_k = (\sigma_t^2 \mu_k + s^2 x_t) / v$, $c = s^2 \sigma_t^2 / v$. Hence
#
# $$\mathbb{E}[x \mid x_t] = \sum_k r_k m_k, \qquad
# \mathbb{V}[x \mid x_t] = c I + \sum_k r_k (m_k - \mathbb{E}[x \mid x_t])(m_k - \mathbb{E}[x \mid x_t])^\top ,$$
#
# and the exact likelihood is a mixture too:
# $p(y \mid x_t) = \sum_k r_k \mathcal{N}(y \mid A m_k, \Sigma_y + c A A^\top)$.
# `diemlib.data.mixture` implements these; its tests check them against autodiff. Here, once more, the
# closed-form covariance against Tweedie's $\sigma_t^2 I + \sigma_t^4 \nabla^2 \log p_t$:

# %%
example = manifold_mixture(keys["example"], n=n, components=components, std=std)
k_x, k_z, k_show = jax.random.split(keys["example"], 3)
x_t = example.sample(k_x, 4) + 0.3 * jax.random.normal(k_z, (4, n))
hessian = jax.vmap(jax.hessian(lambda x: example.log_prob(x, 0.3)))(x_t)
error = jnp.abs(example.covariance(x_t, 0.3) - (0.3**2 * jnp.eye(n) + 0.3**4 * hessian)).max()
print(f"max |V[x | x_t] - (σ² I + σ⁴ ∇² log p_t)| at σ_t = 0.3: {error:.1e}")

fig, ax = plt.subplots(figsize=(4, 4), subplot_kw={"projection": "3d"})
ax.scatter(*example.sample(k_show, 4096).T[:3], s=1, alpha=0.5)
ax.set(title=f"{components} components on a random curve", xlabel="$x_0$", ylabel="$x_1$", zlabel="$x_2$")
plt.show()

# %% [markdown]
# ## Posteriors as sample sets
#
# With one observation row $W \in \mathbb{R}^{1 \times n}$ and $y = W x^\star + \eta$:
#
# - **true** $p(x_t \mid y)$: prior samples importance-resampled with weights $p(y \mid x)$
#   (float64), plus $\sigma_t z$;
# - **approximate** $q(x_t \mid y) \propto p(x_t)\, q(y \mid x_t)$: noised prior samples
#   $x_t = x + \sigma_t z$ resampled with weights
#   $\mathcal{N}(y \mid W\, \mathbb{E}[x \mid x_t], \Sigma_y + W V W^\top)$, $V$ from each choice
#   (`prior` uses the empirical covariance of the prior samples; `tweedie` the exact
#   $\mathbb{V}[x \mid x_t]$);
# - **floor**: the same resampling with the exact $p(y \mid x_t)$: an independent set of true
#   samples drawn exactly like the approximations, i.e. what a perfect $V$ would score.
#
# ## Fig. 1: a helix
#
# 256 components on a helix of radius 2 (angle $0 \to 2\pi$, depth $-2 \to 2$), observed through
# $W = (1, 0, 2)$ with $y = 0$: the plane $x_0 + 2 x_2 = 0$ cuts the helix a few times, so the
# posterior is multimodal. Grey: the true $p(x_t \mid y)$ at $\sigma_t = 0.25$; colour: each
# approximation. Titles give the Sinkhorn number (below).

# %%
helix = helix_mixture(components=components, radius=2.0, std=std)
helix_W, helix_y = Matrix(jnp.array([[1.0, 0.0, 2.0]])), jnp.array([0.0])
sets = cs.posterior_sets(
    keys["helix"], helix, helix_W, helix_y, var_y, helix_sigma, choices,
    prior_samples=prior_samples, count=helix_samples, chunk=chunk,
)
m = min(divergence_samples, helix_samples // 2)
helix_scores = sinkhorn_divergences(
    sets["true"][:m], sets["true"][-m:], {name: x[:m] for name, x in sets.items() if name != "true"},
    dtype=sinkhorn_dtype, **sinkhorn,
)

labels = {
    "zero": r"$V = 0$", "sigma": r"$V = \Sigma_t$", "sigma_over_1p": r"$V = (I + \Sigma_t^{-1})^{-1}$",
    "prior": r"$V = (\Sigma_x^{-1} + \Sigma_t^{-1})^{-1}$", "tweedie": r"Tweedie's $V$", cs.EXACT: "floor (exact likelihood)",
}
colors = {"zero": "C3", "sigma": "C1", "sigma_over_1p": "C4", "prior": "C2", "tweedie": "C0", cs.EXACT: "0.4"}
true = np.asarray(sets["true"])
fig, axes = plt.subplots(2, len(choices), figsize=(3.2 * len(choices), 6.4), sharex=True, sharey="row", squeeze=False)
for j, name in enumerate(choices):
    approx = np.asarray(sets[name])
    for i, (a, b) in enumerate([(0, 1), (0, 2)]):
        ax = axes[i, j]
        ax.scatter(true[:, a], true[:, b], s=0.5, c="0.7", alpha=0.3, lw=0, rasterized=True)
        ax.scatter(approx[:, a], approx[:, b], s=0.5, c=colors[name], alpha=0.3, lw=0, rasterized=True)
        ax.set(xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), aspect="equal", xlabel=f"$x_{a}$")
        if j == 0:
            ax.set_ylabel(f"$x_{b}$")
    axes[0, j].set_title(f"{labels[name]}\nS = {helix_scores[name]:.1e}", fontsize=10)
fig.suptitle(
    f"helix, $W = (1, 0, 2)$, $y = 0$, $\\sigma_t = {helix_sigma}$: true $p(x_t \\mid y)$ (grey) "
    f"vs $q(x_t \\mid y)$; floor S = {helix_scores[cs.EXACT]:.1e}", fontsize=11,
)
fig.tight_layout()
fig.savefig(out / "fig1_helix.png", dpi=100)
plt.show()

# %% [markdown]
# ## Fig. 2: accuracy against the noise level
#
# For each of `seeds` experiments: a fresh random manifold mixture in $\mathbb{R}^n$ (means
# min-max normalised to $[-2, 2]$), a row $W \sim \mathcal{N}(0, I)$ normalised to the unit
# sphere, $y \sim \mathcal{N}(W \mu_1, \Sigma_y)$; then, at every $\sigma_t$, the Sinkhorn number
# of the reference (paper §5.1; docs/conventions.md, 'Sinkhorn number'),
#
# $$S(\pi) = \max\big(\mathrm{OT}_\lambda(x^{(1)}, \pi) - \mathrm{OT}_\lambda(x^{(1)}, x^{(2)}),\ 10^{-6}\big),$$
#
# with $x^{(1)}, x^{(2)}$ two sets of true $p(x_t \mid y)$ samples and $\pi$ the approximation's
# (or the floor's). The curves are medians over experiments, the bands 25–75 %.

# %%
per_seed = {name: np.empty((seeds, len(sigmas))) for name in (*choices, cs.EXACT)}
with tqdm(total=seeds * len(sigmas), desc="seeds x sigmas", mininterval=10) as bar:
    for s in range(seeds):
        scores = cs.study_seed(
            jax.random.fold_in(keys["study"], s), sigmas, choices,
            n=n, components=components, std=std, var_y=var_y, prior_samples=prior_samples,
            divergence_samples=divergence_samples, chunk=chunk, ot_dtype=sinkhorn_dtype,
            callback=lambda: bar.update(1), **sinkhorn,
        )
        for name, values in scores.items():
            per_seed[name][s] = values
summary = cs.summarise(per_seed)
best, ratio = cs.tweedie_advantage(summary, heuristics)

# %%
fig, ax = plt.subplots(figsize=(6.5, 4.5))
for name in (*choices, cs.EXACT):
    q = summary[name]
    style = dict(ls="--", marker="") if name == cs.EXACT else dict(ls="-", marker="o", ms=3)
    ax.plot(sigmas, q["median"], color=colors[name], label=labels[name], **style)
    ax.fill_between(sigmas, q["q25"], q["q75"], color=colors[name], alpha=0.15, lw=0)
ax.set(
    xscale="log", yscale="log", xlabel=r"$\sigma_t$", ylabel="Sinkhorn divergence",
    title=f"true vs approximate $p(x_t \\mid y)$, median over {seeds} experiments",
)
ax.grid(True, which="major", alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out / "fig2_divergence.png", dpi=100)
plt.show()

# %% [markdown]
# ## Verdict
#
# The paper's claim: Tweedie's covariance makes $q(x_t \mid y)$ **orders of magnitude** more
# accurate than the heuristics. Below, per $\sigma_t$, the best heuristic's median over Tweedie's
# (ratio $\geq 10$: at least one order of magnitude). A median inside the floor's band (below its
# 75th percentile) is not resolved by the estimator: where Tweedie's is, its error is too small to
# measure (the ratio is then a lower bound, or meaningless when clamped at $10^{-6}$); where the
# heuristics' are too, nothing can be concluded.
# At large $\sigma_t$ every set is dominated by the noise $\sigma_t z$, and the transport costs,
# of order $\sigma_t^2$, dwarf $\lambda = 10^{-3}$: 1024 Sinkhorn iterations no longer converge
# (at $\sigma_t = 5$ the debiasing term still moves by about 6 % between 1024 and 4096), so the
# number there is estimator noise of either sign and the medians are clamped at $10^{-6}$.

# %%
floor = summary[cs.EXACT]


def verdict(r):
    if r >= 100:
        return f"{np.log10(r):.1f} orders of magnitude better"
    if r >= 10:
        return f"{np.log10(r):.1f} order of magnitude better"
    return f"better, by {r:.1f}x" if r > 1 else "NOT better"


rows = []
print(f"{'sigma_t':>8} {'best heuristic':>15} {'its median':>11} {'tweedie':>9} {'floor':>9} {'ratio':>8}  verdict")
for i, sigma in enumerate(sigmas):
    h, tw, f75 = summary[best[i]]["median"][i], summary["tweedie"]["median"][i], floor["q75"][i]
    if h <= f75:
        text = "unresolved: the heuristics are at the estimator floor too"
    elif tw <= f75:
        text = f"Tweedie at the estimator floor, the best heuristic above it ({h:.1e} > floor q75 {f75:.1e})"
    else:
        text = verdict(ratio[i])
    rows.append({"sigma": sigma, "best_heuristic": best[i], "ratio": ratio[i], "tweedie_at_floor": bool(tw <= f75),
                 "heuristic_at_floor": bool(h <= f75), "verdict": text})
    print(f"{sigma:>8g} {best[i]:>15} {h:>11.2e} {tw:>9.2e} {floor['median'][i]:>9.2e} {ratio[i]:>8.1f}  {text}")
per_heuristic = {h: (np.asarray(summary[h]["median"]) / np.asarray(summary["tweedie"]["median"])).tolist() for h in heuristics}
print("\nevery heuristic's median over Tweedie's:")
for h, r in per_heuristic.items():
    print(f"{h:>15}: " + " ".join(f"{x:8.1f}" for x in r))
resolved = [r for r in rows if not r["heuristic_at_floor"]]
print(f"\nresolved noise levels: {len(resolved)}/{len(sigmas)}; Tweedie better at "
      f"{sum(r['ratio'] > 1 for r in resolved)}, by >= 10x at {sum(r['ratio'] >= 10 for r in resolved)}; "
      f"median ratio {np.median([r['ratio'] for r in resolved] or [np.nan]):.1f}x")

# %%
metrics = {
    "sigmas": sigmas,
    "choices": choices,
    "divergence": {name: summary[name] for name in choices},
    "floor": floor,
    "ratio_best_heuristic_over_tweedie": ratio,
    "best_heuristic": best,
    "ratio_over_tweedie": per_heuristic,
    "verdict": rows,
    "per_seed": {name: values.tolist() for name, values in per_seed.items()},
    "fig1_helix": {"sigma": helix_sigma, "divergence": helix_scores},
    "wall_time_s": time.perf_counter() - started,
    "params": config,
}
atomic_write_json(out / "metrics.json", metrics)
print(f"wrote {out / 'metrics.json'}, fig1_helix.png and fig2_divergence.png in {metrics['wall_time_s']:.0f} s")
