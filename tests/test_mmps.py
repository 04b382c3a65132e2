"""MMPS (paper §4; docs/conventions.md, 'MMPS') with the analytic Gaussian denoiser: every quantity has a closed form."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

from diemlib.diffusion.gaussian import GaussianDenoiser
from diemlib.linalg.dplr import DPLR
from diemlib.inverse.mmps import MMPSDenoiser, Prior, Tweedie, covariance
from diemlib.inverse.operators import Matrix, PixelMask, broadcast
from diemlib.diffusion.samplers import DDPM
from diemlib.diffusion.schedule import VESchedule
from diemlib.linalg.solvers import CG, GMRES, solver

D, M = 5, 3


def _prior(seed=0):
    rng = np.random.default_rng(seed)
    dplr = DPLR(jnp.asarray(rng.uniform(0.3, 1.0, D)), jnp.asarray(rng.normal(size=(D, 2))))
    mean = rng.normal(size=D)
    return GaussianDenoiser(jnp.asarray(mean), dplr), mean, np.asarray(dplr.dense())


def _problem(batch, seed=1):
    """Per-sample A, y, x_t and sigma."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(batch, M, D))
    y = rng.normal(size=(batch, M))
    x_t = rng.normal(size=(batch, D)) * 2
    sigma = np.geomspace(0.05, 5.0, batch)
    return a, y, x_t, sigma


def _mmps(denoiser, a, y, var_y, **kwargs):
    return MMPSDenoiser(denoiser, Matrix(jnp.asarray(a)), jnp.asarray(y), jnp.asarray(var_y), **kwargs)


@eqx.filter_jit
def _with_info(mmps, x_t, sigma):
    """Jitted MMPS call (eager lineax is slow); compiled once per solver/covariance/shape."""
    return mmps.with_info(jnp.asarray(x_t), jnp.asarray(sigma))


def _call(mmps, x_t, sigma):
    return np.asarray(_with_info(mmps, x_t, sigma)[0])


def _x_hat_and_jacobian(mean, cov, x_t, s):
    jac = np.eye(D) - s**2 * np.linalg.inv(cov + s**2 * np.eye(D))
    return x_t - s**2 * np.linalg.solve(cov + s**2 * np.eye(D), x_t - mean), jac


def _exact_posterior_mean(mean, cov, x_t, s, a, y, var_y):
    """E[x | x_t, y] by dense conditioning of the joint Gaussian of (x, x_t, y):
    x_t = x + s z, y = A x + eta, eta ~ N(0, diag(var_y))."""
    k = np.block([[cov + s**2 * np.eye(D), cov @ a.T], [a @ cov, a @ cov @ a.T + np.diag(var_y)]])
    c = np.hstack([cov, cov @ a.T])
    return mean + c @ np.linalg.solve(k, np.r_[x_t - mean, y - a @ mean])


def _exact_posterior(mean, cov, a, y, var_y):
    """N(mean, cov) of x | y (no x_t)."""
    gain = cov @ a.T @ np.linalg.inv(a @ cov @ a.T + np.diag(var_y))
    return mean + gain @ (y - a @ mean), cov - gain @ a @ cov


def _system(mean, cov, x_t, s, a, y, var_y, v_cov=None):
    """Dense M = Sigma_y + A V A^T (V = s^2 J by default), b = y - A x_hat, and x_hat, J."""
    x_hat, jac = _x_hat_and_jacobian(mean, cov, x_t, s)
    v_cov = s**2 * jac if v_cov is None else v_cov
    return np.diag(var_y) + a @ v_cov @ a.T, y - a @ x_hat, x_hat, jac


EXACT_SOLVERS = {
    "cg": CG(M),
    "gmres": GMRES(M),
    "lineax_cg": lx.CG(rtol=1e-13, atol=1e-13, max_steps=50),
    "lineax_gmres": solver("gmres", M, rtol=1e-13),
    "lineax_lu": lx.LU(),
}


def _check_posterior_mean(out, x_t, sigma, a, y, var_y):
    _, mean, cov = _prior()
    full_var = np.broadcast_to(var_y, y.shape)
    sigma = np.broadcast_to(sigma, x_t.shape[:1])
    for b in range(len(x_t)):
        expected = _exact_posterior_mean(mean, cov, x_t[b], sigma[b], a[b], y[b], full_var[b])
        np.testing.assert_allclose(out[b], expected, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("solver_name", list(EXACT_SOLVERS))
def test_exact_solve_gives_the_analytic_posterior_mean(solver_name):
    """Random per-sample A (m = 3, d = 5), per-sample diagonal Sigma_y and per-sample sigma."""
    denoiser, _, _ = _prior()
    a, y, x_t, sigma = _problem(4)
    var_y = np.random.default_rng(2).uniform(0.05, 1.0, (4, M))
    out, info = _with_info(_mmps(denoiser, a, y, var_y, solver=EXACT_SOLVERS[solver_name]), x_t, sigma)
    _check_posterior_mean(np.asarray(out), x_t, sigma, a, y, var_y)
    assert np.all(np.asarray(info["residual"]) < 1e-8), info["residual"]


@pytest.mark.parametrize("var_y", [0.1, (0.05, 0.2, 1.0)], ids=["scalar", "shared_diagonal"])
def test_exact_solve_with_shared_noise_and_scalar_sigma(var_y):
    denoiser, _, _ = _prior()
    a, y, x_t, _ = _problem(4)
    out = _call(_mmps(denoiser, a, y, np.asarray(var_y), solver=CG(M)), x_t, 0.7)
    _check_posterior_mean(out, x_t, 0.7, a, y, np.asarray(var_y))


def test_posterior_sampling_reproduces_the_gaussian_posterior():
    """DDPM (256 steps) with MMPS (exact CG) on one observation shared by the batch draws
    N(m_post, C_post): whitened mean within 5/sqrt(N), covariance within 6 sqrt(2/N)."""
    denoiser, mean, cov = _prior()
    rng = np.random.default_rng(3)
    a, y, var_y = rng.normal(size=(M, D)), rng.normal(size=M), np.full(M, 0.1)
    m_post, c_post = _exact_posterior(mean, cov, a, y, var_y)
    n = 4000
    mmps = MMPSDenoiser(denoiser, broadcast(Matrix(jnp.asarray(a)), n), jnp.broadcast_to(jnp.asarray(y), (n, M)),
                jnp.asarray(0.1), solver=CG(M))
    run = eqx.filter_jit(lambda key: DDPM(VESchedule(1e-3, 1e2), 256)(mmps, (n, D), key, mean=denoiser.mean))
    x = np.asarray(run(jax.random.key(0)))
    values, vectors = np.linalg.eigh(c_post)
    w = (x - m_post) @ (vectors @ np.diag(values**-0.5) @ vectors.T).T
    assert np.all(np.abs(w.mean(0)) < 5 / np.sqrt(n)), w.mean(0)
    w_cov = np.cov(w.T, bias=True)
    assert np.all(np.abs(w_cov - np.eye(D)) < 6 * np.sqrt(2 / n)), w_cov


@pytest.mark.parametrize("scope", ["sample", "batch"])
def test_prior_covariance_equals_tweedie_for_the_gaussian_denoiser(scope):
    denoiser, mean, cov = _prior()
    a, y, x_t, sigma = _problem(4)

    @eqx.filter_jit
    def both(x_t, sigma):
        out = []
        for k in (1, M):  # also an inexact solve: the two operators M are the same matrix
            for choice in (covariance("tweedie"), covariance("prior", denoiser.cov)):
                out.append(_mmps(denoiser, a, y, 0.1, cov=choice, solver=CG(k), scope=scope)(x_t, sigma))
        return out

    tweedie_1, prior_1, tweedie_m, prior_m = map(np.asarray, both(jnp.asarray(x_t), jnp.asarray(sigma)))
    np.testing.assert_allclose(prior_1, tweedie_1, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(prior_m, tweedie_m, rtol=1e-10, atol=1e-11)
    assert np.max(np.abs(tweedie_1 - tweedie_m)) > 1e-4  # the inexact solve is a different check


def test_heuristic_covariances_match_their_closed_forms():
    """Only V inside the solve changes; the final direction keeps the denoiser's J^T:
    x_hat + s^2 J^T A^T (Sigma_y + A V A^T)^-1 (y - A x_hat), V = 0, s^2 I, s^2 / (1 + s^2) I."""
    denoiser, mean, cov = _prior()
    batch = 4
    a, y, x_t, sigma = _problem(batch)
    var_y = np.array([0.05, 0.2, 1.0])
    names = ("zero", "sigma", "sigma_over_1p")
    outs = eqx.filter_jit(
        lambda x_t, sigma: [_mmps(denoiser, a, y, var_y, cov=covariance(n), solver=CG(M))(x_t, sigma) for n in names]
    )(jnp.asarray(x_t), jnp.asarray(sigma))
    for name, out in zip(names, outs):
        for b in range(batch):
            s = sigma[b]
            v_cov = {"zero": 0.0, "sigma": s**2, "sigma_over_1p": s**2 / (1 + s**2)}[name] * np.eye(D)
            mat, rhs, x_hat, jac = _system(mean, cov, x_t[b], s, a[b], y[b], var_y, v_cov)
            expected = x_hat + s**2 * jac.T @ a[b].T @ np.linalg.solve(mat, rhs)
            if name == "zero":  # the DPS-like form
                dps = x_hat + s**2 * jac.T @ a[b].T @ ((y[b] - a[b] @ x_hat) / var_y)
                np.testing.assert_allclose(expected, dps, rtol=1e-12)
            np.testing.assert_allclose(out[b], expected, rtol=1e-9, atol=1e-10)


def test_per_sample_scope_does_not_depend_on_the_batch():
    denoiser, _, _ = _prior()
    a, y, x_t, sigma = _problem(9)
    var_y = np.random.default_rng(4).uniform(0.05, 1.0, (9, M))

    def run(index, scope):
        mmps = _mmps(denoiser, a[index], y[index], var_y[index], solver=CG(2), scope=scope)
        return _call(mmps, x_t[index], sigma[index])

    full = run(np.arange(6), "sample")
    for index in (np.array([0, 2, 4]), np.array([5, 3, 1, 0, 2, 4])):  # a sub-batch, a permutation
        np.testing.assert_allclose(run(index, "sample"), full[index], rtol=1e-13, atol=1e-14)
    # The reference's batch scope shares alpha_k, beta_k: the same rows change with the batch.
    full_batch, other_batch = run(np.arange(6), "batch"), run(np.array([0, 6, 2, 7, 4, 8]), "batch")
    assert np.max(np.abs(other_batch[[0, 2, 4]] - full_batch[[0, 2, 4]])) > 1e-6


def _batch_problem(batch=4, seed=5):
    denoiser, mean, cov = _prior()
    a, y, x_t, sigma = _problem(batch, seed)
    var_y = np.random.default_rng(seed).uniform(0.05, 1.0, (batch, M))
    blocks, rhs, x_hats, jacs = zip(*(_system(mean, cov, x_t[b], sigma[b], a[b], y[b], var_y[b]) for b in range(batch)))
    big = np.zeros((batch * M, batch * M))
    for b, block in enumerate(blocks):
        big[b * M:(b + 1) * M, b * M:(b + 1) * M] = block
    return denoiser, a, y, x_t, sigma, var_y, big, np.concatenate(rhs), x_hats, jacs


def test_batch_scope_equals_jax_scipy_cg_on_the_stacked_system():
    denoiser, a, y, x_t, sigma, var_y, big, rhs, x_hats, jacs = _batch_problem()
    batch, ks = len(sigma), (1, 2, 3)
    outs = eqx.filter_jit(
        lambda x_t, sigma: [_mmps(denoiser, a, y, var_y, solver=CG(k), scope="batch")(x_t, sigma) for k in ks]
    )(jnp.asarray(x_t), jnp.asarray(sigma))
    big_j = jnp.asarray(big)
    for k, out in zip(ks, outs):
        v = jax.scipy.sparse.linalg.cg(lambda u: big_j @ u, jnp.asarray(rhs), x0=jnp.zeros_like(rhs), tol=0.0,
                                       atol=0.0, maxiter=k)[0]
        v = np.asarray(v).reshape(batch, M)
        if k == 1:  # the reference's one iteration: v = <b, b> / <b, M b> b, sums over the batch
            np.testing.assert_allclose(v.reshape(-1), rhs @ rhs / (rhs @ big @ rhs) * rhs, rtol=1e-12)
        expected = np.stack([x_hats[b] + sigma[b] ** 2 * jacs[b].T @ a[b].T @ v[b] for b in range(batch)])
        np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-11)


def _recover_v(out, x_hat, jac, s, a):
    """v from out = x_hat + s^2 J^T A^T v (J^T A^T has full column rank)."""
    return np.linalg.lstsq(s**2 * jac.T @ a.T, out - x_hat, rcond=None)[0]


def _textbook_cg(mat, b, k):
    v, r = np.zeros_like(b), b.copy()
    p = r.copy()
    for _ in range(k):
        alpha = (r @ r) / (p @ mat @ p)
        v, r_new = v + alpha * p, r - alpha * mat @ p
        p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
    return v


@pytest.mark.parametrize(
    "name, make, steps", [("cg", lambda: CG(2), 2), ("gmres", lambda: GMRES(2), 2),
                          ("bicgstab", lambda: solver("bicgstab", 1, rtol=1e-12), None)]
)
def test_diagnostics_report_iterations_and_the_true_relative_residual(name, make, steps):
    denoiser, mean, cov = _prior()
    batch = 4
    a, y, x_t, sigma = _problem(batch)
    var_y = np.array([0.05, 0.2, 1.0])
    out, info = _with_info(_mmps(denoiser, a, y, var_y, solver=make()), x_t, sigma)
    assert info["residual"].shape == (batch,) and info["iterations"].shape == (batch,)
    if steps is not None:
        np.testing.assert_array_equal(info["iterations"], steps)
    for b in range(batch):
        mat, rhs, x_hat, jac = _system(mean, cov, x_t[b], sigma[b], a[b], y[b], var_y)
        v = _recover_v(np.asarray(out[b]), x_hat, jac, sigma[b], a[b])
        true_residual = np.linalg.norm(rhs - mat @ v) / np.linalg.norm(rhs)
        assert true_residual > 1e-6  # an inexact solve: the check is not trivially 0 = 0
        np.testing.assert_allclose(info["residual"][b], true_residual, rtol=1e-6)
        if name == "cg":
            np.testing.assert_allclose(v, _textbook_cg(mat, rhs, 2), rtol=1e-8, atol=1e-10)


def test_cg_with_tolerance_stops_early_on_an_easy_system():
    """At sigma = 1e-3 and Sigma_y = I, M = I + 1e-6 A J A^T: one iteration meets rtol = 1e-3."""
    denoiser, mean, cov = _prior()
    a, y, x_t, _ = _problem(4)
    out, info = _with_info(_mmps(denoiser, a, y, 1.0, solver=CG(10, rtol=1e-3)), x_t, 1e-3)
    assert np.all(info["iterations"] < 10), info["iterations"]
    np.testing.assert_array_equal(info["iterations"], 1)
    assert np.all(info["residual"] <= 1e-3)
    for b in range(4):
        mat, rhs, x_hat, jac = _system(mean, cov, x_t[b], 1e-3, a[b], y[b], np.ones(M))
        expected = x_hat + 1e-6 * jac.T @ a[b].T @ np.linalg.solve(mat, rhs)
        np.testing.assert_allclose(out[b], expected, rtol=1e-6, atol=1e-9)


def test_invalid_choices_raise():
    with pytest.raises(ValueError):
        covariance("nope")
    with pytest.raises(ValueError):
        covariance("prior")
    denoiser, _, _ = _prior()
    assert isinstance(covariance("prior", denoiser.cov), Prior)
    assert isinstance(covariance("tweedie"), Tweedie)
    a, y, _, _ = _problem(2)
    with pytest.raises(ValueError):
        _mmps(denoiser, a, y, 0.1, scope="nope")


# --------------------------------------------------------------------------------------------
# Non-symmetric Jacobians. The Gaussian denoiser's Jacobian is symmetric, so the tests above
# cannot tell J from J^T. Here: a linear denoiser D(x) = B x + c with B non-symmetric, a tanh MLP
# and image-shaped samples, each against a dense numpy solve. The final direction is
# x_hat + s^2 J^T A^T v (the VJP); inside the system, V u = s^2 J^T u (`Tweedie` applies V with
# the same VJP, as the reference implementation does), so the operator is
# Sigma_y + s^2 A J^T A^T. The formula written with V = s^2 J, Sigma_y + s^2 A J A^T, is a
# different matrix when J is not symmetric: `test_tweedie_system_with_v_equal_to_s2_j` checks it
# and is expected to fail (see its reason).


def _dense_mmps(x_hat, jac, s, a, y, var_y, v_cov):
    """x_hat + s^2 J^T A^T v with (Sigma_y + A V A^T) v = y - A x_hat, dense (numpy)."""
    mat = np.diag(np.broadcast_to(var_y, y.shape)) + a @ v_cov @ a.T
    return x_hat + s**2 * jac.T @ a.T @ np.linalg.solve(mat, y - a @ x_hat)


def _nonsymmetric_linear(d=D, seed=7):
    """D(x, sigma) = B x + c, batched over the leading axis of x (any event shape), B = P + K with
    P symmetric positive definite and K skew: B is far from symmetric, yet v^T B v > 0, so every
    system Sigma_y + s^2 A B^(T) A^T has a positive-definite symmetric part (non-singular)."""
    rng = np.random.default_rng(seed)
    q, r = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    b = 0.3 * np.eye(d) + q @ q.T / d + (r - r.T) / 2
    c = rng.normal(size=d)
    bj, cj = jnp.asarray(b), jnp.asarray(c)

    def denoiser(x_t, sigma):
        flat = x_t.reshape(x_t.shape[0], -1)
        return (flat @ bj.T + cj).reshape(x_t.shape)

    assert np.linalg.norm(b - b.T) > 0.5 * np.linalg.norm(b)
    return denoiser, b, c


def _tanh_mlp(d=D, hidden=16, seed=8):
    """D(x, sigma) = x / 2 + W2 tanh(W1 x / sqrt(1 + sigma^2) + b1) + b2 (per sample, batched)."""
    rng = np.random.default_rng(seed)
    w1, b1 = jnp.asarray(rng.normal(size=(hidden, d)) / np.sqrt(d)), jnp.asarray(rng.normal(size=hidden))
    w2, b2 = jnp.asarray(rng.normal(size=(d, hidden)) / np.sqrt(hidden)), jnp.asarray(rng.normal(size=d))

    def denoiser(x_t, sigma):
        scale = 1 / jnp.sqrt(1 + jnp.reshape(jnp.asarray(sigma, x_t.dtype), (-1, 1)) ** 2)
        return x_t / 2 + jnp.tanh(scale * x_t @ w1.T + b1) @ w2.T + b2

    return denoiser


def _nonsymmetric_problem(batch=4):
    a, y, x_t, sigma = _problem(batch)
    var_y = np.random.default_rng(9).uniform(0.05, 0.5, (batch, M))
    return a, y, x_t, sigma, var_y


@pytest.mark.parametrize("scope, solver_name", [("sample", "gmres"), ("batch", "gmres"), ("sample", "lu")])
def test_linear_nonsymmetric_denoiser_against_a_dense_solve(scope, solver_name):
    """GMRES with as many iterations as unknowns (3 per sample; 12 for the stacked batch system)
    and LU are exact: the output is x_hat + s^2 B^T A^T v, (Sigma_y + s^2 A B^T A^T) v = y - A x_hat.
    Both placements of the transpose matter: the dense results with B in place of B^T (in the
    final direction or in the system) differ from it by far more than the tolerance."""
    denoiser, b, c = _nonsymmetric_linear()
    a, y, x_t, sigma, var_y = _nonsymmetric_problem()
    solver = {"gmres": GMRES(M if scope == "sample" else len(x_t) * M), "lu": lx.LU()}[solver_name]
    out = _call(_mmps(denoiser, a, y, var_y, solver=solver, scope=scope), x_t, sigma)
    for i in range(len(x_t)):
        s, x_hat = sigma[i], b @ x_t[i] + c
        expected = _dense_mmps(x_hat, b, s, a[i], y[i], var_y[i], s**2 * b.T)
        np.testing.assert_allclose(out[i], expected, rtol=1e-9, atol=1e-10)
        wrong_direction = _dense_mmps(x_hat, b.T, s, a[i], y[i], var_y[i], s**2 * b.T)
        wrong_system = _dense_mmps(x_hat, b, s, a[i], y[i], var_y[i], s**2 * b)
        assert np.max(np.abs(wrong_direction - expected)) > 1e-4
        if s > 0.3:  # at small s the system is nearly Sigma_y either way
            assert np.max(np.abs(wrong_system - expected)) > 1e-4


def test_cg_where_valid_symmetric_linear_denoiser():
    """CG needs a symmetric positive-definite system: with B symmetric (B = P), CG(3) is exact and
    both placements of the transpose agree."""
    _, b, c = _nonsymmetric_linear()
    p = (b + b.T) / 2
    pj, cj = jnp.asarray(p), jnp.asarray(c)
    denoiser = lambda x_t, sigma: x_t @ pj.T + cj
    a, y, x_t, sigma, var_y = _nonsymmetric_problem()
    out = _call(_mmps(denoiser, a, y, var_y, solver=CG(M)), x_t, sigma)
    for i in range(len(x_t)):
        expected = _dense_mmps(p @ x_t[i] + c, p, sigma[i], a[i], y[i], var_y[i], sigma[i] ** 2 * p)
        np.testing.assert_allclose(out[i], expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("scope", ["sample", "batch"])
def test_tanh_mlp_denoiser_against_a_dense_solve_with_jacfwd(scope):
    """A small nonlinear network: J = jacfwd of the per-sample denoiser at x_t (not symmetric);
    exact GMRES against the dense solve with V = s^2 J^T."""
    denoiser = _tanh_mlp()
    a, y, x_t, sigma, var_y = _nonsymmetric_problem()
    solver = GMRES(M if scope == "sample" else len(x_t) * M)
    out = _call(_mmps(denoiser, a, y, var_y, solver=solver, scope=scope), x_t, sigma)
    for i in range(len(x_t)):
        one = lambda x: denoiser(x[None], sigma[i])[0]
        x_hat = np.asarray(one(jnp.asarray(x_t[i])))
        jac = np.asarray(jax.jacfwd(one)(jnp.asarray(x_t[i])))
        assert np.linalg.norm(jac - jac.T) > 0.1 * np.linalg.norm(jac)
        expected = _dense_mmps(x_hat, jac, sigma[i], a[i], y[i], var_y[i], sigma[i] ** 2 * jac.T)
        np.testing.assert_allclose(out[i], expected, rtol=1e-9, atol=1e-10)


IMAGE = (2, 3, 4)  # (C, H, W)


def _image_problem(batch=3, seed=10):
    """Image samples (C, H, W) = (2, 3, 4), a per-sample pixel mask shared by the channels, and
    the dense (d x d) matrix of each mask on the flattened image (d = 24)."""
    rng = np.random.default_rng(seed)
    masks = (rng.uniform(size=(batch, *IMAGE[1:])) < 0.6).astype(float)
    x_t = 2 * rng.normal(size=(batch, *IMAGE))
    y = masks[:, None] * rng.normal(size=(batch, *IMAGE))
    sigma = np.geomspace(0.1, 3.0, batch)
    dense = [np.diag(np.tile(m.ravel(), IMAGE[0])) for m in masks]
    return masks, x_t, y, sigma, dense


@pytest.mark.parametrize("scope", ["sample", "batch"])
@pytest.mark.parametrize("name", ["tweedie", "prior"])
def test_image_samples_with_a_pixel_mask(name, scope):
    """(C, H, W) samples, PixelMask operators, the linear non-symmetric denoiser on the flattened
    image, and the `tweedie` or `prior` covariance (a DPLR Sigma_x over the d = 24 flattened
    pixels; `Prior` reshapes to it): V = s^2 J^T, or s^2 I - s^4 (Sigma_x + s^2 I)^-1. LU solve."""
    d = int(np.prod(IMAGE))
    denoiser, b, c = _nonsymmetric_linear(d, seed=11)
    masks, x_t, y, sigma, dense = _image_problem()
    rng = np.random.default_rng(12)
    sigma_x = DPLR(jnp.asarray(rng.uniform(0.2, 1.0, d)), jnp.asarray(rng.normal(size=(d, 3))))
    cov = covariance(name, sigma_x)
    var_y = 0.1
    mmps = MMPSDenoiser(denoiser, PixelMask(jnp.asarray(masks)), jnp.asarray(y), jnp.asarray(var_y), cov,
                        lx.LU(), scope)
    out = _call(mmps, x_t, sigma)
    assert out.shape == x_t.shape
    cov_x = np.asarray(sigma_x.dense())
    for i in range(len(x_t)):
        s = sigma[i]
        x_hat = b @ x_t[i].ravel() + c
        v_cov = s**2 * b.T if name == "tweedie" else s**2 * np.eye(d) - s**4 * np.linalg.inv(cov_x + s**2 * np.eye(d))
        expected = _dense_mmps(x_hat, b, s, dense[i], y[i].ravel(), np.full(d, var_y), v_cov)
        np.testing.assert_allclose(out[i].ravel(), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("group", [1, 2, 3])
def test_group_scope_solves_each_group_as_its_own_batch(group):
    """`scope=g` on a batch of 6 equals `scope="batch"` run on each group of g samples alone (and
    `scope=1` equals `"sample"`); a group size that does not divide the batch is refused."""
    denoiser, _, _ = _prior()
    a, y, x_t, sigma = _problem(6)
    var_y = np.random.default_rng(4).uniform(0.05, 1.0, (6, M))
    grouped = _call(_mmps(denoiser, a, y, var_y, solver=CG(2), scope=group), x_t, sigma)
    for start in range(0, 6, group):
        rows = slice(start, start + group)
        alone = _call(_mmps(denoiser, a[rows], y[rows], var_y[rows], solver=CG(2), scope="batch"), x_t[rows], sigma[rows])
        np.testing.assert_allclose(grouped[rows], alone, rtol=1e-12, atol=1e-13)
    if group == 1:
        per_sample = _call(_mmps(denoiser, a, y, var_y, solver=CG(2), scope="sample"), x_t, sigma)
        np.testing.assert_allclose(grouped, per_sample, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="groups of 4"):
        _call(_mmps(denoiser, a, y, var_y, solver=CG(2), scope=4), x_t, sigma)
