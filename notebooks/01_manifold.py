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
# # 01 · DiEM on a low-dimensional manifold
#
# *Rozet, Andry, Lanusse & Louppe, Learning Diffusion Priors from Observations by
# Expectation Maximization (NeurIPS 2024), §5.1 and Fig. 3.*
#
# > **Which file?** `01_manifold.py` is this notebook's source (JupyterLab opens it as a notebook);
# > `01_manifold.ipynb` beside it is its paired copy (JupyterLab writes both on every save). Open the `.py`.
#
# **Scale.** The defaults below are the quick interactive scale, what Run All does: a few minutes
# on a laptop CPU (2048 observations, 3 laps of 1024 Adam steps), enough to watch the prior leave
# the Gaussian blob, with rough numbers. `diem-run 01 --profile laptop` (about 15 minutes on
# 2 CPU cores, 16 laps) shows the effect clearly; `--profile paper` is the paper's configuration
# for a GPU node (`params/01_manifold/paper.yaml`: 65 536 observations, 32 laps of 65 536 steps);
# `--profile ci` is a smoke test whose numbers are noise. To use a profile in JupyterLab, copy its
# values into the parameters cell.
#
# We never see the latent $x \in \mathbb{R}^5$: only $y_i = A_i x_i + \eta_i$, random 2-D
# projections with noise $\eta_i \sim \mathcal{N}(0, 10^{-4} I)$. Empirical Bayes asks for the
# prior $q_\theta(x)$ under which the observations are most likely,
#
# $$\theta^\star = \arg\max_\theta \sum_i \log \int p(y_i \mid x, A_i) \, q_\theta(x) \, dx ,$$
#
# and **DiEM** reaches it by expectation-maximization with a diffusion model as $q_\theta$:
#
# 1. **E-step.** Draw $x_i \sim q_{\theta_k}(x \mid y_i, A_i)$ for every observation, with the
#    MMPS posterior denoiser inside a diffusion sampler.
# 2. **M-step.** Train the denoiser on the samples $\{x_i\}$ with the denoising loss:
#    $\theta_{k+1} = \arg\min_\theta \mathbb{E}\big[\lambda(\sigma) \|D_\theta(x + \sigma z, \sigma) - x\|^2\big]$.
#
# Each lap increases the evidence; the prior sharpens from a Gaussian blob to the manifold.

# %% tags=["parameters"]
seed = 0  # the run's seed: every key is fold_in(seed, ...)
dimension = 5  # latent dimension n (> 0)
observations = 2048  # number N of observations y_i = A_i x_i + eta_i (> 0)
projection = 2  # rows of each A_i (> 0)
var_y = 1e-4  # observation noise variance Sigma_y (> 0)
sigma_max = 10.0  # sigma_1 of the noise schedule (> 0)
gaussian_iterations = 4  # EM iterations of the Gaussian q0 (>= 0)
gaussian_steps = 64  # DDIM steps of the q0 E-step (> 0)
gaussian_rtol = 1e-3  # CG relative tolerance of the q0 E-step (>= 0)
sampler = "pc"  # E-step sampler; one of: pc, ddpm, ddim
estep_steps = 64  # E-step sampler steps (> 0)
covariance = "tweedie"  # V[x | x_t] inside MMPS; one of: tweedie, prior, sigma, sigma_over_1p, zero
solver = "gmres"  # MMPS solver; one of: cg, gmres, bicgstab
solver_iterations = 3  # solver iterations per MMPS call (> 0)
solver_rtol = 0.0  # solver relative tolerance; 0 runs exactly solver_iterations (>= 0)
scope = "sample"  # solves per sample or over the batch (the reference); one of: sample, batch
estep_batch = 2048  # observations per E-step batch (> 0)
bound = 3.0  # discard posterior samples outside (-bound, bound)^n, as the reference does with 3; 0 keeps all (>= 0)
hidden = 128  # width of the MLP (> 0)
mstep_steps = 1024  # Adam steps per lap (> 0)
mstep_batch = 1024  # examples per Adam step (> 0)
learning_rate = 1e-3  # initial learning rate, decays linearly each lap (> 0)
final_learning_rate = 1e-6  # learning rate at the end of each lap (>= 0)
laps = 3  # EM laps (> 0)
eval_samples = 1024  # prior samples per evaluation and per ground-truth set (> 0)
eval_steps = 64  # sampler steps of the evaluation's prior samples (> 0)
sinkhorn_max_iter = 1024  # Sinkhorn iterations (> 0)
corner_laps = [0, 1, 2]  # laps drawn as corner plots (>= 0)
overwrite = False  # start afresh if out_dir holds a run with other parameters
out_dir = "../outputs/01_manifold/interactive"  # where figures, metrics.json and checkpoints go (set by diem-run)

# %%
from diemlib.workbook.runner import run_config

config = run_config("01_manifold", globals())  # every parameter: a run directory holding other values is refused

from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np

from diemlib import em
from diemlib.data import random_manifold, sample_manifold
from diemlib.diffusion import DDIM, Denoiser, VESchedule, sampler as make_sampler
from diemlib.eval import evidence_divergence, sinkhorn_divergence
from diemlib.eval.sinkhorn import FLOOR
from diemlib.inverse import random_projection, simulate_observations
from diemlib.linalg import solvers
from diemlib.nn import MLP
from diemlib.workbook import write_metrics
from diemlib.workbook.claims import Claims
from diemlib.workbook.plots import corner, mark_diverged, mark_unresolved

if observations < 2 * eval_samples:  # checked before any compute
    raise ValueError(f"the evidence check needs observations >= 2 * eval_samples = {2 * eval_samples}, got {observations}")
out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
key = jax.random.key(seed)
keys = {name: jax.random.fold_in(key, i) for i, name in enumerate(["manifold", "latents", "operators", "noise", "model", "em", "eval"])}
print(jax.devices())

# %% [markdown]
# ## The latent manifold and its observations
#
# The latent lives on a random smooth 1-D curve in $\mathbb{R}^5$ (after randman): with
# $K = 10$ frequencies and $a, b, c \sim \mathcal{U}[0, 1)^{5 \times 1 \times K}$,
# $x_j = \sum_{k=1}^K \frac{a_{jk}}{k^3} \sin\big(2\pi(k\, b_{jk} z + c_{jk})\big)$ with
# $z \sim \mathcal{U}[0, 1)$, each coordinate rescaled to $[-2, 2]$.
# Every observation has its own $A_i \in \mathbb{R}^{2 \times 5}$ with unit-norm Gaussian rows.

# %%
manifold = random_manifold(keys["manifold"], dimension)
x_true = sample_manifold(keys["latents"], manifold, observations + 2 * eval_samples)
x_obs, truth = x_true[:observations], np.asarray(x_true[observations:])
A = jax.vmap(lambda k: random_projection(k, projection, dimension))(
    jax.random.split(keys["operators"], observations)
)
y = simulate_observations(keys["noise"], A, x_obs, var_y)
print(f"{observations} observations y of shape {y.shape[1:]}, latents of shape {x_obs.shape[1:]}")
corner(truth[:eval_samples], title="ground truth (never observed)");

# %% [markdown]
# ## The posterior denoiser: MMPS
#
# A sampler only needs $\mathbb{E}[x \mid x_t, y]$. With $\hat{x} = D_\theta(x_t, \sigma)$ and
# Tweedie's covariance $V[x \mid x_t] = \sigma^2 \nabla_{x_t} \hat{x}$, moment matching gives
#
# $$\mathbb{E}[x \mid x_t, y] \approx \hat{x} + \sigma^2 J^\top A^\top v, \qquad
# (\Sigma_y + \sigma^2 A J A^\top)\, v = y - A \hat{x},$$
#
# solved matrix-free with a few Krylov iterations: each costs one VJP of the network.
# Conjugate gradients (the paper's choice, and the `paper` profile's) need $\Sigma_y + \sigma^2 A J A^\top$
# symmetric positive definite, which holds for the exact denoiser but not for a network trained
# briefly: at CPU scales CG diverged at lap 1 (relative residual ≈ 36), so the defaults and the
# `ci` and `laptop` profiles use GMRES, which the author recommends when the denoiser is not
# optimal. Like the reference, they also discard posterior samples outside $(-3, 3)^5$ (`bound`).
#
# ## Step 0: a Gaussian prior $q_0$
#
# EM starts from $\mathcal{N}(0, I)$ and fits a Gaussian by the same EM, with the exact Gaussian
# denoiser in the E-step and probabilistic PCA in the M-step (full rank here).
#
# ## Laps
#
# Lap $k$ draws one posterior sample per observation under $q_k$ (predictor-corrector sampler),
# then trains the MLP denoiser on them, warm-started from lap $k - 1$ with a fresh Adam state.
# Every lap is checkpointed: running this notebook again continues a killed run.

# %%
schedule = VESchedule(1e-3, sigma_max)
model = Denoiser(MLP(dimension, emb_features=64, hidden=hidden, key=keys["model"]), emb_features=64)
gaussian_estep = em.EStep(
    DDIM(schedule, gaussian_steps), solvers.CG(2 * projection, gaussian_rtol), "tweedie",
    batch_size=estep_batch,
)
estep = em.EStep(
    make_sampler(sampler, schedule, estep_steps),
    solvers.solver(solver, solver_iterations, solver_rtol),
    covariance,
    scope=scope,
    batch_size=estep_batch,
    bound=bound or None,
)
mstep = em.MStep(
    mstep_steps, mstep_batch, learning_rate, schedule="linear", final_learning_rate=final_learning_rate
)
eval_sampler = make_sampler(sampler, schedule, eval_steps)
reference, other_reference = truth[:eval_samples], truth[eval_samples:]


def evaluate(lap, prior, mean, samples):
    """Sinkhorn divergence to the ground truth, and the evidence check, of the current prior."""
    k = jax.random.fold_in(keys["eval"], lap + 1)
    x = em.prior_samples(k, prior, eval_sampler, eval_samples, event_shape=(dimension,), mean=mean)
    np.save(out / f"prior_lap{lap:03d}.npy", np.asarray(x))  # lap -1 is q0
    return {
        "sinkhorn": sinkhorn_divergence(reference, other_reference, x, max_iter=sinkhorn_max_iter),
        "evidence": evidence_divergence(
            jax.random.fold_in(k, 1), x, A, y, var_y, max_iter=sinkhorn_max_iter
        ),
    }


# %%
metrics = em.diem(
    out / "run", keys["em"], model=model, A=A, y=y, var_y=var_y, event_shape=(dimension,),
    schedule=schedule, gaussian_estep=gaussian_estep, gaussian_rank=dimension,
    gaussian_iterations=gaussian_iterations, estep=estep, mstep=mstep, laps=laps,
    evaluate=evaluate, config=config, overwrite=overwrite,
)

# %% [markdown]
# ## The prior, lap by lap (Fig. 3)
#
# Below the diagonal: 2-D histograms of prior samples; above it, mirrored, the ground truth; on
# the diagonal, the 1-D marginals (line: ground truth). Lap $-1$ is the Gaussian $q_0$.

# %%
shown = [-1] + [lap for lap in corner_laps if lap < laps]
for lap in shown:
    name = "q0" if lap < 0 else f"lap {lap}"
    fig = corner(np.load(out / f"prior_lap{lap:03d}.npy"), reference, title=f"prior at {name}")
    fig.savefig(out / ("corner_q0.png" if lap < 0 else f"corner_lap{lap:02d}.png"), dpi=100)
    plt.show()

# %% [markdown]
# ## Metrics against the lap
#
# *Sinkhorn*: the reference's debiased entropic OT between prior samples and the ground truth
# (needs the truth, which a real user never has). *Evidence*: the same number between the
# observations $y_i$ and observations $y'_i = A_i x'_i + \eta_i$ simulated from prior samples:
# it needs no ground truth, and EM drives it down. The dashed lines are the Gaussian $q_0$.

# %%
history = metrics["laps"]
lap_index = [m["lap"] for m in history]
unresolved = {}  # a number at the estimator's floor for q0 and every lap: a flat line, not a result
fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
for ax, name in zip(axes[:2], ["sinkhorn", "evidence"]):
    ax.semilogy(lap_index, [m[name] for m in history], "o-")
    ax.axhline(metrics["q0"][name], ls="--", c="gray", label="$q_0$")
    ax.set(xlabel="lap", title=name)
    ax.legend()
    if reason := mark_unresolved(ax, [metrics["q0"][name]] + [m[name] for m in history], FLOOR, eval_samples):
        unresolved[name] = reason
axes[2].semilogy(lap_index, [m["loss"] for m in history], "o-")
axes[2].set(xlabel="lap", title="training loss (last 10 % of the lap)")
axes[3].plot(lap_index, [m["estep_time"] for m in history], "o-", label="E-step")
axes[3].plot(lap_index, [m["mstep_time"] for m in history], "o-", label="M-step")
axes[3].set(xlabel="lap", ylabel="seconds", title="time per step")
axes[3].legend()
mark_diverged(axes, history)
fig.tight_layout()
fig.savefig(out / "metrics.png", dpi=100)

# %% [markdown]
# The claim of this section, checked on this run's numbers: EM brings the prior closer to the
# manifold than $q_0$ (Sinkhorn), and it explains the observations better (evidence).

# %%
claims = Claims()
for name, claim in [("sinkhorn", "is closer to the ground truth than q0"), ("evidence", "explains the observations better than q0")]:
    claims.check(f"the last lap's prior {claim} ({name})",
                 name not in unresolved and history[-1][name] < metrics["q0"][name],
                 unresolved.get(name, f"q0 {metrics['q0'][name]:.4g}, lap {history[-1]['lap']} {history[-1][name]:.4g}"))

# %%
summary = {
    "q0_sinkhorn": metrics["q0"]["sinkhorn"],
    "final_sinkhorn": history[-1]["sinkhorn"],
    "sinkhorn_ratio": history[-1]["sinkhorn"] / metrics["q0"]["sinkhorn"],
    "q0_evidence": metrics["q0"]["evidence"],
    "final_evidence": history[-1]["evidence"],
}
write_metrics(out, summary=summary, unresolved=unresolved, claims=claims.results, **metrics)
for name, value in summary.items():
    print(f"{name:>16}: {value:.4g}")
for name, why in unresolved.items():
    print(f"{name:>16}: {why}")
