"""Shared by the quick-experiment tests: run an experiment's quick version through the one runner."""

import json

import numpy as np
import pytest

from iclsim import runner
from tests.tolerance import TRAINED_RISK_GAP, TRAINED_W_REL, report

EXPERIMENTS = runner.discover()


def run_quick(name, tmp_path):
    meta = runner.run_experiment(EXPERIMENTS[name], tmp_path, quick=True, seed=0, progress=lambda m: None)
    rows = runner.read_rows(tmp_path / f"{name}.csv")
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert saved["seed"] == 0 and saved["quick"] and "jax" in saved["versions"] and saved["wall_time_s"] >= 0
    return meta, rows


def exact_gaps(rows):
    return np.array([abs(r["exact_risk"] - r["theory"]) / r["theory"] for r in rows if "exact_risk" in r])


def check_correlated(name, rows):
    """Trained attention within 6% of the exact RAG / alignment optimum on 20k fresh prompts (SE ~1%),
    effective W within 12% of c* I; alpha = 0.4 has a larger effective sample size than alpha = 0."""
    gaps = np.array([abs(r["gap"]) for r in rows])
    w_rel = np.array([r["w_rel"] for r in rows])
    report(f"{name} quick: worst risk gap {gaps.max():.4f}, worst W rel {w_rel.max():.4f}")
    assert gaps.max() < TRAINED_RISK_GAP and w_rel.max() < TRAINED_W_REL
    for n in {r["n"] for r in rows}:
        by_alpha = {r["design"]: r["n_eff_ratio_theory"] for r in rows if r["n"] == n}
        assert by_alpha["alpha=0.4"] > by_alpha["alpha=0"] == pytest.approx(1.0)
