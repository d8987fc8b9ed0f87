"""experiments/gla.py's quick run: GLA, H3 and linear attention on multitask prompts beside their optima."""

import numpy as np
import pytest

from iclsim import gating, quality
from iclsim.multitask import Multitask
from tests.quick import EXPERIMENTS, run_quick
from tests.tolerance import report

# the whole quick study runs in the slow tier (make test's budget); its library is unit-tested in the default tier
pytestmark = pytest.mark.slow


def test_gla_quick(tmp_path):
    """Every row carries its own model's optimum (GLA: the cone, H3: the optimal WPGD, attention: uniform), recomputed
    here from the settings; the gate's count is the rows' and it is reported, never averaged in; on ordered relevance
    theory puts GLA on the optimal WPGD and well below linear attention, and the trained scalar GLA is below trained
    linear attention on the shared test prompts and weights the query's segment most. Planted bugs caught: the
    theory column of another model, a gate counted over the wrong rows, GLA's weights read in reverse order."""
    meta, rows = run_quick("gla", tmp_path)
    s = EXPERIMENTS["gla"].quick
    summary = meta["summary"]
    assert summary["passed"] + summary["failed"] == len(rows) == 2 * 4 * s.seeds
    assert summary["passed"] == sum(quality.gate(r["risk"], r["theory"], se=r["se"]) for r in rows)
    designs = {"ordered relevance": s.ordered, "unordered relevance": s.unordered}
    for r in rows:
        design = Multitask(s.task_dim, designs[r["design"]], s.per_task, noise_var=s.noise_var)
        expected = {"GLA (scalar gate)": gating.gla_optimum, "GLA (vector gate)": gating.gla_optimum,
                    "H3 (free filter)": gating.optimal_wpgd,
                    "linear attention": gating.linear_attention_optimum}[r["model"]](design).risk
        assert abs(r["theory"] - expected) <= 1e-12 * expected
    assert summary["ordered_theory_gap_GLA_minus_WPGD"] == 0 and summary["ordered_theory_gap_LA_minus_GLA"] > 0.5
    assert summary["unordered_theory_gap_GLA_minus_WPGD"] > 0.3
    trained = summary["ordered_trained_gap_LA_minus_GLA"]
    report(f"gla quick: {summary['failed']} of {len(rows)} networks failed the gate; LA - GLA trained "
           f"{trained[0]:.3f} (theory {summary['ordered_theory_gap_LA_minus_GLA']:.3f})")
    assert trained[0] > 0.2
    ordered = [r for r in rows if r["design"] == "ordered relevance" and r["model"] == "GLA (scalar gate)"]
    w = np.array([[r["w_1"], r["w_2"], r["w_3"]] for r in ordered])
    assert np.all(w[:, 2] > w[:, 0])
