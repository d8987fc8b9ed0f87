"""rng.normal: jax.random.normal bit for bit, drawn flat (the Monte Carlo references' draw blocks use it)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclsim import rng


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_normal_is_jax_random_normal_bit_for_bit(dtype):
    """Every shape the library draws (a draw block [B, n, d], a vector), eagerly and
    under vmap over fold_in keys. Catches a reshape in another order (Fortran), a draw at another size, or
    a scheme where counters are not the flattened index."""
    key = jax.random.PRNGKey(7)
    for shape in [(25, 6, 3), (9,)]:
        np.testing.assert_array_equal(rng.normal(key, shape, dtype), jax.random.normal(key, shape, dtype))
    keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(3))
    np.testing.assert_array_equal(jax.vmap(lambda k: rng.normal(k, (5, 4, 2), dtype))(keys),
                                  jax.vmap(lambda k: jax.random.normal(k, (5, 4, 2), dtype))(keys))
    assert rng.normal(key, (2, 3), dtype).dtype == dtype
