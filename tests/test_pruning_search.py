"""The pieces of paper B's search protocol and its controls (iclsim.pruning): the clipping-rate grid as kept
ranks, the validation choice, the oracle GD-form network, paired evaluation of arbitrary networks, and the
robust per-prompt summary of a heavy-tailed change."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclsim import IID, models, montecarlo, pruning, sweeps, theory
from tests.tolerance import assert_close, assert_within_se

F64 = jnp.float64


def test_rate_grid_as_kept_ranks_on_d5():
    """Paper B's grid {0, .1, .5, .75, .9, .95, .99, .995} on a 5x5 matrix keeps floor(5 (1 - rate)) values, at
    least 1: 5 (the unpruned network), 4, 2, 1, 1, 1, 1, 1, so four distinct networks; on 8x8 five
    (8, 7, 4, 2, 1). Planted bugs caught: rounding or ceiling the kept rank (0.1 -> 5 or 0.5 -> 3), keeping
    rank 0 (no lower clip), the full rank scored as a pruned candidate, duplicates kept, the largest rate
    (instead of the smallest) named for a collapsed rank."""
    assert pruning.ranks_for_rates((5, 5), pruning.DEFAULT_RATES, distinct=False) == [5, 4, 2, 1, 1, 1, 1, 1]
    assert pruning.rate_options((5, 5)) == [(0.0, None), (0.1, 4), (0.5, 2), (0.75, 1)]
    assert pruning.rate_options((8, 8)) == [(0.0, None), (0.1, 7), (0.5, 4), (0.75, 2), (0.9, 1)]
    assert pruning.rate_options((5, 5), [0.5, 0.9]) == [(0.5, 2), (0.9, 1)]
    with pytest.raises(ValueError, match="rates must be a non-empty increasing sequence"):
        pruning.rate_options((5, 5), [0.5, 0.1])
    with pytest.raises(ValueError, match="rates must be a non-empty increasing sequence"):
        pruning.rate_options((5, 5), [])


def test_validation_choice_is_the_first_minimum():
    """Per row the lowest validation risk; a tie goes to the earlier option (the smaller clipping rate, the
    unpruned network first), NaN is never chosen. Planted bugs caught: argmax (paper B maximises accuracy,
    we minimise risk), the last of tied minima (the larger rate), a NaN risk taken as the minimum."""
    val = [[1.0, 0.5, 0.5, 0.7],
           [0.3, 0.3, 0.2, 0.2],
           [0.1, 0.2, 0.3, 0.4],
           [np.nan, 0.2, 0.1, 0.1]]
    assert list(pruning.select_on_validation(val)) == [1, 2, 0, 2]
    with pytest.raises(ValueError, match="no finite risk"):
        pruning.select_on_validation([[np.nan, np.nan]])
    with pytest.raises(ValueError, match=r"val_risk must be \[seeds, options\]"):
        pruning.select_on_validation([0.1, 0.2])


def test_robust_change_by_hand():
    """before = [1, 2, 3, 4, 100], after = [3, 3, 1, 5, 300], quantile 0.75: mean change (62.4 - 22) / 22;
    threshold c = 4 (the before-errors' 0.75 quantile), clipped means 2.8 -> 3.0, change 0.2 / 2.8; per-prompt
    differences [2, 1, -2, 1, 200] with median 1 (/ 22); the top round(0.25 x 5) = 1 prompt carries 200 of the
    total 202. Planted bugs caught: the threshold taken from the after-errors (c = 5: change 0.5/2.8 - ...),
    only one network clipped, the median of the ratio instead of the difference, the top share over the
    smallest differences."""
    rc = pruning.robust_change([1, 2, 3, 4, 100], [3, 3, 1, 5, 300], quantile=0.75)
    assert_close(rc.mean_change, (62.4 - 22) / 22, rtol=1e-12)
    assert_close(rc.winsorised_change, (3.0 - 2.8) / 2.8, rtol=1e-12)
    assert_close(rc.median_difference, 1 / 22, rtol=1e-12)
    assert_close(rc.top_share, 200 / 202, rtol=1e-12)
    assert rc.count == 5 and rc.quantile == 0.75
    same = pruning.robust_change([1, 2, 3], [1, 2, 3], 0.5)
    assert same.mean_change == same.winsorised_change == same.median_difference == 0.0 and np.isnan(same.top_share)
    with pytest.raises(ValueError, match="paired arrays"):
        pruning.robust_change([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=r"quantile must be in \(0, 1\)"):
        pruning.robust_change([1, 2, 3], [1, 2, 3], 1.0)
    with pytest.raises(ValueError, match="finite squared errors"):
        pruning.robust_change([1, -2, 3], [1, 2, 3])


def test_oracle_network_is_multistep_gd(key):
    """The GD-form network of ``multistep_gd_params`` has Gamma_l = gamma_l I exactly (negative steps too) and
    its Monte Carlo risk is the closed-form L-step GD risk (4 SE). Planted bugs caught: w_v = +1 (the
    network ascends), Wq = gamma I (a step gamma^2), a negative step's sign lost."""
    d, n = 3, 7
    steps = [0.4, -0.2, 1.1]
    model = models.LinearTransformer(d, len(steps), dtype=F64)
    params = pruning.multistep_gd_params(d, steps, F64)
    assert_close(model.preconditioners(params), np.stack([g * np.eye(d) for g in steps]), rtol=1e-12, atol=1e-12)
    design = IID(d, noise_var=0.5)
    exact, exact_se = theory.multistep_gd_risk(design, n, steps)  # the exact form (Wishart moments)
    assert exact_se == 0.0
    mean, se = theory.monte_carlo_risk(lambda p: model.apply(params, p), design, n, key, 100_000)
    assert_within_se(exact, mean, se, name="oracle GD-form network vs multistep_gd_risk")
    with pytest.raises(ValueError, match="step_sizes must be a non-empty 1-D array"):
        pruning.multistep_gd_params(d, [])


def test_evaluate_networks_pairs_within_a_seed_and_matches_evaluate_candidates(key):
    """[seeds, k] networks: a seed's k networks share its prompts (two copies of one network score
    identically), and the edits of ``evaluate_candidates`` scored through ``evaluate_networks`` (same count of
    networks, so the same prompts) give the same risks. Planted bugs caught: the [seeds, k] axes flattened in
    the wrong order (a network scored on another seed's prompts), keys not repeated per network."""
    d, L = 3, 2
    model = models.LinearTransformer(d, L)
    params = jax.jit(jax.vmap(model.init))(jnp.stack([jax.random.PRNGKey(s) for s in (1, 2)]))
    cands = [pruning.Candidate(0, "attn", None), pruning.Candidate(1, "attn", 1), pruning.Candidate(0, "attn", None)]
    keys = sweeps.stream_keys([1, 2], 5)
    expected, _ = pruning.evaluate_candidates(model, params, IID(d), 6, cands, keys, 2_000)
    # the edits made here under vmap, in one jitted program (evaluate_candidates makes them seed by seed)
    nets = jax.jit(lambda ps: jax.tree_util.tree_map(lambda *a: jnp.stack(a, axis=1), *[
        jax.vmap(lambda p, c=c: pruning.apply_candidate(p, c))(ps) for c in cands]))(params)
    risk, se = pruning.evaluate_networks(model, nets, IID(d), 6, keys, 2_000)
    assert_close(risk, expected, rtol=1e-12)
    assert risk[0, 0] == risk[0, 2] and risk[1, 0] == risk[1, 2]
    assert np.all(se > 0) and risk[0, 0] != risk[1, 0]


def test_candidate_networks_built_once_give_the_search_and_scores_of_the_candidates(key):
    """``candidate_networks`` is what ``evaluate_candidates`` scores ([seeds, candidates], seed-major);
    ``select_networks`` picks candidates by position; ``search`` on networks built beforehand gives the same
    result as building them itself and scores the networks it is given (two swapped candidates swap its
    columns); networks of another shape, without the unpruned networks first, or selected by an empty, float or
    boolean index are refused. Planted bugs caught: the axes in candidate-major order, a selection along the
    seed axis, ``networks`` ignored (rebuilt from ``candidates``)."""
    d, L = 3, 2
    model = models.LinearTransformer(d, L)
    params = jax.jit(jax.vmap(model.init))(jnp.stack([jax.random.PRNGKey(s) for s in (3, 4)]))
    cands = [pruning.Candidate(0, "attn", None), pruning.Candidate(1, "attn", 1), pruning.Candidate(0, "attn", 2),
             pruning.Candidate(1, "attn", None, "delete")]
    nets = pruning.candidate_networks(params, cands)
    one = pruning.apply_candidate(jax.tree_util.tree_map(lambda a: a[1], params), cands[2])
    for a, b in zip(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a: a[1, 2], nets)),
                    jax.tree_util.tree_leaves(one)):
        np.testing.assert_array_equal(a, np.asarray(b))
    keys, val_keys = sweeps.stream_keys([3, 4], 5), sweeps.stream_keys([3, 4], 6)
    expected, _ = pruning.evaluate_candidates(model, params, IID(d), 6, cands, keys, 2_000)
    risk, _ = pruning.evaluate_networks(model, nets, IID(d), 6, keys, 2_000)
    np.testing.assert_array_equal(risk, expected)
    sub = [0, 2]
    picked, _ = pruning.evaluate_networks(model, pruning.select_networks(nets, sub), IID(d), 6, keys, 2_000)
    alone, _ = pruning.evaluate_candidates(model, params, IID(d), 6, [cands[j] for j in sub], keys, 2_000)
    np.testing.assert_array_equal(picked, alone)
    built = pruning.search(model, params, IID(d), 6, cands[:3], val_keys, keys, 1_000, 2_000)
    given = pruning.search(model, params, IID(d), 6, cands[:3], val_keys, keys, 1_000, 2_000,
                           networks=pruning.select_networks(nets, [0, 1, 2]))
    for a, b in zip(built[1:], given[1:]):
        np.testing.assert_array_equal(a, b)
    # the networks given are the ones scored: candidates 2 and 1 swapped swap the search's columns
    swapped = pruning.search(model, params, IID(d), 6, cands[:3], val_keys, keys, 1_000, 2_000,
                             networks=pruning.select_networks(nets, np.array([0, 2, 1])))
    np.testing.assert_allclose(swapped.val_risk, built.val_risk[:, [0, 2, 1]], rtol=1e-6)  # position: round-off
    assert not np.allclose(swapped.val_risk, built.val_risk, rtol=1e-3)
    with pytest.raises(ValueError, match="networks must have leading axes"):
        pruning.search(model, params, IID(d), 6, cands[:3], val_keys, keys, 1_000, 2_000, networks=nets)
    with pytest.raises(ValueError, match="must be the unpruned networks"):
        pruning.search(model, params, IID(d), 6, cands[:3], val_keys, keys, 1_000, 2_000,
                       networks=pruning.select_networks(nets, [1, 0, 2]))
    for bad in ([], [0.5, 1.0], np.array([True, False, True, False])):
        with pytest.raises(ValueError, match="indices must be a non-empty list of integer positions"):
            pruning.select_networks(nets, bad)


def test_prompt_errors_are_paired_and_unbiased(key):
    """Per-prompt errors of [network, same network, other network] on one key: the copies agree prompt by
    prompt, their mean is the oracle's closed-form risk (4 SE), and the paired change of a network to itself
    is exactly 0. The prompts are the referee's (``montecarlo``): the mean is ``montecarlo.risk``'s on the same
    key, and a smaller count or another memory batch gives a prefix of the same errors. Planted bugs caught:
    each network on its own prompts (unpaired), the prediction compared with a context label instead of
    y_query, prompts drawn per memory batch (a layout-dependent test set)."""
    d, n = 3, 6
    model = models.LinearTransformer(d, 2)
    design = IID(d, noise_var=0.3)
    gd = pruning.multistep_gd_params(d, [0.5, 0.8])
    other = pruning.apply_candidate(gd, pruning.Candidate(1, "attn", None, "delete"))
    three = jax.tree_util.tree_map(lambda *a: jnp.stack(a), gd, gd, other)
    err = pruning.prompt_errors(model, three, design, n, key, 50_000)
    # exactly the count, the same prompts whatever the batch (float32 predictions may round 1 ulp apart
    # when another number of blocks is vmapped; other prompts would differ at O(1))
    np.testing.assert_allclose(pruning.prompt_errors(model, three, design, n, key, 25_001, batch=1_000),
                               err[:, :25_001], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(err[0], err[1])
    referee = montecarlo.risk(lambda p: model.apply(gd, p), design, n, key, 50_000, dtype=model.dtype)
    assert_close(err[0].mean(), referee.mean, rtol=1e-6)  # float32 predictions, one network or three vmapped
    exact, exact_se = theory.multistep_gd_risk(design, n, [0.5, 0.8])  # the exact form (Wishart moments)
    assert exact_se == 0.0
    assert_within_se(exact, err[0].mean(), err[0].std() / np.sqrt(err.shape[1]), name="prompt_errors mean")
    # 50_000 prompts as below: one compiled program for both paired changes
    assert pruning.paired_prompt_change(model, gd, gd, design, n, key, 50_000).mean_change == 0.0
    rc = pruning.paired_prompt_change(model, gd, other, design, n, key, 50_000, quantile=0.99)
    assert_close(rc.mean_change, (err[2].mean() - err[0].mean()) / err[0].mean(), rtol=1e-9)
