"""The one place that says how close is close: every comparison in the suite goes through here."""

import numpy as np

Z_SCORES: list[tuple[str, float]] = []
REPORT: list[str] = []
MC_SIGMAS = 4.0  # closed form vs Monte Carlo: |closed - MC| <= 4 standard errors


def assert_within_se(closed, mc_mean, mc_se, name="", sigmas=MC_SIGMAS, slack=0.0):
    """|closed - MC| <= sigmas * SE (+ slack for a known deterministic bias); records the z score."""
    closed = float(closed)
    z = abs(closed - mc_mean) / mc_se
    Z_SCORES.append((name, z))
    assert abs(closed - mc_mean) <= sigmas * mc_se + slack, (
        f"{name}: closed form {closed:.6g} vs Monte Carlo {mc_mean:.6g} +- {mc_se:.3g} (z = {z:.2f})")


def assert_close(actual, expected, rtol=1e-9, atol=1e-12, name=""):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol, err_msg=name)


def relative_gap(value, reference):
    return abs(float(value) - float(reference)) / abs(float(reference))


def report(line: str):
    """A measured number worth seeing in the test summary (gaps, not timings)."""
    REPORT.append(line)


KS_ALPHA = 1e-3  # Kolmogorov-Smirnov checks reject at this level (asymptotic critical value)


def _ks_critical(alpha=KS_ALPHA):
    return np.sqrt(-0.5 * np.log(alpha / 2))


def assert_same_distribution(a, b, name=""):
    """Two-sample Kolmogorov-Smirnov: sup |F_a - F_b| <= c(alpha) sqrt((n + m) / (n m))."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    grid = np.concatenate([a, b])
    D = np.max(np.abs(np.searchsorted(a, grid, "right") / a.size - np.searchsorted(b, grid, "right") / b.size))
    bound = _ks_critical() * np.sqrt((a.size + b.size) / (a.size * b.size))
    REPORT.append(f"KS {name}: D = {D:.4f} (bound {bound:.4f})")
    assert D <= bound, f"{name}: KS distance {D:.4f} > {bound:.4f} (alpha = {KS_ALPHA})"


def assert_distribution(samples, cdf, name=""):
    """One-sample Kolmogorov-Smirnov against a CDF: sup |F_n - F| <= c(alpha) / sqrt(n)."""
    x = np.sort(np.asarray(samples, np.float64))
    F = np.asarray(cdf(x), np.float64)
    i = np.arange(1, x.size + 1)
    D = max(np.max(i / x.size - F), np.max(F - (i - 1) / x.size))
    bound = _ks_critical() / np.sqrt(x.size)
    REPORT.append(f"KS {name}: D = {D:.4f} (bound {bound:.4f})")
    assert D <= bound, f"{name}: KS distance {D:.4f} > {bound:.4f} (alpha = {KS_ALPHA})"


# Trained models against theory: how far training (finite steps, Adam noise) may leave a quick run from
# the optimum it should reach. Relative gaps unless said otherwise.
TRAINED_RISK_GAP = 0.06     # Monte Carlo risk of a quickly trained model vs the theoretical optimum
TRAINED_EXACT_GAP = 0.01    # closed-form risk of the trained weights vs the optimum (no Monte Carlo noise)
TRAINED_W_REL = 0.12        # ||W_trained - W*||_F / ||W*||_F for a quick run
TRAINED_W_REL_LONG = 0.05   # the same after a longer single fit
FILTER_GAP = 0.10           # H3 filter's distance to the optimal weighting (h3_weighting quick)
SAMPLER_GAP = 0.02          # Gram-trained or token-trained model vs the optimum
SAMPLER_AGREEMENT = 0.015   # Gram-trained vs token-trained model
MOMENT_RTOL = 0.05          # sample second moments of 50k draws vs their expectation
GROUND_TRUTH_REL = 0.02     # in-sample ground-truth risk (biased low by ~d^2 / prompts) vs the optimum
