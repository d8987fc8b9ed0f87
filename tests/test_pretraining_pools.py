"""pretraining_tau's networks trained on finite task pools (experiments/pretraining_tau.py, ``train_kappas``): each
seed's network is trained on its own pool, the pool of that seed's closed-form fits, and paired with the ridge
fit on its own stored prompts."""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclsim import models, montecarlo, pretraining
from iclsim.runner import RunError
from tests.quick import EXPERIMENTS

study = sys.modules[EXPERIMENTS["pretraining_tau"].run.__module__]


@pytest.mark.slow  # trains 4 small networks (make test's budget); the fresh-task path is in the default tier
def test_each_seed_trains_on_its_own_pool_and_pairs_with_its_ridge_fit():
    """d = 3, one task per pool (kappa = 1/3), noiseless, tau = 6: every network passes its gate (its Gamma within
    1e-3 of the ridge fit on its own stored set) and its exact ICL error equals that fit's; that fit is the ridge
    fit on stored prompts of the seed's own pool (``_design(d, kappa, rho, seed)``, the pool of the seed's
    closed-form fits), refitted here, which predicts its own pool's task at under half the risk of another
    seed's. Planted bugs caught: every seed trained on one pool (seed 0's), a network paired with another
    seed's ridge fit, the pool's rows labelled with the fresh-task kappa."""
    kappa = 1 / 3
    s = dataclasses.replace(study.SETTINGS, dims=(3,), train_dims=(3,), alpha=4.0, noise_var=0.0, kappas=(kappa,),
                            train_kappas=(kappa,), train_taus=(6.0,), seeds=2, train_steps=1500)
    seeds = [5, 9]
    rows = study._trained(s, seeds, lambda m: None, None)
    pooled = [r for r in rows if r["kappa"] == f"{kappa:g}"]
    fresh = [r for r in rows if r["kappa"] == "inf"]
    assert [r["seed"] for r in pooled] == seeds and [r["seed"] for r in fresh] == seeds
    assert all(r["passed"] and r["param_gap"] < 1e-3 for r in pooled)
    for r in pooled:
        assert r["icl_error"] == pytest.approx(r["ridge_error"], rel=1e-3)
    # refit seed by seed from the rows' own settings: the network of seed s predicts its own pool's task
    n, P = pooled[0]["n"], pooled[0]["P"]
    pools = [study._design(3, kappa, 0.0, sd) for sd in seeds]
    assert not np.allclose(pools[0].pool, pools[1].pool)
    with jax.enable_x64(True):
        gammas = [study._FIT(jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                                    pretraining.stored_prompts(pools[k], [sd], P, n)), s.ridge, P)[0]
                  for k, sd in enumerate(seeds)]
        model = models.LinearAttention(3, dtype=jnp.float64)
        risk = np.array([[montecarlo.risk(lambda p, g=g: model.apply(pretraining.attention_params(g, jnp.float64), p),
                                          pool, n, jax.random.PRNGKey(1), 1_000).mean for pool in pools] for g in gammas])
        refit = [float(pretraining.icl_error(g, n, 0.0)) for g in gammas]
    np.testing.assert_allclose([r["ridge_error"] for r in pooled], refit, rtol=1e-9)
    own, other = np.diag(risk), risk[~np.eye(2, dtype=bool)]
    assert own.max() < 0.5 * other.min()


def test_trained_kappas_must_be_on_the_curve():
    s = dataclasses.replace(study.SETTINGS, kappas=(0.5,), train_kappas=(2.0,))
    with pytest.raises(RunError, match="train_kappas"):
        study._check_training(s)
