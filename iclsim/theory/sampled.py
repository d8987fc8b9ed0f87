"""Monte Carlo pieces of the theory (docs/theory.md §4, §7), every draw made by the one referee
(``iclsim.montecarlo``): the PGD-form optimum of any design that can be sampled, the risk of a predictor on
fresh prompts, and the PGD predictor as a function of a prompt batch."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as check
from iclsim import montecarlo
from iclsim._precision import float64
from iclsim.designs import Prompts
from iclsim.theory._common import F64, MAX_PER_POSITION, _context, _finite, _weights

__all__ = ["ground_truth", "risk_moments", "mean_and_se", "monte_carlo_risk", "pgd_predict"]


def _sampled(design, n, what: str) -> int:
    """n for a Monte Carlo function: a design with ``dim`` and ``sample``, n at most MAX_PER_POSITION."""
    if not (hasattr(design, "dim") and callable(getattr(design, "sample", None))):
        raise TypeError(f"design must be a design (with dim and sample(key, batch, n, dtype)), got "
                        f"{type(design).__name__}")
    n = _context(design, n)
    if n > MAX_PER_POSITION:
        raise ValueError(f"n must be <= {MAX_PER_POSITION} for {what} (it draws n context pairs per prompt), got {n}")
    return n


@float64
def ground_truth(design, n: int, key, num_prompts: int = 200_000, weights=None, batch_size: int = 10_000):
    """Monte Carlo estimate of the PGD-form optimum, the best yhat = <W, x g^T>, g = X^T (weights * y),
    for any design that can be sampled (docs/theory.md §4): the same optimum ``optimal_pgd`` gives in
    closed form, NOT the Bayes risk (the best of all predictors, ``bayes_risk``), which lies below it.

    With F = vec(x g^T), A = E[F F^T], b = E[y F]: W = A^{-1} b, L = E[y^2] - b^T A^{-1} b,
    estimated in float64 from exactly num_prompts fresh prompts of the referee's draw blocks
    (``montecarlo.prompt_totals``; ``batch_size`` bounds memory only). The
    in-sample L is a least-squares fit's training error: biased low (by about d^2 / num_prompts
    relative) and without a standard error. For an unbiased risk with its SE score W on fresh
    prompts (``monte_carlo_risk``), which is biased high only by W's estimation error.
    """
    n = _sampled(design, n, "ground_truth")
    num_prompts = montecarlo.check_count("num_prompts", num_prompts)
    check.positive_int("batch_size", batch_size)
    w = _weights(weights, n)
    d = design.dim
    if num_prompts <= d * d:  # A = E[F F^T] is d^2 x d^2: fewer prompts leave it singular
        raise ValueError(f"num_prompts must be > dim^2 = {d * d} for ground_truth (it fits {d * d} coefficients), "
                         f"got {num_prompts}")
    group = montecarlo.group_size(num_prompts, batch_size)
    check.memory(f"ground_truth at dim = {d}", 8.0 * (2 * d**4 + group * montecarlo.DRAW_BLOCK * (d * d + n * d)),
                 "use a smaller dim or batch_size")

    def totals(p, valid):  # A, b and sum y^2 over one draw block's valid prompts
        g = jnp.einsum("bnd,bn->bd", p.X, p.y * w[None, :])
        F = jnp.where(valid[:, None], jnp.einsum("bi,bj->bij", p.x, g).reshape(-1, d * d), 0.0)
        yq = jnp.where(valid, p.y_query, 0.0)
        return F.T @ F, F.T @ yq, yq @ yq

    A, b, yy = jax.jit(lambda k: montecarlo.prompt_totals(totals, design, n, k, num_prompts, group))(key)
    wvec = jnp.linalg.solve(A, b)
    return wvec.reshape(d, d), (yy - b @ wvec) / num_prompts


@float64
def risk_moments(predict: Callable[[Prompts], jax.Array], design, n_slots: int, n, key, chunks: int,
                 batch: int, dtype, gram: bool = False) -> tuple[jax.Array, jax.Array]:
    """Sum and sum of squares of (y - predict)^2 over the first chunks x batch fresh prompts of ``key``
    with n active context pairs in n_slots slots (``montecarlo.risk_sums``: fixed draw blocks, block b
    from fold_in(key, b); ``batch`` only groups whole blocks, so the prompts do not depend on it). Pure and
    vmappable; n and chunks may be traced (a traced count cannot be differentiated in reverse mode)."""
    return montecarlo.risk_sums(predict, design, n_slots, n, key, chunks * batch,
                                max(1, batch // montecarlo.DRAW_BLOCK), dtype, gram)


def mean_and_se(total, total_sq, count: int):
    """Mean and standard error from a sum and a sum of squares over count samples (``montecarlo.estimate``)."""
    return montecarlo.estimate(total, total_sq, count)


@float64
def monte_carlo_risk(predict: Callable[[Prompts], jax.Array], design, n: int, key, num_prompts: int = 100_000,
                     batch_size: int = 10_000, dtype=F64):
    """Monte Carlo risk of a predictor: (mean, standard error) of (y - predict(prompts))^2 over exactly
    num_prompts fresh prompts sampled in ``dtype`` (``montecarlo.risk``; ``batch_size`` bounds memory only)."""
    if not callable(predict):
        raise TypeError(f"predict must be a function of a Prompts batch, got {type(predict).__name__}")
    n = _sampled(design, n, "monte_carlo_risk")
    return montecarlo.risk(predict, design, n, key, num_prompts, batch_size, dtype)


def pgd_predict(W, weights=None) -> Callable[[Prompts], jax.Array]:
    """The predictor x^T W X^T (weights * y) as a function of a Prompts batch."""
    W = _finite("W", W)
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"W must be a square matrix, got shape {W.shape}")
    if weights is not None and _finite("weights", weights).ndim != 1:
        raise ValueError(f"weights must be a 1-D array, got shape {np.shape(weights)}")

    def predict(p: Prompts):
        wy = p.y if weights is None else p.y * jnp.asarray(weights, p.y.dtype)[None, :]
        return jnp.einsum("bi,ij,bnj,bn->b", p.x, jnp.asarray(W, p.x.dtype), p.X, wy)

    return predict
