"""DPLR algebra against dense numpy, and the analytic Gaussian denoiser against dense conditioning
(docs/conventions.md, 'Gaussian denoiser', 'DPLR algebra')."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diemlib.diffusion.gaussian import GaussianDenoiser
from diemlib.linalg.dplr import DPLR

D, R = 6, 2


def _dplr(symmetric: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    diagonal = rng.uniform(0.5, 2.0, D)
    u = rng.normal(size=(D, R))
    v = None if symmetric else rng.normal(size=(R, D))
    dense = np.diag(diagonal) + u @ (u.T if symmetric else v)
    return DPLR(diagonal, u, v), dense


@pytest.mark.parametrize("symmetric", [True, False])
def test_dplr_dense_diag_and_matvec_match_numpy(symmetric):
    matrix, dense = _dplr(symmetric)
    x = np.random.default_rng(1).normal(size=(3, D))
    np.testing.assert_allclose(matrix.dense(), dense, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(matrix.diag(), np.diag(dense), rtol=1e-13)
    np.testing.assert_allclose(matrix @ x[0], dense @ x[0], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(matrix @ x, x @ dense.T, rtol=1e-12, atol=1e-13)  # batched
    assert matrix.dim == D


@pytest.mark.parametrize("symmetric", [True, False])
def test_dplr_woodbury_inverse_and_solve_match_numpy(symmetric):
    matrix, dense = _dplr(symmetric)
    b = np.random.default_rng(2).normal(size=(4, D))
    inverse = matrix.inv()
    assert isinstance(inverse, DPLR)
    np.testing.assert_allclose(inverse.dense(), np.linalg.inv(dense), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(matrix.solve(b[0]), np.linalg.solve(dense, b[0]), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(matrix.solve(b), np.linalg.solve(dense, b.T).T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_dplr_slogdet_matches_numpy(seed):
    # Non-symmetric V: the determinant may be negative, which tests the sign.
    for symmetric in (True, False):
        matrix, dense = _dplr(symmetric, seed)
        sign, logdet = matrix.slogdet()
        sign_np, logdet_np = np.linalg.slogdet(dense)
        assert float(sign) == sign_np
        np.testing.assert_allclose(logdet, logdet_np, rtol=1e-11)


def test_dplr_slogdet_negative_diagonal_sign():
    rng = np.random.default_rng(3)
    diagonal = np.array([-1.0, 2.0, 3.0, 0.5, 1.5, 1.0])
    u, v = 0.3 * rng.normal(size=(D, R)), 0.3 * rng.normal(size=(R, D))
    sign, logdet = DPLR(diagonal, u, v).slogdet()
    sign_np, logdet_np = np.linalg.slogdet(np.diag(diagonal) + u @ v)
    assert float(sign) == sign_np == -1.0
    np.testing.assert_allclose(logdet, logdet_np, rtol=1e-11)


@pytest.mark.parametrize("symmetric", [True, False])
def test_dplr_add_scalar_diagonal_and_scale(symmetric):
    matrix, dense = _dplr(symmetric)
    diagonal = np.arange(1.0, D + 1)
    np.testing.assert_allclose((matrix + 0.7).dense(), dense + 0.7 * np.eye(D), rtol=1e-13)
    np.testing.assert_allclose((matrix + diagonal).dense(), dense + np.diag(diagonal), rtol=1e-13)
    np.testing.assert_allclose((matrix * 2.5).dense(), 2.5 * dense, rtol=1e-13)
    np.testing.assert_allclose((2.5 * matrix).dense(), 2.5 * dense, rtol=1e-13)
    # Composition: solve((c S + s2 I), b) as the Gaussian denoiser uses it.
    b = np.ones(D)
    np.testing.assert_allclose(
        (0.5 * matrix + 0.3).solve(b), np.linalg.solve(0.5 * dense + 0.3 * np.eye(D), b), rtol=1e-10
    )


def test_dplr_scalar_diagonal_broadcasts():
    u = np.random.default_rng(4).normal(size=(D, R))
    matrix = DPLR(0.5, u)
    np.testing.assert_allclose(matrix.dense(), 0.5 * np.eye(D) + u @ u.T, rtol=1e-13)


# --- the analytic Gaussian denoiser -----------------------------------------------------------


def _prior(event=(5,), seed=0):
    rng = np.random.default_rng(seed)
    d = int(np.prod(event))
    cov = DPLR(rng.uniform(0.2, 1.0, d), rng.normal(size=(d, 2)))
    mean = rng.normal(size=event)
    return GaussianDenoiser(jnp.asarray(mean), cov), mean.reshape(-1), np.asarray(cov.dense())


def _conditional_mean(mean, cov, x_t, sigma):
    """E[x | x_t] from the joint Gaussian of (x, x_t = x + sigma z):
    Cov(x, x_t) = S, Cov(x_t) = S + sigma^2 I, so E = mu + S (S + sigma^2 I)^-1 (x_t - mu)."""
    d = mean.size
    return mean + cov @ np.linalg.solve(cov + sigma**2 * np.eye(d), x_t - mean)


@pytest.mark.parametrize("event", [(5,), (1, 2, 3)])
def test_gaussian_denoiser_is_conditional_mean_scalar_sigma(event):
    denoiser, mean, cov = _prior(event)
    x_t = np.random.default_rng(5).normal(size=(4, *event)) * 3
    for sigma in (1e-3, 0.4, 1.0, 30.0):
        out = np.asarray(denoiser(jnp.asarray(x_t), sigma))
        assert out.shape == x_t.shape
        for b in range(4):
            expected = _conditional_mean(mean, cov, x_t[b].reshape(-1), sigma)
            np.testing.assert_allclose(out[b].reshape(-1), expected, rtol=1e-9, atol=1e-10)


def test_gaussian_denoiser_is_conditional_mean_per_sample_sigma():
    denoiser, mean, cov = _prior()
    x_t = np.random.default_rng(6).normal(size=(4, 5)) * 3
    sigma = np.array([1e-2, 0.3, 2.0, 50.0])
    out = np.asarray(eqx.filter_jit(denoiser)(jnp.asarray(x_t), jnp.asarray(sigma)))
    for b in range(4):
        np.testing.assert_allclose(out[b], _conditional_mean(mean, cov, x_t[b], sigma[b]), rtol=1e-9, atol=1e-10)


def test_gaussian_denoiser_jacobian_is_identity_minus_sigma2_inverse():
    denoiser, mean, cov = _prior()
    x = np.random.default_rng(7).normal(size=5)
    for sigma in (0.1, 1.0, 5.0):
        jac = jax.jacfwd(lambda xi: denoiser(xi[None], sigma)[0])(jnp.asarray(x))
        expected = np.eye(5) - sigma**2 * np.linalg.inv(cov + sigma**2 * np.eye(5))
        np.testing.assert_allclose(jac, expected, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(jac, jac.T, atol=1e-11)  # symmetric
