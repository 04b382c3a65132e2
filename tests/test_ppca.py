"""PPCA (docs/conventions.md, 'PPCA') against the dense eigendecomposition of the sample covariance, and
recovery of a planted covariance D I + U U^T."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diemlib.linalg.ppca import ppca

# `diemlib.ppca` the attribute is the function (re-exported); the module is in sys.modules.
ppca_module = importlib.import_module("diemlib.linalg.ppca")


def _planted(d, r, noise, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(d, r)) * np.array([3.0, 2.0, 1.5][:r])
    mean = rng.normal(size=d)
    return mean, noise * np.eye(d) + u @ u.T


def _samples(mean, cov, n, seed=1):
    z = jax.random.normal(jax.random.key(seed), (n, mean.size), dtype=jnp.float64)
    return jnp.asarray(mean) + z @ jnp.asarray(np.linalg.cholesky(cov)).T


def _dense_ppca(x, rank):
    """PPCA (docs/conventions.md) by dense numpy: top-r eigenpairs of C = X^T X / N of the centred samples."""
    x = np.asarray(x)
    n, d = x.shape
    centred = x - x.mean(0)
    c = centred.T @ centred / n
    values, vectors = np.linalg.eigh(c)
    values, vectors = values[::-1][:rank], vectors[:, ::-1][:, :rank]
    diagonal = (np.trace(c) - values.sum()) / (d - rank) if rank < d else 1e-6
    u = vectors * np.sqrt(np.maximum(values - diagonal, 0))
    return x.mean(0), diagonal, diagonal * np.eye(d) + u @ u.T, c


@pytest.fixture
def lobpcg_spy(monkeypatch):
    """Records whether PPCA took the LOBPCG path (else it took `eigh`)."""
    calls = []
    original = ppca_module.lobpcg_standard

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(ppca_module, "lobpcg_standard", spy)
    return calls


# (rank, uses LOBPCG) for the covariance form d = 20: LOBPCG iff 5 r < 20.
@pytest.mark.parametrize("rank, lobpcg", [(3, True), (4, False)])
def test_ppca_covariance_form_matches_dense_and_recovers_planted(rank, lobpcg, lobpcg_spy):
    d, n = 20, 20_000
    mean, cov = _planted(d, 3, noise=0.5)
    x = _samples(mean, cov, n)
    fit_mean, fit_cov = jax.jit(ppca, static_argnums=1)(x, rank)
    assert bool(lobpcg_spy) == lobpcg
    dense_mean, diagonal, dense_cov, _ = _dense_ppca(x, rank)
    np.testing.assert_allclose(fit_mean, dense_mean, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(fit_cov.diagonal, diagonal, rtol=1e-8)
    np.testing.assert_allclose(fit_cov.dense(), dense_cov, rtol=1e-7, atol=1e-8)
    assert fit_cov.u.shape == (d, rank)
    # Recovery of the planted covariance within sampling error (relative Frobenius ~ sqrt(d / n)).
    rel = np.linalg.norm(fit_cov.dense() - cov) / np.linalg.norm(cov)
    assert rel < 0.05, rel
    np.testing.assert_allclose(fit_cov.diagonal, 0.5, rtol=0.05)
    np.testing.assert_allclose(fit_mean, mean, atol=5 * np.sqrt(np.diag(cov).max() / n))


# Gram form d = 300 > N = 100: LOBPCG iff 5 r < N.
@pytest.mark.parametrize("rank, lobpcg", [(3, True), (25, False)])
def test_ppca_gram_form_matches_dense_eigendecomposition(rank, lobpcg, lobpcg_spy):
    d, n = 300, 100
    mean, cov = _planted(d, 3, noise=0.1, seed=2)
    x = _samples(mean, cov, n, seed=3)
    fit_mean, fit_cov = jax.jit(ppca, static_argnums=1)(x, rank)
    assert bool(lobpcg_spy) == lobpcg
    if lobpcg:
        assert lobpcg_spy[0] == (n, rank)  # the Gram matrix is n x n
    dense_mean, diagonal, dense_cov, c = _dense_ppca(x, rank)
    np.testing.assert_allclose(fit_mean, dense_mean, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(fit_cov.diagonal, diagonal, rtol=1e-8)
    np.testing.assert_allclose(fit_cov.dense(), dense_cov, rtol=1e-7, atol=1e-8)
    # The mapped-back vectors are orthonormal eigenvectors of C.
    q = np.asarray(fit_cov.u) / np.linalg.norm(np.asarray(fit_cov.u), axis=0)
    np.testing.assert_allclose(q.T @ q, np.eye(rank), atol=1e-8)
    values = np.sum(q * (c @ q), axis=0)
    np.testing.assert_allclose(c @ q, q * values, atol=1e-7)


def test_ppca_full_rank_uses_tiny_diagonal_and_returns_the_sample_covariance(lobpcg_spy):
    rng = np.random.default_rng(4)
    n, event = 500, (1, 5)
    x = jnp.asarray(rng.normal(size=(n, *event)) * np.array([1.0, 2.0, 0.5, 1.0, 3.0]) + 1.0)
    fit_mean, fit_cov = ppca(x, 5)
    assert not lobpcg_spy
    flat = np.asarray(x).reshape(n, -1)
    centred = flat - flat.mean(0)
    sample_cov = centred.T @ centred / n
    assert fit_mean.shape == event
    np.testing.assert_allclose(fit_mean.reshape(-1), flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(fit_cov.diagonal, 1e-6, rtol=0)
    # D I + Q diag(L - D) Q^T = C exactly when r = d.
    np.testing.assert_allclose(fit_cov.dense(), sample_cov, rtol=1e-10, atol=1e-12)


def test_ppca_rank_above_the_data_raises():
    x = jax.random.normal(jax.random.key(0), (4, 10))
    with pytest.raises(ValueError, match="rank 5 exceeds"):
        ppca(x, 5)
