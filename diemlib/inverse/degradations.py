r"""Image degradations of the restoration benchmark (paper App. E): blurs, down-sampling and their generators.

Each operator maps one image `(C, H, W)` to one observation and is linear, so its adjoint comes
from [`adjoint`][] (`jax.linear_transpose`) like every other operator's. Inpainting needs no
new operator: it is a [`PixelMask`][] with a mask from [`box_mask`][] (a square hole) or
[`pixel_mask`][] (scattered pixels). Kernel and mask *generators* are functions, separate from
the operators that apply them:

- [`box_mask`][]: a square box at a uniformly random position;
- [`motion_kernel`][]: a random camera-shake trajectory (the generator the DPS benchmark uses,
  after Borodenko's `motionblur`), with an `intensity` in $[0, 1]$;
- [`gaussian_kernel`][]: an isotropic Gaussian.

The super-resolution operator [`Downsample`][] is antialiased bicubic down-sampling
(`jax.image.resize`, Keys' cubic with $a = -0.5$, its kernel widened by the factor), as in the
benchmarks of DPS (Chung et al. 2023) and DiffPIR (Zhu et al. 2023).
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .operators import LinearOperator


class Blur(LinearOperator):
    r"""Convolution of every channel with one kernel $k$, reflect-padded so that $A x$ keeps the size of $x$.

    $$(A x)_{c, i, j} = \sum_{u, v} k_{u, v} \, \tilde{x}_{c, i + u, j + v},$$ with $\tilde{x}$ the
    image padded by reflection by half the kernel size (a cross-correlation, as PyTorch's
    `conv2d` in the DPS benchmark; padding by reflection is linear too).

    **Arguments:**

    - `kernel`: $k$, shape `(K, K)` with $K$ odd (e.g. from [`motion_kernel`][] or
      [`gaussian_kernel`][]).
    """

    kernel: Float[Array, "K K"]

    def __call__(self, x):
        half = self.kernel.shape[-1] // 2
        padded = jnp.pad(x, ((0, 0), (half, half), (half, half)), mode="reflect")
        out = jax.lax.conv_general_dilated(padded[:, None], self.kernel[None, None].astype(x.dtype), (1, 1), "VALID")
        return out[:, 0]


class Downsample(LinearOperator):
    r"""Antialiased bicubic down-sampling by an integer `factor` (super-resolution).

    `jax.image.resize` with `method="cubic"` and `antialias=True`: every output pixel is a
    weighted sum of input pixels with weights that depend on the shapes only, so the map is linear.
    An image `(C, H, W)` becomes `(C, H / factor, W / factor)`.
    """

    factor: int = eqx.field(static=True)

    def __call__(self, x):
        c, h, w = x.shape
        return jax.image.resize(x, (c, h // self.factor, w // self.factor), "cubic", antialias=True)


def box_mask(key: PRNGKeyArray, shape: tuple[int, int], size: int, margin: int) -> Float[Array, "H W"]:
    r"""A mask that deletes a `size` × `size` box; its top-left corner is uniform in $[m, H - s - m)$ per axis.

    The benchmark (256 × 256 images) deletes a 128 × 128 box with its corner in $[16, 112)$:
    `size=128, margin=16`.
    """
    corner = jax.random.randint(key, (2,), margin, np.array(shape) - size - margin)
    rows, cols = jnp.arange(shape[0]), jnp.arange(shape[1])
    inside_rows = (rows >= corner[0]) & (rows < corner[0] + size)
    inside_cols = (cols >= corner[1]) & (cols < corner[1] + size)
    return 1.0 - (inside_rows[:, None] & inside_cols[None, :]).astype(float)


def gaussian_kernel(size: int, std: float) -> Float[Array, "K K"]:
    r"""The normalised isotropic Gaussian kernel $k_{u, v} \propto \exp(-(u^2 + v^2) / 2 s^2)$ on a `size` × `size` grid."""
    u = jnp.arange(size) - (size - 1) / 2
    g = jnp.exp(-(u**2) / (2 * std**2))
    k = g[:, None] * g[None, :]
    return k / k.sum()


def motion_kernel(key: PRNGKeyArray, size: int, intensity: float = 0.5) -> Float[Array, "K K"]:
    r"""A random motion-blur kernel: the normalised image of a random camera-shake trajectory.

    The trajectory generator of `motionblur` (L. Borodenko), which the DPS benchmark draws its
    kernels from, on a grid of $2K$ (diagonal $\delta = 2\sqrt{2}K$):

    - the path length is $\ell = 0.75\, \delta\, (u_1 + u_2)$, $u_1 \sim \mathcal{U}[0, 1]$,
      $u_2 \sim \mathcal{U}[0, I^2]$; steps of length $\beta\,(1 - I)\,\delta$,
      $\beta \sim \mathrm{Beta}(1, 30)$, are drawn until they add up to $\ell$;
    - the first direction is uniform in $[-\theta, \theta]$, $\theta \sim \mathcal{U}[0, \pi I]$;
      every next turn is $\mathrm{Triangular}(0, I \theta, \theta)$, with a sign that flips with
      probability $\mathrm{Beta}(2, 20)$ (jitter);
    - the path is centred on its mean, rotated by a uniform angle, rasterised by bilinear splatting,
      reduced to $K \times K$ by 2 × 2 averaging, smoothed by a Gaussian of width $0.01\,\delta$
      (at least half a pixel) and normalised to sum 1.

    The intensity $I \in [0, 1]$ makes the path longer and more curved. Drawn on the host with a
    NumPy generator seeded by `key` (the number of steps is random): call it outside `jit`.
    """
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    grid = 2 * size
    diagonal = math.sqrt(2) * grid
    length = 0.75 * diagonal * (rng.uniform() + rng.uniform(0, intensity**2))
    steps = []
    while sum(steps) < length:
        step = rng.beta(1, 30) * (1 - intensity + 1e-6) * diagonal
        if step < length:
            steps.append(step)
    max_angle = rng.uniform(0, intensity * math.pi)
    jitter = rng.beta(2, 20)
    angles = [rng.uniform(-max_angle, max_angle)]
    while len(angles) < len(steps):
        angle = rng.triangular(0, intensity * max_angle, max_angle + 1e-6)
        sign = -np.sign(angles[-1]) if rng.uniform() < jitter else np.sign(angles[-1])
        angles.append(angle * (sign or 1.0))
    path = np.concatenate([[0], np.cumsum(np.asarray(steps) * np.exp(1j * np.asarray(angles)))])
    path = (path - path.mean()) * np.exp(1j * rng.uniform(0, math.pi)) + (grid - 1) / 2 * (1 + 1j)
    # Dense points along the polyline, splatted bilinearly on the 2K grid.
    points = np.concatenate([np.linspace(a, b, 16, endpoint=False) for a, b in zip(path[:-1], path[1:])] + [path[-1:]])
    image = np.zeros((grid + 1, grid + 1))
    x, y = np.clip(points.real, 0, grid - 1), np.clip(points.imag, 0, grid - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    for dx, dy, w in [(0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)]:
        np.add.at(image, (y0 + dy, x0 + dx), w)
    kernel = image[:grid, :grid].reshape(size, 2, size, 2).mean(axis=(1, 3))
    smooth = np.asarray(gaussian_kernel(3, max(0.01 * diagonal, 0.5)))
    kernel = np.asarray(Blur(jnp.asarray(smooth))(jnp.asarray(kernel)[None]))[0]
    return jnp.asarray(kernel / kernel.sum())
