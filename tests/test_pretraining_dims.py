"""pretraining_tau's networks trained at every d in ``train_dims`` (experiments/pretraining_tau.py): each d trains its
own networks, paired with the ridge fit at that d; the summary fits the passers' seed means over the d by a + b/d,
as the closed-form means are fitted, and the plot draws each d's points where that d's fits are drawn."""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclsim import asymptotics, pretraining
from tests.quick import EXPERIMENTS

study = sys.modules[EXPERIMENTS["pretraining_tau"].run.__module__]


@pytest.mark.slow  # trains 4 tiny networks (make test's budget); the quick run trains at one d
def test_every_train_dim_trains_its_own_networks_paired_with_the_ridge_fit_at_that_d():
    """d = 2 and 3 (fresh tasks, tau = 3, alpha = 2): the rows come per d with that d's P = tau d^2 and n = alpha d,
    every network passes its gate and its error equals that of the ridge fit at its d on its own stored prompts,
    refitted here. Planted bugs caught: every d trained at train_dims[0] (rows, P and errors at d = 2 only), a
    network paired with the other d's ridge fit."""
    s = dataclasses.replace(study.SETTINGS, dims=(2, 3), train_dims=(2, 3), alpha=2.0, kappas=(), train_kappas=(),
                            train_taus=(3.0,), seeds=2, train_steps=500)
    seeds = [3, 4]
    rows = study._trained(s, seeds, lambda m: None, None)
    assert [(r["d"], r["seed"]) for r in rows] == [(2, 3), (2, 4), (3, 3), (3, 4)]
    for r in rows:
        d = r["d"]
        assert (r["P"], r["n"]) == (3 * d * d, 2 * d)
        assert r["passed"] and r["param_gap"] < 1e-3
        with jax.enable_x64(True):
            stored = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), pretraining.stored_prompts(
                pretraining.lu_design(d, s.noise_var), [r["seed"]], r["P"], r["n"]))
            refit = float(pretraining.icl_error(study._FIT(stored, s.ridge, r["P"])[0], r["n"], s.noise_var))
        assert r["ridge_error"] == pytest.approx(refit, rel=1e-9)
        assert r["icl_error"] == pytest.approx(refit, rel=1e-3)
    assert rows[0]["ridge_error"] != pytest.approx(rows[2]["ridge_error"], rel=1e-3)


DIMS, TAUS, A, B = (8, 12, 16), (0.5, 1.0, 2.5), 0.3, 4.0  # trained means a(tau) + b/d with a = A tau, b = B
DEV = np.array([-3, -1, 1, 3, -2, 2, -0.5, 0.5]) * 0.01  # per-seed deviations, mean 0: the seed means are exact


def _rows(s):
    """Synthetic rows: closed-form curve and peak rows at DIMS (fresh tasks) and trained rows whose 8 passing seeds
    average exactly A tau + B/d at each d, plus a ninth network per (d, tau) that failed its gate with a huge error."""
    rows = []
    for d in DIMS:
        for tau in s.taus:
            asym = asymptotics.ridge_icl_error(s.alpha, np.inf, tau, s.noise_var, s.ridge)
            rows += [{"grid": "curve", "kappa": "inf", "d": d, "tau": tau, "seed": k, "icl_error": asym * (1 + 1 / d)
                      + DEV[k], "asymptotic": asym} for k in range(8)]
            rows += [{"grid": "trained", "kappa": "inf", "d": d, "tau": tau, "seed": k, "icl_error": A * tau + B / d
                      + DEV[k], "ridge_error": A * tau + B / d + DEV[k], "param_gap": 1e-6, "gd_bound": 1e-9,
                      "passed": True, "asymptotic": asym} for k in range(8)]
            rows.append({**rows[-1], "seed": 8, "icl_error": 1e3, "param_gap": 0.5, "passed": False})
        rows += [{"grid": "peak", "kappa": "inf", "d": d, "tau": tau, "seed": k, "icl_error": 5.0 if tau == 1.05 else 1.0}
                 for tau in s.peak_taus for k in range(8)]
    return rows


def test_trained_summary_fits_the_passers_means_over_train_dims_by_a_plus_b_over_d():
    """Synthetic rows whose passers' seed means are exactly A tau + B/d: the summary counts 8 of 9 passed per
    (d, tau), reports each d's mean A tau + B/d (the failed network not averaged in) and, at |tau - 1| >= 0.5 only,
    the a + b/d intercept's 95% interval relative to the asymptote: centred on (A tau - asymptotic) / asymptotic
    with the half width of simple regression's intercept, 1.96 se sqrt(1/3 + mean(1/d)^2 / Sxx) (se: the seed
    means' common standard error). Planted bugs caught: the failed network averaged in, every d's mean taken at
    train_dims[0], the intercept's interval from the slope's variance."""
    s = dataclasses.replace(study.SETTINGS, taus=TAUS, peak_taus=(1.0, 1.05, 1.1), kappas=(), train_taus=TAUS)
    out = study.trained_summary(_rows(s))
    se = np.std(DEV, ddof=1) / np.sqrt(len(DEV))
    x = 1 / np.array(DIMS)
    half = 1.96 * se * np.sqrt(1 / len(x) + x.mean() ** 2 / np.sum((x - x.mean()) ** 2))
    worst = 0.0
    for tau in TAUS:
        asym = asymptotics.ridge_icl_error(s.alpha, np.inf, tau, s.noise_var, s.ridge)
        for d in DIMS:
            assert out[f"GD d={d} tau={tau:g}: passed"] == "8 of 9"
            assert out[f"GD d={d} tau={tau:g}: GD error mean (95%)"][1] == pytest.approx(A * tau + B / d, abs=1e-4)
            # paired by seed the per-seed deviations cancel: a zero-width interval at the difference of the means
            low, mid, high = out[f"GD d={d} tau={tau:g}: GD - curve, paired by seed (95%)"]
            assert low == mid == high == pytest.approx(A * tau + B / d - asym * (1 + 1 / d), abs=1e-4)
        key = f"GD tau={tau:g}: extrapolated gap over d = 8, 12, 16 (95%)"
        if abs(tau - 1) < 0.5:
            assert key not in out
            continue
        low, high = out[key]
        assert (low + high) / 2 == pytest.approx((A * tau - asym) / asym, abs=1e-4)
        assert (high - low) / 2 == pytest.approx(half / asym, abs=1e-4)
        worst = max(worst, abs(A * tau - asym) / (half / 1.96))
    assert out["GD: worst |extrapolated - asymptotic| / SE (|tau-1| >= 0.5)"] == pytest.approx(worst, abs=0.01)
    assert all(out[f"GD d={d}: taus whose seed-paired difference from the curve excludes 0 (95%)"] == "3 of 3" for d in DIMS)
    # no tau fitted (only near the peak): no worst z, not a perfect 0
    near = study.trained_summary([r for r in _rows(s) if r["grid"] != "trained" or abs(r["tau"] - 1) < 0.5])
    assert near["GD: worst |extrapolated - asymptotic| / SE (|tau-1| >= 0.5)"] is None


def test_plot_draws_each_train_dims_points_where_that_d_is_drawn():
    """Every d's trained seed means are drawn as hollow diamonds on the tau panel at tau x 1.05^(j+1) (j: the d's
    rank, larger at larger d), on the 1/d panel at 1/d (just right of it) for |tau - 1| >= 0.5 with the a + b/d
    intercept at 1/d = 0, and the failed networks are counted in each d's legend entry. Planted bugs caught:
    every d's points at train_dims[0]'s place, only the first d drawn, the failed network's error averaged in."""
    s = dataclasses.replace(study.SETTINGS, taus=TAUS, peak_taus=(1.0, 1.05, 1.1), kappas=(), train_taus=TAUS)
    fig = study.plot(_rows(s), s)
    ax, gax, _ = fig.axes
    diamonds = [line for line in ax.get_lines() if line.get_marker() == "D"]
    assert len(diamonds) == len(DIMS)
    for j, (d, line) in enumerate(zip(DIMS, diamonds)):
        np.testing.assert_allclose(line.get_xdata(), np.array(TAUS) * 1.05 ** (j + 1), rtol=1e-12)
        np.testing.assert_allclose(line.get_ydata(), A * np.array(TAUS) + B / d, rtol=1e-12)
    legend = [t.get_text() for t in ax.get_legend().get_texts() if t.get_text().startswith("GD-trained")]
    assert [t.split(" (")[0] for t in legend] == [f"GD-trained, d = {d}" for d in DIMS]
    assert all("24/27 passed" in t for t in legend)
    gaps = [line for line in gax.get_lines() if line.get_marker() == "D"]
    far = [t for t in TAUS if abs(t - 1) >= 0.5]
    xs = sorted(round(float(x), 9) for line in gaps for x in line.get_xdata())
    assert xs == sorted([0.002] * len(far) + [round(1 / d + 0.002, 9) for d in DIMS for _ in far])
