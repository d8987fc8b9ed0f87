"""fig1 and the quick runs it reads (rag, lowrank, h3_weighting), in one folder."""

import pytest

from iclsim import evaluate, runner, train
from tests.quick import EXPERIMENTS, check_correlated, exact_gaps, run_quick
from tests.tolerance import FILTER_GAP, TRAINED_EXACT_GAP, TRAINED_RISK_GAP, report

# the whole quick study runs in the slow tier (make test's budget); its library is unit-tested in the default tier
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """Quick runs of fig1 and the experiments it reads, into one folder (make test's pytest-xdist workers
    take whole files, so one worker runs this module's tests and the fixture once)."""
    out = tmp_path_factory.mktemp("quick")
    return out, {name: run_quick(name, out)[1] for name in ("rag", "lowrank", "h3_weighting", "fig1")}


def test_rag_quick(quick_results):
    check_correlated("rag", quick_results[1]["rag"])


def test_lowrank_quick(quick_results):
    """Rank-r attention within 1% of the Eckart-Young risk (exact, from its effective W) and 6% on fresh
    prompts; on the spiked design it keeps the theory's top eigendirection (overlap > 0.95)."""
    rows = quick_results[1]["lowrank"]
    exact = exact_gaps(rows)
    report(f"lowrank quick: worst exact gap {exact.max():.4f}, worst risk gap {max(abs(r['gap']) for r in rows):.4f}")
    assert exact.max() < TRAINED_EXACT_GAP and max(abs(r["gap"]) for r in rows) < TRAINED_RISK_GAP
    assert min(r["overlap"] for r in rows if "overlap" in r) > 0.95


def test_h3_weighting_quick(quick_results):
    """H3 beats attention on drift by at least half the theoretical margin L_ATT - L_H3; on IID the two
    tie within 1%; the learned free filter is within 10% (max-norm) of omega* = K^-1 rho."""
    rows = quick_results[1]["h3_weighting"]
    summary = EXPERIMENTS["h3_weighting"].summary(rows)
    report(f"h3_weighting quick: drift margin {summary['drift_margin_empirical']} vs theory "
           f"{summary['drift_margin_theory']}, worst filter gap {summary['worst_filter_gap']}")
    assert summary["drift_margin_empirical"] >= 0.5 * summary["drift_margin_theory"] > 0
    iid = {r["model"]: r["risk"] for r in rows if r["design"] == "IID"}
    assert abs(iid["H3 (free filter)"] - iid["linear attention"]) / iid["linear attention"] < TRAINED_EXACT_GAP
    assert max(r["filter_gap"] for r in rows if r["model"] == "H3 (free filter)") < FILTER_GAP
    assert exact_gaps(rows).max() < TRAINED_EXACT_GAP


def test_fig1_reads_without_retraining(quick_results, monkeypatch):
    """fig1 draws from its sources' CSVs: rerun with training and evaluation made to fail, it still
    runs and its rows are the sources' rows. Planted bug caught: fig1 retraining (or rescoring) a source."""
    out, results = quick_results
    assert {r["source"] for r in results["fig1"]} == {"h3_weighting", "rag", "lowrank"}

    def refuse(*args, **kwargs):
        raise AssertionError("fig1 must not train or evaluate")

    for name in ("fit_sweep", "_run_points"):
        monkeypatch.setattr(train, name, refuse)
    monkeypatch.setattr(evaluate, "evaluate_sweep", refuse)
    rows = EXPERIMENTS["fig1"].run(EXPERIMENTS["fig1"].settings, 0,
                                   runner.RunContext(lambda m: None, None, out, True))  # the sources are quick runs: fig1 checks their provenance
    for name in ("h3_weighting", "rag", "lowrank"):
        source = runner.read_rows(out / f"{name}.csv")
        assert [{k: v for k, v in r.items() if k != "source"} for r in rows if r["source"] == name] == source
