"""When SVD truncation of the optimum helps (docs/theory.md §6.1): the exact test risk of the truncated
train optimum, the per-direction change of the risk, and the noise level above which dropping a direction
helps."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from iclsim._precision import float64
from iclsim.designs import IID, _check_n
from iclsim.theory._common import _check_rank, _require, _truncate
from iclsim.theory.pgd import optimal_pgd, pgd_risk

__all__ = ["DirectionGains", "truncated_optimum_risk", "direction_gains", "noise_threshold", "predict_zero_risk"]


class DirectionGains(NamedTuple):
    """Per eigendirection i of a jointly diagonal design (basis U, columns): the train optimum's weight
    w_i (W* = U diag(w) U^T) and the exact change of the test risk when direction i alone is dropped
    (negative: dropping it helps). Directions are sorted by decreasing w_i, the order in which the
    rank-k SVD truncation keeps them."""

    basis: np.ndarray   # [d, d]
    weights: np.ndarray  # [d] w_i
    change: np.ndarray   # [d] Delta_i


@float64
def truncated_optimum_risk(train_design: IID, n_train: int, test_design: IID, n_test: int, rank: int) -> jax.Array:
    """Exact test risk of the rank-k SVD truncation of the train optimum W* (``optimal_pgd``):
    L_test([W*]_k) by ``pgd_risk`` (any IID covariances; shifts in label noise, task covariance and
    context length). rank = dim is the unpruned optimum."""
    _require(train_design, (IID,), "truncated_optimum_risk")
    _require(test_design, (IID,), "truncated_optimum_risk")
    if test_design.dim != train_design.dim:
        raise ValueError(f"test_design.dim must equal train_design.dim = {train_design.dim}, got {test_design.dim}")
    _check_rank(rank, train_design.dim)
    W_star, _ = optimal_pgd(train_design, n_train)
    return pgd_risk(test_design, n_test, _truncate(W_star, rank))


@float64
def direction_gains(train_design: IID, n_train: int, test_design: IID, n_test: int) -> DirectionGains:
    """docs/theory.md §6.1: with cov_x = U diag(sigma) U^T, train and test cov_beta = U diag(l), U diag(l')
    U^T (jointly diagonal) and scalar noises, W* = U diag(w) U^T with w_i = l_i / ((n+1) sigma_i l_i + c),
    c = tr(Sx Sb) + s^2, and the test risk is a sum over directions of
    sigma_i l'_i - 2 n' w sigma_i^2 l'_i + n' w^2 sigma_i^2 ((n'+1) sigma_i l'_i + c'), so dropping
    direction i changes it by Delta_i = n' w_i sigma_i^2 (2 l'_i - w_i ((n'+1) sigma_i l'_i + c')):
    dropping helps iff w_i ((n'+1) sigma_i l'_i + c') > 2 l'_i."""
    for name, des in (("train_design", train_design), ("test_design", test_design)):
        _require(des, (IID,), "direction_gains")
        if np.ndim(des.noise_var) != 0:
            raise ValueError(f"{name} must have a scalar noise_var for the per-direction condition")
    if test_design.dim != train_design.dim:
        raise ValueError(f"test_design.dim must equal train_design.dim = {train_design.dim}, got {test_design.dim}")
    _check_n(train_design, n_train)
    _check_n(test_design, n_test)
    Sx = np.asarray(train_design.cov_x, np.float64)
    if not np.allclose(np.asarray(test_design.cov_x, np.float64), Sx, rtol=1e-12, atol=0):
        raise ValueError("test_design.cov_x must equal train_design.cov_x (the shift is in noise, tasks or n)")
    Sb, Sb_te = np.asarray(train_design.cov_beta, np.float64), np.asarray(test_design.cov_beta, np.float64)
    mats = (Sx, Sb, Sb_te)
    _, U = np.linalg.eigh(Sx + np.sqrt(2.0) * Sb + np.pi * Sb_te)  # a generic combination: a common basis
    diag = [np.einsum("ji,jk,ki->i", U, A, U) for A in mats]
    for A, dg in zip(mats, diag):
        if np.abs(U.T @ A @ U - np.diag(dg)).max() > 1e-9 * np.abs(A).max():
            raise ValueError("direction_gains needs cov_x and both cov_beta jointly diagonalisable (commuting); "
                             "use truncated_optimum_risk for general covariances")
    sigma, l_tr, l_te = diag
    c_tr = float(np.sum(sigma * l_tr) + train_design.noise_var)
    c_te = float(np.sum(sigma * l_te) + test_design.noise_var)
    w = l_tr / ((n_train + 1) * sigma * l_tr + c_tr)
    change = n_test * w * sigma**2 * (2 * l_te - w * ((n_test + 1) * sigma * l_te + c_te))
    order = np.argsort(-w, kind="stable")
    return DirectionGains(U[:, order], w[order], change[order])


def predict_zero_risk(design: IID) -> float:
    """Risk of the predictor yhat = 0: E y^2 = tr(Sx Sb) + s_q^2 (x independent of beta, the query's noise
    s_q^2). docs/theory.md §6.1: for an isotropic design and an isotropic W = w I (one-layer PGD) every
    eigendirection adds the same Delta to the risk, L(W) - L(0) = d Delta, so dropping any set of k
    directions changes the risk by k (L(0) - L(W)) / d: truncation helps iff L(W) exceeds this level."""
    _require(design, (IID,), "predict_zero_risk")
    return float(np.trace(np.asarray(design.cov_x, np.float64) @ np.asarray(design.cov_beta, np.float64))
                 + float(design.query_noise_var))


@float64
def noise_threshold(design: IID, n: int) -> np.ndarray:
    """Per direction (sorted as ``direction_gains``), the test label-noise variance above which dropping
    it from W* lowers the risk when only the noise shifts (docs/theory.md §6.1):
    s_test^2 > (n + 1) sigma_i l_i + tr(Sx Sb) + 2 s_train^2; isotropic: n + d + 1 + 2 s_train^2."""
    g = direction_gains(design, n, design, n)
    sigma_l = np.einsum("ji,jk,ki->i", g.basis, np.asarray(design.cov_x) @ np.asarray(design.cov_beta), g.basis)
    T = float(np.trace(np.asarray(design.cov_x) @ np.asarray(design.cov_beta)))
    return (n + 1) * sigma_l + T + 2 * float(design.noise_var)
