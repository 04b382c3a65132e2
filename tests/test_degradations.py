"""Restoration operators of the benchmark (paper App. E): adjoints through `jax.linear_transpose`,
and what the kernel and mask generators promise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diemlib.inverse.degradations import Blur, Downsample, box_mask, gaussian_kernel, motion_kernel
from diemlib.inverse.operators import PixelMask, adjoint, pixel_mask

SHAPE = (3, 16, 16)


def _operators():
    key = jax.random.key(0)
    return {
        "box": PixelMask(box_mask(key, SHAPE[1:], 8, 2)),
        "random": PixelMask(pixel_mask(key, SHAPE[1:], 0.9)),
        "motion": Blur(motion_kernel(key, 7, 0.5)),
        "gaussian": Blur(gaussian_kernel(7, 1.0)),
        "sr": Downsample(4),
    }


@pytest.mark.parametrize("name", ["box", "random", "motion", "gaussian", "sr"])
def test_adjoint_identity(name):
    """<A x, y> = <x, A^T y> with A^T from jax.linear_transpose."""
    op = _operators()[name]
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=SHAPE))
    y = jnp.asarray(rng.normal(size=op(x).shape))
    np.testing.assert_allclose(jnp.vdot(op(x), y), jnp.vdot(x, adjoint(op, x)(y)), rtol=1e-12)


def test_shapes_and_constants():
    ops, x = _operators(), jnp.ones(SHAPE)
    assert ops["sr"](x).shape == (3, 4, 4)
    for name in ("motion", "gaussian", "sr"):  # normalised kernels: constants are kept (reflect padding)
        np.testing.assert_allclose(ops[name](x), 1.0, rtol=1e-12)


def test_box_mask_deletes_one_box_inside_the_margin():
    for seed in range(20):
        mask = np.asarray(box_mask(jax.random.key(seed), (32, 32), 16, 2))
        rows, cols = np.nonzero(mask == 0)
        assert rows.size == 16 * 16
        assert rows.min() >= 2 and rows.max() < 30 and cols.min() >= 2 and cols.max() < 30


def test_motion_kernel_is_a_seeded_normalised_kernel():
    k1, k2 = (np.asarray(motion_kernel(jax.random.key(s), 9, 0.5)) for s in (0, 1))
    assert k1.shape == (9, 9) and (k1 >= 0).all()
    np.testing.assert_allclose(k1.sum(), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(k1, np.asarray(motion_kernel(jax.random.key(0), 9, 0.5)))
    assert not np.allclose(k1, k2)


def test_gaussian_kernel_is_separable_and_normalised():
    k = np.asarray(gaussian_kernel(5, 1.0))
    np.testing.assert_allclose(k.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(k, k.T)
    assert np.linalg.matrix_rank(k) == 1
