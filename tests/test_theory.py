"""Closed forms of THEORY sections 3-5 against Monte Carlo (4 SE), literature special cases and
each other (identities, optimality conditions)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iclsim import IID, RAG, Drift, TaskFeatureAlignment, testing, theory
from tests import strategies
from tests.tolerance import GROUND_TRUTH_REL, MC_SIGMAS, Z_SCORES, assert_close, assert_within_se

MC = settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
FAST = settings(max_examples=40, deadline=None, derandomize=True)
FEW = settings(max_examples=10, deadline=None, derandomize=True)  # make test; its ..._fuzzed copy repeats at FAST
KEY = jax.random.PRNGKey(7)
NUM = 60_000

# make test checks each closed form against Monte Carlo once, on one generic design that has every term the
# form has (general covariances, per-position label noise, a query noise of its own, n > d); each Monte Carlo
# check is a program of its own to compile. The slow tier repeats every check over random designs (the
# hypothesis tests ..._fuzzed below), where the minimal design (d = n = 1, identity covariances, no noise) is
# the first example hypothesis draws.
COV_X = np.array([[1.5, 0.3, 0.0], [0.3, 1.0, -0.2], [0.0, -0.2, 0.6]])
COV_BETA = np.array([[1.0, 0.5, 0.0], [0.5, 1.5, 0.2], [0.0, 0.2, 0.6]])
IID_GENERIC = IID(3, COV_X, COV_BETA, np.array([0.2, 0.9, 0.05, 0.5]), query_noise_var=0.7)
IID_SCALAR_NOISE = IID(3, COV_X, COV_BETA, 0.3)  # attention_risk needs one noise variance for every token


def _check(predictor, design, n, expected, name):
    """iclsim.testing's Monte Carlo check at the suite's tolerance, its z recorded for the summary."""
    check = testing.assert_matches_theory(predictor, design, n, expected, sigmas=MC_SIGMAS, num_prompts=NUM,
                                          key=KEY, name=name)
    Z_SCORES.append((name, abs(check.z)))


def _check_pgd(W, design, n, expected, name, weights=None):
    _check(theory.pgd_predict(W, weights), design, n, expected, name)


def test_iid_risk_of_any_w_matches_monte_carlo():
    _iid_risk_of_any_w(IID_GENERIC, 4, 0)


@pytest.mark.slow
@MC
@given(strategies.iid_designs(), st.integers(0, 2**31 - 1))
def test_iid_risk_of_any_w_matches_monte_carlo_fuzzed(dn, seed):
    _iid_risk_of_any_w(*dn, seed)


def _iid_risk_of_any_w(design, n, seed):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(design.dim, design.dim)) / (n + design.dim)
    weights = rng.uniform(0.2, 2.0, size=n)
    _check_pgd(W, design, n, theory.pgd_risk(design, n, W, weights), "pgd_risk IID", weights)


def _attention_predict(Q, v):
    """yhat = z_q^T Q S v from tokens, z_q = [x; 0], S = Z^T Z / n (float64)."""
    def predict(p):
        Z = jnp.concatenate([p.X, p.y[..., None]], axis=-1)
        zq = jnp.concatenate([p.x, jnp.zeros_like(p.x[:, :1])], axis=-1)
        return jnp.mean(jnp.einsum("bi,ij,bnj->bn", zq, Q, Z) * (Z @ v), axis=1)

    return predict


def test_attention_risk_of_any_attention_matches_monte_carlo():
    """Q and v with every block non-zero (the query reads labels through Q[:d, d], the values carry
    x through v[:d]): the terms that PGD's L(W) does not have. Seed 6 draws Q and v where every term of the
    closed form is 0.49 or more against a risk near 4; dropping the smallest, the cross term 2 q (m0 Sx g) T,
    fails here (at seed 0 it passed)."""
    _attention_risk_of_any_attention(IID_SCALAR_NOISE, 4, 6)


@pytest.mark.slow
@MC
@given(strategies.iid_designs(per_position=False), st.integers(0, 2**31 - 1))
def test_attention_risk_of_any_attention_matches_monte_carlo_fuzzed(dn, seed):
    _attention_risk_of_any_attention(*dn, seed)


def _attention_risk_of_any_attention(design, n, seed):
    rng = np.random.default_rng(seed)
    D = design.dim + 1
    Q, v = rng.normal(size=(D, D)) / D, rng.normal(size=D) / D
    L = theory.attention_risk(design, n, Q, v)
    _check(_attention_predict(Q, v), design, n, L, "attention_risk IID")


@FEW
@given(strategies.iid_designs(max_dim=4, max_n=10, per_position=False), st.integers(0, 2**31 - 1))
def test_attention_risk_in_the_pgd_subspace_is_pgd_risk(dn, seed):
    """Q[:d, d] = 0 and v[:d] = 0: yhat = x^T (v_y Q[:d, :d] / n) X^T y, so L = L(W) of that W."""
    _attention_in_pgd_subspace(*dn, seed)


@pytest.mark.slow
@FAST
@given(strategies.iid_designs(max_dim=4, max_n=10, per_position=False), st.integers(0, 2**31 - 1))
def test_attention_risk_in_the_pgd_subspace_is_pgd_risk_fuzzed(dn, seed):
    _attention_in_pgd_subspace(*dn, seed)


def _attention_in_pgd_subspace(design, n, seed):
    rng = np.random.default_rng(seed)
    d = design.dim
    Q = np.zeros((d + 1, d + 1))
    Q[:d, :d], Q[d] = rng.normal(size=(d, d)), rng.normal(size=d + 1)  # the last row never reaches the output
    v = np.zeros(d + 1)
    v[d] = rng.normal()
    assert_close(theory.attention_risk(design, n, Q, v), theory.pgd_risk(design, n, v[d] * Q[:d, :d] / n),
                 rtol=1e-10, name="attention_risk vs pgd_risk")


def test_iid_optimal_pgd_matches_monte_carlo():
    _optimum_matches_monte_carlo(IID_GENERIC, 4)


@pytest.mark.slow
@MC
@given(strategies.iid_designs())
def test_iid_optimal_pgd_matches_monte_carlo_fuzzed(dn):
    _optimum_matches_monte_carlo(*dn)


@pytest.mark.parametrize("design, n", [(RAG(3, 0.5, gamma=0.7, noise_var=0.2), 4),
                                       (TaskFeatureAlignment(3, -0.6, 0.3), 5)], ids=["RAG", "TaskFeatureAlignment"])
def test_correlated_optimum_matches_monte_carlo(design, n):
    _optimum_matches_monte_carlo(design, n)


@pytest.mark.slow
@MC
@given(strategies.correlated_designs())
def test_correlated_optimum_matches_monte_carlo_fuzzed(dn):
    _optimum_matches_monte_carlo(*dn)


def _optimum_matches_monte_carlo(design, n):
    W, L = theory.optimal_pgd(design, n)
    _check_pgd(W, design, n, L, f"optimal_pgd {type(design).__name__}")


def test_drift_risks_match_monte_carlo():
    """AR(1) drift, whose corr is not rho rho^T, with per-position noise. Seed 14 draws W and weights where
    corr enters the risk by 1.47 of 16.4 (corr taken as rho rho^T with a unit diagonal fails here)."""
    _drift_risks(Drift.ar1(3, 4, 0.7, np.array([0.1, 0.5, 0.0, 0.3]), 0.4), 4, 14)


@pytest.mark.slow
@MC
@given(strategies.drift_designs(), st.integers(0, 2**31 - 1))
def test_drift_risks_match_monte_carlo_fuzzed(dn, seed):
    _drift_risks(*dn, seed)


def _drift_risks(design, n, seed):
    W, omega, L = theory.optimal_wpgd(design, n)
    _check_pgd(W, design, n, L, "optimal_wpgd Drift", omega)
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(design.dim, design.dim)) / (n + design.dim)
    weights = rng.normal(size=n)
    _check_pgd(W, design, n, theory.pgd_risk(design, n, W, weights), "pgd_risk Drift", weights)


def test_iid_optimal_wpgd_matches_monte_carlo_and_is_stationary():
    _optimal_wpgd_is_stationary(IID_GENERIC, 4)


@pytest.mark.slow
@MC
@given(strategies.iid_designs())
def test_iid_optimal_wpgd_matches_monte_carlo_and_is_stationary_fuzzed(dn):
    _optimal_wpgd_is_stationary(*dn)


def _optimal_wpgd_is_stationary(design, n):
    W, omega, L = theory.optimal_wpgd(design, n)
    _check_pgd(W, design, n, L, "optimal_wpgd IID", omega)
    gW, gw = jax.grad(lambda W, w: theory.pgd_risk(design, n, W, w), argnums=(0, 1))(W, omega)
    assert_close(gW, 0.0, atol=1e-8)
    assert_close(gw, 0.0, atol=1e-8)
    assert float(L) <= float(theory.optimal_pgd(design, n).risk) + 1e-10


def test_drift_reference_numbers_from_theory():
    """THEORY 5: d = 5, n = 8, s^2 = 0.2, rho_i = 0.8^(n-i) (generator (a)): L_H3 = 3.742, L_ATT = 4.001."""
    design = Drift(5, 0.8 ** np.arange(7, -1, -1), noise_var=0.2)
    assert float(theory.optimal_wpgd(design, 8).risk) == pytest.approx(3.742, abs=5e-4)
    assert float(theory.optimal_pgd(design, 8).risk) == pytest.approx(4.001, abs=5e-4)


@FEW
@given(strategies.iid_designs(max_dim=4, max_n=10), st.integers(0, 2**31 - 1))
def test_excess_risk_identity_and_stationarity(dn, seed):
    """L(W) - L* = ||Sx^{1/2} (W - W*) M^{1/2}||_F^2 and grad L(W*) = 0."""
    _excess_risk_identity(*dn, seed)


@pytest.mark.slow
@FAST
@given(strategies.iid_designs(max_dim=4, max_n=10), st.integers(0, 2**31 - 1))
def test_excess_risk_identity_and_stationarity_fuzzed(dn, seed):
    _excess_risk_identity(*dn, seed)


def _excess_risk_identity(design, n, seed):
    W_star, L_star = theory.optimal_pgd(design, n)
    W = W_star + np.random.default_rng(seed).normal(size=W_star.shape) * 0.1
    m = theory.pgd_moments(design, n)
    lam_x, Ux = np.linalg.eigh(np.asarray(m.cov_x))
    lam_m, Um = np.linalg.eigh(np.asarray(m.M))
    sx_half = Ux @ np.diag(np.sqrt(lam_x)) @ Ux.T
    m_half = Um @ np.diag(np.sqrt(lam_m)) @ Um.T
    frob = np.sum((sx_half @ (W - W_star) @ m_half) ** 2)
    assert_close(theory.pgd_risk(design, n, W) - L_star, frob, rtol=1e-7, atol=1e-10)
    assert_close(jax.grad(lambda W: theory.pgd_risk(design, n, W))(W_star), 0.0, atol=1e-9)


@pytest.mark.parametrize("d, n, s2", [(1, 1, 0.0), (5, 3, 0.0), (10, 20, 0.5), (20, 7, 2.0)])
def test_isotropic_special_case(d, n, s2):
    """L* = d + s^2 - n d / (n + d + 1 + s^2), W* = I / (n + d + 1 + s^2)."""
    W, L = theory.optimal_pgd(IID(d, noise_var=s2), n)
    assert_close(L, d + s2 - n * d / (n + d + 1 + s2))
    assert_close(W, np.eye(d) / (n + d + 1 + s2), atol=1e-14)


@FAST
@given(strategies.spd(4), st.integers(1, 30))
def test_ahn_preconditioner(cov_x, n):
    """Ahn et al. 2023 (Thm 1), noiseless, beta ~ N(0, I): W* = [(n+1) Sx + tr(Sx) I]^{-1}."""
    W, _ = theory.optimal_pgd(IID(4, cov_x), n)
    assert_close(W, np.linalg.inv((n + 1) * cov_x + np.trace(cov_x) * np.eye(4)), rtol=1e-8)


@FEW
@given(strategies.iid_designs(max_dim=4, max_n=10, per_position=False))
def test_lowrank_spectrum_formula_and_monotonicity(dn):
    """Eckart-Young form = eigenvalue form L* + n sum_{i>r} l_i^2 / ((n+1) l_i + c); non-increasing in r;
    equal to L* at r = d; the returned W_r has rank <= r and risk equal to the formula. 10 designs here (every
    new dim and n compiles the closed forms' ops anew); 40 in the slow tier."""
    _lowrank_spectrum(*dn)


@pytest.mark.slow
@FAST
@given(strategies.iid_designs(max_dim=4, max_n=10, per_position=False))
def test_lowrank_spectrum_formula_and_monotonicity_fuzzed(dn):
    _lowrank_spectrum(*dn)


def _lowrank_spectrum(design, n):
    d = design.dim
    _, L_star = theory.optimal_pgd(design, n)
    Sx, Sb = design.cov_x, design.cov_beta
    lam = np.sort(np.linalg.eigvals(Sx @ Sb).real)[::-1]
    c = np.trace(Sx @ Sb) + float(design.noise_var)
    risks = [float(theory.lowrank_optimal_risk(design, n, r)) for r in range(d + 1)]
    for r in range(d + 1):
        expected = float(L_star) + n * np.sum(lam[r:] ** 2 / ((n + 1) * lam[r:] + c))
        assert_close(risks[r], expected, rtol=1e-8)
        Wr = theory.lowrank_optimal_pgd(design, n, r)
        assert np.linalg.matrix_rank(np.asarray(Wr), tol=1e-9) <= r
        assert_close(theory.pgd_risk(design, n, Wr), risks[r], rtol=1e-8)
    assert all(a >= b - 1e-12 for a, b in zip(risks, risks[1:]))
    assert_close(risks[d], L_star, rtol=1e-10)


@FAST
@given(strategies.iid_designs(max_dim=4, max_n=8), st.integers(0, 2**31 - 1))
def test_lowrank_optimum_beats_random_low_rank(dn, seed):
    design, n = dn
    d = design.dim
    rng = np.random.default_rng(seed)
    r = int(rng.integers(0, d + 1))
    best = float(theory.lowrank_optimal_risk(design, n, r))
    Wr = np.asarray(theory.lowrank_optimal_pgd(design, n, r))
    for _ in range(5):  # perturbations that stay rank r: W_r + U V^T - U' V'^T is generic; use factors
        U, s, Vt = np.linalg.svd(Wr)
        U2 = U[:, :r] + 0.05 * rng.normal(size=(d, r))
        V2 = (s[:r, None] * Vt[:r]) + 0.05 * rng.normal(size=(r, d))
        assert float(theory.pgd_risk(design, n, U2 @ V2)) >= best - 1e-10


@FEW
@given(strategies.iid_designs(max_dim=4, max_n=8, per_position=False), st.integers(0, 2**31 - 1))
def test_lora_lossless_for_low_rank_shift(dn, seed):
    _lora_lossless(*dn, seed)


@pytest.mark.slow
@FAST
@given(strategies.iid_designs(max_dim=4, max_n=8, per_position=False), st.integers(0, 2**31 - 1))
def test_lora_lossless_for_low_rank_shift_fuzzed(dn, seed):
    _lora_lossless(*dn, seed)


def _lora_lossless(design, n, seed):
    d = design.dim
    rng = np.random.default_rng(seed)
    W_star, L_star = theory.optimal_pgd(design, n)
    r = int(rng.integers(0, d + 1))
    shift = rng.normal(size=(d, r)) @ rng.normal(size=(r, d)) * 0.1
    W0 = np.asarray(W_star) - shift
    assert_close(theory.lora_optimal_risk(design, n, W0, r), L_star, rtol=1e-8)
    W0 = np.asarray(W_star) + 0.1 * rng.normal(size=(d, d))
    risks = [float(theory.lora_optimal_risk(design, n, W0, k)) for k in range(d + 1)]
    assert_close(risks[0], theory.pgd_risk(design, n, W0), rtol=1e-9)
    assert_close(risks[d], L_star, rtol=1e-8)
    for k in range(d + 1):
        assert_close(theory.pgd_risk(design, n, theory.lora_optimal_pgd(design, n, W0, k)), risks[k], rtol=1e-8)


@pytest.mark.parametrize("n", [1, 4, 15])
def test_rag_at_alpha_zero_is_iid(n):
    for d, s2 in [(3, 0.0), (6, 0.8)]:
        Wr, Lr = theory.optimal_pgd(RAG(d, 0.0, noise_var=s2), n)
        Wi, Li = theory.optimal_pgd(IID(d, noise_var=s2), n)
        assert_close(Lr, Li, rtol=1e-12)
        assert_close(Wr, Wi, rtol=1e-12, atol=1e-15)
        Wt, Lt = theory.optimal_pgd(TaskFeatureAlignment(d, 0.0, s2), n)
        assert_close(Lt, Li, rtol=1e-12)


@FAST
@given(strategies.iid_designs(max_dim=4, max_n=10, per_position=False))
def test_wpgd_gains_nothing_on_iid(dn):
    design, n = dn
    _, omega, L_w = theory.optimal_wpgd(design, n)
    assert_close(omega, np.ones(n), rtol=1e-10)
    assert_close(L_w, theory.optimal_pgd(design, n).risk, rtol=1e-10)


@pytest.mark.parametrize("n", [1, 5, 12])
def test_h3_gains_nothing_without_drift(n):
    design = Drift(4, np.ones(n), noise_var=0.3)
    _, omega, L_h3 = theory.optimal_wpgd(design, n)
    _, L_att = theory.optimal_pgd(design, n)
    assert_close(L_h3, L_att, rtol=1e-12)
    assert_close(L_h3, theory.optimal_pgd(IID(4, noise_var=0.3), n).risk, rtol=1e-12)


def test_rag_effective_sample_size_at_large_d():
    """THEORY 4: with kappa = alpha^2 d + 1 held fixed, the exact RAG optimum approaches the IID
    formula with n -> kappa n as d grows (gap O(1/d))."""
    for excess in (0.5, 2.0):
        gaps = []
        for d in (10, 40, 160):
            design = RAG(d, np.sqrt(excess / d))
            exact = float(theory.optimal_pgd(design, d).risk)
            gaps.append(abs(float(theory.rag_effective_risk(design, d)) - exact) / exact)
        assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.01, gaps


@pytest.mark.parametrize("design, n", [
    (IID(3, np.diag([2.0, 1.0, 0.5]), noise_var=0.3), 5),
    (RAG(3, 0.5, gamma=0.7, noise_var=0.2), 4),
    (TaskFeatureAlignment(3, 0.6, 0.1), 4),
])
def test_ground_truth_agrees_with_closed_form(design, n, key):
    W_gt, L_in = theory.ground_truth(design, n, key, 200_000)
    W_star, L_star = theory.optimal_pgd(design, n)
    assert_close(W_gt, W_star, rtol=0, atol=0.02 * float(jnp.max(jnp.abs(W_star))) + 1e-3)
    mean, se = theory.monte_carlo_risk(theory.pgd_predict(W_gt), design, n, jax.random.fold_in(key, 1), 200_000)
    # The estimated W carries an excess risk of about d^2 / N * L (here < 1e-3 relative): slack for it.
    assert_within_se(L_star, mean, se, name=f"ground_truth {type(design).__name__}", slack=1e-3 * float(L_star))
    assert float(L_in) == pytest.approx(float(L_star), rel=GROUND_TRUTH_REL)


def test_theory_bad_input():
    design = IID(3)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 3\]"):
        theory.lowrank_optimal_risk(design, 5, 4)
    with pytest.raises(ValueError, match=r"W must have shape \(3, 3\)"):
        theory.pgd_risk(design, 5, np.eye(2))
    with pytest.raises(ValueError, match=r"weights must have shape \(5,\)"):
        theory.pgd_risk(design, 5, np.eye(3), np.ones(4))
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        theory.optimal_pgd(design, 0)
    with pytest.raises(TypeError, match="pgd_risk has a closed form for IID, Drift designs"):
        theory.pgd_risk(RAG(3, 0.2), 5, np.eye(3))
    with pytest.raises(ValueError, match="num_prompts must be an integer >= 1"):
        theory.monte_carlo_risk(theory.pgd_predict(np.eye(3)), design, 5, KEY, 0)
    with pytest.raises(ValueError, match=r"Q must have shape \(4, 4\)"):
        theory.attention_risk(design, 5, np.eye(3), np.ones(4))
    with pytest.raises(ValueError, match=r"v must have shape \(4,\)"):
        theory.attention_risk(design, 5, np.eye(4), np.ones(3))
    with pytest.raises(ValueError, match="attention_risk needs a scalar noise_var"):
        theory.attention_risk(IID(3, noise_var=[0.1] * 5, query_noise_var=0.1), 5, np.eye(4), np.ones(4))


@FEW
@given(st.integers(1, 30), st.integers(1, 60), st.floats(0.0, 3.0))
def test_iid_effective_n_inverts_isotropic_formula(d, n, s2):
    """10 (d, n, s^2) here (every new d compiles optimal_pgd's ops anew); 40 in the slow tier."""
    _effective_n_inverts(d, n, s2)


@pytest.mark.slow
@FAST
@given(st.integers(1, 30), st.integers(1, 60), st.floats(0.0, 3.0))
def test_iid_effective_n_inverts_isotropic_formula_fuzzed(d, n, s2):
    _effective_n_inverts(d, n, s2)


def _effective_n_inverts(d, n, s2):
    L = theory.optimal_pgd(IID(d, noise_var=s2), n).risk
    assert theory.iid_effective_n(d, s2, L) == pytest.approx(n, rel=1e-9)
