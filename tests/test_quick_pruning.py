"""Paper B's quick pruning study of depth (claim ii); the search (claims i and iv) is tests/test_quick_pruning_search.py."""

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

