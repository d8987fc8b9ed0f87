"""task_diversity's quick run: the trained networks pass their gate (pool risk within 10% of the best linear
attention on the pool), dMMSE beats ridge on its own pool, and on fresh tasks dMMSE moves toward ridge
as the pool grows while no trained network beats ridge (the Bayes risk for fresh tasks)."""

import pytest
from tests.quick import run_quick
from tests.tolerance import MC_SIGMAS, report

# the whole quick study runs in the slow tier (make test's budget); its library is unit-tested in the default tier
pytestmark = pytest.mark.slow


def test_task_diversity_quick_against_dmmse_and_ridge(tmp_path):
    meta, rows = run_quick("task_diversity", tmp_path)
    assert meta["summary"]["networks_failed"] == 0 and all(r["passed"] for r in rows)
    by_M = {r["M"]: r for r in rows}
    small, large = by_M[min(by_M)], by_M[max(by_M)]
    for r in (small, large):
        diff_se = (r["dmmse_pool_se"] ** 2 + r["ridge_pool_se"] ** 2) ** 0.5
        assert r["ridge_pool"] - r["dmmse_pool"] > MC_SIGMAS * diff_se
    assert abs(large["dmmse_fresh"] - large["ridge_fresh"]) < abs(small["dmmse_fresh"] - small["ridge_fresh"])
    for r in rows:
        assert r["risk_fresh"] + MC_SIGMAS * r["se_fresh"] > r["ridge_fresh"] - MC_SIGMAS * r["ridge_fresh_se"]
    report(f"task_diversity quick: dMMSE fresh {small['dmmse_fresh']:.3f} (M={small['M']}) -> "
           f"{large['dmmse_fresh']:.3f} (M={large['M']}), ridge {large['ridge_fresh']:.3f}")
