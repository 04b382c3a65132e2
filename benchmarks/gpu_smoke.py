"""One short lap of each EM notebook at its `paper` profile: E-step and M-step throughput, peak memory.

For notebooks 01 (the manifold MLP, paper §5.1), 03 (the CIFAR-10 U-Net, §5.2), 04 (the fastMRI
U-Net, §5.3) and 05 (the CIFAR U-Net of the posterior-sampling benchmark, App. E), builds the
network, E-step and M-step of `params/<notebook>/paper.yaml` over the notebook's defaults (as
`diem-run --profile paper` resolves them) and runs them on random data of the right shapes:

- E-step: one batch of `estep_batch` posterior samples (05: `batch_size`, MMPS with its most
  GMRES iterations, on random inpainting), with the notebook's sampler and MMPS solver cut to
  `--steps` sampler steps: posterior samples per second and seconds per sampler step;
- M-step: `--mstep-steps` Adam steps at the paper's batch size, with the notebook's optimiser,
  EMA and augmentation, in one scan (the program `fit` runs): steps and examples per second.

Each phase is compiled and run once, then timed (the compile time is reported apart). Memory on a
GPU: the device's peak since the process started, read after each phase (it cannot be reset, so
a number covers everything before it too); elsewhere, XLA's compiled memory analysis of the
phase's program (`diemlib.eval.cost.measure`).

Run: `make gpu-smoke [ARGS="--only 03,04"]` on a GPU node (the paper's sizes), or
`python benchmarks/gpu_smoke.py --tiny [--only 01]` anywhere: every network and batch shrunk, one
solver iteration, for a check that every lap runs (tests/test_gpu_smoke.py). On a CPU, XLA's
compiler dominates; `XLA_FLAGS=--xla_backend_optimization_level=0` makes it about three times
faster (a minute on 2 cores instead of three), which the test uses.
"""

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from diemlib import em
from diemlib.data.augment import FlipTranslate
from diemlib.diffusion import DDPM, Denoiser, VESchedule, denoising_loss, sampler
from diemlib.em.estep import _sample_batch
from diemlib.em.training import TrainState, _fit_chunk, make_train_step
from diemlib.eval.cost import measure
from diemlib.inverse import (
    Clip, MaskedFFT, PixelMask, covariance, kspace_mask, pixel_mask, posterior_samples, random_projection,
    simulate_observations,
)
from diemlib.linalg import solvers
from diemlib.nn import MLP, cifar_unet, count_parameters, fastmri_unet
from diemlib.workbook.runner import resolve

# --tiny: what replaces the paper's values, for the notebooks that have them.
TINY = {"widths": [8], "blocks": [1], "attention": [], "emb_features": 16, "hidden": 32, "size": 16,
        "unshuffle": 2, "estep_batch": 8, "batch_size": 8, "mstep_batch": 8, "train_batch": 8, "solver_iterations": 1,
        "mmps_iterations": [1]}


@dataclass
class Lap:
    """What one notebook's lap runs: its denoiser, a batch of operators for the E-step, the M-step."""

    model: Denoiser
    schedule: VESchedule
    event: tuple[int, ...]
    A: object  # one E-step batch of operators
    var_y: float
    sample: Callable  # sample(key, model, A, y): the batch's posterior samples
    mstep: em.MStep


def mmps_batch(estep, var_y, event):
    """The program `em.posterior_samples` runs for each batch of observations."""
    return lambda key, model, A, y: _sample_batch(key, model, A, y, var_y, estep, covariance(estep.cov), 0.0, event)[0]


def unet(make, p, key, **extra):
    """The notebook's U-Net denoiser from its parameters."""
    network = make(key=key, widths=tuple(p["widths"]), blocks=tuple(p["blocks"]), attention=tuple(p["attention"]),
                   emb_features=p["emb_features"], dropout=p["dropout"], **extra)
    return Denoiser(network, emb_features=p["emb_features"])


def pixel_masks(key, n, rho):
    """`n` CIFAR-10 pixel masks, each pixel deleted with probability `rho`."""
    return PixelMask(jax.vmap(lambda k: pixel_mask(k, (32, 32), rho))(jax.random.split(key, n)))


def manifold(p, key, steps, mstep_steps):
    """Notebook 01: the MLP on 5-D latents seen through random 2×5 projections."""
    schedule, event = VESchedule(1e-3, p["sigma_max"]), (p["dimension"],)
    model = Denoiser(MLP(p["dimension"], emb_features=64, hidden=p["hidden"], key=key), emb_features=64)
    solver = solvers.solver(p["solver"], p["solver_iterations"], p["solver_rtol"])
    estep = em.EStep(sampler(p["sampler"], schedule, steps), solver, p["covariance"], scope=p["scope"])
    A = jax.vmap(lambda k: random_projection(k, p["projection"], p["dimension"]))(jax.random.split(key, p["estep_batch"]))
    mstep = em.MStep(mstep_steps, p["mstep_batch"], p["learning_rate"], schedule="linear",
                     final_learning_rate=p["final_learning_rate"])
    return Lap(model, schedule, event, A, p["var_y"], mmps_batch(estep, p["var_y"], event), mstep)


def cifar10(p, key, steps, mstep_steps):
    """Notebook 03: the CIFAR-10 U-Net, every pixel deleted with probability rho."""
    schedule, event = VESchedule(1e-3, 1e2), (3, 32, 32)
    estep = em.EStep(DDPM(schedule, steps), solvers.solver(p["solver"], p["solver_iterations"]), p["covariance"])
    mstep = em.MStep(mstep_steps, p["mstep_batch"], p["learning_rate"], ema_decay=p["ema_decay"],
                     augment=FlipTranslate(p["translation"]))
    return Lap(unet(cifar_unet, p, key), schedule, event, pixel_masks(key, p["estep_batch"], p["rho"]), p["var_y"],
               mmps_batch(estep, p["var_y"], event), mstep)


def mri(p, key, steps, mstep_steps):
    """Notebook 04: the fastMRI U-Net on pixel-unshuffled slices, observed through column-masked k-space."""
    schedule, event = VESchedule(1e-3, 1e2), (1, p["size"], p["size"])
    estep = em.EStep(DDPM(schedule, steps), solvers.solver(p["solver"], p["solver_iterations"]), "tweedie")
    masks = jax.vmap(lambda k: kspace_mask(k, p["acceleration"], p["size"]))(jax.random.split(key, p["estep_batch"]))
    mstep = em.MStep(mstep_steps, p["mstep_batch"], p["learning_rate"], ema_decay=p["ema_decay"],
                     augment=FlipTranslate(p["translation"]))
    return Lap(unet(fastmri_unet, p, key, unshuffle=p["unshuffle"]), schedule, event, MaskedFFT(masks.astype(jnp.float32)),
               p["var_y"], mmps_batch(estep, p["var_y"], event), mstep)


def benchmark(p, key, steps, mstep_steps):
    """Notebook 05: the prior's training on clean images, then MMPS on random inpainting."""
    schedule, event = VESchedule(1e-3, 1e2), (3, 32, 32)
    var_y = (2 * p["random_std"]) ** 2

    def sample(key, model, A, y):
        return posterior_samples("mmps", Clip(model) if p["clip"] else model, A, y, var_y, schedule, steps, key,
                                 event_shape=event, batch_size=len(y), iterations=max(p["mmps_iterations"]))

    mstep = em.MStep(mstep_steps, p["train_batch"], p["learning_rate"], ema_decay=p["ema_decay"],
                     augment=FlipTranslate(1))
    return Lap(unet(cifar_unet, p, key), schedule, event, pixel_masks(key, p["batch_size"], p["random_fraction"]),
               var_y, sample, mstep)


NOTEBOOKS = {"01_manifold": manifold, "03_cifar10": cifar10, "04_mri": mri, "05_mmps_evaluation": benchmark}


def timed(fn, *args) -> tuple[float, float, float]:
    """`fn(*args)` compiled and run once, then run again: compile seconds, run seconds, peak MiB.

    The peak is the device's since the process started where it keeps one (GPU), else XLA's
    compiled memory analysis of the program (`diemlib.eval.cost.measure`).
    """
    compile_s = measure(fn, *args)[1]["compile_s"]
    stats = measure(fn, *args)[1]  # the same program, run again
    return compile_s, stats["run_s"], stats.get("device_peak_mib", stats["peak_mib"])


def estep(lap: Lap, key, steps: int) -> dict:
    """One E-step batch of posterior samples."""
    n = jax.tree.leaves(lap.A)[0].shape[0]
    y = simulate_observations(key, lap.A, jax.random.normal(key, (n, *lap.event)), lap.var_y)
    compile_s, run_s, mib = timed(lap.sample, key, lap.model, lap.A, y)
    return {"batch": n, "compile_s": compile_s, "per_s": n / run_s, "s_per_step": run_s / steps, "mib": mib}


def mstep(lap: Lap, key) -> dict:
    """`lap.mstep.steps` Adam steps in one scan: the program `fit` runs for each chunk of steps."""
    m = lap.mstep
    opt = m.optimizer()
    step_fn = make_train_step(opt, lambda model, x, k: denoising_loss(model, x, k, lap.schedule), m.ema_decay)
    state = TrainState.create(lap.model, opt, ema=m.ema_decay is not None)
    data = jax.random.normal(key, (m.batch_size, *lap.event))
    chunk = partial(_fit_chunk, batch_size=m.batch_size, step_fn=step_fn, augment=m.augment, chunk=m.steps, sharding=None)
    compile_s, run_s, mib = timed(chunk, state, data, key, jnp.uint32(0), jnp.uint32(m.steps))
    return {"batch": m.batch_size, "compile_s": compile_s, "per_s": m.steps / run_s,
            "examples_per_s": m.steps * m.batch_size / run_s, "mib": mib}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny networks and batches: a CPU check in about a minute")
    parser.add_argument("--only", default="", help="comma-separated notebook prefixes, e.g. 01,03 (default: all)")
    parser.add_argument("--steps", type=int, help="E-step sampler steps (default 4; --tiny 2)")
    parser.add_argument("--mstep-steps", type=int, help="M-step Adam steps (default 8; --tiny 4)")
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    stems = [stem for stem in NOTEBOOKS if not only or any(stem.startswith(s) for s in only)]
    if unknown := [s for s in only if not any(stem.startswith(s) for stem in NOTEBOOKS)]:
        parser.error(f"no notebook {', '.join(unknown)}; choose among {', '.join(NOTEBOOKS)}")
    steps = args.steps or (2 if args.tiny else 4)
    mstep_steps = args.mstep_steps or (4 if args.tiny else 8)
    os.environ.setdefault("DIEMLIB_PROGRESS", "off")  # the table is the output
    device = jax.devices()[0]
    gpu_memory = "peak_bytes_in_use" in (device.memory_stats() or {})
    print(f"device: {device.device_kind} x {jax.device_count()} ({device.platform}), jax {jax.__version__}")
    print(f"profile paper{', shrunk by --tiny' if args.tiny else ''}; MiB: "
          + ("the device's peak so far, after the phase" if gpu_memory else "XLA's compiled peak of the phase's program"))
    print(f"{'':<31} | {f'E-step: one batch, {steps} sampler steps':<45} | M-step: {mstep_steps} Adam steps")
    print(f"{'notebook':<19}{'params':>12} | {'batch':>6}{'compile s':>10}{'samples/s':>11}{'s/step':>9}{'MiB':>9} | "
          f"{'batch':>6}{'compile s':>10}{'steps/s':>9}{'examples/s':>11}{'MiB':>9}", flush=True)
    failed = []
    for stem in stems:
        key = jax.random.key(0)
        try:
            p = resolve(stem, "paper").values
            if args.tiny:
                p |= {k: v for k, v in TINY.items() if k in p}
            lap = NOTEBOOKS[stem](p, key, steps, mstep_steps)
            e, m = estep(lap, jax.random.fold_in(key, 1), steps), mstep(lap, jax.random.fold_in(key, 2))
        except Exception as error:  # one failure (out of memory, say) should not hide the other notebooks
            failed.append(stem)
            print(f"{stem:<19} failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}", flush=True)
            continue
        print(f"{stem:<19}{count_parameters(lap.model):>12,} | {e['batch']:>6}{e['compile_s']:>10.1f}{e['per_s']:>11.4g}"
              f"{e['s_per_step']:>9.3g}{e['mib']:>9.4g} | {m['batch']:>6}{m['compile_s']:>10.1f}{m['per_s']:>9.4g}"
              f"{m['examples_per_s']:>11.4g}{m['mib']:>9.4g}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
