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
