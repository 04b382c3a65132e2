"""Observation operators (docs/conventions.md; paper §5.1-5.3): adjoints, the centred
orthonormal FFT, and the statistics of the mask generators."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diemlib.inverse.operators import MaskedFFT, Matrix, PixelMask, apply, broadcast, kspace_mask, pixel_mask, random_projection

H, W = 6, 8


def _operators(seed, batch=()):
    """(operator, sample, observation) for each kind, random masks/matrices (numpy: no compiles)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=batch + shape))
    bits = lambda p, *shape: jnp.asarray((rng.uniform(size=batch + shape) < p).astype(float))
    return [
        (Matrix(normal(3, 5)), normal(5), normal(3)),
        (PixelMask(bits(0.6, H, W)), normal(3, H, W), normal(3, H, W)),
        (MaskedFFT(bits(0.5, W)), normal(1, H, W), normal(2, H, W)),
    ]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["Matrix", "PixelMask", "MaskedFFT"])
def test_adjoint_identity_single(index):
    op, x, y = _operators(0)[index]
    forward, adjoint = jax.jit(lambda op, x, y: (op(x), op.T(y, like=x)))(op, x, y)
    np.testing.assert_allclose(np.vdot(forward, y), np.vdot(x, adjoint), rtol=1e-12)
    assert adjoint.shape == x.shape and forward.shape == y.shape


@pytest.mark.parametrize("index", [0, 1, 2], ids=["Matrix", "PixelMask", "MaskedFFT"])
def test_adjoint_identity_batched_via_vmap(index):
    ops, xs, ys = _operators(1, batch=(4,))[index]  # a batch of different operators

    @jax.jit
    def run(ops, xs, ys):
        adjoint = jax.vmap(lambda op, x, y: op.T(y, like=x))(ops, xs, ys)
        op_0 = jax.tree.map(lambda a: a[0], ops)
        return apply(ops, xs), adjoint, op_0(xs[0]), op_0.T(ys[0], like=xs[0])

    forward, adjoint, forward_0, adjoint_0 = map(np.asarray, run(ops, xs, ys))
    lhs = np.sum((forward * np.asarray(ys)).reshape(4, -1), axis=1)
    rhs = np.sum((np.asarray(xs) * adjoint).reshape(4, -1), axis=1)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12)
    # apply == the per-sample call; the batched adjoint == the per-sample adjoint.
    np.testing.assert_allclose(forward[0], forward_0, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(adjoint[0], adjoint_0, rtol=1e-13, atol=1e-14)


def test_matrix_and_pixel_mask_adjoints_are_the_transposes():
    (matrix, x, y), (mask, xm, ym), _ = _operators(2)
    np.testing.assert_allclose(matrix.T(y, like=x), matrix.matrix.T @ y, rtol=1e-13)
    np.testing.assert_allclose(mask.T(ym, like=xm), mask.mask * ym, rtol=1e-14)


def test_masked_fft_with_full_mask_is_the_centred_orthonormal_fft_and_an_isometry():
    x = np.random.default_rng(3).normal(size=(1, H, W))
    op = MaskedFFT(jnp.ones(W))
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x[0]), norm="ortho"))
    out, back = map(np.asarray, jax.jit(lambda op, x: (op(x), op.T(op(x), like=x)))(op, jnp.asarray(x)))
    np.testing.assert_allclose(out, np.stack([k.real, k.imag]), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(np.linalg.norm(out), np.linalg.norm(x), rtol=1e-12)
    # An isometry from R^(HW) into R^(2HW): A^T A = I.
    np.testing.assert_allclose(back, x, rtol=1e-12, atol=1e-13)


def test_masked_fft_zeroes_masked_columns():
    mask = jnp.zeros(W).at[jnp.array([1, 4])].set(1.0)
    out = np.asarray(MaskedFFT(mask)(jnp.asarray(np.random.default_rng(4).normal(size=(1, H, W)))))
    assert np.all(out[..., [0, 2, 3, 5, 6, 7]] == 0) and np.all(np.abs(out[0][..., [1, 4]]) > 0)


def test_broadcast_shares_one_operator():
    op, x, _ = _operators(5)[0]
    ops = broadcast(op, 3)
    assert ops.matrix.shape == (3, 3, 5)
    xs = jnp.stack([x, 2 * x, -x])
    np.testing.assert_allclose(apply(ops, xs), xs @ op.matrix.T, rtol=1e-13)


@pytest.mark.parametrize("acceleration", [4, 6, 8])
def test_kspace_mask_keeps_the_centre_and_has_about_320_over_r_columns(acceleration):
    n = 2000
    masks = np.asarray(jax.jit(jax.vmap(lambda k: kspace_mask(k, acceleration)))(jax.random.split(jax.random.key(6), n)))
    assert masks.shape == (n, 320) and masks.dtype == bool
    half = math.ceil(60 / acceleration)
    assert masks[:, 160 - half : 160 + half].all()
    # Other columns are on with p = 200 / (320 R - 120); the expected count is exact:
    p = 200 / (320 * acceleration - 120)
    expected = 2 * half + (320 - 2 * half) * p
    counts = masks.sum(1)
    sd = np.sqrt((320 - 2 * half) * p * (1 - p) / n)
    assert abs(counts.mean() - expected) < 5 * sd, (counts.mean(), expected)
    np.testing.assert_allclose(masks[:, :160 - half].mean(), p, atol=5 * np.sqrt(p / (n * (160 - half))))
    # About 320 / R: within 2 % for R = 4, 6; R = 8 expects 40.92 (the formula assumes 120 / R = 15
    # centre columns, ceil gives 16), 2.3 % above 40.
    assert abs(counts.mean() / (320 / acceleration) - 1) < (0.02 if acceleration != 8 else 0.03)


def test_random_projection_rows_have_unit_norm():
    op = random_projection(jax.random.key(7), 4, 5)
    assert isinstance(op, Matrix) and op.matrix.shape == (4, 5)
    np.testing.assert_allclose(np.linalg.norm(op.matrix, axis=1), 1.0, rtol=1e-12)
    assert np.linalg.matrix_rank(np.asarray(op.matrix)) == 4


@pytest.mark.parametrize("rho", [0.25, 0.75])
def test_pixel_mask_keeps_pixels_with_probability_one_minus_rho(rho):
    n = 64
    masks = np.asarray(jax.jit(jax.vmap(lambda k: pixel_mask(k, (32, 32), rho)))(jax.random.split(jax.random.key(8), n)))
    assert set(np.unique(masks)) <= {0.0, 1.0}
    sd = np.sqrt(rho * (1 - rho) / masks.size)
    assert abs(masks.mean() - (1 - rho)) < 5 * sd


def _centre_half(size, acceleration):
    """h = ceil((60 / 320) N / R) = ceil(3 N / (16 R)), in integers (R integer)."""
    return -(-3 * size // (16 * acceleration))


@pytest.mark.parametrize("size", [16, 32, 64, 96, 320, 640])
@pytest.mark.parametrize("acceleration", [2, 4, 8])
def test_kspace_mask_scales_with_the_image_size(size, acceleration):
    """At any N: the centre band [N/2 - h, N/2 + h) is always on, the other columns are on with
    p = 200 / (320 R - 120) (independent of N), so the expected count 2h + (N - 2h) p is N / R up
    to the rounding of h (less than 2 columns)."""
    n = 4000
    masks = np.asarray(jax.jit(jax.vmap(lambda k: kspace_mask(k, acceleration, size)))(
        jax.random.split(jax.random.key(size + acceleration), n)))
    assert masks.shape == (n, size) and masks.dtype == bool
    half, centre = _centre_half(size, acceleration), size // 2
    if size == 320:
        assert half == math.ceil(60 / acceleration)  # the fastMRI constants
    assert 1 <= half and 2 * half < size
    assert masks[:, centre - half : centre + half].all()
    p = 200 / (320 * acceleration - 120)
    outside = np.r_[0 : centre - half, centre + half : size]
    np.testing.assert_allclose(masks[:, outside].mean(), p, atol=5 * np.sqrt(p * (1 - p) / (n * outside.size)))
    counts = masks.sum(1)
    expected = 2 * half + (size - 2 * half) * p
    sd = np.sqrt((size - 2 * half) * p * (1 - p) / n)
    assert abs(counts.mean() - expected) < 5 * sd, (counts.mean(), expected)
    assert abs(expected - size / acceleration) < 2
    assert abs(counts.mean() - size / acceleration) < 2 + 5 * sd


@pytest.mark.parametrize("size", [15, 16, 32, 33, 64, 320])
def test_masked_fft_adjoint_at_several_sizes(size):
    """<A x, y> = <x, A^T y> for MaskedFFT with a k-space mask of the image size (H = W = N, odd N
    too, where fftshift and ifftshift differ);
    <A^T A x, x> = |A x|^2 and A^T A is a contraction (A keeps part of an orthonormal transform)."""
    rng = np.random.default_rng(size)
    mask = kspace_mask(jax.random.key(size), 4, size).astype(float)
    x, y = jnp.asarray(rng.normal(size=(1, size, size))), jnp.asarray(rng.normal(size=(2, size, size)))

    @jax.jit
    def run(op, x, y):
        ax = op(x)
        return ax, op.T(y, like=x), op.T(ax, like=x)

    op = MaskedFFT(mask)
    ax, aty, atax = map(np.asarray, run(op, x, y))
    assert ax.shape == (2, size, size) and aty.shape == (1, size, size)
    np.testing.assert_allclose(np.vdot(ax, y), np.vdot(x, aty), rtol=1e-10)
    assert np.linalg.norm(atax) <= np.linalg.norm(x) * (1 + 1e-12)
    np.testing.assert_allclose(np.vdot(atax, x), np.linalg.norm(ax) ** 2, rtol=1e-10)
