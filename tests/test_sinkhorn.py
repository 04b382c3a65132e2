"""`entropic_ot` and `sinkhorn_divergence` (diemlib.eval.sinkhorn) against POT, an independent code.

`entropic_ot(x, y, reg, max_iter, stop)` is documented as POT's
`ot.sinkhorn2(a, b, M, reg, method="sinkhorn_log", numItermax=max_iter, stopThr=stop)` with
uniform weights and the squared Euclidean cost `M = ot.dist(x, y)`: the same log-domain updates
and the same stopping test (the right marginal's error, every 10th iteration). Both run in
float64 here, so they agree to round-off whether the iterations stop on `stop` or on the
iteration cap. In the capped cases and those stopped by a loose `stop` (1e-3, the default), one
iteration more or fewer changes the cost by over 1e3 times the tolerance (checked below), so an
off-by-one in the iteration count or in the stopping test cannot pass.
"""

import warnings

import jax
import numpy as np
import ot
import pytest

from diemlib.eval.sinkhorn import entropic_ot, sinkhorn_divergence

RTOL = 1e-10


def pot(x, y, reg, max_iter, stop):
    """POT's cost and the index of its last iteration (`niter`), its last marginal error."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    a, b = np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sinkhorn did not converge" when the cap is reached
        cost, log = ot.sinkhorn2(a, b, ot.dist(x, y), reg, method="sinkhorn_log", numItermax=max_iter,
                                 stopThr=stop, log=True)
    return float(cost), log["niter"], float(log["err"][-1])


def points(seed, n, d, scale, shift=0.0):
    return scale * np.random.default_rng(seed).normal(size=(n, d)) + shift


# (name, x, y, reg, max_iter, stop, capped): capped cases reach max_iter before the stopping test.
CASES = [
    ("defaults", points(0, 64, 3, 0.3), points(1, 48, 3, 0.3, 0.1), 1e-3, 1024, 1e-3, False),
    ("loose_stop", points(2, 40, 2, 1.0), points(3, 40, 2, 1.0, 0.5), 0.1, 1000, 1e-3, False),
    ("tight_stop", points(4, 32, 5, 1.0), points(5, 80, 5, 1.0), 0.5, 5000, 1e-12, False),
    ("large_scale", points(6, 50, 4, 10.0), points(7, 30, 4, 10.0, 3.0), 20.0, 2000, 1e-8, False),
    ("capped_37", points(8, 50, 2, 1.0), points(9, 60, 2, 1.0, 0.3), 1e-2, 37, 1e-12, True),
    ("capped_10", points(10, 20, 8, 0.5), points(11, 25, 8, 0.5), 1e-2, 10, 1e-12, True),
    ("capped_1", points(12, 30, 3, 1.0), points(13, 30, 3, 1.0, 1.0), 0.05, 1, 1e-12, True),
]


@pytest.mark.parametrize("name, x, y, reg, max_iter, stop, capped", CASES, ids=[c[0] for c in CASES])
def test_entropic_ot_equals_pot_sinkhorn_log(name, x, y, reg, max_iter, stop, capped):
    expected, niter, error = pot(x, y, reg, max_iter, stop)
    assert (niter == max_iter - 1 and error >= stop) if capped else (niter < max_iter - 1 and error < stop)
    got = float(entropic_ot(x, y, reg=reg, max_iter=max_iter, stop=stop))
    np.testing.assert_allclose(got, expected, rtol=RTOL)
    if capped or stop >= 1e-3:  # far from convergence, the check resolves single iterations:
        for other in [k for k in (niter, niter + 2) if k > 0]:  # numItermax = k runs k iterations
            neighbour, _, _ = pot(x, y, reg, other, 0.0)  # one iteration fewer or more
            assert abs(neighbour - expected) > 1e3 * RTOL * abs(expected), (name, other)


def test_entropic_ot_defaults_are_reg_1e3_1024_iterations_stop_1e3():
    x, y = points(14, 40, 3, 0.2), points(15, 40, 3, 0.2, 0.05)
    np.testing.assert_allclose(float(entropic_ot(x, y)), pot(x, y, 1e-3, 1024, 1e-3)[0], rtol=RTOL)


def test_entropic_ot_of_a_set_with_itself():
    """x against a copy of itself (POT zeroes the diagonal only for the same object: pass a copy)."""
    x = points(16, 30, 2, 1.0)
    np.testing.assert_allclose(float(entropic_ot(x, x.copy(), reg=0.05)), pot(x, x.copy(), 0.05, 1024, 1e-3)[0], rtol=RTOL)


@pytest.mark.parametrize("shift", [0.0, 0.2, 2.0])
def test_sinkhorn_divergence_equals_pot_difference(shift):
    """S = max(OT(ref, samples) - OT(ref, other_ref), 1e-6), each OT from POT."""
    ref, other, samples = points(17, 48, 3, 1.0), points(18, 48, 3, 1.0), points(19, 40, 3, 1.0, shift)
    kwargs = dict(reg=0.1, max_iter=500, stop=1e-6)
    expected = max(pot(ref, samples, 0.1, 500, 1e-6)[0] - pot(ref, other, 0.1, 500, 1e-6)[0], 1e-6)
    np.testing.assert_allclose(sinkhorn_divergence(ref, other, samples, **kwargs), expected, rtol=1e-9)
    if shift == 2.0:
        assert expected > 1.0


def test_sinkhorn_divergence_floor():
    ref = points(20, 32, 2, 1.0)
    assert sinkhorn_divergence(ref, ref.copy(), ref.copy(), reg=0.1) == 1e-6
    assert jax.numpy.isfinite(entropic_ot(ref, ref.copy(), reg=0.1))


def test_debiasing_term_is_computed_once_per_reference_pair(monkeypatch):
    """A second call with the same references reuses the debiasing term (same numbers, one
    Sinkhorn solve fewer); other references or options compute their own."""
    from diemlib.eval import sinkhorn as module

    calls = []
    solve = module.entropic_ot
    monkeypatch.setattr(module, "entropic_ot", lambda x, y, **kw: calls.append(1) or solve(x, y, **kw))
    monkeypatch.setattr(module, "_BIAS", {})
    k = jax.random.split(jax.random.key(7), 4)
    ref, other, a = (jax.random.normal(kk, (64, 2)) for kk in k[:3])
    first = module.sinkhorn_divergences(ref, other, {"a": a})
    assert len(calls) == 2
    assert module.sinkhorn_divergences(ref, other, {"a": a}) == first
    assert len(calls) == 3
    module.sinkhorn_divergences(ref, other, {"a": a}, max_iter=10)
    module.sinkhorn_divergences(ref, jax.random.normal(k[3], (64, 2)), {"a": a})
    assert len(calls) == 7
