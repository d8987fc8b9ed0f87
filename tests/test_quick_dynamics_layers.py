"""dynamics_layers' quick run (2 layers, 2 seeds): the recorded per-layer steps end at the best 2-step GD
set (in some order) within 5%, every layer settles before the end, and the rank of each layer's step is a
permutation of 1..L per seed."""

import pytest
from tests.quick import run_quick
from tests.tolerance import report

# the whole quick study runs in the slow tier (make test's budget); its library is unit-tested in the default tier
pytestmark = pytest.mark.slow


def test_dynamics_layers_quick(tmp_path):
    _, rows = run_quick("dynamics_layers", tmp_path)
    layers = [r for r in rows if r["kind"] == "layer"]
    paths = [r for r in rows if r["kind"] == "path"]
    report(f"dynamics_layers quick: set gap {max(r['set_gap'] for r in layers):.4f}")
    assert len(layers) == 4 and max(r["set_gap"] for r in layers) < 0.05
    for sd in {r["seed"] for r in layers}:
        assert sorted(r["rank"] for r in layers if r["seed"] == sd) == [1, 2]
    last = max(r["step"] for r in paths)
    assert all(0 <= r["acquired_at"] < last for r in layers)
    # the record starts at the initialisation (GD with step init_step = 0.5 in every layer) and its last
    # entry is each layer's final step
    first = [r for r in paths if r["step"] == 0]
    assert all(abs(r["layer1"] - 0.5) < 0.2 and abs(r["layer2"] - 0.5) < 0.2 for r in first)
    for r in layers:
        end = next(p for p in paths if p["seed"] == r["seed"] and p["step"] == last)
        assert end[f"layer{r['layer']}"] == r["final_step"]
