"""dynamics_gf_limit's quick run (2 seeds, no shift and a rotated covariance): the limit's Monte Carlo
risk within 4 SE of its closed form, the learned W within 5% of Gamma^{-1}, the trained risk within 5% of
the limit's on the same prompts, and every network through the gate."""

from tests.quick import run_quick
from tests.tolerance import report


def test_dynamics_gf_limit_quick(tmp_path):
    _, rows = run_quick("dynamics_gf_limit", tmp_path)
    report(f"dynamics_gf_limit quick: W gap {max(r['w_rel_gap'] for r in rows):.4f}, "
           f"risk gap {max(abs(r['rel_gap']) for r in rows):.4f}")
    assert {r["test"] for r in rows} == {"no shift", "rotated"} and len(rows) == 4
    assert all(abs(r["limit_z"]) < 4 for r in rows)
    assert all(r["w_rel_gap"] < 0.05 for r in rows)
    assert all(abs(r["rel_gap"]) < 0.05 for r in rows)
    assert all(r["passed"] for r in rows)
    # the rotated covariance changes the limit's risk: the closed form moves with the shift
    closed = {r["test"]: r["limit_closed"] for r in rows}
    assert closed["rotated"] > 1.2 * closed["no shift"]
