"""docs/extending.md runs: its python blocks, in order, in one namespace (the two worked examples
train at small size and save their figures; the property tests run their examples)."""

import pytest
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "extending.md"


def blocks():
    return re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_guide_has_the_worked_examples():
    code = "\n".join(blocks())
    for needed in ("class SoftmaxAttention", "class StudentFeatures", "train.fit_sweep", "plotting.curves",
                   "theory.optimal_pgd", "theory.bayes_risk", "testing.iid_designs", "assert_matches_theory"):
        assert needed in code, needed


@pytest.mark.slow  # the guide's worked examples train and plot (the docs tier, with the tutorials)
def test_guide_code_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "guide"}
    for i, code in enumerate(blocks()):
        exec(compile(code, f"{GUIDE.name}[block {i}]", "exec"), namespace)
    for name in ("softmax.png", "student.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    # the softmax model is a weighted average of labels: it stays above the PGD optimum it resembles
    rows = namespace["rows"]
    assert all(r["risk"] > 0 for r in rows)
