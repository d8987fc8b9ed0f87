"""The Bayes predictor for a finite task pool, dMMSE (docs/theory.md §11), and the Gaussian-prior
posterior mean (ridge) it is compared with.

Raventos, Paul, Chen, Ganguli, *Pretraining task diversity and the emergence of non-Bayesian in-context
learning for regression*, NeurIPS 2023: when pretraining tasks are drawn uniformly from a pool
{beta_1, ..., beta_M} (``designs.TaskPool``), the Bayes-optimal predictor of the query label is the
posterior mean under that discrete prior,

    yhat = x^T sum_k w_k beta_k,   w = softmax_k( -||y - X beta_k||^2 / (2 s^2) ),

the "discrete minimum mean squared error" (dMMSE) predictor. Ridge, x^T (X^T X + s^2 I)^+ X^T y, is the
posterior mean under the Gaussian prior N(0, I) the pool is drawn from; dMMSE is a self-normalised
importance-sampling estimate of it with the pool as the sample, so dMMSE tends to ridge as M grows.
Noiseless labels (s^2 = 0) take the limit of the softmax: all weight on the pool task(s) of least residual.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as check
from iclsim import montecarlo
from iclsim.designs import IID, Prompts, TaskPool
from iclsim.protocols import Estimate

__all__ = ["POOL_CHUNK", "posterior_weights", "dmmse_predict", "ridge_predict", "dmmse_risk", "ridge_risk",
           "gaussian_design"]

F64 = jnp.float64

# pool tasks scored per round of the online softmax: bounds the [B, chunk] residual table, not the result
POOL_CHUNK = 1024


def _pool(design) -> tuple[np.ndarray, float]:
    if not isinstance(design, TaskPool):
        raise TypeError(f"design must be a TaskPool (the dMMSE prior is its pool), got {type(design).__name__}")
    return np.asarray(design.pool, np.float64), float(design.noise_var)


def _residuals(X, y, tasks):
    """||y - X beta_k||^2 for each prompt and task [B, c] from X^T X and X^T y (O(c d^2), not O(c n d))."""
    G = jnp.einsum("bni,bnj->bij", X, X)
    g = jnp.einsum("bni,bn->bi", X, y)
    yy = jnp.einsum("bn,bn->b", y, y)
    return yy[:, None] - 2 * g @ tasks.T + jnp.einsum("ki,bij,kj->bk", tasks, G, tasks)


def _logits(X, y, tasks, noise_var):
    r = _residuals(X, y, tasks)
    if noise_var > 0:
        return -r / (2 * noise_var)
    # the s^2 -> 0 limit: the least residual gets all the weight (ties shared)
    return jnp.where(r <= jnp.min(r, axis=1, keepdims=True), 0.0, -jnp.inf)


def posterior_weights(design: TaskPool, prompts: Prompts) -> jax.Array:
    """The dMMSE posterior over the pool, w [B, M] (rows sum to 1): softmax_k(-||y - X beta_k||^2 / (2 s^2)),
    the uniform prior over the M pool tasks times the Gaussian likelihood of the context labels."""
    pool, s2 = _pool(design)
    tasks = jnp.asarray(pool, prompts.X.dtype)
    return jax.nn.softmax(_logits(prompts.X, prompts.y, tasks, s2), axis=1)


def dmmse_predict(design: TaskPool) -> Callable[[Prompts], jax.Array]:
    """The dMMSE predictor of ``design``'s pool as a function of a Prompts batch, [B]: x^T E[beta | X, y]
    under the uniform prior over the pool (Raventos et al. 2023, eq. for dMMSE). The posterior mean is
    accumulated over chunks of ``POOL_CHUNK`` tasks with a running log-sum-exp (exact, any pool size).
    Zero (padding) context pairs add nothing to any residual, so padded prompts give the same prediction."""
    pool, s2 = _pool(design)
    M, d = pool.shape
    chunks = -(-M // POOL_CHUNK)
    size = min(M, POOL_CHUNK)
    padded = np.zeros((chunks * size, d))
    padded[:M] = pool
    valid = np.arange(chunks * size) < M

    def predict(p: Prompts) -> jax.Array:
        dtype = p.X.dtype
        blocks = jnp.asarray(padded, dtype).reshape(chunks, size, d)
        masks = jnp.asarray(valid).reshape(chunks, size)
        B = p.X.shape[0]

        def body(carry, block):
            top, total, mean = carry
            tasks, mask = block
            logit = jnp.where(mask[None, :], _logits(p.X, p.y, tasks, s2), -jnp.inf)
            new_top = jnp.maximum(top, jnp.max(logit, axis=1))
            safe = jnp.where(jnp.isfinite(new_top), new_top, 0.0)
            scale = jnp.where(jnp.isfinite(top), jnp.exp(top - safe), 0.0)
            e = jnp.exp(logit - safe[:, None])
            return (new_top, total * scale + e.sum(1), mean * scale[:, None] + e @ tasks), None

        init = (jnp.full((B,), -jnp.inf, dtype), jnp.zeros((B,), dtype), jnp.zeros((B, d), dtype))
        _, total, mean = jax.lax.scan(body, init, (blocks, masks))[0]
        return jnp.einsum("bi,bi->b", p.x, mean / total[:, None])

    return predict


def ridge_predict(design: TaskPool | IID) -> Callable[[Prompts], jax.Array]:
    """The Gaussian-prior posterior mean x^T (X^T X + s^2 I)^+ X^T y (beta ~ N(0, I), label noise s^2; s^2 = 0:
    the minimum-norm interpolant), the Bayes predictor for fresh tasks and the M -> infinity limit of
    dMMSE. Needs an isotropic prior: a TaskPool, or an IID design with cov_x = cov_beta = I."""
    if isinstance(design, IID):
        if not (np.allclose(design.cov_beta, np.eye(design.dim)) and np.ndim(design.noise_var) == 0):
            raise ValueError("ridge_predict needs an IID design with cov_beta = I and a scalar noise_var")
    elif not isinstance(design, TaskPool):
        raise TypeError(f"design must be a TaskPool or an IID design, got {type(design).__name__}")
    s2 = float(design.noise_var)
    d = design.dim

    def predict(p: Prompts) -> jax.Array:
        A = jnp.einsum("bni,bnj->bij", p.X, p.X) + s2 * jnp.eye(d, dtype=p.X.dtype)[None]
        b = jnp.einsum("bni,bn->bi", p.X, p.y)
        return jnp.einsum("bi,bi->b", p.x, jnp.einsum("bij,bj->bi", jnp.linalg.pinv(A, hermitian=True), b))

    return predict


def gaussian_design(design: TaskPool) -> IID:
    """The design the pool is drawn from: fresh tasks beta ~ N(0, I), the same features and noise (the
    'ICL' test of Raventos et al.: tasks never seen in pretraining)."""
    _pool(design)
    return IID(design.dim, noise_var=float(design.noise_var))


def dmmse_risk(design: TaskPool, n: int, key, test_design=None, num_prompts: int = 100_000,
               batch_size: int = 10_000) -> Estimate:
    """Monte Carlo risk (mean, SE) of ``design``'s dMMSE predictor on ``num_prompts`` fresh prompts with n
    context pairs from ``test_design`` (default: the pool itself, where dMMSE is the Bayes risk; pass
    ``gaussian_design(design)`` for fresh tasks), scored by the one referee ``montecarlo.risk`` in float64."""
    n = check.positive_int("n", n)
    return montecarlo.risk(dmmse_predict(design), design if test_design is None else test_design, n, key,
                           num_prompts, batch_size, F64)


def ridge_risk(design: TaskPool | IID, n: int, key, test_design=None, num_prompts: int = 100_000,
               batch_size: int = 10_000) -> Estimate:
    """Monte Carlo risk (mean, SE) of the Gaussian-prior posterior mean (``ridge_predict``) on prompts from
    ``test_design`` (default ``design``), through ``montecarlo.risk`` in float64."""
    n = check.positive_int("n", n)
    return montecarlo.risk(ridge_predict(design), design if test_design is None else test_design, n, key,
                           num_prompts, batch_size, F64)
