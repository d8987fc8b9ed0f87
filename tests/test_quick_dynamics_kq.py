"""dynamics_kq's quick run (separate key-query, aligned start, 2 seeds): every drop within 25% of the scalar
ODE's time, every plateau within 4 Monte Carlo SE of its PCR risk; and the helper that rebuilds each seed's
initial parameters (the start of the population flow) agrees with what fit_sweep trained from."""

import pytest
import sys

import jax
import numpy as np

from iclsim import evaluate, train
from tests.quick import EXPERIMENTS, run_quick
from tests.tolerance import report

# the whole quick study runs in the slow tier (make test's budget); its library is unit-tested in the default tier
pytestmark = pytest.mark.slow


def test_dynamics_kq_quick(tmp_path):
    _, rows = run_quick("dynamics_kq", tmp_path)
    drops = [r for r in rows if r["kind"] == "drop"]
    plateaus = [r for r in rows if r["kind"] == "plateau"]
    report(f"dynamics_kq quick: drop ratios {min(r['ratio'] for r in drops):.3f}..{max(r['ratio'] for r in drops):.3f}, "
           f"plateau max |z| {max(abs(r['z']) for r in plateaus):.2f}")
    assert sorted({r["drop"] for r in drops}) == [1, 2, 3] and len(drops) == 6
    assert all(0.8 < r["ratio"] < 1.25 for r in drops)
    assert sorted({r["components"] for r in plateaus}) == [0, 1, 2, 3]
    assert all(r["on_plateau"] and abs(r["z"]) < 4 for r in plateaus)
    # the last plateau read from the iterates' tail average: every seed has a window on it, within 4 SE
    finals = [r for r in rows if r["kind"] == "final"]
    assert len(finals) == 2 and all(r["tail_records"] >= 10 and abs(r["tail_z"]) < 4 for r in finals)
    # the plateaus descend: more components, lower risk
    levels = {r["components"]: r["pcr_risk"] for r in plateaus}
    assert all(levels[k] > levels[k + 1] for k in range(3))
    # the summary's drop ratios per spectrum: the run's three drops under its design's eigenvalues
    by_spectrum = EXPERIMENTS["dynamics_kq"].summary(rows)["drop_ratio_by_spectrum"]
    assert list(by_spectrum) == ["1/0.6/0.35"]
    assert [len(v) for v in by_spectrum["1/0.6/0.35"].values()] == [3]
    assert all(0.8 < x < 1.25 for x in by_spectrum["1/0.6/0.35"]["separate, 3 heads, aligned u0=0.1"])


def test_initial_params_are_the_trained_start():
    """Trained with a vanishing step, fit_sweep's final parameters are its initial ones: initial_params must
    rebuild them exactly (else the population flows would start elsewhere)."""
    module = EXPERIMENTS["dynamics_kq"]
    mod = sys.modules[module.run.__module__]
    design = mod.designs(module.settings)["aniso"]
    model = mod.build("separate", 3, "random", 0.5, design.dim)
    fit = train.fit_sweep(model, design, [8], [4, 9], train.TrainConfig(
        steps=3, batch_size=16, learning_rate=1e-30, optimizer="sgd"))
    start = mod.initial_params(model, [4, 9], 3)
    for got, want in zip(jax.tree_util.tree_leaves(fit.params), jax.tree_util.tree_leaves(start)):
        np.testing.assert_allclose(np.asarray(got)[0, 0], np.asarray(want), rtol=1e-6, atol=1e-25)


@pytest.mark.parametrize("kind,heads", [("merged", 4), ("separate", 3)])
def test_scoring_model_reads_neither_start_nor_scale(kind, heads):
    """run scores every network as ``build(kind, heads, "random", 1.0)`` (one evaluation program per kind and head
    count): the risk of an aligned network at its own scale must be the same numbers, to the last bit, as with
    that scoring model. Planted bug caught: a prediction that read the start or the init scale."""
    module = EXPERIMENTS["dynamics_kq"]
    mod = sys.modules[module.run.__module__]
    design = mod.designs(module.settings)["aniso"]
    model = mod.build(kind, heads, "aligned", 0.3, design.dim)
    params = jax.vmap(model.init)(jax.random.split(jax.random.PRNGKey(0), 2))
    params = jax.tree_util.tree_map(lambda a: a[None, None] * 1.7, params)  # off the start: every entry matters
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    own = evaluate.evaluate_sweep(model, params, design, [8], keys, 2000)
    scored = evaluate.evaluate_sweep(mod.build(kind, heads, "random", 1.0, design.dim), params, design, [8], keys, 2000)
    np.testing.assert_array_equal(np.asarray(scored[0]), np.asarray(own[0]))
    np.testing.assert_array_equal(np.asarray(scored[1]), np.asarray(own[1]))
