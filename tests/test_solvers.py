"""CG and GMRES from zero (docs/conventions.md, 'MMPS', 'Solver semantics') against textbook dense computations."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

from diemlib.linalg.solvers import CG, GMRES, solver

N = 6


def _spd(seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(N, N))
    return a @ a.T + 0.5 * np.eye(N), rng.normal(size=N)


def _nonsymmetric(seed=1):
    rng = np.random.default_rng(seed)
    return 2 * np.eye(N) + rng.normal(size=(N, N)), rng.normal(size=N)


def _solve(matrix, b, method, tags=()):
    operator = lx.MatrixLinearOperator(jnp.asarray(matrix), tags)
    return lx.linear_solve(operator, jnp.asarray(b), method, throw=False)


def _textbook_cg(matrix, b, k):
    v, r = np.zeros_like(b), b.copy()
    p = r.copy()
    for _ in range(k):
        mp = matrix @ p
        alpha = (r @ r) / (p @ mp)
        v, r_new = v + alpha * p, r - alpha * mp
        p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
    return v


def _krylov_min_residual(matrix, b, k):
    """argmin over v in span{b, M b, ..., M^(k-1) b} of |b - M v| by dense least squares."""
    basis = np.stack([np.linalg.matrix_power(matrix, j) @ b for j in range(k)], axis=1)
    coef = np.linalg.lstsq(matrix @ basis, b, rcond=None)[0]
    return basis @ coef


def _solve_each_k(matrix, b, make, ks, tags=()):
    """One compiled function for several iteration counts."""
    return jax.jit(lambda m, v: [_solve(m, v, make(k), tags) for k in ks])(jnp.asarray(matrix), jnp.asarray(b))


def test_cg_equals_k_steps_of_textbook_cg_from_zero():
    matrix, b = _spd()
    ks = (1, 2, 3, 4)
    for k, solution in zip(ks, _solve_each_k(matrix, b, CG, ks, lx.positive_semidefinite_tag)):
        expected = _textbook_cg(matrix, b, k)
        np.testing.assert_allclose(solution.value, expected, rtol=1e-9, atol=1e-11)
        assert int(solution.stats["num_steps"]) == k
        true_residual = np.linalg.norm(b - matrix @ expected) / np.linalg.norm(b)
        np.testing.assert_allclose(solution.stats["residual"], true_residual, rtol=1e-6)


def test_cg_solves_an_spd_system_exactly_in_n_steps():
    matrix, b = _spd()
    solution = _solve(matrix, b, CG(N), lx.positive_semidefinite_tag)
    np.testing.assert_allclose(solution.value, np.linalg.solve(matrix, b), rtol=1e-8, atol=1e-10)
    assert float(solution.stats["residual"]) < 1e-8


def test_cg_with_tolerance_stops_when_the_residual_is_small():
    matrix, b = _spd()
    solution = _solve(matrix, b, CG(50, rtol=1e-6), lx.positive_semidefinite_tag)
    steps = int(solution.stats["num_steps"])
    assert steps <= N + 2  # far fewer than max_steps (exact in N steps up to rounding)
    assert float(solution.stats["residual"]) <= 1e-6
    np.testing.assert_allclose(solution.value, _textbook_cg(matrix, b, steps), rtol=1e-8, atol=1e-10)


def test_gmres_is_the_minimal_residual_solution_over_the_krylov_space():
    matrix, b = _nonsymmetric()
    ks = (1, 2, 3, 4)
    for k, solution in zip(ks, _solve_each_k(matrix, b, GMRES, ks)):
        expected = _krylov_min_residual(matrix, b, k)
        np.testing.assert_allclose(solution.value, expected, rtol=1e-8, atol=1e-10)
        assert int(solution.stats["num_steps"]) == k
        true_residual = np.linalg.norm(b - matrix @ expected) / np.linalg.norm(b)
        np.testing.assert_allclose(solution.stats["residual"], true_residual, rtol=1e-8)


def test_gmres_solves_a_nonsymmetric_system_exactly_in_n_steps():
    matrix, b = _nonsymmetric()
    solution = _solve(matrix, b, GMRES(N))
    np.testing.assert_allclose(solution.value, np.linalg.solve(matrix, b), rtol=1e-9, atol=1e-11)
    assert float(solution.stats["residual"]) < 1e-10


def test_cg_and_gmres_on_a_pytree_vector():
    """The vector may be a pytree (inner products sum over leaves); results equal the flat ones."""
    matrix, b = _spd()
    mat = jnp.asarray(matrix)

    def mv(v):
        flat = mat @ jnp.concatenate([v["a"], v["b"]])
        return {"a": flat[:2], "b": flat[2:]}

    structure = {"a": jax.ShapeDtypeStruct((2,), jnp.float64), "b": jax.ShapeDtypeStruct((N - 2,), jnp.float64)}
    operator = lx.FunctionLinearOperator(mv, structure, lx.positive_semidefinite_tag)
    vector = {"a": jnp.asarray(b[:2]), "b": jnp.asarray(b[2:])}
    for method, expected in ((GMRES(2), _krylov_min_residual(matrix, b, 2)), (CG(2), _textbook_cg(matrix, b, 2))):
        value = lx.linear_solve(operator, vector, method, throw=False).value
        np.testing.assert_allclose(np.concatenate([value["a"], value["b"]]), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", [CG(3), CG(N, 0.3), GMRES(3)], ids=["cg", "cg-rtol", "gmres"])
def test_independent_systems_in_one_solve_equal_separate_solves(method):
    """`options={"systems": G}` with a block-diagonal operator over a pytree vector: the values
    and the per-system stats equal G separate solves (with a tolerance, each system stops on its
    own residual: the three systems below need different numbers of CG steps)."""
    blocks = [_spd(seed) for seed in range(3)]
    mats = jnp.asarray(np.stack([m for m, _ in blocks]))
    bs = np.stack([b for _, b in blocks])

    def mv(v):  # leaves (G, 2) and (G, N - 2): one block of the operator per system
        flat = jnp.einsum("gij,gj->gi", mats, jnp.concatenate([v["a"], v["b"]], axis=1))
        return {"a": flat[:, :2], "b": flat[:, 2:]}

    structure = {"a": jax.ShapeDtypeStruct((3, 2), jnp.float64), "b": jax.ShapeDtypeStruct((3, N - 2), jnp.float64)}
    operator = lx.FunctionLinearOperator(mv, structure, lx.positive_semidefinite_tag)
    vector = {"a": jnp.asarray(bs[:, :2]), "b": jnp.asarray(bs[:, 2:])}
    together = lx.linear_solve(operator, vector, method, options={"systems": 3}, throw=False)
    for g, (matrix, b) in enumerate(blocks):
        alone = _solve(matrix, b, method, (lx.positive_semidefinite_tag,))
        value = np.concatenate([together.value["a"][g], together.value["b"][g]])
        np.testing.assert_allclose(value, alone.value, rtol=1e-10, atol=1e-12)
        for name in ("num_steps", "residual"):
            np.testing.assert_allclose(together.stats[name][g], alone.stats[name], rtol=1e-10, atol=1e-12)
    if isinstance(method, CG) and method.rtol:
        assert len(set(np.asarray(together.stats["num_steps"]).tolist())) > 1


@pytest.mark.parametrize("make", [CG, GMRES])
@pytest.mark.parametrize("k", [1, 4])
def test_k_iterations_cost_exactly_k_operator_products(make, k):
    """A debug callback in the operator's mv fires once per executed product (also inside the
    compiled loop): starting from zero costs no product for the initial residual."""
    matrix, b = _spd()
    mat = jnp.asarray(matrix)
    count = []

    def mv(v):
        jax.debug.callback(lambda: count.append(1))
        return mat @ v

    operator = lx.FunctionLinearOperator(mv, jax.ShapeDtypeStruct((N,), jnp.float64), lx.positive_semidefinite_tag)
    solve = jax.jit(lambda vec: lx.linear_solve(operator, vec, make(k), throw=False).value)
    jax.block_until_ready(solve(jnp.asarray(b)))
    jax.effects_barrier()
    assert len(count) == k
    # lineax's own CG, as shipped, evaluates M v_0 first: one product more (docs/conventions.md, 'MMPS').
    count.clear()
    jax.block_until_ready(lx.linear_solve(operator, jnp.asarray(b), lx.CG(0.0, 0.0, max_steps=k), throw=False).value)
    jax.effects_barrier()
    assert len(count) == k + 1


def test_solver_factory():
    assert solver("cg", 3) == CG(3)
    assert solver("cg", 3, rtol=1e-3) == CG(3, 1e-3)
    assert solver("gmres", 4) == GMRES(4)
    assert isinstance(solver("gmres", 4, rtol=1e-3), lx.GMRES)
    assert isinstance(solver("bicgstab", 4, rtol=1e-3), lx.BiCGStab)
    with pytest.raises(ValueError):
        solver("nope", 3)
