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
# # 04 · DiEM for accelerated MRI
#
# *Rozet, Andry, Lanusse & Louppe, Learning Diffusion Priors from Observations by
# Expectation Maximization (NeurIPS 2024), §5.3, Fig. 6.*
#
# > **Which file?** `04_mri.py` is this notebook's source (JupyterLab opens it as a notebook);
# > `04_mri.ipynb` beside it is its paired copy (JupyterLab writes both on every save). Open the `.py`.
#
# **Scale.** The defaults below are a quick interactive run (about 5-11 minutes on 2 CPU cores:
# 10 min 52 s measured with the cores shared with other jobs): 32 × 32 slices of the MNI152
# brain template, a 94 k-parameter U-Net, three laps of 512 Adam steps. They show the paper's
# direction, not its numbers: in that run the held-out posterior PSNR went from 19.2 dB ($q_0$)
# to 20.8 dB after lap 2, and the posterior mean beat the zero-filled reconstruction by 5-7 dB at
# every acceleration; the cells that state these results check them on your run's numbers.
# `diem-run 04 --profile laptop` is the longer CPU run (a 0.58 M-parameter U-Net, 1024 Adam steps
# per lap; about an hour) where the prior's samples turn into head-shaped slices. `--profile paper`
# is the paper's configuration for GPU nodes: fastMRI single-coil knee slices at 320 × 320, the
# 77.6 M-parameter U-Net, 16 laps. It needs the fastMRI files, which you download yourself after
# accepting their licence; without
# them it stops at once and says what it expected.
#
# **Data.** fastMRI needs a licence and a download, so the defaults and the `ci` and `laptop`
# profiles use a stand-in that every install has: the slices of the MNI152 T1 template, a brain
# MRI volume averaged over 152 subjects (skull removed) that ships inside the `nilearn` package,
# from which we *simulate* k-space by an FFT. Any NIfTI volume can take its place
# (`brain_volume`, e.g. the Colin27 head of one subject). It is magnitude-only data, a brain
# rather than a knee, without phase or coil noise, and an average is smoother than any one
# scan: every number and figure below is about **simulated k-space from a template**, not about
# fastMRI.
#
# An MRI scanner measures the Fourier transform of the image, *k-space*, one column (one phase
# encoding line) at a time. Scanning faster means measuring fewer columns: at acceleration $R$,
# about one column in $R$. A hospital never holds the fully sampled images that a supervised
# prior would need; it holds these under-sampled scans. DiEM learns a diffusion prior over
# images from them alone, and that prior then reconstructs new scans.

# %% tags=["parameters"]
seed = 0  # the run's seed: every key is fold_in(seed, ...) (>= 0)
fastmri = ""  # fastMRI single-coil knee training volumes (knee_singlecoil_train: a directory of .h5 files, or one), relative to the repository root; "" uses brain_volume
fastmri_val = ""  # fastMRI volumes of the held-out slices (knee_singlecoil_val); needed with fastmri
brain_volume = ""  # the offline stand-in: a 3-D brain MRI volume (NIfTI), relative to the repository root; "": the MNI152 T1 template that ships with nilearn (an average of 152 brains)
orientations = ["axial", "coronal", "sagittal"]  # brain_volume: the cuts taken; one of: axial, coronal, sagittal
min_tissue = 0.25  # brain_volume: keep slices with at least this fraction of tissue (>= 0, < 1)
size = 32  # image size N; fastMRI slices are 320 (> 0)
observations = 256  # training slices, each observed once through its own mask (0: all) (>= 0)
held_out = 8  # held-out slices of the per-lap checks and of the reconstruction study (> 0)
holdout_gap = 2  # brain_volume: slices next to a held-out one left out of training (>= 0)
acceleration = 6.0  # R of the training masks (paper: 6) (> 1)
var_y = 1e-4  # observation noise variance Sigma_y, training and study (paper: 1e-4, sigma_y = 1e-2) (> 0)
gaussian_rank = 16  # rank of the Gaussian q0's covariance (paper: 64) (> 0)
gaussian_observations = 256  # observations of the q0 fit (paper: 4096) (> 0)
gaussian_iterations = 4  # EM iterations of q0 (paper: 16) (>= 0)
gaussian_steps = 16  # DDIM steps of the q0 E-step (paper: 256) (> 0)
gaussian_cg = 5  # CG iterations of the q0 E-step (paper: 5) (> 0)
estep_steps = 16  # DDPM steps of the E-step (paper: 64) (> 0)
solver = "gmres"  # MMPS solver of the E-step and the study (paper: cg, for a well-trained network; CG diverges on a young one); one of: cg, gmres
solver_iterations = 3  # solver iterations per MMPS call in the E-step (paper: 3) (> 0)
posterior_draws = 2  # posterior samples per observation in the E-step (paper: 2) (> 0)
estep_batch = 256  # posterior samples per E-step batch; held-out checks use one batch (> 0)
unshuffle = 2  # pixel-unshuffle factor of the U-Net (paper: 4) (> 0)
widths = [16, 32]  # U-Net widths per level (paper: [128, 256, 384, 512]) (> 0)
blocks = [1, 1]  # residual blocks per level (paper: [3, 3, 3, 3]) (> 0)
attention = []  # levels with self-attention (paper: [3]) (>= 0)
emb_features = 64  # noise embedding size (paper: 256) (> 0)
dropout = 0.1  # dropout rate of the residual blocks (>= 0, < 1)
mstep_epochs = 32  # epochs over the posterior samples per lap (paper: 64) (> 0)
mstep_batch = 32  # examples per Adam step (paper: 256) (> 0)
learning_rate = 2e-3  # constant Adam learning rate (paper: 1e-4) (> 0)
ema_decay = 0.99  # EMA of the weights; the next lap starts from and samples with it (paper: 0.999) (>= 0, < 1)
translation = 1  # random translations by up to this many pixels, reflect padding (paper: 4) (>= 0)
laps = 3  # EM laps (paper: 16) (> 0)
eval_samples = 16  # prior samples per lap: the grid and the evidence check (> 0)
eval_steps = 16  # DDPM steps of the per-lap prior samples (paper: 64) (> 0)
accelerations = [4, 8, 16, 32]  # R of the reconstruction study (Fig. 6) (> 1)
study_samples = 4  # posterior samples per held-out slice and R: two are shown, all give the mean and std (> 1)
study_steps = 16  # DDPM steps of the reconstruction study (paper: 64) (> 0)
study_cg = 5  # solver iterations per MMPS call in the reconstruction study (paper: 5) (> 0)
overwrite = False  # start afresh if out_dir holds a run with other parameters
out_dir = "../outputs/04_mri/interactive"  # where figures, metrics.json and checkpoints go (set by diem-run)

# %%
from diemlib.workbook.runner import run_config

config = run_config("04_mri", globals())  # every parameter: a run directory holding other values is refused

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from diemlib import em
from diemlib.data.augment import FlipTranslate
from diemlib.data.mri import holdout, load_brain_volume, load_fastmri, mni152_template, to_magnitude
from diemlib.diffusion import DDIM, DDPM, Denoiser, VESchedule
from diemlib.em import checkpoint
from diemlib.eval import evidence_divergence, psnr, ssim
from diemlib.eval.sinkhorn import FLOOR
from diemlib.inverse import MaskedFFT, adjoint, kspace_mask, simulate_observations
from diemlib.inverse.operators import apply, take
from diemlib.linalg import solvers
from diemlib.nn import count_parameters, fastmri_unet
from diemlib.workbook import write_metrics
from diemlib.workbook.claims import Claims
from diemlib.workbook.plots import image_grid, mark_diverged, mark_unresolved, show_saved
from diemlib.workbook.runner import repo_path

# Checked before any compute: the data are read first, so a wrong path fails at once.
if size % (unshuffle * 2 ** (len(widths) - 1)):
    raise ValueError(f"size ({size}) must be a multiple of unshuffle * 2^(levels - 1) = {unshuffle * 2 ** (len(widths) - 1)}")
if fastmri:
    if not fastmri_val:
        raise ValueError("fastmri_val must name the held-out fastMRI volumes (knee_singlecoil_val) when fastmri is set")
    source = "fastMRI single-coil knee"
    train_x = load_fastmri(repo_path(fastmri), size=size, limit=observations or None)
    test_x = load_fastmri(repo_path(fastmri_val), size=size, slices=(25, 26), limit=held_out)  # one central slice per volume
else:
    volume = repo_path(brain_volume) if brain_volume else mni152_template()
    source = f"simulated k-space from {'the MNI152 template (an average of 152 brains)' if not brain_volume else volume.name}"
    slices = load_brain_volume(volume, size=size, orientations=tuple(orientations), min_tissue=min_tissue)
    train, test = holdout(len(slices), held_out, holdout_gap)
    train_x, test_x = slices[train][: observations or None], slices[test]
observations = len(train_x)
if gaussian_observations > observations:
    raise ValueError(f"gaussian_observations ({gaussian_observations}) exceeds the {observations} training slices")
if observations < 2 * eval_samples:
    raise ValueError(f"the evidence check needs observations >= 2 * eval_samples = {2 * eval_samples}, got {observations}")
out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
key = jax.random.key(seed)
keys = {name: jax.random.fold_in(key, i) for i, name in enumerate(["masks", "noise", "model", "em", "eval", "study", "demo", "held_out"])}
event = (1, size, size)
print(jax.devices(), f"{source}: {observations} training and {len(test_x)} held-out {size}×{size} slices")

# %% [markdown]
# ## k-space and column masks
#
# A slice is a real image $x \in \mathbb{R}^{N \times N}$ (a magnitude $m \in [0, 1]$, divided
# by its volume's maximum and mapped to $x = 4m - 2$). Its single-coil k-space is the centred
# orthonormal 2-D Fourier transform
#
# $$k = \operatorname{fftshift}\big(\operatorname{FFT2}(\operatorname{ifftshift}(x))\big) \in \mathbb{C}^{N \times N},$$
#
# with the low frequencies (the overall contrast and the large shapes) at the centre and the
# high frequencies (edges, fine texture) towards the borders. The scanner acquires whole
# columns of $k$. A mask $m \in \{0, 1\}^N$ keeps a band of central columns,
# $[N/2 - h, N/2 + h)$ with $h = \lceil 0.1875\, N / R \rceil$ ($\lceil 60 / R \rceil$ at
# $N = 320$), and every other column with probability $200 / (320 R - 120)$, so that about
# $N / R$ columns are measured. Every slice gets its own mask, and the observation keeps the
# real and imaginary parts of the kept columns, with noise:
#
# $$y = m \odot [\operatorname{Re} k, \operatorname{Im} k] + \eta, \qquad \eta \sim \mathcal{N}(0, \Sigma_y),
# \quad \Sigma_y = 10^{-4} I .$$
#
# The operator $A x = m \odot [\operatorname{Re} k, \operatorname{Im} k]$ is `MaskedFFT`. Its
# adjoint $A^\top y$ fills the missing columns with zeros and transforms back: the **zero-filled**
# reconstruction. A missing column is a missing horizontal frequency for every row of the image
# at once, so the zero-filled image is blurred horizontally and haunted by aliased copies of
# the anatomy: structure that is not noise, and that a model must learn to remove.

# %%
def fresh_masks(key, R, count):
    """`count` operators, each with its own column mask at acceleration R."""
    return MaskedFFT(jax.vmap(lambda k: kspace_mask(k, R, size))(jax.random.split(key, count)).astype(jnp.float32))


A = fresh_masks(keys["masks"], acceleration, observations)
y = simulate_observations(keys["noise"], A, jnp.asarray(train_x), var_y)
like = jax.ShapeDtypeStruct(event, jnp.float32)


def zero_filled(A, y):
    """$A^\\top y$ for a batch of operators: the inverse FFT with the missing columns set to zero."""
    return jax.vmap(lambda a, yi: adjoint(a, like)(yi))(A, y)


def kspace(x):
    """log10 |k| of latents `(B, 1, N, N)`: the full, centred k-space."""
    k = jax.vmap(MaskedFFT(jnp.ones(size)))(x)
    return jnp.log10(jnp.hypot(k[:, 0], k[:, 1]) + 1e-3)


shown = 8  # images per row of the figures
demo = jnp.asarray(test_x[:1]).repeat(len(accelerations), 0)
A_demo = MaskedFFT(jnp.stack([kspace_mask(jax.random.fold_in(keys["demo"], R), R, size) for R in accelerations]).astype(jnp.float32))
rows = {
    "slice x": to_magnitude(demo[:, 0]),
    "log |k|": kspace(demo),
    "mask": jnp.broadcast_to(A_demo.mask[:, None, :], (len(accelerations), size, size)),
    "zero-filled": to_magnitude(zero_filled(A_demo, apply(A_demo, demo))[:, 0]),
}
fig = image_grid(rows, columns=len(accelerations), size=1.6, limits={"slice x": (0, 1), "zero-filled": (0, 1), "mask": (0, 1)},
                 title=f"{source}: R = {', '.join(map(str, accelerations))} (columns)")
fig.savefig(out / "kspace.png", dpi=100)
plt.show()
print(f"columns kept: {float(A.mask.mean()):.1%} of {size} on average in training (R = {acceleration})")

# %% [markdown]
# Here is what EM sees: only the observations, shown through their zero-filled images. No
# clean slice ever enters training; the clean ones below are for our eyes only.

# %%
fig = image_grid(
    {"clean (unseen)": to_magnitude(train_x[:shown, 0]), "zero-filled y": to_magnitude(zero_filled(take(A, slice(0, shown)), y[:shown])[:, 0])},
    limits={"clean (unseen)": (0, 1), "zero-filled y": (0, 1)}, title=f"{source}: training observations, R = {acceleration}",
)
fig.savefig(out / "observations.png", dpi=100)
plt.show()

# %% [markdown]
# ## DiEM
#
# **Step 0: a Gaussian prior $q_0$**, fitted by EM with the exact Gaussian denoiser in the
# E-step (DDIM, CG to $10^{-3}$ or `gaussian_cg` iterations) and probabilistic PCA of rank
# `gaussian_rank` in the M-step. Its samples are blurry averages of anatomy.
#
# **Laps.** Lap $k$ draws `posterior_draws` (paper: 2) posterior samples
# $x \sim q_k(x \mid y_i, A_i)$ per observation with MMPS (Tweedie's covariance, `solver_iterations`
# solver iterations per call, paper: CG 3; the defaults use GMRES, see below) inside a DDPM sampler, then trains the U-Net on all of them with Adam,
# dropout, horizontal flips and reflect-padded translations, warm-started from the previous
# lap's EMA weights. The U-Net pixel-unshuffles the image (each $r \times r$ patch becomes $r^2$
# channels), as the paper's does for 320 × 320 slices.
#
# **Which solver.** MMPS solves $(\Sigma_y + \sigma^2 A J A^\top)\, v = y - A \hat{x}$ with
# $J = \nabla_{x_t} \hat{x}$. Conjugate gradients assume that matrix symmetric positive definite:
# true of the exact denoiser, nearly so of a well-trained network (the paper's choice), but not
# of a network trained for minutes. In a measured run of these defaults with CG, lap 1's
# relative residual reached 13, its posterior samples were noise, and the held-out PSNR fell
# from 16.8 dB ($q_0$) to 11.0 dB. GMRES needs neither symmetry nor definiteness and never
# increases the residual: the defaults and the CPU profiles use it. Whatever the solver, a solve
# whose mean relative residual exceeds 1 is reported: a warning naming the lap, the solver and
# the remedy, and a red band on that lap in the per-lap figure.
#
# **Per lap** we check, without any clean image entering training:
# - held-out slices: one posterior sample per slice (drawn like the E-step's) from fresh
#   observations at the training acceleration, scored by PSNR and SSIM against the truth;
# - the evidence check (§5.1): a Sinkhorn number between observed k-space and k-space simulated
#   from prior samples through other observations' masks; it falls as the prior explains the
#   data better;
# - a grid of unconditional prior samples.
#
# Every lap is checkpointed: running this notebook again continues a killed run.

# %%
schedule = VESchedule(1e-3, 1e2)
network = fastmri_unet(
    key=keys["model"], widths=tuple(widths), blocks=tuple(blocks), attention=tuple(attention),
    emb_features=emb_features, dropout=dropout, unshuffle=unshuffle,
)
model = Denoiser(network, emb_features=emb_features)
print(f"U-Net with {count_parameters(network):,} parameters")
gaussian_estep = em.EStep(DDIM(schedule, gaussian_steps), solvers.CG(gaussian_cg, 1e-3), "tweedie", batch_size=estep_batch)
estep = em.EStep(
    DDPM(schedule, estep_steps), solvers.solver(solver, solver_iterations), "tweedie", batch_size=estep_batch,
    samples_per_observation=posterior_draws,
)
mstep = em.MStep(
    math.ceil(mstep_epochs * observations * posterior_draws / mstep_batch), mstep_batch, learning_rate,
    ema_decay=ema_decay, augment=FlipTranslate(translation),
)
eval_sampler = DDPM(schedule, eval_steps)
A_test = fresh_masks(keys["held_out"], acceleration, len(test_x))
y_test = simulate_observations(jax.random.fold_in(keys["held_out"], 1), A_test, jnp.asarray(test_x), var_y)


def quality(x, target):
    """PSNR (dB) and SSIM of each magnitude image against the truth, range: the truth's maximum (fastMRI's convention)."""
    m, t = to_magnitude(jnp.asarray(x)[:, 0]), to_magnitude(jnp.asarray(target)[:, 0])
    r = jnp.max(t, axis=(1, 2))
    return psnr(m, t, data_range=r), ssim(m, t, data_range=r)


def evaluate(lap, prior, mean, samples):
    """Held-out posterior PSNR/SSIM, the evidence check on k-space, and the lap's sample grid."""
    k = jax.random.fold_in(keys["eval"], lap + 1)
    x = em.prior_samples(k, prior, eval_sampler, eval_samples, event_shape=event, mean=mean, batch_size=estep_batch)
    # The E-step's own sampler and batch shape: the next lap's E-step reuses this compilation.
    post, _ = em.posterior_samples(jax.random.fold_in(k, 1), prior, A_test, y_test, var_y, estep, event_shape=event, mean=mean,
                                   desc=f"{'q0' if lap < 0 else f'lap {lap}'} held-out posterior samples")
    post = post[::posterior_draws]
    p, s = quality(post, test_x)
    name = "q0" if lap < 0 else f"lap{lap:02d}"
    np.save(out / f"prior_{name}.npy", np.asarray(x))
    rows = {"held-out truth": to_magnitude(test_x[:, 0]), "posterior sample": to_magnitude(post[:, 0])}
    if samples is not None:
        rows["E-step sample"] = to_magnitude(samples[::posterior_draws, 0])
    rows["prior sample"] = to_magnitude(x[:, 0])
    fig = image_grid(rows, limits=dict.fromkeys(rows, (0, 1)), title=f"{source}: {'q0' if lap < 0 else f'lap {lap}'}")
    fig.savefig(out / f"samples_{name}.png", dpi=100)
    plt.close(fig)
    scores = {
        "psnr": float(jnp.mean(p)), "ssim": float(jnp.mean(s)),
        "evidence": evidence_divergence(jax.random.fold_in(k, 2), x, A, y, var_y),
    }
    print(f"{name}: held-out posterior PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.3f}, evidence {scores['evidence']:.3g}")
    return scores


# %%
metrics = em.diem(
    out / "run", keys["em"], model=model, A=A, y=y, var_y=var_y, event_shape=event,
    schedule=schedule, gaussian_estep=gaussian_estep, gaussian_observations=gaussian_observations,
    gaussian_rank=gaussian_rank, gaussian_iterations=gaussian_iterations, estep=estep, mstep=mstep,
    laps=laps, evaluate=evaluate, config=config, overwrite=overwrite,
)
(model, mean), _ = checkpoint.load(out / "run" / "state.eqx", (model, jnp.zeros(event)))

# %% [markdown]
# ## The prior, lap by lap
#
# Rows: held-out slices (never trained on), one posterior sample each from fresh observations
# at the training acceleration, the lap's E-step samples (its M-step's training set, after
# lap 0), and unconditional samples of the prior. The Gaussian $q_0$ gives blurred averages;
# with every lap the samples gain edges, contrast between tissues and head-like shapes.

# %%
history = metrics["laps"]
show_saved(out / f"samples_{name}.png" for name in ["q0"] + [f"lap{m['lap']:02d}" for m in history])

# %%
lap_index = [m["lap"] for m in history]
fig, axes = plt.subplots(1, 5, figsize=(20, 3.5))
for ax, name in zip(axes[:3], ["psnr", "ssim", "evidence"]):
    ax.plot(lap_index, [m[name] for m in history], "o-")
    ax.axhline(metrics["q0"][name], ls="--", c="gray", label="$q_0$")
    ax.set(xlabel="lap", title={"psnr": "held-out posterior PSNR (dB)", "ssim": "held-out posterior SSIM", "evidence": "evidence check (k-space)"}[name])
    ax.legend()
axes[2].set_yscale("log")
unresolved = {}  # the evidence check at the estimator's floor for q0 and every lap: a flat line, not a result
if reason := mark_unresolved(axes[2], [metrics["q0"]["evidence"]] + [m["evidence"] for m in history], FLOOR, eval_samples):
    unresolved["evidence"] = reason
axes[3].semilogy(lap_index, [m["loss"] for m in history], "o-")
axes[3].set(xlabel="lap", title="training loss (last 10 % of the lap)")
for name in ["estep_time", "mstep_time", "eval_time"]:
    axes[4].plot(lap_index, [m[name] for m in history], "o-", label=name.replace("_time", ""))
axes[4].set(xlabel="lap", ylabel="seconds", title="time per lap")
axes[4].legend()
mark_diverged(axes, history)
fig.suptitle(f"{source}: {observations} observations at R = {acceleration}", fontsize=9)
fig.tight_layout()
fig.savefig(out / "metrics.png", dpi=100)

# %% [markdown]
# The claim of this section, checked on this run's numbers: EM, which never sees a clean slice,
# makes the prior better at reconstructing held-out slices than the Gaussian $q_0$ it started
# from.

# %%
claims = Claims()
claims.check("the last lap's prior reconstructs held-out slices better than q0 (PSNR)",
             history[-1]["psnr"] > metrics["q0"]["psnr"], f"q0 {metrics['q0']['psnr']:.2f} dB, lap {history[-1]['lap']} {history[-1]['psnr']:.2f} dB")

# %% [markdown]
# ## Reconstructions at R = 4, 8, 16, 32 (Fig. 6)
#
# Held-out slices are observed afresh at each acceleration, $\sigma_y = \sqrt{\Sigma_y} = 10^{-2}$,
# and the final prior reconstructs them by posterior sampling (MMPS in DDPM, `study_cg` iterations of the E-step's solver).
# Each posterior sample is *one* image consistent with the measured columns and plausible
# under the prior. Two of them side by side show what the data pin down (where they agree) and
# what the prior invents (where they differ); the standard deviation over `study_samples`
# samples maps that uncertainty, a picture the paper does not show. The posterior mean
# averages the invented details away: it scores higher PSNR than any single sample but looks
# smoother.
#
# **Why R = 32 is hard.** At $N = 320$, $R = 32$ keeps 4 centre columns and about 6 random ones
# of 320; at $N = 32$, 2 centre columns of 32 and on average less than one other. Every row of the image is
# then known through a handful of horizontal frequencies: the overall intensity profile, not
# where an edge lies. Almost everything left-right must come from the prior, so samples
# diverge, the standard deviation spreads over the whole anatomy, and PSNR falls towards that
# of a generic slice.

# %%
study_estep = em.EStep(
    DDPM(schedule, study_steps), solvers.solver(solver, study_cg), "tweedie", batch_size=len(test_x) * study_samples,
    samples_per_observation=study_samples,
)
study, pictures = {}, {}
for R in accelerations:
    k = jax.random.fold_in(keys["study"], R)
    A_R = fresh_masks(k, R, len(test_x))
    y_R = simulate_observations(jax.random.fold_in(k, 1), A_R, jnp.asarray(test_x), var_y)
    x_R, info = em.posterior_samples(jax.random.fold_in(k, 2), model, A_R, y_R, var_y, study_estep, event_shape=event,
                                     mean=mean, desc=f"reconstruction study, R = {R}")
    x_R = x_R.reshape(len(test_x), study_samples, *event)
    zf = zero_filled(A_R, y_R)
    scores = {"zero-filled": quality(zf, test_x), "posterior mean": quality(x_R.mean(1), test_x),
              "posterior sample": quality(x_R[:, 0], test_x)}
    study[R] = {f"{method} {metric}": float(jnp.mean(v[i])) for method, v in scores.items() for i, metric in enumerate(["psnr", "ssim"])}
    study[R]["residual"] = info["residual"]
    pictures[R] = {"zero-filled": zf[:, 0], "sample 1": x_R[:, 0, 0], "sample 2": x_R[:, 1, 0],
                   "posterior std": x_R[:, :, 0].std(1) / 4, "truth": test_x[:, 0]}
    print(f"R = {R:>2}: " + ", ".join(f"{k} {v:.3f}" for k, v in study[R].items()))

# %%
columns = list(pictures[accelerations[0]])
for i in range(min(3, len(test_x))):
    fig, axes = plt.subplots(len(accelerations), len(columns), figsize=(1.8 * len(columns), 1.8 * len(accelerations)), squeeze=False)
    for r, R in enumerate(accelerations):
        for c, label in enumerate(columns):
            image = pictures[R][label][i]
            ax = axes[r, c]
            if label == "posterior std":
                ax.imshow(image, cmap="magma", vmin=0)
            else:
                ax.imshow(to_magnitude(image), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=9)
        axes[r, 0].set_ylabel(f"R = {R}")
    fig.suptitle(f"{source}: held-out slice {i}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"reconstructions_{i}.png", dpi=100)
    plt.show()

# %% [markdown]
# ## PSNR and SSIM against R
#
# Means over the held-out slices, magnitudes scored against the truth with the truth's maximum
# as the data range (PSNR and SSIM from `dm-pix`). The zero-filled image is what the scanner's
# data give without a prior; the gap to the posterior mean is what the learned prior adds.

# %%
header = f"{'R':>3} | {'zero-filled PSNR':>16} {'SSIM':>6} | {'posterior mean PSNR':>19} {'SSIM':>6} | {'one sample PSNR':>15} {'SSIM':>6}"
print(header + "\n" + "-" * len(header))
for R, s in study.items():
    print(f"{R:>3} | {s['zero-filled psnr']:>16.2f} {s['zero-filled ssim']:>6.3f} | {s['posterior mean psnr']:>19.2f} "
          f"{s['posterior mean ssim']:>6.3f} | {s['posterior sample psnr']:>15.2f} {s['posterior sample ssim']:>6.3f}")
fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
for ax, metric in zip(axes, ["psnr", "ssim"]):
    for method, style in [("zero-filled", "s--"), ("posterior mean", "o-"), ("posterior sample", "^:")]:
        ax.plot(accelerations, [study[R][f"{method} {metric}"] for R in accelerations], style, label=method)
    ax.set(xscale="log", xticks=accelerations, xticklabels=accelerations, xlabel="acceleration R",
           title=metric.upper() + (" (dB)" if metric == "psnr" else ""))
    ax.legend()
fig.suptitle(f"{source}: {len(test_x)} held-out slices, σ_y = {math.sqrt(var_y):.0e}", fontsize=9)
fig.tight_layout()
fig.savefig(out / "quality_vs_R.png", dpi=100)

# %% [markdown]
# The claims of this section, checked on this run's numbers: the learned prior adds to what the
# measured columns give (the posterior mean beats the zero-filled image), and averaging samples
# beats any one of them in PSNR.

# %%
for R, s in study.items():
    claims.check(f"the posterior mean beats the zero-filled image at R = {R} (PSNR)",
                 s["posterior mean psnr"] > s["zero-filled psnr"], f"{s['posterior mean psnr']:.2f} vs {s['zero-filled psnr']:.2f} dB")
claims.check("the posterior mean scores a higher PSNR than one posterior sample, at every R",
             all(s["posterior mean psnr"] > s["posterior sample psnr"] for s in study.values()),
             ", ".join(f"R = {R}: {s['posterior mean psnr']:.2f} vs {s['posterior sample psnr']:.2f} dB" for R, s in study.items()))
print(claims.summary())

# %%
summary = {
    "q0_psnr": metrics["q0"]["psnr"],
    "final_psnr": history[-1]["psnr"],
    "q0_evidence": metrics["q0"]["evidence"],
    "final_evidence": history[-1]["evidence"],
    "data": source,
}
write_metrics(out, summary=summary, study={str(R): s for R, s in study.items()}, claims=claims.results, unresolved=unresolved, **metrics)
for name, value in summary.items():
    print(f"{name:>15}: {value:.4g}" if isinstance(value, float) else f"{name:>15}: {value}")
