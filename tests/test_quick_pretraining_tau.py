"""pretraining_tau's quick run (d = 6, fresh tasks): the finite-d formula of each fit agrees with the Monte
Carlo referee, and every seed's error curve rises into the interpolation threshold P = d(d+1) and falls
after it (double descent), with the peak on the grid point nearest the threshold for most seeds."""

import numpy as np
import pytest

from iclsim import asymptotics
from tests.quick import EXPERIMENTS, run_quick
from tests.tolerance import MC_SIGMAS, report

# the whole quick study runs in the slow tier (make test's budget); its library is unit-tested in the default tier
pytestmark = pytest.mark.slow


def test_pretraining_tau_quick_double_descent_and_formula(tmp_path):
    _, rows = run_quick("pretraining_tau", tmp_path)
    s = EXPERIMENTS["pretraining_tau"].quick
    d = s.dims[0]
    z = [abs(r["mc_z"]) for r in rows if "mc_z" in r and r["mc_z"] != ""]
    assert len(z) == len(s.taus) and max(z) < MC_SIGMAS
    for r in rows:
        assert r["asymptotic"] == pytest.approx(asymptotics.ridge_icl_error(s.alpha, np.inf, r["tau"], s.noise_var,
                                                                             s.ridge), rel=1e-12)
    threshold = d * (d + 1) / d**2
    nearest = min(s.peak_taus, key=lambda t: abs(t - threshold))
    peaks = []
    for sd in sorted({r["seed"] for r in rows}):
        curve = [r["icl_error"] for r in rows if r["seed"] == sd and r["grid"] == "curve"]
        peak = [r for r in rows if r["seed"] == sd and r["grid"] == "peak"]
        top = max(peak, key=lambda r: r["icl_error"])
        assert top["icl_error"] > 2 * max(curve)  # up into the threshold, down after it
        peaks.append(top["tau"])
    report(f"pretraining_tau quick: per-seed peak tau {peaks}, threshold {threshold:.3f}, worst MC |z| {max(z):.2f}")
    assert sum(p == nearest for p in peaks) >= len(peaks) // 2
