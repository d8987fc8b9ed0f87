"""The Bayes risk (docs/theory.md §9): the least risk of any predictor on a Gaussian IID design, a floor
under every PGD and trained model."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as check
from iclsim import montecarlo, rng
from iclsim._precision import float64
from iclsim.designs import IID, _check_n
from iclsim.theory._common import F64

__all__ = ["BayesRisk", "bayes_risk"]


class BayesRisk(NamedTuple):
    """The Bayes risk and its Monte Carlo standard error (0 where the value is exact)."""

    risk: float
    se: float


@float64
def bayes_risk(design: IID, n: int, key=None, num_draws: int = 20_000, batch_size: int = 2_000) -> BayesRisk:
    """Risk of the posterior-mean predictor yhat = x^T E[beta | X, y], the least risk of ANY
    predictor on a Gaussian IID design (docs/theory.md §9): a floor under every PGD and trained model.

    With x_i, x ~ N(0, Sx), beta ~ N(0, Sb) and y_i = x_i.beta + N(0, s_i^2) (D = diag(s_i^2)),
    beta | X, y ~ N(mu, Sigma_post), Sigma_post = Sb - Sb X^T (X Sb X^T + D)^+ X Sb
    (= (Sb^{-1} + X^T D^{-1} X)^{-1} when D > 0; the pseudo-inverse gives the noiseless limit), and
    since x is independent of the context, L_Bayes = s_q^2 + E_X[tr(Sx Sigma_post(X))].
    Exact cases (se = 0): n = 0 gives s_q^2 + tr(Sx Sb); noiseless labels with n >= d give s_q^2
    (X has rank d almost surely, so beta is recovered). Otherwise the expectation over X has no
    closed form and is a Monte Carlo average over exactly num_draws draws of X (``montecarlo.block_sums``;
    ``batch_size`` bounds memory only), returned with its standard error; float64 throughout.
    """
    if not isinstance(design, IID):
        raise TypeError(f"bayes_risk has a form for IID (Gaussian) designs, not {type(design).__name__}; "
                        "for other designs bound the risk with ground_truth or monte_carlo_risk")
    check.positive_int("n", n, minimum=0)
    if n:
        _check_n(design, n)
    d = design.dim
    Sx, Sb = np.asarray(design.cov_x, np.float64), np.asarray(design.cov_beta, np.float64)
    sq2 = float(design.query_noise_var)
    noise = np.broadcast_to(np.asarray(design.noise_var, np.float64), (n,))
    if n == 0:
        return BayesRisk(sq2 + float(np.trace(Sx @ Sb)), 0.0)
    if n >= d and not np.any(noise):
        return BayesRisk(sq2, 0.0)
    num_draws = check.positive_int("num_draws", num_draws)
    if num_draws < 2:
        raise ValueError(f"num_draws must be >= 2 for bayes_risk (one draw has no standard error), got {num_draws}")
    group = montecarlo.group_size(num_draws, check.positive_int("batch_size", batch_size))
    check.memory(f"bayes_risk at n = {n}, dim = {d} ({group * montecarlo.DRAW_BLOCK} draws per batch)",
                 8.0 * group * montecarlo.DRAW_BLOCK * (4 * n * n + 3 * n * d), "use a smaller n or batch_size")
    key = jax.random.PRNGKey(0) if key is None else key
    with jax.enable_x64(True):
        lx = jnp.linalg.cholesky(jnp.asarray(Sx))
        Sb_j, Sx_j, D = jnp.asarray(Sb), jnp.asarray(Sx), jnp.diag(jnp.asarray(noise))

        def excess(k):  # tr(Sx Sigma_post) of one draw block of X
            X = rng.normal(k, (montecarlo.DRAW_BLOCK, n, d), F64) @ lx.T
            XSb = X @ Sb_j  # [B, n, d]
            K = jnp.einsum("bnd,bmd->bnm", XSb, X) + D[None]
            # tr(Sx Sigma_post) = tr(Sx Sb) - tr(Sx Sb X^T K^+ X Sb)
            explained = jnp.einsum("bnd,bnm,bme,ed->b", XSb, jnp.linalg.pinv(K, hermitian=True), XSb, Sx_j)
            return jnp.trace(Sx_j @ Sb_j) - explained

        total, total_sq = jax.jit(lambda k: montecarlo.block_sums(excess, k, num_draws, group))(key)
        mean, se = montecarlo.estimate(total, total_sq, num_draws)
        return BayesRisk(sq2 + float(mean), float(se))
