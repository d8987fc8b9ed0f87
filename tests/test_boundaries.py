"""Validation where a user's values enter the engine (``fit``, ``fit_sweep``, ``evaluate``): each case
gave a plausible number or a deep JAX error before, and now gives a named error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclsim import IID, models, train
from iclsim.evaluate import evaluate, evaluate_sweep

CFG = train.TrainConfig(steps=20, batch_size=32, learning_rate=0.02, warmup_steps=5)
KEY = jax.random.PRNGKey(0)


@pytest.mark.parametrize("call, error, message", [
    (lambda: train.fit(models.PGD(2), IID(2), 1.5, steps=5), TypeError, "n must be an integer"),  # trained at n = 1 before
    (lambda: train.fit_sweep(models.PGD(2), IID(2), [2.0], [0], CFG), TypeError, "n must be an integer"),
    (lambda: train.fit_sweep(models.PGD(2), IID(2), [2], [0.5, 0.9], CFG), TypeError, "seeds must be an integer"),
    (lambda: train.fit_sweep(models.PGD(2), IID(2), [], [0], CFG), ValueError, "ns must hold at least one"),
    (lambda: train.fit(models.PGD(2), IID(2), 2, steps=5, seed=1.5), TypeError, "seed must be an integer"),
])
def test_fit_refuses_non_integers(call, error, message):
    """A wrong type is a TypeError, an empty list a ValueError; both name the argument."""
    with pytest.raises(error, match=message):
        call()


def test_numpy_integers_are_integers():
    fitted = train.fit_sweep(models.PGD(2), IID(2), [np.int64(3)], [np.int32(1)], CFG)
    assert fitted.losses.shape == (1, 1, 1, 20)
    assert np.isfinite(evaluate(models.PGD(2), jax.tree_util.tree_map(lambda a: a[0, 0, 0], fitted.params), IID(2),
                                np.int64(3), KEY, 64)[0])


def test_model_and_design_dims_must_agree():
    """Before: a failure 18 frames deep in dot_general."""
    with pytest.raises(ValueError, match=r"model dim \(4\) must equal design dim \(5\) in fit_sweep"):
        train.fit(models.LinearAttention(4), IID(5), 4, steps=5)
    params = models.LinearAttention(4).init(KEY)
    with pytest.raises(ValueError, match=r"model dim \(4\) must equal design dim \(5\) in evaluate"):
        evaluate(models.LinearAttention(4), params, IID(5), 4, KEY, 64)


def test_evaluate_refuses_fractional_n():
    params = models.PGD(2).init(KEY)
    with pytest.raises(TypeError, match="n must be an integer"):  # scored at n = 2 before
        evaluate(models.PGD(2), params, IID(2), 2.7, KEY, 64)


def test_params_must_match_the_sweep_they_are_evaluated_on():
    """Params trained for ns = [2] evaluated at ns = [2, 8] scored the n = 2 model at n = 8 before."""
    fitted = train.fit_sweep(models.PGD(2), IID(2), [2], [0, 1], CFG)
    with pytest.raises(ValueError, match=r"leading axes \[designs, ns, seeds\] = \[1, 2, seeds\]"):
        evaluate_sweep(models.PGD(2), fitted.params, IID(2), [2, 8], KEY, 64)
    with pytest.raises(ValueError, match=r"leading axes"):
        evaluate_sweep(models.PGD(2), jax.tree_util.tree_map(np.asarray, fitted.params), [IID(2), IID(2)], [2], KEY, 64)
    risk, se = evaluate_sweep(models.PGD(2), fitted.params, IID(2), [2], KEY, 64)
    assert risk.shape == se.shape == (1, 1, 2)


def test_non_finite_params_are_refused():
    params = {"W": jnp.full((2, 2), jnp.nan, jnp.float32)}
    with pytest.raises(ValueError, match=r"params leaf \['W'\] has non-finite values"):
        evaluate(models.PGD(2), params, IID(2), 3, KEY, 64)


def test_a_model_without_dtype_gets_a_named_error():
    class NoDtype:
        dim = 2

        def init(self, key):
            return {"W": jnp.zeros((2, 2))}

        def apply(self, params, prompts):
            return jnp.einsum("bi,ij,bnj,bn->b", prompts.x, params["W"], prompts.X, prompts.y)

    with pytest.raises(TypeError, match="evaluate needs model.dtype"):
        evaluate(NoDtype(), {"W": jnp.zeros((2, 2))}, IID(2), 3, KEY, 64)


def test_multi_n_sweep_refuses_a_model_that_does_not_declare_inert_padding():
    """Issue 20, finding 11: a model not inert to zero tokens was trained and scored on padded prompts
    silently. Planted bug caught: dropping the check lets the sweep run."""
    import dataclasses

    import jax.numpy as jnp

    from iclsim import IID, models, train

    @dataclasses.dataclass(frozen=True)
    class Biased:
        dim: int
        dtype: object = jnp.float32

        def init(self, key):
            return {"b": jnp.zeros((), self.dtype)}

        def apply(self, params, prompts):
            return params["b"] + jnp.mean(prompts.y, axis=1)  # a zero token moves the mean: not inert

    with pytest.raises(ValueError, match="inert_padding"):
        train.fit_sweep(Biased(3), IID(3), [2, 4], [0], train.TrainConfig(steps=2, batch_size=8))
    assert models.LinearTransformer(3, 2, form="full").inert_padding and models.H3(3, 4).inert_padding
    train.fit_sweep(Biased(3), IID(3), [4], [0], train.TrainConfig(steps=2, batch_size=8))  # one n: no padding
