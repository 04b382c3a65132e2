r"""Reconstruction quality: PSNR and SSIM from `dm-pix`, for images on any value range.

`dm-pix` assumes images in $[0, 1]$; we divide both images by the `data_range` the caller
names (4 for CIFAR-10 latents in $[-2, 2]$; the ground truth's maximum for MRI magnitudes, as
fastMRI's evaluation does), so that the numbers are those of the usual definitions:

$$\mathrm{PSNR}(x, x^\star) = 10 \log_{10} \frac{R^2}{\operatorname{mean}(x - x^\star)^2}$$

and SSIM with an 11×11 Gaussian window of width 1.5 and $k_1 = 0.01$, $k_2 = 0.03$.
"""

import dm_pix
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float


def _unit_range(x, target, data_range) -> tuple[Array, Array]:
    """Both image batches as float32 `(B, H, W, C)` (greyscale `(B, H, W)` gains a channel axis),
    divided by `data_range` (one per image or one for all)."""
    scale = jnp.reshape(jnp.asarray(data_range, jnp.float32), (-1, 1, 1, 1))
    x, target = (jnp.asarray(a, jnp.float32) for a in (x, target))
    if x.shape != target.shape or x.ndim not in (3, 4):
        raise ValueError(f"expected two batches of images (B, H, W, C) or (B, H, W) of one shape, got {x.shape} and {target.shape}")
    if x.ndim == 3:
        x, target = x[..., None], target[..., None]
    return x / scale, target / scale


def psnr(
    x: Float[ArrayLike, "B H W *C"],
    target: Float[ArrayLike, "B H W *C"],
    *,
    data_range: ArrayLike,
) -> Float[Array, " B"]:
    r"""The PSNR of each image of `x` against `target`, in dB.

    **Arguments:**

    - `x`, `target`: images of shape `(B, H, W, C)` (channels last), or `(B, H, W)` (greyscale).
    - `data_range`: $R$, a number or one per image (shape `(B,)`).
    """
    return dm_pix.psnr(*_unit_range(x, target, data_range))


def ssim(
    x: Float[ArrayLike, "B H W *C"],
    target: Float[ArrayLike, "B H W *C"],
    *,
    data_range: ArrayLike,
) -> Float[Array, " B"]:
    """The SSIM of each image of `x` against `target` (shapes and `data_range` as in [`psnr`][])."""
    return dm_pix.ssim(*_unit_range(x, target, data_range), max_val=1.0)
