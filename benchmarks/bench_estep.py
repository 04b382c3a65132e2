"""E-step throughput: per-sample solves, one call of grouped solves, and sequential batches.

Notebook 01's E-step at the reference's reduced manifold configuration: the 5-D manifold MLP
(150 789 parameters, untrained: the cost does not depend on the weights), observations through
random 2×5 projections, a predictor-corrector sampler, Tweedie's covariance, 3 solver iterations.
Prints seconds per 8192 posterior samples for

- per-sample CG 3 and GMRES 3 (`scope="sample"`, batches of 4096: the paper's formulation), and
  per-sample CG 3 in batches of 256 (the batch size, not the per-sample solve, sets the speed),
- 32 systems of 256 in one call (`scope=256`, batches of 4096, CG 3),
- the reference's form, sequential batches of 256 with one system each (`scope="batch"`, CG 3),

all in the same run (compare ratios: this machine's speed drifts). Sampler steps default to 32
and the time is scaled to the configuration's 256 steps (each step costs the same); `--steps 256`
measures the full sampler. Run: `make bench` or `python benchmarks/bench_estep.py [--steps N]`.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from diemlib.diffusion import PC, Denoiser, VESchedule
from diemlib.em import EStep, posterior_samples
from diemlib.inverse import operators
from diemlib.linalg import solvers
from diemlib.nn import MLP

SAMPLES, STEPS = 8192, 256


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32, help="sampler steps measured (scaled to 256)")
    args = parser.parse_args()
    key = jax.random.key(0)
    k = jax.random.split(key, 4)
    model = Denoiser(MLP(5, key=k[0]), emb_features=64)
    A = jax.vmap(lambda kk: operators.random_projection(kk, 2, 5))(jax.random.split(k[1], SAMPLES))
    y = jax.random.normal(k[2], (SAMPLES, 2))
    sampler = PC(VESchedule(1e-3, 1e2), args.steps)
    cases = {
        "per-sample CG 3, batches of 4096": EStep(sampler, solvers.CG(3), scope="sample", batch_size=4096),
        "per-sample GMRES 3, batches of 4096": EStep(sampler, solvers.GMRES(3), scope="sample", batch_size=4096),
        "per-sample CG 3, batches of 256": EStep(sampler, solvers.CG(3), scope="sample", batch_size=256),
        "32 systems of 256 in one call, CG 3": EStep(sampler, solvers.CG(3), scope=256, batch_size=4096),
        "sequential batches of 256, CG 3": EStep(sampler, solvers.CG(3), scope="batch", batch_size=256),
    }
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, jax {jax.__version__}")
    print(f"E-step, {SAMPLES} posterior samples, PC sampler, {args.steps} steps measured, scaled to {STEPS}:")
    for name, estep in cases.items():
        run = lambda: posterior_samples(jax.random.key(1), model, A, y, 1e-2, estep, event_shape=(5,), desc=name)[0]
        jax.block_until_ready(run())  # compiles
        start = time.perf_counter()
        jax.block_until_ready(run())
        wall = (time.perf_counter() - start) * STEPS / args.steps
        print(f"  {name:<40}{wall:>8.1f} s per {SAMPLES} samples")


if __name__ == "__main__":
    main()
