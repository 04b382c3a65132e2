r"""The cost of a posterior sampler, measured: network passes, wall time and peak memory (paper App. E).

- [`CountedDenoiser`][] wraps a denoiser and counts, while the compiled program runs, how many
  images went through the network forward ($F$) and through a vector-Jacobian product of it
  ($B$). Nothing is assumed from the method's definition: a solver that spends one product
  more than its floor shows up.
- [`measure`][] compiles a function once (and reuses the program for arguments of the same
  shapes), reads XLA's compiled memory analysis (the program's arguments, outputs and its
  temporary buffer, which XLA sizes for the program's peak: together the memory it needs, the
  number the CPU reports) and the device's own peak statistics where it keeps them (GPU), then
  runs it once and times it.
"""

import time
from typing import Any, Callable

import equinox as eqx
import jax
import numpy as np


class Counter:
    """Running totals of images through the network: `forward` (F) and `vjp` (B)."""

    def __init__(self):
        self.forward = 0
        self.vjp = 0

    def add(self, kind: str, images) -> None:
        setattr(self, kind, getattr(self, kind) + int(np.size(images)))

    def reset(self) -> None:
        self.forward = self.vjp = 0


def _tap(counter: Counter):
    """The identity on a batch, counting its images once per forward pass and once per VJP through it."""

    def count(kind, images):
        jax.debug.callback(lambda images: counter.add(kind, images), images)

    def images(x):  # one number per image, batched wherever x is (the cotangent may not be)
        return x.reshape(x.shape[0], -1)[:, 0]

    @jax.custom_vjp
    def tap(x):
        count("forward", images(x))
        return x

    def forward(x):
        return tap(x), images(x)

    def backward(residual, cotangent):
        count("vjp", residual)
        return (cotangent,)

    tap.defvjp(forward, backward)
    return tap


class CountedDenoiser(eqx.Module):
    r"""A denoiser that counts the images it denoises (F) and the VJPs taken through it (B).

    The output passes through an identity with a custom VJP; both its forward and its backward
    rule call back to the host with the batch (one call per sample under `vmap`), so the counts
    are those of the compiled program as it runs, loops and solvers included. Divide by the number
    of images and of steps for the cost per image and step.

    **Arguments:**

    - `denoiser`: the denoiser to count.
    - `counter`: the [`Counter`][] that receives the counts.
    """

    denoiser: Callable
    counter: Counter = eqx.field(static=True)

    def __call__(self, x_t, sigma, **kwargs):
        return _tap(self.counter)(self.denoiser(x_t, sigma, **kwargs))


def memory_analysis(compiled) -> dict[str, float]:
    """XLA's compiled memory analysis in MiB: arguments, outputs, temporaries, and their sum less aliasing (`peak`)."""
    m = compiled.memory_analysis()
    mib = lambda n: n / 2**20
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {"argument_mib": mib(m.argument_size_in_bytes), "output_mib": mib(m.output_size_in_bytes),
            "temp_mib": mib(m.temp_size_in_bytes), "peak_mib": mib(peak)}


_COMPILED = {}


def measure(fn: Callable, *args) -> tuple[Any, dict[str, float]]:
    """Compiles `fn(*args)` (once per `fn`, static parts and shapes of `args`), then runs and times it.

    `args` may hold equinox modules (their non-array leaves are static). Returns the output and
    `compile_s` (0 when an earlier call compiled the same program), `run_s` (wall time of the
    compiled run, outputs ready), the compiled memory analysis of [`memory_analysis`][] and,
    where the device reports it, `device_peak_mib` (the device's peak since the process started:
    monotone, an upper bound for this run).
    """
    dynamic, static = eqx.partition(args, eqx.is_array)
    static_leaves, static_def = jax.tree.flatten(static)
    dynamic_leaves, dynamic_def = jax.tree.flatten(dynamic)
    shapes = tuple((a.shape, a.dtype) for a in dynamic_leaves)
    signature = (fn, static_def, tuple(static_leaves), dynamic_def, shapes)
    start = time.perf_counter()
    if signature not in _COMPILED:
        _COMPILED[signature] = jax.jit(lambda d: fn(*eqx.combine(d, static))).lower(dynamic).compile()
    compiled = _COMPILED[signature]
    stats = {"compile_s": time.perf_counter() - start, **memory_analysis(compiled)}
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(dynamic))
    jax.effects_barrier()  # every count has reached its Counter
    stats["run_s"] = time.perf_counter() - start
    device = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in device:
        stats["device_peak_mib"] = device["peak_bytes_in_use"] / 2**20
    return out, stats
