"""pretraining_tau's quick run (d = 6, fresh tasks): the finite-d formula of each fit agrees with the Monte
Carlo referee, and every seed's error curve rises into the interpolation threshold P = d(d+1) and falls
after it (double descent), with the peak on the grid point nearest the threshold for most seeds; the
heavy-ball-trained networks all pass their gate, sit on their paired ridge fits, and are no further from them
than heavy ball's predicted contraction allows (plus float32's floor)."""

import numpy as np
import pytest

from iclsim import asymptotics
from tests.quick import EXPERIMENTS, run_quick
from tests.tolerance import MC_SIGMAS, report

# the whole quick study runs in the slow tier (make test's budget); its library is unit-tested in the default tier
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    return run_quick("pretraining_tau", tmp_path_factory.mktemp("pretraining_tau"))[1]


def test_pretraining_tau_quick_double_descent_and_formula(quick_rows):
    rows = quick_rows
    s = EXPERIMENTS["pretraining_tau"].quick
    d = s.dims[0]
    z = [abs(r["mc_z"]) for r in rows if r["grid"] == "curve" and "mc_z" in r and r["mc_z"] != ""]
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


FLOAT32_FLOOR = 1e-5  # ||Gamma_GD - Gamma_ridge|| / ||Gamma_ridge|| float32 heavy ball reaches here (measured: 1e-6)


def test_pretraining_tau_quick_trained_networks_reach_their_ridge_fits(quick_rows):
    rows = quick_rows
    s = EXPERIMENTS["pretraining_tau"].quick
    mine = [r for r in rows if r["grid"] == "trained"]
    assert sorted({r["tau"] for r in mine}) == sorted(s.train_taus) and len(mine) == len(s.train_taus) * s.seeds
    for r in mine:
        assert r["passed"] and r["param_gap"] <= r["gd_bound"] + FLOAT32_FLOOR
        assert abs(r["icl_error"] - r["ridge_error"]) <= 1e-3 * r["ridge_error"]
        assert 0 < r["momentum"] < 1  # heavy ball, one (step, momentum) per tau
    assert all(len({(r["learning_rate"], r["momentum"]) for r in mine if r["tau"] == t}) == 1 for t in s.train_taus)
    report(f"pretraining_tau quick: GD vs ridge worst parameter gap {max(r['param_gap'] for r in mine):.2e}")
