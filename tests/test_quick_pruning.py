"""Paper B's quick pruning study: the derivative-free search (claim i); depth (claim ii) is in
test_quick_pruning_depth.py."""

from tests.quick import EXPERIMENTS, run_quick


def test_pruning_search_quick(tmp_path):
    """Search: its choice never looks worse on validation than no pruning, and on the training
    distribution it does not claim that pruning helps."""
    meta, rows = run_quick("pruning_search", tmp_path)
    assert all(r["val_after"] <= r["val_before"] for r in rows)
    assert meta["summary"]["claim_i"]["matched"]["verdict"] != "supported"
