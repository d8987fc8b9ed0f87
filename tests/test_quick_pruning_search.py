"""Paper B's search against controls (experiments/pruning_search.py), quick run: properties of its output that
a wrong protocol, a wrong oracle or a broken pairing would change."""

import sys

import numpy as np
import pytest

from iclsim import quality
from tests.quick import EXPERIMENTS, run_quick
from tests.tolerance import MC_SIGMAS, report

# the quick study's runs are the slow tier (make test's budget); its library pieces are unit-tested in
# tests/test_pruning_search.py
pytestmark = pytest.mark.slow

ALLOWED = {"supported", "contradicted", "not resolved at this sample size", quality.UNSTABLE,
           "not resolved: fewer than 2 passing seeds"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return run_quick("pruning_search", tmp_path_factory.mktemp("pruning_search"))


def _module():
    EXPERIMENTS["pruning_search"]  # discovered: the module is registered
    return sys.modules["iclsim_experiments.pruning_search"]


def _by_seed(rows, setting):
    out = {}
    for r in rows:
        if r["kind"] == "option" and r["setting"] == setting:
            out.setdefault(r["seed"], []).append(r)
    return {sd: sorted(v, key=lambda r: r["option"]) for sd, v in out.items()}


def test_quick_every_seed_scored_and_gated(quick_run):
    """Two bases of s.seeds networks each, every one with the full option list in every setting (unpruned
    first, oracle last) and counted as passed or failed. Planted bugs caught: a base dropped, failed networks
    silently removed, a setting scored on a subset of the options."""
    meta, rows = quick_run
    s = EXPERIMENTS["pruning_search"].quick
    summary = meta["summary"]
    for b in ("A", "B"):
        assert summary["networks_passed"][b] + summary["networks_failed"][b] == s.seeds
    n_options = len(_module().options(s)) + 1
    for setting in ("matched", "noisier test labels", "shorter context"):
        by_seed = _by_seed(rows, setting)
        assert len(by_seed) == 2 * s.seeds
        for opts in by_seed.values():
            assert [r["option"] for r in opts] == list(range(n_options))
            assert opts[0]["family"] == "unpruned" and opts[-1]["family"] == "oracle"
            assert opts[0]["test_change"] == 0.0


def test_quick_no_edit_beats_the_unpruned_network_on_matched(quick_run):
    """On the training distribution no edit (pruning or control) is better on test than the unpruned network
    beyond Monte Carlo error (4 SE of the unpaired difference), and the joint search's median change is not
    negative on either base. Planted bugs caught: edits applied to the wrong seed's network or scored on
    other prompts, a sign flip in test_change."""
    _, rows = quick_run
    worst = np.inf
    for opts in _by_seed(rows, "matched").values():
        base = opts[0]
        for r in opts[1:-1]:
            z = (r["test_risk"] - base["test_risk"]) / np.hypot(r["test_se"], base["test_se"])
            worst = min(worst, z)
            assert z >= -MC_SIGMAS, r
            assert np.sign(r["test_change"]) == np.sign(r["test_risk"] - base["test_risk"])
    report(f"pruning_search quick: matched, smallest (edit - unpruned) / SE = {worst:.2f}")


def test_quick_oracle_is_the_floor_on_shifted_settings(quick_run):
    """Under noisier labels and a shorter context, the best L-step GD re-tuned for the test distribution is
    at or below every other option's test risk, up to 4 SE. Planted bugs caught: an oracle network with the
    wrong step convention (Wq = gamma I, a step gamma^2) or sign (w_v = +1). Its 4-SE slack is unpaired, so
    an oracle tuned for the training design is caught only where re-tuning gains more than that (not
    claimed here)."""
    _, rows = quick_run
    for setting in ("noisier test labels", "shorter context"):
        for opts in _by_seed(rows, setting).values():
            oracle = opts[-1]
            for r in opts[:-1]:
                assert r["test_risk"] >= oracle["test_risk"] - MC_SIGMAS * np.hypot(r["test_se"], oracle["test_se"]), \
                    (setting, r, oracle)


def test_quick_protocols_pick_the_validation_minimum(quick_run):
    """Recomputed from the rows: the joint search's recorded choice is the first validation minimum over the
    unpruned network and the SVD options; paper B's protocol on a fixed layer picks among that layer's
    ranks only; the summary's verdicts are the allowed words and across-bases agrees with the two bases.
    Planted bugs caught: a choice made on test prompts, a per-layer protocol that looks at other layers,
    an across-bases verdict 'supported' where one base is not."""
    meta, rows = quick_run
    mod = _module()
    for setting in ("matched", "noisier test labels", "shorter context"):
        seed_rows = {r["seed"]: r for r in rows if r["kind"] == "seed" and r["setting"] == setting}
        for sd, opts in _by_seed(rows, setting).items():
            pool = [opts[0]] + [r for r in opts if r["family"] == "svd"]
            best = min(r["val_risk"] for r in pool)
            assert seed_rows[sd]["joint_choice"] == next(r["option"] for r in pool if r["val_risk"] == best)
            for layer in (1, 2):
                pick = mod.choose(opts, "svd", layer)
                assert pick["family"] == "unpruned" or pick["layer"] == layer
                same_layer = [opts[0]] + [r for r in opts if r["family"] == "svd" and r["layer"] == layer]
                assert pick["val_risk"] == min(r["val_risk"] for r in same_layer)
        for name, entry in meta["summary"]["claims"][setting].items():
            if name == "null_and_robust":
                continue
            assert {entry["A"]["verdict"], entry["B"]["verdict"], entry["across_bases"]} <= ALLOWED, name
            if entry["across_bases"] in ("supported", "contradicted"):
                assert entry["A"]["verdict"] == entry["B"]["verdict"] == entry["across_bases"], name


def test_paper_b_protocol_ties_go_to_the_smaller_rate():
    """On hand-made rows: layer 2's options at ranks 4, 2, 1 (rates 0.1, 0.5, 0.75) where ranks 4 and 2 tie
    on validation and layer 1 holds a lower risk: the protocol on layer 2 picks rank 4 (the smaller rate),
    never layer 1's option; where the unpruned network ties, it is kept. Planted bugs caught: ties to the
    larger rate, the fixed layer ignored."""
    choose = _module().choose

    def row(option, family, layer, rank, val):
        return {"option": option, "family": family, "layer": layer, "rank": rank, "val_risk": val,
                "test_change": 0.01 * option}

    opts = [row(0, "unpruned", None, None, 1.0), row(1, "svd", 1, 4, 0.2), row(2, "svd", 1, 2, 0.9),
            row(3, "svd", 2, 4, 0.5), row(4, "svd", 2, 2, 0.5), row(5, "svd", 2, 1, 0.7)]
    assert choose(opts, "svd", 2)["option"] == 3
    assert choose(opts, "svd", 1)["option"] == 1
    assert choose(opts, "svd")["option"] == 1
    opts[0]["val_risk"] = 0.5
    assert choose(opts, "svd", 2)["option"] == 0
