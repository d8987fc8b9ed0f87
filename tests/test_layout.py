"""Numbers independent of the layout: the prompts a key gives, and so every Monte Carlo number, do not
depend on the batch size, on how many networks share a device, on the device count or on the memory
bound (``montecarlo``: fixed draw blocks, block b from fold_in(key, b); memory batching groups whole
blocks and the block sums are added in block order). Every comparison here is bit for bit.

The suite runs with four forced host devices (tests/conftest.py sets
--xla_force_host_platform_device_count=4), so one device and four are compared in one process by
passing ``devices``: the same sharded program a 4-device machine runs.

Bit for bit holds for float64 models: the prompts are identical. A float32 model's predictions are rounded
in float32 by whichever dot kernel XLA picks for the shapes at hand (one network, or several vmapped
together), so its risk may move by float32 rounding (measured: 3.8e-8 relative for one-layer attention,
about 1e-6 of its Monte Carlo SE); those are compared at rtol 1e-6 and, within one program shape (stacked
copies, 1 vs 4 devices for the one-layer model), bit for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dataclasses

import iclsim.evaluate as evaluation
from iclsim import IID, models, montecarlo, theory
from iclsim.evaluate import evaluate, evaluate_sweep
from iclsim.gram import draw

KEY = jax.random.PRNGKey(31)
D, N = 3, 6
NUM = 2_600  # not a multiple of DRAW_BLOCK: the last block is masked


def _networks(model, count: int):
    """``count`` different parameter sets of ``model`` (its init under keys PRNGKey(100 + i)), stacked
    [count, ...]: one jitted, vmapped init (one program, where eager inits compile one per network)."""
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(100, 100 + count))
    return jax.tree_util.tree_map(np.asarray, jax.jit(jax.vmap(model.init))(keys))


def _sweep(model, seeds: int = 4):
    """A sweep of 24 points: 6 designs x 1 n x ``seeds`` seeds (24 / seeds copies of the seed axis), each
    point a different network; point (2, 0, 1) is the network ``alone`` scores by itself."""
    designs = [IID(D, noise_var=v) for v in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)]
    flat = _networks(model, len(designs) * seeds)
    params = jax.tree_util.tree_map(lambda a: a.reshape((len(designs), 1, seeds) + a.shape[1:]), flat)
    alone = jax.tree_util.tree_map(lambda a: a[2, 0, 1], params)
    return designs, params, alone


def _devices():
    devices = jax.devices()
    assert len(devices) >= 4, "tests/conftest.py forces 4 host devices; this test needs them"
    return devices


MODELS = {"attention": models.LinearAttention(D), "two-layer": models.LinearTransformer(D, 2)}


@pytest.mark.parametrize("name, dtype", [
    pytest.param("attention", jnp.float64, marks=pytest.mark.slow),  # make test's budget: float32 attention stays
    pytest.param("two-layer", jnp.float64, marks=pytest.mark.slow),
    ("attention", jnp.float32)])
def test_a_network_scores_the_same_alone_in_a_sweep_of_24_and_on_1_or_4_devices(name, dtype):
    """One network scored alone, inside a sweep of 24 networks (one shared key), and the sweep on one
    device or four: identical risks and SEs, bit for bit in float64 (float32: rtol 1e-6, the rounding of
    the predictions; see the module docstring). Catches evaluation batches sized by the number of networks
    per device (the old ``min(batch_size, MAX_BATCH // networks)`` moved these risks by whole SEs) and
    block sums added in an order that depends on the grouping."""
    model = dataclasses.replace(MODELS[name], dtype=dtype)
    designs, params, alone = _sweep(model)
    one = evaluate(model, alone, designs[2], N, KEY, NUM)
    risk1, se1 = evaluate_sweep(model, params, designs, [N], KEY, NUM, devices=_devices()[:1])
    risk4, se4 = evaluate_sweep(model, params, designs, [N], KEY, NUM, devices=_devices()[:4])
    assert len(np.unique(risk1)) == risk1.size  # 24 different networks: a sweep that scored one would fail
    if dtype == jnp.float64:
        assert (risk1[2, 0, 1], se1[2, 0, 1]) == one
        np.testing.assert_array_equal(risk1, risk4)
        np.testing.assert_array_equal(se1, se4)
    else:
        np.testing.assert_allclose([risk1[2, 0, 1], se1[2, 0, 1]], one, rtol=1e-6)
        np.testing.assert_allclose(risk1, risk4, rtol=1e-6)
        np.testing.assert_allclose(se1, se4, rtol=1e-6)


def test_per_seed_keys_and_stacked_copies_score_alike_across_layouts():
    """A key per seed (each seed its own test set): the point of seed s scored alone with key s equals
    its score in the sweep, and four stacked copies of one network in a sweep score identically on 1
    and 4 devices. Catches a block key taken from the wrong seed row and copies that see different
    prompts because they sit in different device blocks."""
    model = dataclasses.replace(MODELS["attention"], dtype=jnp.float64)
    designs, params, alone = _sweep(model)
    keys = np.stack([np.asarray(jax.random.fold_in(KEY, s)) for s in range(4)])
    risk, se = evaluate_sweep(model, params, designs, [N], keys, NUM, devices=_devices()[:4])
    assert (risk[2, 0, 1], se[2, 0, 1]) == evaluate(model, alone, designs[2], N, keys[1], NUM)
    copies = jax.tree_util.tree_map(lambda a: np.broadcast_to(a[2:3, :, 1:2], (1, 1, 4) + a.shape[3:]), params)
    for devices in (_devices()[:1], _devices()[:4]):
        r, s = evaluate_sweep(model, copies, designs[2], [N], KEY, NUM, devices=devices)
        assert np.all(r == r[0, 0, 0]) and np.all(s == s[0, 0, 0])
        assert (r[0, 0, 0], s[0, 0, 0]) == evaluate(model, alone, designs[2], N, KEY, NUM)


def _groupings(monkeypatch, cases):
    """``evaluate_sweep`` of 6 networks on one device at 2600 prompts (11 blocks), token draws (n = 6) and
    Gram draws (n_slots = 24 > d / 2 + 9), under each (MAX_BATCH, batch_size) of ``cases``: {n: [(risk, se)]}
    and the blocks per round each case groups (2048 prompts per network a round at MAX_BATCH 12288)."""
    model = dataclasses.replace(MODELS["attention"], dtype=jnp.float64)
    designs, params, _ = _sweep(model)
    params = jax.tree_util.tree_map(lambda a: a[:, :, :1], params)  # 6 networks
    results = {N: [], 24: []}
    for bound, batch in cases:
        monkeypatch.setattr(evaluation, "MAX_BATCH", bound)
        for n in results:
            results[n].append(evaluate_sweep(model, params, designs, [n], KEY, NUM, batch_size=batch,
                                             devices=_devices()[:1]))
    return results, [montecarlo.group_size(NUM, min(b, m // 6)) for m, b in cases]


def _assert_same_numbers(results, exact):
    """Token draws: every case bit for bit. Gram draws: the cases of several blocks a round (the first
    ``exact``) bit for bit, a round of one block (the rest) to float64 rounding (rtol 1e-13)."""
    for risk, se in results[N][1:]:
        np.testing.assert_array_equal(results[N][0][0], risk)
        np.testing.assert_array_equal(results[N][0][1], se)
    gram = results[24]
    for risk, se in gram[1:exact]:
        np.testing.assert_array_equal(gram[0][0], risk)
        np.testing.assert_array_equal(gram[0][1], se)
    for risk, se in gram[exact:]:
        np.testing.assert_allclose(gram[0][0], risk, rtol=1e-13)
        np.testing.assert_allclose(gram[0][1], se, rtol=1e-13)


def test_memory_bound_and_batch_size_only_group(monkeypatch):
    """Three batch sizes give the same numbers: a sweep of 6 networks on one device at 2600 prompts (11
    blocks) grouped 8 blocks per round (MAX_BATCH 12288, batch_size 10000), 3 (batch 777) and 1 (batch 250).
    Bit for bit on token draws (n = 6); on Gram draws (n_slots = 24 > d / 2 + 9) bit for bit between rounds
    of several blocks, and to float64 rounding (rtol 1e-13; measured 1.5e-16) when a round holds one block,
    where XLA drops the size-1 axis and may pick other kernels for the Gram model's small products. Catches
    a draw or a sum whose result depends on how many blocks a round holds (other prompts move these risks by
    about one SE). The second memory bound is test_memory_bound_only_groups_fuzzed (slow tier)."""
    results, groups = _groupings(monkeypatch, ((12_288, 10_000), (12_288, 777), (12_288, 250)))
    assert groups == [8, 3, 1]
    _assert_same_numbers(results, exact=2)


@pytest.mark.slow
def test_memory_bound_only_groups_fuzzed(monkeypatch):
    """The memory bound as the test above checks the batch size: MAX_BATCH 3000 groups 2 blocks a round
    (6 networks x 500 prompts) and gives the numbers of 8 blocks a round (MAX_BATCH 12288), bit for bit on
    token and Gram draws. Catches prompts that depend on the number of networks sharing the bound."""
    results, groups = _groupings(monkeypatch, ((12_288, 10_000), (3_000, 10_000)))
    assert groups == [8, 2]
    _assert_same_numbers(results, exact=2)


def test_block_sums_are_the_first_count_draws_of_the_block_stream():
    """``block_sums`` of 600 draws = the sums, computed here directly, of block 0 and block 1 (from
    fold_in(key, 0) and fold_in(key, 1)) and the first 100 draws of block 2, for every grouping. Catches
    a wrong key per block, a mask off by one and a tail block counted whole."""
    B = montecarlo.DRAW_BLOCK

    def values(k):
        return jax.random.normal(k, (B,), jnp.float64) ** 2 + 1.0

    count = 2 * B + 100
    direct = np.concatenate([np.asarray(values(jax.random.fold_in(KEY, b))) for b in range(3)])[:count]
    for group in (1, 2, 3, 5):
        total, total_sq = jax.jit(lambda k, g=group: montecarlo.block_sums(values, k, count, g))(KEY)
        np.testing.assert_allclose([float(total), float(total_sq)], [direct.sum(), (direct**2).sum()], rtol=1e-13)


def test_risk_moments_and_monte_carlo_risk_do_not_depend_on_the_batch():
    """``theory.risk_moments`` over chunks x batch = 5000 prompts as (20, 250), (2, 2500) and (1, 5000),
    and ``theory.monte_carlo_risk`` at batch sizes 250 and 100_000 (1 and 20 blocks a round; 1000 in
    test_monte_carlo_risk_batch_fuzzed, slow tier): identical, bit for bit; a prefix of 2500 prompts
    scores the first half of the 5000. Catches chunked draws keyed by chunk (fold_in(key, chunk)) rather
    than by fixed block."""
    design = IID(D, noise_var=0.3)
    W, _ = theory.optimal_pgd(design, N)
    predict = theory.pgd_predict(W)
    moments = {b: jax.jit(lambda k, c, b=b: theory.risk_moments(predict, design, N, N, k, c, b, jnp.float64))
               for b in (250, 2500, 5000)}  # chunks traced: one program per batch
    sums = [moments[b](KEY, c) for c, b in ((20, 250), (2, 2500), (1, 5000))]
    for other in sums[1:]:
        assert (float(other[0]), float(other[1])) == (float(sums[0][0]), float(sums[0][1]))
    estimates = {theory.monte_carlo_risk(predict, design, N, KEY, 5_000, b) for b in (250, 100_000)}
    assert len(estimates) == 1
    half = moments[250](KEY, 10)

    @jax.jit
    def errors(k):  # the squared errors of block k's prompts, written out here
        p = draw(design, k, montecarlo.DRAW_BLOCK, N, N, jnp.float64)
        return (p.y_query - predict(p)) ** 2

    first = np.asarray(jax.vmap(lambda b: errors(jax.random.fold_in(KEY, b)))(jnp.arange(10))).ravel()
    np.testing.assert_allclose(float(half[0]), first.sum(), rtol=1e-12)
    assert float(half[0]) < float(sums[0][0])


@pytest.mark.slow
def test_monte_carlo_risk_batch_fuzzed():
    """``theory.monte_carlo_risk`` at batch 1000 (4 blocks a round) gives the numbers of batches 250 and
    100_000, bit for bit (the test above, at a third grouping)."""
    design = IID(D, noise_var=0.3)
    predict = theory.pgd_predict(theory.optimal_pgd(design, N)[0])
    estimates = {theory.monte_carlo_risk(predict, design, N, KEY, 5_000, b) for b in (250, 1_000, 100_000)}
    assert len(estimates) == 1


def test_bayes_risk_does_not_depend_on_the_batch():
    """``theory.bayes_risk`` (the one Monte Carlo case: noisy labels) at batch sizes 250 and 5000: identical.
    Catches its draws keyed by batch."""
    design = IID(D, noise_var=0.5)
    assert theory.bayes_risk(design, 4, KEY, 2_000, 250) == theory.bayes_risk(design, 4, KEY, 2_000, 5_000)


# ---- named random streams (rng.Stream): the experiments' keys are unchanged ----

# the offsets below 2**32 - 1 the experiments used before the names (experiments/*.py at fd749e7), and the
# engine's own streams (RECORD, PRETRAINING)
OLD_OFFSETS = {"TEST": 0, "DEPTH_TEST": 1, "TRAJECTORY_TEST": 2, "VALIDATION": 3, "SEARCH_TEST": 4, "NULL": 5,
               "ONE_LAYER_TEST": 6, "RECORD": 7, "PRETRAINING": 8, "FINAL": 9, "REFERENCE": 11}


def test_named_streams_keep_the_experiments_keys():
    """Each named stream is the integer its experiment folded in before (2**32 - 1 - offset), and
    ``stream_keys`` gives fold_in(PRNGKey(seed), stream) made with jax.random itself, for negative and
    large seeds too; the L-step reference stream is 2**32 - 11 - L. Catches a renumbered stream (every
    committed figure's test prompts would move) and host-made seed keys that differ from PRNGKey."""
    from iclsim import rng, sweeps

    assert {s.name: 2**32 - 1 - int(s) for s in rng.Stream} == OLD_OFFSETS
    assert sweeps.TEST_STREAM == 2**32 - 1
    seeds = [0, 7, -3, 2**40]
    for stream in rng.Stream:
        direct = np.stack([np.asarray(jax.random.fold_in(jax.random.PRNGKey(s), np.uint32(2**32 - 1 - OLD_OFFSETS[
            stream.name]))) for s in seeds])
        np.testing.assert_array_equal(rng.stream_keys(seeds, stream), direct)
        np.testing.assert_array_equal(sweeps.stream_keys(seeds, stream), direct)
        np.testing.assert_array_equal(rng.stream_key(seeds[1], stream), direct[1])
    assert [rng.reference_stream(L) for L in (1, 2, 3, 4)] == [2**32 - 11 - L for L in (1, 2, 3, 4)]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"steps must be an integer in \[1, "):
            rng.reference_stream(bad)
    with pytest.raises(ValueError, match=r"stream must be an integer in \[0, 4294967295\]"):
        rng.stream_keys([0], 2**32)
