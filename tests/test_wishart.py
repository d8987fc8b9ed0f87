"""Exact Wishart moments (iclsim.wishart) against independent answers: closed forms derived by hand, a
brute-force sum over all Wick pairings written here without the recursion, Monte Carlo, and symmetry."""

import jax
import numpy as np
import pytest

from iclsim import theory, wishart
from tests.tolerance import assert_within_se


def _closed_forms(n, d):
    """E tr W^k, k = 1..4, derived by hand (not from the recursion)."""
    return {1: n * d, 2: n * d * (n + d + 1), 3: n * d * (n**2 + d**2 + 3 * n * d + 3 * n + 3 * d + 4),
            4: n * d * (n**3 + d**3 + 6 * n**2 * d + 6 * n * d**2 + 6 * n**2 + 6 * d**2 + 17 * n * d + 21 * n
                        + 21 * d + 20)}


def _pairings(items):
    """Every perfect matching of ``items`` (a list of even length), as lists of pairs."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for i, other in enumerate(rest):
        for tail in _pairings(rest[:i] + rest[i + 1:]):
            yield [(first, other)] + tail


def _wick_moment(powers, n, d):
    """E prod tr W^p by Isserlis/Wick: tr W^p = sum X_{a1 i1} X_{a1 i2} X_{a2 i2} X_{a2 i3} ... X_{ap i1} over
    free row indices a (range n) and column indices i (range d); E of a product of Gaussians is the sum over
    pairings of the factors of products of deltas, so each pairing contributes n^(row classes) d^(column
    classes), the classes being those of the indices it identifies (union-find here)."""
    factors, rows, cols = [], 0, 0  # each factor X_{a i} as (row variable, column variable)
    for p in powers:
        if p == 0:  # tr W^0 = d: a constant factor
            continue
        for t in range(p):
            factors.append((rows + t, cols + t))
            factors.append((rows + t, cols + (t + 1) % p))
        rows, cols = rows + p, cols + p
    zero_factor = d ** sum(1 for p in powers if p == 0)
    total = 0
    for pairing in _pairings(list(range(len(factors)))):
        parent = {("a", r): ("a", r) for r in range(rows)} | {("i", c): ("i", c) for c in range(cols)}

        def find(x):
            while parent[x] != x:
                x = parent[x]
            return x

        for u, v in pairing:
            for kind, k in (("a", 0), ("i", 1)):
                ru, rv = find((kind, factors[u][k])), find((kind, factors[v][k]))
                if ru != rv:
                    parent[ru] = rv
        roots = {find(x) for x in parent}
        total += n ** sum(1 for r in roots if r[0] == "a") * d ** sum(1 for r in roots if r[0] == "i")
    return zero_factor * total


def test_power_moments_match_hand_derived_closed_forms():
    """E tr W^k for k = 1..4 against formulas derived by hand, at square, tall and wide shapes, and the
    quoted E tr W^4 = 2792000 at n = 20, d = 5. Planted bugs caught: (n + m) written (n + m + 1) or n, the
    2 j factor written j, the tr W^0 = d convention replaced by 1."""
    assert wishart.power_moment(4, 20, 5) == 2792000
    for n, d in ((1, 1), (20, 5), (5, 20), (3, 3), (7, 2), (11, 13)):
        for k, value in _closed_forms(n, d).items():
            assert wishart.power_moment(k, n, d) == value, (k, n, d)
        assert wishart.power_moment(0, n, d) == d


@pytest.mark.parametrize("powers", [(1,), (2,), (3,), (4,), (5,), (1, 1), (2, 1), (1, 1, 1), (3, 1), (2, 2),
                                    (2, 1, 1), (0, 2), (3, 2), (2, 2, 1), (1, 1, 1, 1, 1)])
def test_trace_product_moments_match_the_sum_over_all_wick_pairings(powers):
    """Every product of traces up to total degree 5 against the brute-force Wick sum (945 pairings at degree
    5), at two (n, d) pairs; catches any wrong coefficient or term of the recursion, including the
    cross-factor term 2 j E[tr W^{m+j} P / tr W^j] (wrong for every power list with two factors)."""
    for n, d in ((3, 2), (4, 7)):
        assert wishart.trace_product_moment(powers, n, d) == _wick_moment(powers, n, d), (powers, n, d)


def test_sixth_power_matches_the_wick_sum():
    """Degree 6 (10395 pairings) against the Wick sum, and E (tr W)^2 = (nd)^2 + 2nd, the chi-squared second
    moment. Planted bug caught: the r-sum stopped one term short (the d tr W^m term, r = m - 1, lost)."""
    assert wishart.power_moment(6, 2, 3) == _wick_moment((6,), 2, 3)
    assert wishart.trace_product_moment((1, 1), 20, 5) == 100**2 + 2 * 100


def test_power_moments_are_symmetric_in_n_and_d():
    """tr (X^T X)^k = tr (X X^T)^k for k >= 1, so E tr W^k is symmetric in (n, d); the recursion is not
    written symmetrically, so an asymmetric slip (n + m vs d + m) breaks this."""
    for k in range(1, 13):
        for n, d in ((3, 8), (1, 6), (20, 5)):
            assert wishart.power_moment(k, n, d) == wishart.power_moment(k, d, n), (k, n, d)


def test_power_moments_match_monte_carlo_up_to_the_ninth(key):
    """E tr W^k, k = 1..9 (all the best 4-step GD needs), against 200k Wishart draws (theory.
    context_power_traces, independent of the recursion), within 4 SE each. Planted bug caught: a
    recursion right at low degree and wrong above it (e.g. a missing r-sum term for m >= 4). The nine
    estimates share their draws, so their z scores move together (with the key fold_in(key, n) every k at
    n = 6, d = 3 sat at z -3.1 to -3.9, k = 1 included, where E tr W = nd is certain: a low draw of the
    chi-squared itself)."""
    for n, d in ((20, 5), (6, 3)):
        num = 200_000
        traces = np.asarray(theory.context_power_traces(jax.random.fold_in(key, 1000 * n + d), d, n, num, 9))
        for k in range(1, 10):
            mc = traces[:, k] / float(n) ** k
            exact = float(wishart.power_moment(k, n, d)) / float(n) ** k
            assert_within_se(exact, mc.mean(), mc.std(ddof=1) / np.sqrt(num), name=f"E tr S^{k}, n={n}, d={d}")


def test_sample_covariance_moments_are_exact_ratios_and_do_not_overflow():
    """m_k = E tr W^k / n^k rounded once (m_2 = d (n + d + 1) / n = 6.5 at n = 20, d = 5); a large n
    whose n^k and E tr W^k exceed float64 (n^17 > 1e308 for n = 10^20) still gives a finite m_k near d
    (S -> I as n grows: m_k -> d). Planted bug caught: float(E) / float(n)**k (inf / inf = nan)."""
    m = wishart.sample_covariance_moments(20, 5, 9)
    assert m[0] == 5 and m[1] == 5 and m[2] == 5 * 26 / 20
    big = wishart.sample_covariance_moments(10**20, 2, 17)
    assert np.all(np.isfinite(big)) and np.all(np.abs(big[1:] - 2) < 1e-3), big
    assert wishart.power_moment(17, 10**20, 2) > 10**308  # the integer itself is beyond float64


def test_wishart_arguments_are_checked():
    """A wrong setup names the argument and its range."""
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        wishart.power_moment(2, 0, 3)
    with pytest.raises(ValueError, match="d must be an integer >= 1"):
        wishart.trace_product_moment((1,), 3, 0)
    with pytest.raises(ValueError, match="powers must be an integer >= 0"):
        wishart.trace_product_moment((2, -1), 3, 3)
    with pytest.raises(TypeError, match="powers"):
        wishart.trace_product_moment((1.5,), 3, 3)
    with pytest.raises(ValueError, match="MAX_DEGREE"):
        wishart.trace_product_moment((30, 30), 3, 3)
    with pytest.raises(ValueError, match="k must be an integer in"):
        wishart.power_moment(wishart.MAX_DEGREE + 1, 3, 3)
    with pytest.raises(TypeError, match="powers must be a sequence"):
        wishart.trace_product_moment(3, 3, 3)
