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


@pytest.mark.parametrize("kappa", [None, 0.5])
def test_curve_prompts_are_design_sample_bit_for_bit(kappa):
    """The closed-form curve's prompts come from ``_sample`` (the draws compiled once per shape, the labels op by op):
    they must be ``design.sample(key, count, n, float64)``'s to the last bit, fresh tasks and a pool alike (the
    committed figures were made from design.sample). Planted bugs caught: labels computed inside the compiled draw
    (the multiply-add fused: last-bit differences), a pool's query noise taken as 0, the task draw of another
    design kind."""
    d, n, count, rho = 4, 5, 37, 0.3
    with jax.enable_x64(True):
        for seed in (0, 7):
            design = study._design(d, kappa, rho, seed)
            want = design.sample(jax.random.PRNGKey(seed), count, n, jnp.float64)
            got = study._sample(design, jax.random.PRNGKey(seed), count, n)
            for name, a, b in zip(want._fields, want, got):
                assert (a is None) == (b is None), name
                if a is not None:
                    np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=name)


def test_monte_carlo_referee_is_montecarlo_risk_of_the_attention_form():
    """``_monte_carlo`` scores Gamma's attention form with one compiled program for every Gamma: its estimate must be
    ``montecarlo.risk``'s on the same prompts (same key, count and blocks), to the last bit, divided by d, and its z
    the gap to the exact finite-d error in its standard errors. Planted bugs caught: another key or prompt count,
    the prediction without Gamma's last column, a z against the wrong exact error."""
    d, n, rho, num, seed = 4, 6, 0.2, 700, 3
    with jax.enable_x64(True):
        prompts = study._sample(pretraining.lu_design(d, rho), jax.random.PRNGKey(1), 60, n)
        gamma = pretraining.fit_ridge(prompts, 1e-3)
        model = models.LinearAttention(d, dtype=jnp.float64)
        params = pretraining.attention_params(gamma, jnp.float64)
    est = montecarlo.risk(lambda p: model.apply(params, p), pretraining.lu_design(d, rho), n,
                          jax.random.fold_in(jax.random.PRNGKey(seed), 77), num)
    got = study._monte_carlo(gamma, d, n, rho, num, seed)
    assert got["mc_error"] == est.mean / d and got["mc_se"] == est.se / d
    exact = float(pretraining.icl_error(gamma, n, rho))
    assert got["mc_z"] == (est.mean / d - exact) / (est.se / d)
