"""dMMSE, the Bayes predictor for a finite task pool (docs/theory.md §11): M = 1 is the pool task, it tends
to ridge (the Gaussian-prior posterior mean) as the pool grows, and it beats ridge on the pool's own tasks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclsim import IID, TaskPool, dmmse, montecarlo
from tests.tolerance import MC_SIGMAS, report

KEY = jax.random.PRNGKey(11)


def _prompts(design, n, batch=64, key=KEY):
    with jax.enable_x64(True):
        return _sample(design, key, batch, n)


# The checks run compiled programs: eager, each operation compiles on its own.
_sample = jax.jit(lambda design, key, batch, n: design.sample(key, batch, n, jnp.float64), static_argnums=(2, 3))


@pytest.mark.parametrize("noise_var", [0.0, 0.3])
def test_one_task_pool_predicts_that_task(noise_var):
    """With M = 1 the posterior is a point mass: yhat = x^T beta_1 exactly, whatever the context."""
    pool = TaskPool(3, 1, noise_var=noise_var, pool_seed=4)
    p = _prompts(IID(3, noise_var=0.5), 5)  # labels from other tasks: the prior still allows only beta_1
    with jax.enable_x64(True):
        pred = jax.jit(dmmse.dmmse_predict(pool))(p)
    np.testing.assert_allclose(np.asarray(pred), np.asarray(p.x) @ pool.pool[0], rtol=1e-12, atol=1e-12)


def test_noiseless_pool_prompt_recovers_its_task():
    """s^2 = 0: only the prompt's own task has zero residual, so dMMSE predicts its noiseless label."""
    pool = TaskPool(4, 50, noise_var=0.0, pool_seed=2)
    p = _prompts(pool, 3)
    with jax.enable_x64(True):
        pred = jax.jit(dmmse.dmmse_predict(pool))(p)
    np.testing.assert_allclose(np.asarray(pred), np.asarray(p.y_query), rtol=1e-9, atol=1e-9)


def test_chunked_posterior_mean_equals_the_softmax_over_the_whole_pool():
    """The running log-sum-exp over chunks of POOL_CHUNK tasks gives x^T (w @ pool) with w the softmax over
    all M tasks (M not a multiple of the chunk, so the last chunk is masked)."""
    pool = TaskPool(3, 2 * dmmse.POOL_CHUNK + 37, noise_var=0.2, pool_seed=9)
    p = _prompts(pool, 6)
    with jax.enable_x64(True):
        w, pred = jax.jit(lambda p: (dmmse.posterior_weights(pool, p), dmmse.dmmse_predict(pool)(p)))(p)
    w = np.asarray(w)
    direct = np.einsum("bi,bi->b", np.asarray(p.x), w @ np.asarray(pool.pool))
    np.testing.assert_allclose(np.asarray(w.sum(1)), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(pred), np.asarray(direct), rtol=1e-10, atol=1e-12)
    # the likelihood's temperature is 2 s^2: a prompt's own task gets the largest weight on average
    assert float(np.mean(np.max(w, axis=1))) > 0.2


def test_dmmse_tends_to_ridge_as_the_pool_grows():
    """dMMSE is a self-normalised importance-sampling estimate of the Gaussian posterior mean with the pool
    as the sample: E[(dMMSE - ridge)^2] on fresh tasks falls like 1/M (here 64x more tasks: at least 16x
    smaller), and at M = 16384 it is below 1% of ridge's excess risk over the label noise."""
    d, n, s2 = 2, 4, 0.25
    fresh = IID(d, noise_var=s2)

    def gap(M):
        pool = TaskPool(d, M, noise_var=s2, pool_seed=1)
        f, r = dmmse.dmmse_predict(pool), dmmse.ridge_predict(pool)
        return montecarlo.mean(lambda p: (f(p) - r(p)) ** 2, fresh, n, KEY, 5_000)

    small, large = gap(256), gap(16_384)
    ridge = dmmse.ridge_risk(fresh, n, KEY, num_prompts=5_000)
    report(f"dmmse vs ridge: E(dMMSE - ridge)^2 = {small.mean:.3g} (M = 256), {large.mean:.3g} (M = 16384)")
    assert large.mean < small.mean / 16
    assert large.mean < 0.01 * (ridge.mean - s2)


def test_dmmse_beats_ridge_on_the_pools_own_tasks():
    """On prompts from the pool, dMMSE is the Bayes predictor: paired on the same prompts its risk is
    below ridge's by more than 4 standard errors of the difference (M = 16, d = 4, n = 6)."""
    pool = TaskPool(4, 16, noise_var=0.25, pool_seed=3)
    f, r = dmmse.dmmse_predict(pool), dmmse.ridge_predict(pool)
    diff = montecarlo.mean(lambda p: (p.y_query - r(p)) ** 2 - (p.y_query - f(p)) ** 2, pool, 6, KEY, 5_000)
    report(f"dmmse on its pool: ridge - dMMSE = {diff.mean:.4f} +- {diff.se:.4f}")
    assert diff.mean > MC_SIGMAS * diff.se


def test_dmmse_risk_is_the_referees_estimate():
    """dmmse_risk and ridge_risk are montecarlo.risk of the predictors (same key, same prompts)."""
    pool = TaskPool(3, 8, noise_var=0.1, pool_seed=0)
    est = dmmse.dmmse_risk(pool, 4, KEY, num_prompts=1_000)
    ref = montecarlo.risk(dmmse.dmmse_predict(pool), pool, 4, KEY, 1_000)
    assert est == ref and est.se > 0


def test_wrong_designs_are_refused_by_name():
    with pytest.raises(TypeError, match="TaskPool"):
        dmmse.dmmse_predict(IID(3))
    with pytest.raises(ValueError, match="cov_beta = I"):
        dmmse.ridge_predict(IID(2, cov_beta=np.diag([1.0, 2.0])))
    with pytest.raises(TypeError, match="TaskPool or an IID"):
        dmmse.ridge_predict("pool")
