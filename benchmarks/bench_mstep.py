"""M-step throughput, and why the U-Net computes channels last (docs/conventions.md, 'Networks').

Part 1, one 3×3 convolution (batch 64, 32×32, 32 channels) and its gradients, inside a
`lax.scan` of 8 steps against 8 separate jitted calls: XLA's default channels-first convolution
against ours (`diemlib.nn.layers.Conv2d`: channels last, an HWIO kernel, the im2col backward on
the CPU). Part 2, the M-step's training loop (`diemlib.em.training.fit`, Adam + EMA, scanned in
chunks): steps per second for the manifold MLP (batch 1024) and images per second for the small
U-Net of the CPU profiles (batch 64) and, with `--paper`, the paper's CIFAR-10 U-Net (batch 16).

Run: `make bench` or `python benchmarks/bench_mstep.py [--steps N] [--paper]`.
"""

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp

from diemlib.diffusion import Denoiser, VESchedule
from diemlib.diffusion.denoiser import denoising_loss
from diemlib.em.training import TrainState, fit, make_train_step, optimizer
from diemlib.nn import MLP, cifar_unet
from diemlib.nn.layers import conv


def seconds(fn, *args):
    """Wall time of one call of `fn(*args)`, compiled (and warmed up) first."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def scan_vs_calls(op, x, n=8):
    """Per-iteration ms of `op` inside a scan of `n` steps, and as `n` separate jitted calls."""
    scanned = jax.jit(lambda x: jax.lax.scan(lambda c, _: (op(c), None), x, None, length=n)[0])
    one = jax.jit(op)

    def calls(x):
        for _ in range(n):
            x = one(x)
        return x

    return 1e3 * seconds(scanned, x) / n, 1e3 * seconds(calls, x) / n


def convolutions():
    key = jax.random.key(0)
    x = jax.random.normal(key, (64, 32, 32, 32))
    layer = conv(32, 32, key=key)
    xla = eqx.nn.Conv2d(32, 32, 3, padding=1, key=key)
    ours = jax.vmap(lambda z: layer(z) - layer.bias.reshape(-1))
    theirs = lambda z: jnp.transpose(jax.vmap(xla)(jnp.transpose(z, (0, 3, 1, 2))), (0, 2, 3, 1)) - xla.bias.reshape(-1)
    cases = {}
    for name, f in (("XLA default (NCHW)", theirs), ("ours (NHWC, HWIO)", ours)):
        loss = lambda z, f=f: jnp.sum(f(z) ** 2)
        cases[f"{name}, forward"] = f
        cases[f"{name}, gradient"] = lambda z, loss=loss: z + jax.grad(loss)(z)
    print(f"{'3x3 conv, 64x32x32x32':<40}{'in scan ms':>12}{'calls ms':>10}{'ratio':>8}")
    for name, f in cases.items():
        inside, outside = scan_vs_calls(f, x)
        print(f"{name:<40}{inside:>12.1f}{outside:>10.1f}{inside / outside:>8.2f}")


def training(name, model, data, batch, steps, unit):
    schedule = VESchedule()
    opt = optimizer(1e-3)
    step_fn = make_train_step(opt, lambda m, x, k: denoising_loss(m, x, k, schedule), 0.999)
    state = TrainState.create(model, opt, ema=True)
    key = jax.random.key(1)
    run = lambda: fit(state, data, key, steps=steps, batch_size=batch, step_fn=step_fn, chunk=steps, desc=name)[1]
    start = time.perf_counter()
    jax.block_until_ready(run())
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(run())
    wall = time.perf_counter() - start
    rate = steps / wall if unit == "steps" else steps * batch / wall
    print(f"{name:<44}{rate:>10.1f} {unit}/s   ({steps} steps: {wall:.1f} s, first call with compilation {first:.1f} s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32, help="training steps per measurement")
    parser.add_argument("--paper", action="store_true", help="also the paper's CIFAR-10 U-Net (slow on a CPU)")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, jax {jax.__version__}")
    convolutions()
    key = jax.random.key(0)
    print("M-step (fit: Adam, clipping, EMA):")
    training("manifold MLP, batch 1024", Denoiser(MLP(5, key=key), emb_features=64),
             jax.random.normal(key, (8192, 5)), 1024, 4 * args.steps, "steps")
    small = cifar_unet(widths=(16, 32), blocks=(1, 1), attention=(), emb_features=64, key=key)
    images = jax.random.normal(key, (1024, 3, 32, 32))
    training("small U-Net (CPU profiles), batch 64", Denoiser(small, emb_features=64), images, 64, args.steps, "images")
    if args.paper:
        paper = Denoiser(cifar_unet(key=key), emb_features=256)
        training("paper CIFAR-10 U-Net, batch 16", paper, images, 16, max(2, args.steps // 8), "images")


if __name__ == "__main__":
    main()
