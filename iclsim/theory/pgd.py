"""One-layer closed forms (docs/theory.md §3.1, §3.2, §3.4, §5): the exact risk of PGD and weighted PGD
(WPGD) for any W, of the whole one-layer linear attention, and their optima, in float64.

Predictors: PGD yhat = x^T W X^T y and weighted PGD (WPGD) yhat = x^T W X^T (omega * y).
Risk L = E[(y - yhat)^2] over fresh prompts, including the irreducible query noise s_q^2.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as check
from iclsim._precision import float64
from iclsim.designs import IID, RAG, Drift, TaskFeatureAlignment
from iclsim.theory._common import (F64, MAX_PER_POSITION, _context, _finite, _require, _square, _weight_sums,
                                     _weights)
from iclsim.theory.correlated import _correlated_moments

__all__ = ["Optimum", "WeightedOptimum", "Moments", "pgd_moments", "pgd_risk", "attention_risk", "optimal_pgd", "iid_effective_n", "optimal_wpgd"]


class Optimum(NamedTuple):
    """An optimal preconditioner W [d, d] and its risk L (a float64 scalar)."""

    W: jax.Array
    risk: jax.Array


class WeightedOptimum(NamedTuple):
    """An optimal weighted PGD: W [d, d], per-position weights omega [n] (mean |omega| = 1), risk L."""

    W: jax.Array
    omega: jax.Array
    risk: jax.Array


class Moments(NamedTuple):
    """docs/theory.md §3 for g = X^T (omega * y): C = E[g beta^T], M = E[g g^T]; risk pieces."""

    cov_x: jax.Array
    C: jax.Array
    M: jax.Array
    base: jax.Array  # s_q^2 + tr(Sx Sb), the risk of yhat = 0


@float64
def pgd_moments(design: IID, n: int, weights=None) -> Moments:
    """docs/theory.md §3: C = s1 Sx Sb, M = (s1^2 + s2) Sx Sb Sx + s2 tr(Sb Sx) Sx + sn Sx."""
    _require(design, (IID,), "pgd_moments")
    n = _context(design, n)
    Sx, Sb = jnp.asarray(design.cov_x, F64), jnp.asarray(design.cov_beta, F64)
    s1, s2, sn = _weight_sums(design, n, weights)
    T = jnp.trace(Sx @ Sb)
    C = s1 * Sx @ Sb
    M = (s1**2 + s2) * Sx @ Sb @ Sx + (s2 * T + sn) * Sx
    return Moments(Sx, C, M, jnp.asarray(design.query_noise_var, F64) + T)


def _drift_K(design: Drift):
    """docs/theory.md §5: K = P - I + diag(d + 2 + s_i^2)."""
    n = design.fixed_n
    s_i = jnp.broadcast_to(jnp.asarray(design.noise_var, F64), (n,))
    return jnp.asarray(design.corr, F64) - jnp.eye(n, dtype=F64) + jnp.diag(design.dim + 2.0 + s_i)


@float64
def pgd_risk(design: IID | Drift, n: int, W, weights=None) -> jax.Array:
    """Exact risk of x^T W X^T (weights * y) (weights default to 1, i.e. PGD).

    IID (docs/theory.md §3): L(W) = s_q^2 + tr(Sx Sb) - 2 tr(Sx W C) + tr(Sx W M W^T).
    Drift (docs/theory.md §5, general W): L = s_q^2 + d - 2 (omega.rho) tr W + (omega^T K omega) tr(W W^T).
    Differentiable in W and weights.
    """
    _require(design, (IID, Drift), "pgd_risk")
    n = _context(design, n)
    W = _square("W", W, design.dim)
    if isinstance(design, Drift):
        w = _weights(weights, n)
        rho = jnp.asarray(design.rho, F64)
        return (jnp.asarray(design.query_noise_var, F64) + design.dim - 2 * (w @ rho) * jnp.trace(W)
                + (w @ _drift_K(design) @ w) * jnp.sum(W * W))
    m = pgd_moments(design, n, weights)
    return m.base - 2 * jnp.trace(m.cov_x @ W @ m.C) + jnp.trace(m.cov_x @ W @ m.M @ W.T)


@float64
def attention_risk(design: IID, n: int, Q, v) -> jax.Array:
    """Exact risk of any one-layer linear attention yhat = z_q^T Q S v, z_q = [x; 0], S = Z^T Z / n,
    Q = Wq Wk^T [d+1, d+1], v = Wv[:, d+1] (IID, scalar noise): PGD's L(W) (``pgd_risk``) is the case
    Q[:d, d] = 0, v[:d] = 0. Given beta, z_i ~ N(0, C) with C = [[Sx, Sx b], [b^T Sx, b^T Sx b + s^2]]
    and E[S A S] = C A C + (C A^T C + tr(A C) C) / n, so with G = Q[:d, :] and u = G S v,
    L = s_q^2 + E_beta[b^T Sx b - 2 b^T Sx G C v + (1 + 1/n) v^T C G^T Sx G C v + (v^T C v) tr(Sx G C G^T) / n],
    a polynomial of degree 4 in beta averaged with Isserlis' theorem. Differentiable in Q and v."""
    _require(design, (IID,), "attention_risk")
    n = _context(design, n)
    d = design.dim
    if jnp.ndim(design.noise_var) != 0:
        raise ValueError("attention_risk needs a scalar noise_var (tokens i.i.d. given beta)")
    Q = _square("Q", Q, d + 1)
    v = _finite("v", v)
    if v.shape != (d + 1,):
        raise ValueError(f"v must have shape ({d + 1},), got {v.shape}")
    Sx, Sb = jnp.asarray(design.cov_x, F64), jnp.asarray(design.cov_beta, F64)
    s2, sq2 = jnp.asarray(design.noise_var, F64), jnp.asarray(design.query_noise_var, F64)
    G1, g, p, q = Q[:d, :d], Q[:d, d], v[:d], v[d]
    T = jnp.trace(Sx @ Sb)
    Et2 = T**2 + 2 * jnp.trace(Sx @ Sb @ Sx @ Sb)  # E[t^2], t = b^T Sx b
    # G C v = m0 + L b + q g t
    a = Sx @ p
    m0 = G1 @ a + q * s2 * g
    L = q * G1 @ Sx + jnp.outer(g, a)
    kappa = g @ Sx @ g
    first = -2 * jnp.trace(Sx @ L @ Sb)
    second = (m0 @ Sx @ m0 + jnp.trace(L.T @ Sx @ L @ Sb) + q**2 * kappa * Et2 + 2 * q * (m0 @ Sx @ g) * T)
    # v^T C v = al0 + al1.b + q^2 t; tr(Sx G C G^T) = ga0 + ga1.b + kappa t
    al0, al1 = p @ Sx @ p + q**2 * s2, 2 * q * Sx @ p
    ga0, ga1 = jnp.trace(Sx @ G1 @ Sx @ G1.T) + kappa * s2, 2 * Sx @ G1.T @ Sx @ g
    third = al0 * ga0 + (al0 * kappa + q**2 * ga0) * T + al1 @ Sb @ ga1 + q**2 * kappa * Et2
    return sq2 + T + first + (1 + 1 / n) * second + third / n


@float64
def optimal_pgd(design, n: int) -> Optimum:
    """Optimal PGD preconditioner and risk ``Optimum(W*, L*)``.

    IID (docs/theory.md §3): W* = C^T M^{-1}, L* = s_q^2 + tr(Sx Sb) - tr(Sx C^T M^{-1} C).
    RAG, TaskFeatureAlignment (docs/theory.md §4): W* = c* I with c* = n E1 / E2.
    Drift (docs/theory.md §5): the uniform-weight (linear attention) optimum,
    W* = (1^T rho / 1^T K 1) I, L_ATT = d + s_q^2 - d (1^T rho)^2 / (1^T K 1).
    O(d^3) whatever n (n up to 2**53).
    """
    _require(design, (IID, RAG, TaskFeatureAlignment, Drift), "optimal_pgd")
    n = _context(design, n)
    d = design.dim
    if isinstance(design, IID):
        m = pgd_moments(design, n)
        W = jnp.linalg.solve(m.M, m.C).T  # M symmetric: C^T M^{-1} = (M^{-1} C)^T
        return Optimum(W, m.base - jnp.trace(m.cov_x @ W @ m.C))
    if isinstance(design, (RAG, TaskFeatureAlignment)):
        E1, E2 = _correlated_moments(design, n)
        return Optimum((n * E1 / E2) * jnp.eye(d, dtype=F64), jnp.asarray(d + design.noise_var - (n * E1) ** 2 / E2, F64))
    if isinstance(design, Drift):
        one = jnp.ones(n, F64)
        c = (one @ jnp.asarray(design.rho, F64)) / (one @ _drift_K(design) @ one)
        W = c * jnp.eye(d, dtype=F64)
        return Optimum(W, pgd_risk(design, n, W))
    _require(design, (IID, RAG, TaskFeatureAlignment, Drift), "optimal_pgd")


def iid_effective_n(dim: int, noise_var: float, risk):
    """Effective sample size: the n at which the isotropic IID optimum d + s^2 - n d / (n + d + 1 + s^2)
    equals ``risk`` (inverse of that formula, real-valued): n = r (d + 1 + s^2) / (d - r), r = d + s^2 - L.
    A risk at or above the zero predictor's, d + s^2 (r <= 0: no better than ignoring the context), gives
    0, never a negative sample size."""
    dim = check.positive_int("dim", dim)
    noise_var = check.real("noise_var", noise_var, 0.0)
    risk = check.real_array("risk", risk)
    if np.any(risk <= noise_var):
        raise ValueError(f"risk must be > noise_var = {noise_var:g} (no predictor beats the label noise), got {risk!r}")
    r = np.maximum(dim + noise_var - risk, 0.0)
    return r * (dim + 1 + noise_var) / (dim - r)


@float64
def optimal_wpgd(design: IID | Drift, n: int) -> WeightedOptimum:
    """Optimal weighted PGD ``WeightedOptimum(W*, omega*, L*)``, omega normalised to mean |omega| = 1.

    Drift (docs/theory.md §5, H3 optimum): omega* = K^{-1} rho, W* = I up to scale,
    L_H3 = d + s_q^2 - d rho^T K^{-1} rho.
    IID with per-position noise s_i^2 (docs/theory.md §3 with weights): the stationarity condition of
    L over omega with sum omega fixed gives omega_i proportional to 1 / (t + s_i^2), where
    t = sum_k w_k (lambda_k + T) / sum_k w_k, w_k = lambda_k^2 / den_k^2,
    den_k = (1 + s2) lambda_k + s2 T + sn, lambda = eig(Sx Sb), T = tr(Sx Sb); t is found by
    fixed-point iteration (isotropic: t = d + 1). Equal noise gives uniform omega.
    """
    _require(design, (IID, Drift), "optimal_wpgd")
    n = _context(design, n)
    if n > MAX_PER_POSITION:
        raise ValueError(f"n must be <= {MAX_PER_POSITION} for optimal_wpgd (it returns one weight per position), "
                         f"got {n}")
    if isinstance(design, Drift):
        raw = jnp.linalg.solve(_drift_K(design), jnp.asarray(design.rho, F64))
        scale = jnp.mean(jnp.abs(raw))
        scale = jnp.where(scale > 0, scale, 1.0)  # rho = 0: omega* = 0, any W
        W = scale * jnp.eye(design.dim, dtype=F64)
        omega = raw / scale
        return WeightedOptimum(W, omega, pgd_risk(design, n, W, omega))
    Sx, Sb = np.asarray(design.cov_x), np.asarray(design.cov_beta)
    lam = np.linalg.eigvals(Sx @ Sb).real
    T = float(np.trace(Sx @ Sb))
    s_i = np.broadcast_to(np.asarray(design.noise_var, np.float64), (n,))
    t = T + lam.max()
    for _ in range(500):
        u = 1.0 / (t + s_i)
        u = u / u.sum()
        s2, sn = np.sum(u**2), np.sum(u**2 * s_i)
        den = (1 + s2) * lam + s2 * T + sn
        wk = lam**2 / den**2
        t_new = float(np.sum(wk * (lam + T)) / np.sum(wk))
        if abs(t_new - t) <= 1e-14 * t:
            break
        t = t_new
    omega = 1.0 / (t + s_i)
    omega = jnp.asarray(omega / omega.mean(), F64)
    m = pgd_moments(design, n, omega)
    W = jnp.linalg.solve(m.M, m.C).T
    return WeightedOptimum(W, omega, pgd_risk(design, n, W, omega))
