"""Paper B's claim (ii) in quick runs: pruning one layer against its controls (pruning_depth), and depth
against step over all layer orders (pruning_depth_step)."""

import pytest

import math

import jax
import numpy as np

from iclsim import IID, depth, quality, theory
from tests.quick import EXPERIMENTS, run_quick
from tests.tolerance import MC_SIGMAS, assert_within_se, report

VERDICTS = {"supported", "contradicted", "not resolved at this sample size", quality.UNSTABLE}


def _settings(name):
    return EXPERIMENTS[name].quick


@pytest.mark.slow  # a whole quick study (make test's budget); its library is unit-tested in the default tier
def test_pruning_depth_quick_controls_and_mechanism(tmp_path):
    """Every network passes its gate and has one row per (setting, layer, operation, rank) and an oracle row.
    The oracle (the best GD re-tuned for the test setting) is the GD network of its steps: its risk is within
    4 SE of theory.multistep_gd_risk of those steps on the test design, and on the shifted settings it is never
    worse than the unpruned network beyond 4 SE. Pruning (Wq, Wk) to rank 1 harms as much as deleting the
    layer's step (within 10%: the kept subspaces barely overlap), the best scale of a layer on the training
    distribution is near 1, and the verdicts are the allowed words on both bases and across.
    Planted bugs caught: an oracle built from the training steps or with Gamma = gamma^2 I, an 'svd' op that
    keeps the matrices whole, c* = +b / (2a), a verdict across bases that ignores one base."""
    meta, rows = run_quick("pruning_depth", tmp_path)
    s = _settings("pruning_depth")
    summ = meta["summary"]
    assert summ["networks_failed"] == 0
    L, ranks, seeds = s.layers, s.ranks, 2 * s.seeds
    assert len(rows) == 3 * seeds * (L * (3 * len(ranks) + 2) + 1)
    worst_z = 0.0
    settings = {"matched": (IID(s.dim, noise_var=s.noise_var), s.n),
                "noisier test labels": (IID(s.dim, noise_var=s.test_noise_var), s.n),
                "shorter context": (IID(s.dim, noise_var=s.noise_var), s.test_n)}
    for setting, (design, n) in settings.items():
        oracle = [r for r in rows if r["setting"] == setting and r["op"] == "oracle"]
        steps = np.array([float(g) for g in str(oracle[0]["oracle_steps"]).split()])
        closed, closed_se = theory.multistep_gd_risk(design, n, steps, jax.random.PRNGKey(7), 200_000)
        for r in oracle:
            assert_within_se(closed, r["risk"], float(np.hypot(r["se"], closed_se)), f"oracle {setting}")
            if setting != "matched":
                assert r["risk"] <= r["baseline"] + MC_SIGMAS * np.hypot(r["se"], r["baseline_se"]), r
                worst_z = max(worst_z, (r["risk"] - r["baseline"]) / np.hypot(r["se"], r["baseline_se"]))
    for r in rows:
        if r["op"] == "svd" and r["rank"] == 1 and r["setting"] == "matched":
            assert abs(r["relative_change"] - r["delete_change"]) <= 0.1 * abs(r["delete_change"]), r
        if r["op"] == "scale" and r["setting"] == "matched":
            assert 0.8 <= r["value"] <= 1.2, r
    for kind in ("claim_ii",):
        for c in summ[kind].values():
            assert {c["verdict_A"], c["verdict_B"], c["verdict_across"]} <= VERDICTS
            assert c["verdict_across"] == quality.across_bases([c["verdict_A"], c["verdict_B"]])
    report(f"pruning_depth quick: oracle vs unpruned on shifted settings, largest z = {worst_z:.2f}; rank-1 overlap "
           f"{summ['mechanism']['rank1']['overlap_median']}")


@pytest.mark.slow  # a whole quick study (make test's budget); its library is unit-tested in the default tier
def test_pruning_depth_step_quick_identity_and_decomposition(tmp_path):
    """The best GD's unpruned risk is the same in every layer order on the same prompts (its steps commute:
    float32 rounding, 1e-5 relative); every seed's table, rebuilt here from the rows, splits its trained-order
    contrast exactly (1e-9) into the depth effect, the step part and the interaction, and the depth effect
    is the mean harm at position 1 minus that at position L. Planted bugs caught: an order applied to the
    step sizes but not to the weights, a table indexed by original layer instead of step rank, a step part
    taken from the wrong ends."""
    meta, rows = run_quick("pruning_depth_step", tmp_path)
    s = _settings("pruning_depth_step")
    summ = meta["summary"]
    assert summ["networks_failed"] == 0
    L = s.layers
    sets = 2 * s.seeds + 2 * s.reference_sets
    assert len(rows) == 2 * sets * math.factorial(L) * L * len(s.ranks)
    for setting in ("matched", "shorter context"):
        gd = [r for r in rows if r["setting"] == setting and r["kind"] == "best GD"]
        for sd in {r["seed"] for r in gd}:
            base = [r["baseline"] for r in gd if r["seed"] == sd]
            assert (max(base) - min(base)) / min(base) <= 1e-5
        for (b, sd) in {(r["base"], r["seed"]) for r in rows if r["kind"] == "trained"}:
            mine = [r for r in rows if r["setting"] == setting and r["kind"] == "trained" and r["seed"] == sd]
            H = np.zeros((L, L))
            for p in range(1, L + 1):
                for k in range(1, L + 1):
                    H[p - 1, k - 1] = np.mean([r["relative_change"] for r in mine
                                               if r["position"] == p and r["step_order"] == k])
            first = next(r["step_order"] for r in mine if r["layer"] == 1)
            last = next(r["step_order"] for r in mine if r["layer"] == L)
            row_mean, col_mean = H.mean(axis=1), H.mean(axis=0)
            depth_effect = row_mean[0] - row_mean[-1]
            step_part = col_mean[first - 1] - col_mean[last - 1]
            inter = (H[0, first - 1] - row_mean[0] - col_mean[first - 1]) - (H[-1, last - 1] - row_mean[-1]
                                                                              - col_mean[last - 1])
            assert abs(H[0, first - 1] - H[-1, last - 1] - (depth_effect + step_part + inter)) < 1e-9
            dec = depth.decompose(H)
            assert abs(dec.depth_effect - depth_effect) < 1e-12
            assert abs(sum(dec.contrast(first - 1, last - 1)) - (H[0, first - 1] - H[-1, last - 1])) < 1e-12
        e = summ[setting]
        assert e["claim_ii_verdict_across"] == quality.across_bases([e["claim_ii_as_stated"]["A"],
                                                                     e["claim_ii_as_stated"]["B"]])
        assert e["best_GD_unpruned_spread_over_orders"] <= 1e-5
    report("pruning_depth_step quick: " + "; ".join(f"{st} depth {summ[st]['depth_effect']['A']['median']:+.3f}, "
                                                    f"step {summ[st]['step_effect']['A']['median']:+.3f} (base A)"
                                                    for st in ("matched", "shorter context")))
