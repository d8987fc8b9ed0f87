"""Gating is weighting (Li, Tarzanagh, Rawat, Fazel, Oymak, arXiv 2504.04308; docs/theory.md §10): the optimal
weighted PGD on multitask prompts (``multitask.Multitask``), the best a gated linear attention (GLA) can reach
with its gates, linear attention's uniform-weight optimum, and the gaps between them. All float64 (asked for
locally), numpy results.

WPGD on a multitask prompt, unscaled convention: yhat = x^T W sum_i omega_i x_i y_i. Sample weights constant on
each segment (the optimum is: examples of one segment are exchangeable), omega_i = w_{k(i)}, give the exact risk

    L(W, w) = s_q^2 + d - 2 (b.w) tr W + (w^T A w) ||W||_F^2,
    b_k = m r_k,   A = (m m^T) * corr + diag(m (d + 1 + s^2))          (m = per_task, d = task_dim),

(delimiters carry y = 0 and add nothing). For fixed w the best W is (b.w / w^T A w) I, so
L(w) = s_q^2 + d - d (b.w)^2 / (w^T A w): invariant to the scale of w, and maximising the Rayleigh-type
quotient gives the unique (up to scaling) optimum w* = A^{-1} b, L* = s_q^2 + d - d b^T A^{-1} b
(``optimal_wpgd``). Linear attention is w = 1 (``linear_attention_optimum``). A scalar-gated GLA whose gates
are 1 on data tokens and gamma_k in [0, 1] on the delimiter after segment k has w_k = prod_{l >= k} gamma_l
(times the query's gate): the achievable weights are the cone 0 <= w_1 <= ... <= w_K (non-decreasing toward
the query), and ``gla_optimum`` minimises L over it exactly (non-negative least squares).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.optimize import nnls

from iclsim._precision import float64
from iclsim.multitask import Multitask

__all__ = ["SegmentMoments", "GatingOptimum", "GatingGap", "segment_moments", "wpgd_risk", "optimal_wpgd",
           "linear_attention_optimum", "gla_optimum", "gating_gap", "position_weights"]


class SegmentMoments(NamedTuple):
    """The quadratic form of the risk over per-segment weights w: L(W, w) = base + d - 2 (b.w) tr W
    + (w^T A w) ||W||_F^2, with base = s_q^2 and d = task_dim."""

    A: np.ndarray
    b: np.ndarray
    base: float
    d: int


class GatingOptimum(NamedTuple):
    """An optimal WPGD under a weight constraint: W [dim, dim] (unscaled convention, zero on the marker
    channels), omega [n] per position (mean |omega| = 1 over the data positions, 0 at delimiters), the
    segment weights [K] on the same scale, and the risk L."""

    W: np.ndarray
    omega: np.ndarray
    weights: np.ndarray
    risk: float


class GatingGap(NamedTuple):
    """The three optima on one design and what separates them: risks of the optimal WPGD, the optimal
    scalar-gated GLA and linear attention; ``gap`` = L_LA - L_GLA >= 0; ``gla_attains_wpgd``: A^{-1} b lies
    in the GLA cone (non-negative, non-decreasing toward the query); ``strict_advantage``: the closed-form
    condition (``gating_gap``) for L_GLA < L_LA."""

    wpgd: float
    gla: float
    linear_attention: float
    gap: float
    gla_attains_wpgd: bool
    strict_advantage: bool


def _check(design) -> Multitask:
    if not isinstance(design, Multitask):
        raise TypeError(f"design must be a multitask.Multitask, got {type(design).__name__}")
    return design


@float64
def segment_moments(design: Multitask) -> SegmentMoments:
    """A, b and s_q^2 of the module docstring's risk over per-segment weights (docs/theory.md §10.2)."""
    _check(design)
    d, K, m = design.task_dim, design.tasks, float(design.per_task)
    s2 = float(design.noise_var)
    A = m * m * np.asarray(design.corr, np.float64) + np.eye(K) * m * (d + 1 + s2)
    return SegmentMoments(A, m * np.asarray(design.relevance, np.float64), float(design.query_noise_var), d)


@float64
def wpgd_risk(design: Multitask, weights, W=None) -> float:
    """Exact risk of the WPGD with per-segment weights [K] and preconditioner W [task_dim, task_dim] (the data
    block; default the best W for these weights, (b.w / w^T A w) I)."""
    mo = segment_moments(design)
    w = np.asarray(weights, np.float64)
    if w.shape != mo.b.shape or not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be {mo.b.shape[0]} finite numbers (one per segment), got {weights!r}")
    q = w @ mo.A @ w
    if W is None:
        return float(mo.base + mo.d - (mo.d * (mo.b @ w) ** 2 / q if q > 0 else 0.0))
    W = np.asarray(W, np.float64)
    if W.shape != (mo.d, mo.d):
        raise ValueError(f"W must be the [{mo.d}, {mo.d}] data block, got shape {W.shape}")
    return float(mo.base + mo.d - 2 * (mo.b @ w) * np.trace(W) + q * np.sum(W * W))


def position_weights(design: Multitask, weights) -> np.ndarray:
    """Per-segment weights [K] laid out on the n context positions (0 at delimiters)."""
    seg = design.positions()
    w = np.asarray(weights, np.float64)
    return np.where(seg >= 0, w[np.maximum(seg, 0)], 0.0)


def _optimum(design: Multitask, w: np.ndarray) -> GatingOptimum:
    mo = segment_moments(design)
    omega = position_weights(design, w)
    scale = np.mean(np.abs(omega[design.positions() >= 0]))
    scale = scale if scale > 0 else 1.0
    w, omega = w / scale, omega / scale
    q = w @ mo.A @ w
    c = mo.b @ w / q if q > 0 else 0.0
    W = np.zeros((design.dim, design.dim))
    W[:mo.d, :mo.d] = c * np.eye(mo.d)
    return GatingOptimum(W, omega, w, wpgd_risk(design, w))


@float64
def optimal_wpgd(design: Multitask) -> GatingOptimum:
    """The optimal WPGD over all sample weights: w* = A^{-1} b (unique up to scaling), W* = c I,
    L* = s_q^2 + d - d b^T A^{-1} b (module docstring; docs/theory.md §10.2)."""
    mo = segment_moments(design)
    return _optimum(design, np.linalg.solve(mo.A, mo.b))


@float64
def linear_attention_optimum(design: Multitask) -> GatingOptimum:
    """Uniform weights (linear attention's PGD, delimiters inert): L_LA = s_q^2 + d - d (b.1)^2 / 1^T A 1."""
    return _optimum(design, np.ones(design.tasks))


@float64
def gla_optimum(design: Multitask) -> GatingOptimum:
    """The best scalar-gated GLA (delimiter gates in [0, 1], data gates 1): L minimised over the cone
    0 <= w_1 <= ... <= w_K. With w = T u (T lower-triangular ones, u >= 0) it is min_u>=0 of
    u^T T^T A T u -/+ 2 b^T T u (W of either sign), non-negative least-squares problems solved exactly (active set)."""
    _check(design)
    if not design.delimiters:
        raise ValueError("gla_optimum needs delimiters=True: without them a token's gate cannot tell the segments "
                         "apart, and the GLA cone of weights is not this one")
    mo = segment_moments(design)
    K = design.tasks
    T = np.tril(np.ones((K, K)))
    L = np.linalg.cholesky(T.T @ mo.A @ T)
    best = np.zeros(K)
    for sign in (1.0, -1.0):  # W may carry either sign: the quotient (b.w)^2 / w^T A w, over the cone
        u, _ = nnls(L.T, np.linalg.solve(L, sign * (T.T @ mo.b)), maxiter=50 * K)
        w = T @ u
        if w @ mo.A @ w > 0 and (not np.any(best) or wpgd_risk(design, w) < wpgd_risk(design, best)):
            best = w
    if not np.any(best > 0):  # b = 0: no task carries information about the query's, predict zero
        return GatingOptimum(np.zeros((design.dim, design.dim)), np.zeros(design.fixed_n), np.zeros(K),
                             float(mo.base + mo.d))
    return _optimum(design, best)


@float64
def gating_gap(design: Multitask) -> GatingGap:
    """L_WPGD <= L_GLA <= L_LA and the conditions that separate them (docs/theory.md §10.3):
    GLA attains the optimal WPGD iff w* = A^{-1} b or -w* is >= 0 and non-decreasing toward the query; GLA beats
    linear attention strictly iff uniform weights fail the cone's optimality condition, i.e. some tail sum
    sign(c) sum_{k >= j} (b_k - c (A 1)_k) > 0 for j = 2..K, c = b.1 / 1^T A 1 (later segments under-weighted;
    b.1 = 0: iff b != 0)."""
    mo = segment_moments(design)
    w_star = np.linalg.solve(mo.A, mo.b)
    tol = 1e-12 * np.max(np.abs(w_star))
    attains = any(bool(np.all(v >= -tol) and np.all(np.diff(v) >= -tol)) for v in (w_star, -w_star))  # W's sign
    one = np.ones(design.tasks)
    c = mo.b @ one / (one @ mo.A @ one)
    excess = np.sign(c) * (mo.b - c * (mo.A @ one))  # for b.1 < 0 the optimum has W < 0: the condition on -b
    tails = np.cumsum(excess[::-1])[::-1][1:]
    scale = np.max(np.abs(mo.b))
    strict = bool(np.any(tails > 1e-12 * scale)) if abs(c) > 1e-15 * scale else bool(scale > 0)
    wp, gl, la = optimal_wpgd(design).risk, gla_optimum(design).risk, linear_attention_optimum(design).risk
    return GatingGap(float(wp), float(gl), float(la), float(la - gl), attains, strict)
