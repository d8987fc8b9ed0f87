"""dynamics_gf_limit's quick run (2 seeds, a rotated test covariance): the limit's Monte Carlo
risk within 4 SE of its closed form, the learned W within 5% of Gamma^{-1}, the trained risk within 5% of
the limit's on the same prompts, and every network through the gate."""

import pytest
import numpy as np

from iclsim import IID, theory
from tests.quick import EXPERIMENTS, run_quick
from tests.tolerance import report

# the whole quick study runs in the slow tier (make test's budget); its library is unit-tested in the default tier
pytestmark = pytest.mark.slow


def test_dynamics_gf_limit_quick(tmp_path):
    _, rows = run_quick("dynamics_gf_limit", tmp_path)
    report(f"dynamics_gf_limit quick: W gap {max(r['w_rel_gap'] for r in rows):.4f}, "
           f"risk gap {max(abs(r['rel_gap']) for r in rows):.4f}")
    assert {r["test"] for r in rows} == {"rotated"} and len(rows) == 2
    assert all(abs(r["limit_z"]) < 4 for r in rows)
    assert all(r["w_rel_gap"] < 0.05 for r in rows)
    assert all(abs(r["rel_gap"]) < 0.05 for r in rows)
    assert all(r["passed"] for r in rows)
    # the rotated covariance raises the limit's risk well above its risk without the shift (the PGD optimum)
    lam = EXPERIMENTS["dynamics_gf_limit"].settings.eigenvalues
    unshifted = theory.optimal_pgd(IID(len(lam), cov_x=np.diag(lam)), EXPERIMENTS["dynamics_gf_limit"].settings.n).risk
    assert all(r["limit_closed"] > 1.2 * unshifted for r in rows)
