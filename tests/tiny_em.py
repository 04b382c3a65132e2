"""A tiny DiEM run, shared by tests/test_em.py (imported) and its sharding test (run as a script).

`python tests/tiny_em.py OUT_DIR [--laps K]` runs [`em.diem`][] on the tiny problem below in
`OUT_DIR` and prints one line of JSON: the device count, the metrics without their timings, the
last lap's posterior samples and the final model's weights (flattened). It runs in the dtype of
the process (float32 unless the caller enables x64); set
`XLA_FLAGS=--xla_force_host_platform_device_count=2` to shard it over two CPU devices, or the
`DIEMLIB_COORDINATOR`, `DIEMLIB_NUM_PROCESSES` and `DIEMLIB_PROCESS_ID` variables to run it as
one of several processes (`diemlib.em.distributed`; tests/test_distributed.py): then every
process computes, process 0 alone writes `OUT_DIR` and prints the results, the others print
`{"process": i, ...}` only.

The problem: N = 256 points of a random 1-D manifold in R^3, observed through random 2 x 3
projections with noise variance 1e-4; a tiny MLP (hidden 32); DDIM/PC samplers of 16 steps;
an M-step of 64 Adam steps. Every batch size is even, so it splits over two devices.
"""

import argparse
import json
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diemlib.em import checkpoint, distributed
from diemlib import em
from diemlib.inverse import operators
from diemlib.inverse.operators import simulate_observations
from diemlib.linalg import solvers
from diemlib.linalg.dplr import DPLR
from diemlib.diffusion.denoiser import Denoiser
from diemlib.data.manifold import random_manifold, sample_manifold
from diemlib.nn.mlp import MLP
from diemlib.diffusion.samplers import DDIM, PC
from diemlib.diffusion.schedule import VESchedule

D = 3  # latent dimension
N = 256  # observations
VAR_Y = 1e-4
SCHEDULE = VESchedule(1e-3, 10.0)
GAUSSIAN_ESTEP = em.EStep(DDIM(SCHEDULE, 16), solvers.CG(4), "tweedie", batch_size=128)
ESTEP = em.EStep(PC(SCHEDULE, 16), solvers.CG(3), "tweedie", batch_size=128)
MSTEP = em.MStep(64, 64, 1e-3, schedule="linear")
COUNTS = ("compiles", "cache_loads")  # per lap: programs built (diemlib.compilation)


def problem(seed: int = 0) -> dict:
    """The observations `A`, `y` (and the hidden latents `x`) and a fresh `model`."""
    k = jax.random.split(jax.random.key(seed), 5)
    x = sample_manifold(k[1], random_manifold(k[0], D), N)
    A = jax.vmap(lambda key: operators.random_projection(key, 2, D))(jax.random.split(k[2], N))
    y = simulate_observations(k[3], A, x, VAR_Y)
    model = Denoiser(MLP(D, emb_features=16, hidden=32, layers=2, key=k[4]), emb_features=16)
    return {"x": x, "A": A, "y": y, "model": model}


def run(run_dir, prob: dict, *, laps: int, key: int = 1, estep: em.EStep = ESTEP, mstep: em.MStep = MSTEP,
        config: dict | None = None, log=lambda line: None, **kwargs) -> dict:
    """[`em.diem`][] on `prob` in `run_dir` (q0: 2 iterations, full rank)."""
    return em.diem(
        run_dir, jax.random.key(key), model=prob["model"], A=prob["A"], y=prob["y"], var_y=VAR_Y,
        event_shape=(D,), schedule=SCHEDULE, gaussian_estep=GAUSSIAN_ESTEP, gaussian_rank=D,
        gaussian_iterations=2, estep=estep, mstep=mstep, laps=laps,
        config={"seed": 0} if config is None else config, log=log, **kwargs,
    )


def without_times(tree):
    """`tree` (nested dicts and lists) without the wall-clock entries (keys ending in `time`) and
    the counts of programs built, which depend on what the process built before."""
    if isinstance(tree, dict):
        return {k: without_times(v) for k, v in tree.items() if not k.endswith("time") and k not in COUNTS}
    if isinstance(tree, list):
        return [without_times(v) for v in tree]
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--laps", type=int, default=1)
    parser.add_argument("--solver", default="cg", help="the E-step's MMPS solver: cg or gmres")
    args = parser.parse_args()
    distributed.initialize()  # several processes if the environment says so: before any JAX computation
    out = Path(args.out_dir)
    prob = problem()
    zeros = lambda *shape: jnp.zeros(shape, prob["y"].dtype)
    estep = eqx.tree_at(lambda e: e.solver, ESTEP, solvers.solver(args.solver, 3))
    metrics = run(out, prob, laps=args.laps, estep=estep)
    # An E-step with a network prior: the fresh (untrained) model, the same in every process.
    gmres = eqx.tree_at(lambda e: e.solver, ESTEP, solvers.GMRES(3))
    network_samples, _ = em.posterior_samples(
        jax.random.key(2), prob["model"], prob["A"], prob["y"], VAR_Y, gmres, event_shape=(D,)
    )
    if not distributed.is_main():  # it wrote nothing
        print(json.dumps({"process": jax.process_index(), "device_count": jax.device_count(),
                          "metrics": without_times(metrics)}))
        return
    samples, meta = checkpoint.load(out / "estep.eqx", zeros(N, D))
    (model, mean), _ = checkpoint.load(out / "state.eqx", (prob["model"], zeros(D)))
    (q0_mean, q0_cov), _ = checkpoint.load(out / "q0.eqx", (zeros(D), DPLR(zeros(D), zeros(D, D))))
    weights = np.concatenate([np.ravel(w) for w in jax.tree.leaves(eqx.filter(model, eqx.is_array))])
    as_list = lambda a: np.asarray(a).tolist()
    print(json.dumps({
        "process": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "dtype": str(prob["y"].dtype),
        "metrics": without_times(metrics),
        "samples_lap": meta["lap"],
        "q0_mean": as_list(q0_mean),
        "q0_cov": as_list(q0_cov.dense()),
        "samples": as_list(samples),
        "mean": as_list(mean),
        "weights": as_list(weights),
        "network_samples": as_list(network_samples),
    }))


if __name__ == "__main__":
    main()
