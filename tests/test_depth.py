"""iclsim.depth: paired scoring of arbitrary networks, GD-form networks from step sizes, layer orders, what SVD
truncation keeps of a layer's step, the exact best scale of a layer and the depth/step decomposition."""

import jax
import numpy as np
import pytest

from iclsim import IID, depth, models, pruning, sweeps, theory
from tests.tolerance import assert_close, assert_within_se

D, N = 3, 10
DESIGN = IID(D, noise_var=0.1)


def _nets(seeds=2, L=2):
    """The model and ``seeds`` networks, network s its init under PRNGKey(s): one jitted, vmapped init (eager
    inits compile one program per network)."""
    model = models.LinearTransformer(D, L)
    stacked = jax.jit(jax.vmap(model.init))(jax.vmap(jax.random.PRNGKey)(np.arange(seeds)))
    return model, [jax.tree_util.tree_map(lambda a, s=s: np.asarray(a)[s], stacked) for s in range(seeds)]


def test_evaluate_networks_pairs_each_seed_with_its_own_prompts_as_evaluate_candidates_does():
    """The same candidates scored through evaluate_networks and pruning.evaluate_candidates with the same per-seed
    keys give the same risks exactly; with the seeds' keys swapped they do not. Planted bugs caught: keys repeated
    in the wrong layout (seed s's networks on seed s+1's prompts), a reshape that mixes seeds and networks."""
    model, nets = _nets()
    params = jax.tree_util.tree_map(lambda *a: np.stack(a), *nets)
    cands = [pruning.Candidate(0, "attn", None), pruning.Candidate(0, "attn", 1), pruning.Candidate(1, "attn", None,
                                                                                                    "delete")]
    keys = sweeps.stream_keys([0, 1])
    want, want_se = pruning.evaluate_candidates(model, params, DESIGN, N, cands, keys, 2048)
    edited = [[pruning.apply_candidate(p, c) for c in cands] for p in nets]
    got, got_se = depth.evaluate_networks(model, edited, DESIGN, N, keys, 2048)
    assert_close(got, want, rtol=1e-12, name="risk")
    assert_close(got_se, want_se, rtol=1e-12, name="se")
    swapped, _ = depth.evaluate_networks(model, edited, DESIGN, N, keys[::-1], 2048)
    assert not np.allclose(swapped, want, rtol=1e-6)
    with pytest.raises(ValueError, match="equal length"):
        depth.evaluate_networks(model, [[nets[0]], [nets[1], nets[1]]], DESIGN, N, keys, 100)
    with pytest.raises(ValueError, match="keys"):
        depth.evaluate_networks(model, [[nets[0]], [nets[1]]], DESIGN, N, keys[:1], 100)


def test_gd_network_runs_multistep_gd_its_risk_matches_the_closed_form():
    """The GD-form network of steps (0.3, 0.9) has Gamma_l = gamma_l I, and its Monte Carlo risk on 40k prompts
    is within 4 SE of theory.multistep_gd_risk of the same steps. Planted bugs caught: w_v = +1 (steps of the
    wrong sign), Wq = gamma I instead of sqrt(gamma) I (Gamma = gamma^2 I)."""
    steps = [0.3, 0.9]
    model = models.LinearTransformer(D, 2)
    net = depth.gd_network(steps, D)
    assert_close(model.preconditioners(net), np.stack([g * np.eye(D) for g in steps]), rtol=1e-6, atol=1e-7)
    # four copies: the layout (and so the compiled program) of the permuted-steps test below
    mc, mc_se = depth.evaluate_networks(model, [[net] * 4], DESIGN, N, sweeps.stream_keys([3]), 40_000)
    assert np.all(mc == mc[0, 0])
    closed, closed_se = theory.multistep_gd_risk(DESIGN, N, steps)  # the exact form (Wishart moments): se 0
    assert closed_se == 0.0
    assert_within_se(closed, mc[0, 0], float(np.hypot(mc_se[0, 0], closed_se)), "gd_network vs multistep_gd_risk")
    with pytest.raises(ValueError, match="step_sizes"):
        depth.gd_network([0.3, -0.1], D)


def test_permuted_scalar_steps_have_one_risk_and_trained_layers_do_not():
    """Scalar steps commute: the GD network in all 2 orders has the same risk on the same prompts (float32
    rounding, 1e-5); two generic layers in reversed order do not. permute_layers puts original layer order[p]
    at position p. Planted bugs caught: an order applied inverted (checked on 3 layers), a permutation that
    drops or repeats a layer (refused)."""
    model, nets = _nets(1, 3)
    net = nets[0]
    moved = depth.permute_layers(net, (2, 0, 1))
    assert [m["attn"]["w_v"] for m in moved["layers"]] == [net["layers"][i]["attn"]["w_v"] for i in (2, 0, 1)]
    assert np.array_equal(moved["layers"][0]["attn"]["Wq"], net["layers"][2]["attn"]["Wq"])
    with pytest.raises(ValueError, match="permutation"):
        depth.permute_layers(net, (0, 0, 1))
    model2 = models.LinearTransformer(D, 2)
    gd = depth.gd_network([0.4, 1.3], D)
    generic = model2.init(jax.random.PRNGKey(5))
    # 10_000 prompts (40 draw blocks, one round) at n = N: the program of the GD-network test above
    risk, _ = depth.evaluate_networks(model2, [[gd, depth.permute_layers(gd, (1, 0)), generic,
                                                depth.permute_layers(generic, (1, 0))]], DESIGN, N,
                                      sweeps.stream_keys([0]), 10_000)
    assert abs(risk[0, 0] - risk[0, 1]) <= 1e-5 * risk[0, 0]
    assert abs(risk[0, 2] - risk[0, 3]) > 1e-3 * risk[0, 2]


def test_kept_overlap_identical_orthogonal_and_random_subspaces():
    """1 for one matrix pruned twice, 0 for factors whose top directions are orthogonal, and k/d on average for
    independent Gaussian factors (their right singular subspaces are uniformly random), within 4 SE over 4000
    draws. Planted bugs caught: the left singular vectors instead of the right (the diagonal case below has
    orthogonal right subspaces but it is built so the left ones differ too), a missing division by the rank."""
    W = np.diag([3.0, 2.0, 1.0])
    assert depth.kept_overlap(W, W, 2) == pytest.approx(1.0)
    assert depth.kept_overlap(np.diag([3.0, 2.0, 1.0]), np.diag([1.0, 2.0, 3.0]), 1) == pytest.approx(0.0, abs=1e-12)
    # right subspace of A is e_1, its left one e_2: a left-vector version would see overlap 1 with B below
    A = np.zeros((3, 3))
    A[1, 0] = 1.0
    B = np.diag([0.0, 1.0, 0.0]) + 1e-3 * np.eye(3)
    assert depth.kept_overlap(A + 1e-3 * np.eye(3), B, 1) < 1e-3
    rng = np.random.default_rng(0)
    d, k = 5, 2
    draws = np.array([depth.kept_overlap(rng.standard_normal((d, d)), rng.standard_normal((d, d)), k)
                      for _ in range(4000)])
    assert_within_se(k / d, draws.mean(), draws.std(ddof=1) / np.sqrt(draws.size), "random subspace overlap")
    with pytest.raises(ValueError, match="rank"):
        depth.kept_overlap(W, W, 4)


def test_kept_trace_ratio():
    """Full rank keeps the whole step (1); Wq = Wk = diag(3, 2, 1) at rank 1 keeps 9 / 14; factors with
    orthogonal top directions keep nothing. Planted bugs caught: the ratio of Frobenius norms, Wq Wk without
    the transpose on a non-symmetric pair."""
    W = np.diag([3.0, 2.0, 1.0])
    assert depth.kept_trace_ratio(W, W, 3) == pytest.approx(1.0)
    assert depth.kept_trace_ratio(W, W, 1) == pytest.approx(9 / 14)
    assert depth.kept_trace_ratio(W, np.diag([1.0, 2.0, 3.0]), 1) == pytest.approx(0.0, abs=1e-12)
    R = np.random.default_rng(1).standard_normal((3, 3))
    assert depth.kept_trace_ratio(R, R @ np.diag([1, 2, 3]), 3) == pytest.approx(1.0)


def test_best_scale_is_exact_on_the_prompts_it_was_fitted_on():
    """A layer's update scaled by c: the parabola through the paired risks at c = 0, 1, 2 gives the risk at
    c = 0.6 and at its minimiser c* as scored directly on the same prompts (1e-4 relative: float32 forward
    passes), and no grid value of c in 0..2 step 0.1 scores below c*. Planted bugs caught: c* = +b / (2a), a
    parabola with the wrong curvature (r2 - r1 + r0), a prediction that is not affine in c (an update applied
    twice)."""
    model, nets = _nets(1, 3)

    def scored(scales):  # risks of the network with layer 1's update scaled by each c, on seed 2's prompts
        edits = [pruning.apply_candidate(nets[0], pruning.Candidate(1, "attn", None, "scale", c)) for c in scales]
        return depth.evaluate_networks(model, [edits], DESIGN, N, sweeps.stream_keys([2]), 4096)[0][0]

    grid = np.round(np.arange(0.0, 2.01, 0.1), 2)
    # the fit's call holds as many networks (23) as the probe's: one compiled program for both
    risk = scored([0.6, 0.6] + list(grid))
    fit = depth.best_scale(risk[2], risk[12], risk[22])  # c = 0, 1, 2
    probe = [float(fit.best), 0.6] + list(grid)
    direct = scored(probe)[None]
    # the same prompts in both calls (same key, count and layout): the refit on this call's risks is the fit
    fit = depth.best_scale(direct[0, 2], direct[0, 12], direct[0, 22])
    assert_close(fit.risk(np.array(probe)), direct[0], rtol=1e-4, name="parabola vs direct")
    assert direct[0, 2:].min() >= fit.risk(fit.best) * (1 - 1e-4)
    planted = depth.best_scale(2.0, 1.3, 1.6)  # r(c) = 2 - 1.2 c + 0.5 c^2: minimum at c = 1.2
    assert planted.best == pytest.approx(1.2) and planted.risk(3.0) == pytest.approx(2 - 3.6 + 4.5)
    with pytest.raises(ValueError, match="convex"):
        depth.best_scale(1.0, 2.0, 3.0)


def test_delete_control_equals_the_network_without_the_layer():
    """Deleting layer l's step (w_v -> 0) scores exactly as the (L-1)-layer network without layer l, on the same
    prompts (same keys and network count: the same draws). Planted bugs caught: 'delete' zeroing another
    layer, or scaling Wq by 0 in a way that leaves a bias."""
    model, nets = _nets(1, 3)
    keys = sweeps.stream_keys([4])
    deleted = [pruning.apply_candidate(nets[0], pruning.Candidate(l, "attn", None, "delete")) for l in range(3)]
    removed = [{"layers": [a for i, a in enumerate(nets[0]["layers"]) if i != l]} for l in range(3)]
    r3, _ = depth.evaluate_networks(model, [deleted], DESIGN, N, keys, 4096)
    r2, _ = depth.evaluate_networks(models.LinearTransformer(D, 2), [removed], DESIGN, N, keys, 4096)
    assert_close(r3, r2, rtol=1e-5, name="delete vs L-1 layers")
    assert len(set(np.round(r3[0], 6))) == 3  # the three layers differ: the comparison is not vacuous


def test_decompose_recovers_additive_effects_and_splits_every_contrast():
    """On an additive table mu + a_p + b_r the depth effect is a_1 - a_L and the step effect b_1 - b_L with
    no interaction; on a random table every contrast H[0, i] - H[L-1, j] is the sum of its three parts.
    Planted bugs caught: effects taken from rows and columns swapped, a sign flip, an interaction not
    centred."""
    a, b = np.array([0.5, 0.1, -0.2, -0.4]), np.array([1.0, -0.3, 0.2, -0.9])
    dec = depth.decompose(2.0 + a[:, None] + b[None, :])
    assert dec.depth_effect == pytest.approx(0.9) and dec.step_effect == pytest.approx(1.9)
    assert np.abs(dec.interaction).max() < 1e-12
    H = np.random.default_rng(0).standard_normal((4, 4))
    dec = depth.decompose(H)
    for i in range(4):
        for j in range(4):
            assert sum(dec.contrast(i, j)) == pytest.approx(H[0, i] - H[-1, j], abs=1e-12)
    assert dec.depth_effect == pytest.approx(H[0].mean() - H[-1].mean())
    assert dec.step_effect == pytest.approx(H[:, 0].mean() - H[:, -1].mean())
    with pytest.raises(ValueError, match="square"):
        depth.decompose(np.zeros((3, 4)))
