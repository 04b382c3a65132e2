"""Evaluation cost: seconds per Sinkhorn number (paper §5.1), the metric of notebooks 01 and 02.

Notebook 01 scores every lap by the Sinkhorn divergence between its prior samples and the
manifold's, $S = \\mathrm{OT}_\\lambda(x, z) - \\mathrm{OT}_\\lambda(x, x')$, with a second, disjoint
reference set $x'$ to remove the entropic bias. The bias term depends on the references only, so
`sinkhorn_divergences` computes it once per run and remembers it. For 1024, 4096 and 16 384
points of the 5-D manifold (float32, $\\lambda = 10^{-3}$, at most 1024 iterations), this prints
the seconds of one Sinkhorn solve, of the first Sinkhorn number of a run (two solves) and of
a later one, for another set of samples (one solve). A solve stops once its marginals are
within $10^{-3}$ (tested every 10 iterations), so its time follows the iterations the data
need as much as the $n^2$ cost matrix.

Run: `make bench` or `python benchmarks/bench_eval.py [--sizes 1024 4096 16384]`.
"""

import argparse
import time

import jax

from diemlib.data.manifold import random_manifold, sample_manifold
from diemlib.eval.sinkhorn import entropic_ot, sinkhorn_divergence


def seconds(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384], help="points per set")
    args = parser.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, jax {jax.__version__}")
    key = jax.random.key(0)
    manifold = random_manifold(jax.random.fold_in(key, 0))
    print(f"{'points':>8}{'one solve s':>14}{'first S s':>12}{'later S s':>12}")
    for n in args.sizes:
        reference, other, samples, later = (sample_manifold(jax.random.fold_in(key, i), manifold, n) for i in (1, 2, 3, 4))
        entropic_ot(reference, samples).block_until_ready()  # compiles for this size
        solve = seconds(lambda: entropic_ot(reference, samples))
        first = seconds(lambda: sinkhorn_divergence(reference, other, samples))
        again = seconds(lambda: sinkhorn_divergence(reference, other, later))  # another lap's samples
        print(f"{n:>8}{solve:>14.2f}{first:>12.2f}{again:>12.2f}")


if __name__ == "__main__":
    main()
