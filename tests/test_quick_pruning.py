"""Paper B's quick pruning studies: depth (claim ii) and the derivative-free search (claim i)."""

from tests.quick import EXPERIMENTS, run_quick


def test_pruning_depth_quick(tmp_path):
    """Depth study: every network passes, every seed has its paired rows, and keeping one rank of a
    layer on the training distribution always hurts; the verdicts are the three allowed words."""
    meta, rows = run_quick("pruning_depth", tmp_path)
    s = {**EXPERIMENTS["pruning_depth"].settings, **EXPERIMENTS["pruning_depth"].quick}
    assert meta["summary"]["networks_failed"] == 0
    assert len(rows) == 3 * s["seeds"] * s["layers"] * len(s["ranks"])
    assert all(r["delta"] > 0 for r in rows if r["setting"] == "matched" and r["rank"] == 1)
    allowed = {"supported", "contradicted", "not resolved at this sample size"}
    assert {c["verdict"] for c in meta["summary"]["claim_ii"].values()} <= allowed


def test_pruning_search_quick(tmp_path):
    """Search: its choice never looks worse on validation than no pruning, and on the training
    distribution it does not claim that pruning helps."""
    meta, rows = run_quick("pruning_search", tmp_path)
    assert all(r["val_after"] <= r["val_before"] for r in rows)
    assert meta["summary"]["claim_i"]["matched"]["verdict"] != "supported"
