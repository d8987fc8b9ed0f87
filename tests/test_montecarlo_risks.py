"""``montecarlo.risks`` scores several predictors on one draw of prompts: each estimate is the one
``montecarlo.risk`` gives for that predictor alone (the same prompts, the same block sums in the same order), up to round-off."""

import jax.numpy as jnp
import numpy as np
import pytest

from iclsim import IID, TaskPool, dmmse, montecarlo


def _predictors():
    def zero(p):
        return jnp.zeros_like(p.y_query)

    def first_context_label(p):
        return p.y[:, 0]

    return [zero, first_context_label]


@pytest.mark.parametrize("design", [IID(3, noise_var=0.1), TaskPool(3, 5, noise_var=0.1, pool_seed=2)],
                         ids=["iid", "pool"])
def test_risks_equal_each_predictors_risk_alone(key, design):
    """To round-off (the predictors share one program, compiled with other XLA options than ``risk``'s),
    with a count ending inside a draw block and two blocks per round. Planted bugs caught:
    the mask not broadcast over the predictors (the tail counted), the predictors' rows mixed up, other
    prompts drawn (another n or key), the group changing the sums."""
    count, batch = 3 * montecarlo.DRAW_BLOCK + 17, 2 * montecarlo.DRAW_BLOCK
    predicts = _predictors() + [dmmse.ridge_predict(design)]
    if isinstance(design, TaskPool):
        predicts.append(dmmse.dmmse_predict(design))
    together = montecarlo.risks(predicts, design, 4, key, count, batch)
    alone = [montecarlo.risk(f, design, 4, key, count, batch) for f in predicts]
    # equal up to round-off (the predictors share one program); a masking or pairing bug moves them by > 1e-3
    np.testing.assert_allclose(np.array(together), np.array(alone), rtol=1e-13, atol=0)
    assert len({e.mean for e in together}) == len(predicts)  # distinct predictors, distinct risks


def test_risks_refuses_a_wrong_predictor_list(key):
    design = IID(2)
    with pytest.raises(TypeError, match="predicts"):
        montecarlo.risks([], design, 3, key, 100)
    with pytest.raises(TypeError, match="predicts"):
        montecarlo.risks([np.zeros(3)], design, 3, key, 100)
    with pytest.raises(ValueError, match="num_prompts"):
        montecarlo.risks(_predictors(), design, 3, key, 0)
    with pytest.raises(ValueError, match=r"\[B, 1\]"):
        montecarlo.risks([lambda p: p.y_query[:, None]], design, 3, key, 100)
