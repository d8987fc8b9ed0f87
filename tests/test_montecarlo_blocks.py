"""The referee's per-draw values and sums of any shape (``montecarlo.block_values``, ``block_totals`` and their
prompt forms) are the draws ``block_sums`` and ``mean`` use: the same draw blocks of the same key, whatever
the grouping, a smaller count a prefix of a larger one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclsim import IID, montecarlo


def _normals(k):
    return jax.random.normal(k, (montecarlo.DRAW_BLOCK,), jnp.float64)


def test_block_values_are_the_draws_block_sums_sums(key):
    """Summed by hand, block_values' draws give block_sums' sum and sum of squares; a count that ends inside a
    block masks its tail; a smaller count is a prefix; the grouping does not change a value. Planted bugs
    caught: blocks keyed by split instead of fold_in, the tail not cut, the group changing the draws."""
    with jax.enable_x64(True):
        count = 3 * montecarlo.DRAW_BLOCK + 17
        v1 = np.asarray(montecarlo.block_values(_normals, key, count))
        v3 = np.asarray(montecarlo.block_values(_normals, key, count, group=3))
        total, total_sq = montecarlo.block_sums(_normals, key, count, group=2)
        block0 = np.asarray(_normals(jax.random.fold_in(key, 0)))
    assert v1.shape == (count,)
    np.testing.assert_array_equal(v1, v3)
    np.testing.assert_array_equal(v1[:montecarlo.DRAW_BLOCK], block0)
    np.testing.assert_allclose([float(total), float(total_sq)], [v1.sum(), (v1**2).sum()], rtol=1e-12)
    with jax.enable_x64(True):
        np.testing.assert_array_equal(np.asarray(montecarlo.block_values(_normals, key, 300)), v1[:300])


def test_block_totals_sum_any_shape_over_the_valid_draws(key):
    """block_totals of (x, x x^T) per draw equals the sums over block_values' draws, with the masked tail left
    out, for every grouping. Planted bugs caught: the mask ignored (the whole last block summed), a block
    counted twice across rounds."""
    count = 2 * montecarlo.DRAW_BLOCK + 5

    def draws(k):
        return jax.random.normal(k, (montecarlo.DRAW_BLOCK, 3), jnp.float64)

    def totals(k, valid):
        x = jnp.where(valid[:, None], draws(k), 0.0)
        return x.sum(axis=0), x.T @ x

    with jax.enable_x64(True):
        x = np.asarray(montecarlo.block_values(draws, key, count))
        for group in (1, 2, 3):
            s, ss = montecarlo.block_totals(totals, key, count, group)
            np.testing.assert_allclose(np.asarray(s), x.sum(axis=0), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(np.asarray(ss), x.T @ x, rtol=1e-12)


def test_prompt_values_and_totals_see_the_prompts_mean_sees(key):
    """The per-prompt squared norm of the query from prompt_values, averaged, is montecarlo.mean's estimate on
    the same key and count; prompt_totals' sum over the same prompts agrees. Planted bug caught: a prompt form
    drawing its own prompts (another key or block size)."""
    design, n, count = IID(3), 4, 1_000
    stat = lambda p: jnp.sum(p.x**2, axis=1)  # noqa: E731
    with jax.enable_x64(True):
        values = np.asarray(montecarlo.prompt_values(stat, design, n, key, count))
        (total,) = montecarlo.prompt_totals(lambda p, valid: (jnp.sum(jnp.where(valid, stat(p), 0.0)),), design, n,
                                            key, count, 2)
    est = montecarlo.mean(stat, design, n, key, count)
    assert values.shape == (count,)
    assert est.mean == pytest.approx(values.mean(), rel=1e-12)
    assert float(total) == pytest.approx(values.sum(), rel=1e-12)


def test_block_values_refuses_a_count_that_is_not_positive():
    with pytest.raises(ValueError, match="count"):
        montecarlo.block_values(_normals, jax.random.PRNGKey(0), 0)
