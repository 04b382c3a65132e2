"""Cost of one MMPS call against its floor: one forward pass and k + 1 VJPs (docs/conventions.md, 'MMPS').

For the manifold MLP (batch 1024) and a small image U-Net (32x32x3, batch 16), prints the time
of one forward pass F, one VJP B (a backward pass of `jax.vjp`: forward-with-VJP-and-one-backward
minus F), and one MMPS call with k = 1, 3, 5 solver iterations for our CG and GMRES and lineax's
CG as shipped, each with the ratio MMPS / (F + (k + 1) B). Run: `make bench` or
`python benchmarks/bench_mmps.py [--repeats N]`.
"""

import argparse
import time

import jax
import lineax as lx

from diemlib.inverse import operators
from diemlib.diffusion.denoiser import Denoiser
from diemlib.inverse.mmps import MMPSDenoiser, Tweedie
from diemlib.nn.mlp import MLP
from diemlib.nn.unet import UNet
from diemlib.linalg.solvers import CG, GMRES


def timeit(fn, *args, repeats):
    """Best wall time of `fn(*args)` (jitted, compiled first) over `repeats` runs, in ms.

    The minimum, not the median: on a shared machine the noise only ever adds time.
    """
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def problems(key):
    """(name, denoiser, x_t, A, y) for the two networks of the issue."""
    k = jax.random.split(key, 8)
    mlp = Denoiser(MLP(5, key=k[0]), emb_features=64)
    x = jax.random.normal(k[1], (1024, 5))
    A = jax.vmap(lambda kk: operators.random_projection(kk, 2, 5))(jax.random.split(k[2], 1024))
    yield "MLP 5-D, batch 1024", mlp, x, A, jax.random.normal(k[3], (1024, 2))
    unet = Denoiser(
        UNet(3, 3, widths=(32, 64), blocks=(1, 1), attention=(1,), emb_features=64, dropout=0.0, key=k[4]),
        emb_features=64,
    )
    x = jax.random.normal(k[5], (16, 3, 32, 32))
    masks = jax.vmap(lambda kk: operators.pixel_mask(kk, (32, 32), 0.5))(jax.random.split(k[6], 16))
    yield "U-Net 32x32x3, batch 16", unet, x, operators.PixelMask(masks), jax.random.normal(k[7], x.shape)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    sigma = 1.0
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, jax {jax.__version__}")
    header = f"{'solver':<12}{'k':>3}{'MMPS ms':>10}{'floor ms':>10}{'ratio':>8}"
    for name, denoiser, x, A, y in problems(jax.random.key(0)):
        forward = jax.jit(lambda x: denoiser(x, sigma))
        vjp_once = jax.jit(lambda x, u: jax.vjp(lambda z: denoiser(z, sigma), x)[1](u)[0])
        F = timeit(forward, x, repeats=args.repeats)
        B = timeit(vjp_once, x, x, repeats=args.repeats) - F
        print(f"\n{name}: F = {F:.2f} ms, B = {B:.2f} ms\n{header}")
        for solver_name, make in [("CG", CG), ("GMRES", GMRES), ("lineax CG", lambda k: lx.CG(0.0, 0.0, max_steps=k))]:
            for k in (1, 3, 5):
                posterior = MMPSDenoiser(denoiser, A, y, 1e-2, Tweedie(), make(k))
                t = timeit(jax.jit(lambda x: posterior(x, sigma)), x, repeats=args.repeats)
                floor = F + (k + 1) * B
                print(f"{solver_name:<12}{k:>3}{t:>10.2f}{floor:>10.2f}{t / floor:>8.2f}")


if __name__ == "__main__":
    main()
