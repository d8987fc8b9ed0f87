"""One context length for every point: ``evaluate_sweep`` passes n once, unbatched, so that the networks of a
block (one key, one design: a seed's pruned networks) share one draw. The numbers are those of the per-member
program to round-off, on the same (padded) prompts. A network scored alone against its number in a block:
tests/test_paper_b.py::test_vmapped_evaluation_scores_each_network_as_alone."""

import jax
import numpy as np
from iclsim import IID, evaluate, models, sweeps


def _networks(model, seeds, k, key):
    params = jax.vmap(model.init)(jax.random.split(key, seeds * k))
    return jax.tree_util.tree_map(lambda a: np.asarray(a).reshape((seeds, k) + a.shape[1:]), params)


def test_one_n_program_equals_the_per_member_program(key, n=7, n_slots=12):
    """The same sums from the one-n program and from the program that takes n per member, for a seed's
    networks on its own prompts (a GD-form transformer on Gram draws, the context padded). Planted bug caught:
    the one-n program given another n (n + 1)."""
    model, seeds, k = models.LinearTransformer(4, 3), 3, 5
    nets = _networks(model, seeds, k, key)
    design = IID(4, noise_var=0.2)
    keys = sweeps.stream_keys(list(range(seeds)), 5)
    slots = max(n + 1, n_slots)  # the same slots for both programs (the draw depends on them)
    flat = jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[2:]), nets)
    one, one_se = evaluate.evaluate_sweep(model, jax.tree_util.tree_map(lambda a: a[None, None], flat), design, [n],
                                          np.repeat(keys, k, axis=0), 3000, n_slots=slots, devices=jax.devices()[:1])
    # the per-member program: a second context length makes n vary over the points; its first column is n
    stacked = jax.tree_util.tree_map(lambda a: np.stack([a] * 2)[None], flat)
    both, both_se = evaluate.evaluate_sweep(model, stacked, design, [n, n + 1], np.repeat(keys, k, axis=0), 3000,
                                            n_slots=slots, devices=jax.devices()[:1])
    one, one_se = np.reshape(one, -1), np.reshape(one_se, -1)
    np.testing.assert_allclose(one, both[0, 0], rtol=1e-6)
    np.testing.assert_allclose(one_se, both_se[0, 0], rtol=1e-5)
    assert not np.allclose(both[0, 0], both[0, 1], rtol=1e-3)  # the second column is another context length
