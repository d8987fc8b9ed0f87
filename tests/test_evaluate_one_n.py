"""One context length for every point: ``evaluate_sweep`` passes n once, unbatched, so that the networks of a
block (one key, one design: a seed's pruned networks) share one draw. The numbers are those of the per-member
program to round-off, on the same prompts, padded or not."""

import jax
import numpy as np
import pytest

from iclsim import IID, evaluate, models, pruning, sweeps


def _networks(model, seeds, k, key):
    params = jax.vmap(model.init)(jax.random.split(key, seeds * k))
    return jax.tree_util.tree_map(lambda a: np.asarray(a).reshape((seeds, k) + a.shape[1:]), params)


@pytest.mark.parametrize("n, n_slots", [(20, None), (7, 12)])  # n_slots None: n + 1
def test_one_n_program_equals_the_per_member_program(key, n, n_slots):
    """The same sums from the one-n program and from the program that takes n per member, for a seed's
    networks on its own prompts (a GD-form transformer on Gram draws) and with the context padded."""
    model, seeds, k = models.LinearTransformer(4, 3), 3, 5
    nets = _networks(model, seeds, k, key)
    design = IID(4, noise_var=0.2)
    keys = sweeps.stream_keys(list(range(seeds)), 5)
    slots = max(n + 1, n_slots or 0)  # the same slots for both programs (the draw depends on them)
    flat = jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[2:]), nets)
    one, one_se = evaluate.evaluate_sweep(model, jax.tree_util.tree_map(lambda a: a[None, None], flat), design, [n],
                                          np.repeat(keys, k, axis=0), 3000, n_slots=slots)
    # the per-member program: a second context length makes n vary over the points; its first column is n
    stacked = jax.tree_util.tree_map(lambda a: np.stack([a] * 2)[None], flat)
    both, both_se = evaluate.evaluate_sweep(model, stacked, design, [n, n + 1], np.repeat(keys, k, axis=0), 3000,
                                            n_slots=slots)
    one, one_se = np.reshape(one, -1), np.reshape(one_se, -1)
    np.testing.assert_allclose(one, both[0, 0], rtol=1e-6)
    np.testing.assert_allclose(one_se, both_se[0, 0], rtol=1e-5)
    assert not np.allclose(both[0, 0], both[0, 1], rtol=1e-3)  # the second column is another context length


def test_one_n_scores_each_network_on_its_seeds_prompts(key):
    """A seed's networks share its prompts, other seeds see others: a network scored alone on its seed's
    key gives its number in the block (to round-off)."""
    model, seeds, k = models.LinearTransformer(3, 2), 2, 4
    nets = _networks(model, seeds, k, key)
    design = IID(3, noise_var=0.1)
    keys = sweeps.stream_keys([10, 11], 5)
    risk, _ = pruning.evaluate_networks(model, nets, design, 15, keys, 2000)
    for s in range(seeds):
        for j in (0, k - 1):
            alone = jax.tree_util.tree_map(lambda a: a[s:s + 1, j:j + 1], nets)
            r, _ = pruning.evaluate_networks(model, alone, design, 15, keys[s:s + 1], 2000)
            np.testing.assert_allclose(r[0, 0], risk[s, j], rtol=1e-6)
