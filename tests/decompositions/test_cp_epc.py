"""CP sensitivity (Phan et al. Lemma 1) and the error-preserving correction (Phan et al. section 2.3)."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lowrank.decompositions.cp import als, cp_to_tensor, epc, exact_cp, exact_rank, sensitivity, sensitivity_terms


def test_sensitivity_terms_match_the_definition():
    """Phan et al. eq. 4's expectation E||[[A+dA, B+dB, C+dC]] - [[A, B, C]]||^2 / sigma^2 (sigma -> 0),
    estimated by Monte Carlo, is sum_n I_n * term_n: each mode's Lemma 1 term weighted by the
    mode's size. (Lemma 1 as printed, our `sensitivity`, is the unweighted sum: its proof takes
    tr(M kron I_{I_n}) for R tr(M).)"""
    rng = np.random.default_rng(0)
    factors = [rng.standard_normal((n, 3)) for n in (4, 5, 6)]
    base = cp_to_tensor(factors)
    sigma, trials = 1e-5, 4000
    total = 0.0
    for _ in range(trials):
        moved = [f + sigma * rng.standard_normal(f.shape) for f in factors]
        total += np.sum((cp_to_tensor(moved) - base) ** 2)
    monte_carlo = total / trials / sigma**2
    terms = sensitivity_terms(factors)
    assert monte_carlo == pytest.approx(sum(f.shape[0] * t for f, t in zip(factors, terms)), rel=0.05)
    assert sensitivity(factors) == pytest.approx(sum(terms))


def test_epc_keeps_the_error_and_lowers_the_sensitivity():
    rng = np.random.default_rng(1)
    tensor = rng.standard_normal((9, 12, 16))
    factors = als(tensor, 10, iterations=200)
    err_before = np.linalg.norm(tensor - cp_to_tensor(factors))
    corrected = epc(tensor, factors)
    err_after = np.linalg.norm(tensor - cp_to_tensor(corrected))
    assert err_after == pytest.approx(err_before, rel=1e-6)
    assert sensitivity(corrected) < sensitivity(factors)


def test_epc_tames_a_degenerate_cp():
    """Two huge rank-1 terms that nearly cancel (the degeneracy of Phan et al. Fig. 2): the correction
    keeps the error and shrinks the terms."""
    rng = np.random.default_rng(2)
    tensor = rng.standard_normal((6, 7, 8))
    factors = als(tensor, 4, iterations=50)
    a, b, c = factors
    big = 1e3
    v = [rng.standard_normal((n, 1)) for n in (6, 7, 8)]
    eps = 1e-4
    # add big*u∘v∘w and -big*(u+eps)∘v∘w: they cancel up to a small term
    degenerate = [np.hstack([a, big * v[0], -big * (v[0] + eps)]),
                  np.hstack([b, v[1], v[1]]), np.hstack([c, v[2], v[2]])]
    err = np.linalg.norm(tensor - cp_to_tensor(degenerate))
    corrected = epc(tensor, degenerate)
    assert np.linalg.norm(tensor - cp_to_tensor(corrected)) == pytest.approx(err, rel=1e-6)
    assert sensitivity(corrected) < 1e-3 * sensitivity(degenerate)


@pytest.mark.parametrize("shape", [(9, 4, 6), (3, 3, 5, 2), (1, 4, 4)])
def test_exact_cp_is_exact(shape):
    tensor = np.random.default_rng(3).standard_normal(shape)
    factors = exact_cp(tensor)
    assert factors[0].shape[1] == exact_rank(shape)
    np.testing.assert_allclose(cp_to_tensor(factors), tensor, atol=1e-12)
