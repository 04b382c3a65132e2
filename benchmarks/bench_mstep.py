"""M-step cost: a training step against its forward pass (docs/conventions.md, 'Networks').

Part 1, one 3×3 convolution of the small U-Net (batch 64, 32×32, 16 channels) inside a
`lax.scan`: its forward pass and its VJP (input and kernel gradients) three ways: XLA's own
(autodiff of `lax.conv_general_dilated`), the previous CPU VJP (per image, the VJP of the same
convolution written as an im2col matmul), and ours (`diemlib.nn.layers.Conv2d`: over the batch,
the input gradient a convolution, the kernel gradient one matmul over im2col taps).

Part 2, the M-step's training loop (`diemlib.em.training.fit`: the batch drawn and augmented,
the denoising loss, Adam after clipping, EMA, scanned), per network at the batch of its profile:
the forward pass (the loss on a batch drawn and augmented as `fit` does), the training step, their
ratio and images (or steps) per second, with the previous VJP ("before") and ours ("after") in the
same run, rounds interleaved, best of the rounds. `cpu` is the ratio of process CPU times, less
sensitive to other jobs on the machine than the wall-clock ratio. Networks: the small U-Net of the
CPU profiles (notebook 03), notebook 04's U-Net (laptop profile), with `--paper` the paper's
CIFAR-10 U-Net (a few steps), and the manifold MLP (notebook 01, batch 1024), whose step is also
split into loss, gradient and optimiser.

Run: `make bench` or `python benchmarks/bench_mstep.py [--rounds N] [--paper]`.
"""

import argparse
import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp

from diemlib.data.augment import FlipTranslate
from diemlib.diffusion import Denoiser, VESchedule
from diemlib.diffusion.denoiser import denoising_loss
from diemlib.em.training import TrainState, fit, make_train_step, optimizer
from diemlib.nn import MLP, UNet, cifar_unet, layers


def previous_conv(stride, padding):
    """The CPU convolution before ours, for comparison: per image, the VJP of the im2col matmul."""

    def as_matmul(x, weight):
        out, _, kh, kw = weight.shape
        (top, bottom), (left, right) = padding
        padded = jnp.pad(x, ((top, bottom), (left, right), (0, 0)))
        rows = (padded.shape[0] - kh) // stride[0] + 1
        cols = (padded.shape[1] - kw) // stride[1] + 1
        patches = jnp.concatenate([
            padded[i : i + stride[0] * (rows - 1) + 1 : stride[0], j : j + stride[1] * (cols - 1) + 1 : stride[1]]
            for i in range(kh)
            for j in range(kw)
        ], axis=-1)
        return patches @ layers._hwio(weight).reshape(-1, out)

    @jax.custom_vjp
    def conv(x, weight):
        return layers._conv(x[None], weight, stride, padding)[0]

    conv.defvjp(lambda x, weight: (conv(x, weight), (x, weight)), lambda res, ct: jax.vjp(as_matmul, *res)[1](ct))
    return conv


def best_of(calls, rounds):
    """Best wall and process CPU seconds of each of `calls` (name -> thunk), rounds interleaved."""
    for call in calls.values():
        jax.block_until_ready(call())  # compiles
    best = {name: [float("inf"), float("inf")] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            wall, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(call())
            best[name] = [min(best[name][0], time.perf_counter() - wall), min(best[name][1], time.process_time() - cpu)]
    return best


def convolution(rounds, steps=4):
    key = jax.random.key(0)
    x = jax.random.normal(key, (64, 32, 32, 16))
    layer = layers.conv(16, 16, key=key)

    def scanned(op):
        return jax.jit(lambda x: jax.lax.scan(lambda c, _: (op(c), None), x, None, length=steps)[0])

    def vjp(conv):
        def op(c):  # the input depends on the carry: nothing is hoisted out of the loop
            x_c, grad = jax.vjp(lambda x, w: jax.vmap(lambda z: conv(z, w))(x), jnp.tanh(c), layer.weight)[1](c)
            return c + 1e-3 * x_c + 1e-3 * jnp.sum(grad)
        return scanned(op)

    ours = layers._cpu_conv(layer.stride, layer.padding)
    xla = lambda z, w: layers._conv(z[None], w, layer.stride, layer.padding)[0]
    calls = {
        "forward": scanned(lambda c: c + 1e-3 * jax.vmap(lambda z: ours(z, layer.weight))(jnp.tanh(c))),
        "VJP, XLA's own": vjp(xla),
        "VJP, previous (per image, im2col)": vjp(previous_conv(layer.stride, layer.padding)),
        "VJP, ours (batch, conv + taps)": vjp(ours),
    }
    best = best_of({name: lambda f=f: f(x) for name, f in calls.items()}, rounds)
    forward = best["forward"][0]
    print(f"{'3x3 conv 16->16, batch 64 x 32x32, in lax.scan':<44}{'ms':>9}{'/ forward':>11}")
    for name, (wall, _) in best.items():
        print(f"{name:<44}{1e3 * wall / steps:>9.1f}{wall / forward:>11.2f}")


def training_calls(model, data, batch, steps, *, ema, augment, schedule="constant"):
    """(forward, step) thunks over `steps` steps, traced with the current `layers._cpu_conv`."""
    noise = VESchedule()
    loss = lambda m, x, k: denoising_loss(m, x, k, noise)
    opt = optimizer(1e-3, steps=steps, schedule=schedule)
    step_fn = make_train_step(opt, loss, 0.99 if ema else None)
    state = TrainState.create(model, opt, ema=ema)
    key = jax.random.key(1)

    @eqx.filter_jit
    def forward(model):
        def body(total, i):  # the batch, its augmentation and the loss's key, as `fit` draws them
            key_batch, key_augment, key_step = jax.random.split(jax.random.fold_in(key, i), 3)
            x = data[jax.random.randint(key_batch, (batch,), 0, data.shape[0])]
            x = x if augment is None else augment(key_augment, x)
            return total + loss(model, x, key_step), None
        return jax.lax.scan(body, 0.0, jnp.arange(steps, dtype=jnp.uint32))[0]

    def step():
        return fit(state, data, key, steps=steps, batch_size=batch, step_fn=step_fn, augment=augment, chunk=steps, desc="")[1]

    return lambda: forward(model), step


def table_row(name, variant, forward, step, batch, steps, unit):
    (fw, fc), (sw, sc) = forward, step
    rate = steps / sw if unit == "steps" else steps * batch / sw
    print(f"{name:<34}{variant:<8}{1e3 * fw / steps:>9.1f}{1e3 * sw / steps:>9.1f}{sw / fw:>7.2f}{sc / fc:>6.2f}{rate:>9.1f} {unit}/s")


def networks(rounds, paper):
    key = jax.random.key(0)
    images = jax.random.normal(key, (1024, 3, 32, 32))
    slices = jax.random.normal(key, (512, 1, 32, 32))
    cases = [
        ("small U-Net (03), batch 64", Denoiser(cifar_unet(widths=(16, 32), blocks=(1, 1), attention=(), emb_features=64, key=key), 64), images, 64, 8),
        ("04 U-Net (laptop), batch 32", Denoiser(UNet(1, 1, widths=(32, 64, 64), blocks=(1, 1, 1), attention=(), emb_features=64, unshuffle=2, key=key), 64), slices, 32, 8),
    ]
    if paper:
        cases.append(("paper CIFAR-10 U-Net, batch 16", Denoiser(cifar_unet(key=key), 256), images, 16, 2))
    print(f"{'M-step (fit: Adam, clipping, EMA, flips)':<42}{'fwd ms':>9}{'step ms':>9}{'ratio':>7}{'cpu':>6}{'rate':>9}")
    ours = layers._cpu_conv
    for name, model, data, batch, steps in cases:
        calls = {}
        for variant, conv in (("before", previous_conv), ("after", ours)):
            layers._cpu_conv = conv  # read when the step is traced (here, by the first call)
            forward, step = training_calls(model, data, batch, steps, ema=True, augment=FlipTranslate(1))
            calls[(variant, "forward")], calls[(variant, "step")] = forward, step
            jax.block_until_ready(forward()), jax.block_until_ready(step())
        layers._cpu_conv = ours
        best = best_of(calls, rounds if steps > 2 else 1)
        for variant in ("before", "after"):
            table_row(name, variant, best[(variant, "forward")], best[(variant, "step")], batch, steps, "images")

    # The manifold MLP as notebook 01 trains it: linear schedule, no EMA, no augmentation.
    mlp = Denoiser(MLP(5, key=key), emb_features=64)
    data, batch, steps = jax.random.normal(key, (8192, 5)), 1024, 64
    forward, step = training_calls(mlp, data, batch, steps, ema=False, augment=None, schedule="linear")
    noise = VESchedule()
    loss = lambda m, x, k: denoising_loss(m, x, k, noise)

    @eqx.filter_jit
    def gradient(model):
        def body(total, i):
            key_batch, _, key_step = jax.random.split(jax.random.fold_in(jax.random.key(1), i), 3)
            x = data[jax.random.randint(key_batch, (batch,), 0, data.shape[0])]
            value, grads = eqx.filter_value_and_grad(loss)(model, x, key_step)
            return total + value + sum(jnp.sum(g) for g in jax.tree.leaves(grads)), None
        return jax.lax.scan(body, 0.0, jnp.arange(steps, dtype=jnp.uint32))[0]

    best = best_of({"forward": forward, "gradient": lambda: gradient(mlp), "step": step}, rounds)
    table_row("manifold MLP (01), batch 1024", "", best["forward"], best["step"], batch, steps, "steps")
    print(f"{'  of which loss + gradient':<42}{'':>9}{1e3 * best['gradient'][0] / steps:>9.1f}"
          f"{best['gradient'][0] / best['forward'][0]:>7.2f}{best['gradient'][1] / best['forward'][1]:>6.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement (the best counts)")
    parser.add_argument("--paper", action="store_true", help="also the paper's CIFAR-10 U-Net (slow on a CPU)")
    args = parser.parse_args()
    os.environ.setdefault("DIEMLIB_PROGRESS", "off")  # no M-step progress bars between the rows
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, jax {jax.__version__}")
    if jax.default_backend() == "cpu":
        convolution(args.rounds)
    networks(args.rounds, args.paper)


if __name__ == "__main__":
    main()
