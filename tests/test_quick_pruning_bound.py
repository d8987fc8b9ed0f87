"""Paper B's claim (iii) quick run: the trajectory bound of every pruned network beside its measured harm."""

import pytest

import numpy as np

from tests.quick import EXPERIMENTS, run_quick
from tests.tolerance import report


def _rho(x, y):
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


@pytest.mark.slow  # a whole quick study (make test's budget); its library is unit-tested in the default tier
def test_pruning_bound_quick(tmp_path):
    """Every network passes its gate; each pruned layer's update has the dimension its operation leaves (SVD of
    the factors or of Gamma_l to rank k: k; deleted: 0 with a zero term); the unpruned row changes nothing;
    deleting a step lowers the stand-in sum ||Gamma_l||_2 and raises the matched test risk (the trained network
    is near the best L-step GD); and the summary's median correlations are the medians of Spearman's rho
    recomputed here from the rows (no ties among continuous values). Planted bugs caught: the bound of the
    unpruned network reported for every candidate (supports all d), the wrong layer pruned, the summary's
    correlations taken over the wrong rows (the unpruned row included, seeds or bases mixed: the recomputed
    medians differ), a verdict outside the across-bases vocabulary."""
    meta, rows = run_quick("pruning_bound", tmp_path)
    s = EXPERIMENTS["pruning_bound"].quick
    summary = meta["summary"]
    assert summary["networks_failed"] == 0
    d, L = s.dim, s.layers
    for r in rows:
        if r["op"] == "none":
            assert r["bound_change"] == 0 and r["relative_change"] == 0
            assert all(r[f"support_{l}"] == d for l in range(1, L + 1))
            continue
        layer = r["layer"]
        others = [r[f"support_{l}"] for l in range(1, L + 1) if l != layer]
        assert others == [d] * (L - 1), r
        if r["op"] == "delete":
            assert r[f"support_{layer}"] == 0 and r[f"term_{layer}"] == 0, r
            assert r["gamma_norm_sum_change"] < 0, r
            if r["setting"] == "matched":
                assert r["relative_change"] > 0, r
        else:
            assert r[f"support_{layer}"] == r["rank"], r
            assert np.isfinite(r["bound"]) and np.isfinite(r[f"term_{layer}"]), r
    verdicts = {"supported", "contradicted", "unstable across seed bases", "not resolved at this sample size"}
    for setting, measures in summary["claim_iii"].items():
        for measure, result in measures.items():
            assert result["across_bases"] in verdicts
            for base in ("A", "B"):
                sub = [r for r in rows if r["setting"] == setting and r["base"] == base and r["op"] != "none"]
                rhos = [_rho([r[measure] for r in sub if r["seed"] == sd],
                             [r["relative_change"] for r in sub if r["seed"] == sd])
                        for sd in sorted({r["seed"] for r in sub})]
                assert len(rhos) == s.seeds
                assert abs(result[f"base_{base}"]["median"] - np.median(rhos)) < 1e-3, (setting, measure, base)
    bound = summary["claim_iii"]["matched"]["bound"]
    report(f"pruning_bound quick: matched median rho (bound vs harm) A {bound['base_A']['median']}, "
           f"B {bound['base_B']['median']}")
