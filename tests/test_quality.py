"""PSNR and SSIM (dm-pix) on any value range: the closed form of PSNR, SSIM's bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diemlib.eval import psnr, ssim


def _pair():
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3)) * 4 - 2
    return x, x + 0.1 * jax.random.normal(jax.random.key(1), x.shape)


def test_psnr_is_ten_log10_of_range_squared_over_mse():
    x, y = _pair()
    mse = np.mean((np.asarray(y) - np.asarray(x)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(psnr(y, x, data_range=4.0), 10 * np.log10(16 / mse), rtol=1e-5)


def test_per_image_range_and_greyscale():
    x, y = _pair()
    ranges = jnp.array([4.0, 2.0])
    out = psnr(y[..., 0], x[..., 0], data_range=ranges)  # (B, H, W): no channel axis
    mse = np.mean((np.asarray(y[..., 0]) - np.asarray(x[..., 0])) ** 2, axis=(1, 2))
    np.testing.assert_allclose(out, 10 * np.log10(np.asarray(ranges) ** 2 / mse), rtol=1e-5)


def test_ssim_is_one_for_equal_images_and_below_for_noisy_ones():
    x, y = _pair()
    np.testing.assert_allclose(ssim(x, x, data_range=4.0), 1.0, atol=1e-5)
    noisy = np.asarray(ssim(y, x, data_range=4.0))
    assert np.all(noisy < 0.999) and np.all(noisy > 0.5)


def test_shape_mismatch_is_refused():
    x, y = _pair()
    with pytest.raises(ValueError, match="one shape"):
        psnr(x, y[..., 0], data_range=4.0)
