"""Closed-form risks of docs/theory.md §3 to §5 and model-free ground truth, all in float64
(asked for locally, ``_precision.float64``: the caller's ``jax_enable_x64`` flag is left alone).

Predictors: PGD yhat = x^T W X^T y and weighted PGD (WPGD) yhat = x^T W X^T (omega * y).
Risk L = E[(y - yhat)^2] over fresh prompts, including the irreducible query noise s_q^2.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as check
from iclsim import montecarlo, wishart
from iclsim._precision import float64
from iclsim.designs import IID, RAG, Drift, Prompts, TaskFeatureAlignment, _check_n

__all__ = ["F64", "Optimum", "WeightedOptimum", "Moments", "pgd_moments", "pgd_risk", "attention_risk",
           "optimal_pgd", "rag_effective_risk", "effective_sample_multiplier", "iid_effective_n", "optimal_wpgd",
           "lowrank_optimal_pgd", "lowrank_optimal_risk", "lora_optimal_pgd", "lora_optimal_risk", "ground_truth",
           "risk_moments", "mean_and_se", "monte_carlo_risk", "pgd_predict", "MultiStepGD", "MAX_STEPS",
           "context_power_traces",
           "multistep_gd_risk", "optimal_multistep_gd", "DirectionGains", "truncated_optimum_risk", "direction_gains",
           "noise_threshold", "predict_zero_risk", "BayesRisk", "bayes_risk"]

F64 = jnp.float64


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


# the most context positions a function that returns or reads one number per position takes
MAX_PER_POSITION = 10**7


def _context(design, n) -> int:
    """n checked for ``design`` (``designs._check_n``) and at most ``_validate.MAX_N`` (the closed forms
    are O(d^3) in n, exact in float64 up to 2**53)."""
    _check_n(design, n)
    return check.integer("n", n, 1, check.MAX_N)


def _weights(weights, n):
    if weights is None:
        if n > MAX_PER_POSITION:
            raise ValueError(f"n must be <= {MAX_PER_POSITION} for per-position weights, got {n}")
        return jnp.ones(n, F64)
    w = _finite("weights", weights)
    if w.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {w.shape}")
    return w


def _finite(name, A):
    """A as a float64 array; a concrete array must be finite (a traced one, under grad, is not checked)."""
    if not isinstance(A, jax.core.Tracer):
        arr = check.real_array(name, A, finite=False)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be finite (it holds NaN or inf)")
    return jnp.asarray(A, F64)


def _square(name, W, d):
    W = _finite(name, W)
    if W.shape != (d, d):
        raise ValueError(f"{name} must have shape ({d}, {d}), got {W.shape}")
    return W


def _weight_sums(design, n: int, weights):
    """(s1, s2, sn) = (sum w_i, sum w_i^2, sum w_i^2 s_i^2): analytic for uniform weights (weights None),
    so the cost is free of n."""
    if weights is None:
        noise = np.asarray(design.noise_var, np.float64)
        total = float(noise.sum()) if noise.ndim else float(noise) * n
        return jnp.asarray(float(n), F64), jnp.asarray(float(n), F64), jnp.asarray(total, F64)
    w = _weights(weights, n)
    s_i = jnp.broadcast_to(jnp.asarray(design.noise_var, F64), (n,))
    return jnp.sum(w), jnp.sum(w**2), jnp.sum(w**2 * s_i)


def _require(design, kinds, what):
    if not isinstance(design, kinds):
        names = ", ".join(k.__name__ for k in kinds)
        raise TypeError(f"{what} has a closed form for {names} designs, not {type(design).__name__}; "
                        "use monte_carlo_risk or ground_truth")


def _sym_sqrt(A):
    lam, U = jnp.linalg.eigh(A)
    return (U * jnp.sqrt(jnp.clip(lam, 0.0, None))[None, :]) @ U.T


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


def _correlated_moments(design: RAG | TaskFeatureAlignment, n: int):
    """docs/theory.md §4: E1, E2 with W* = c* I, c* = n E1 / E2, L* = d + s^2 - (n E1)^2 / E2."""
    d, a, s2 = design.dim, float(design.alpha) ** 2, float(design.noise_var)
    m1, m2, m3 = d, d * (d + 2), d * (d + 2) * (d + 4)
    if isinstance(design, RAG):
        g = float(design.gamma) ** 2
        E1 = a * m2 + g * m1
        E2 = (n * (n - 1) * (a**2 * m3 + 2 * a * g * m2 + g**2 * m1)
              + n * (a**2 * m3 + (d + 5) * a * g * m2 + (d + 2) * g**2 * m1) + n * s2 * (a * m2 + g * m1))
    else:
        E1 = a * m2 + m1
        E2 = (n * (n - 1) * (a**2 * m3 + 2 * a * m2 + m1)
              + n * (a**2 * m3 + (d + 5) * a * m2 + (d + 2) * m1) + n * s2 * d * (a + 1))
    return E1, E2


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


@float64
def rag_effective_risk(design: RAG, n: int) -> jax.Array:
    """docs/theory.md §4, large-d approximation for gamma = 1: the isotropic IID optimum with n replaced by
    kappa n, kappa = alpha^2 d + 1: L ~ d + s^2 - d kappa n / (kappa n + kappa + d + s^2)."""
    _require(design, (RAG,), "rag_effective_risk")
    n = _context(design, n)
    if float(design.gamma) != 1.0:
        raise ValueError(f"rag_effective_risk is the approximation for gamma = 1, got a RAG with gamma = "
                         f"{float(design.gamma):g}; use optimal_pgd for the exact risk")
    d, s2 = design.dim, float(design.noise_var)
    kappa = effective_sample_multiplier(design)
    return jnp.asarray(d + s2 - d * kappa * n / (kappa * n + kappa + d + s2), F64)


def effective_sample_multiplier(design: RAG) -> float:
    """Paper A's kappa = alpha^2 d + 1 for RAG with gamma = 1."""
    _require(design, (RAG,), "effective_sample_multiplier")
    return float(design.alpha) ** 2 * design.dim + 1.0


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


def _whitened_optimum(design: IID, n: int, target):
    """Sx^{1/2} (target) M^{1/2} and the maps back, for the Eckart-Young forms of docs/theory.md §3."""
    m = pgd_moments(design, n)
    sx_half, m_half = _sym_sqrt(m.cov_x), _sym_sqrt(m.M)
    return sx_half @ target @ m_half, sx_half, m_half


def _truncate(A, rank):
    U, s, Vt = jnp.linalg.svd(A)
    s = jnp.where(jnp.arange(s.shape[0]) < rank, s, 0.0)
    return (U * s[None, :]) @ Vt


def _check_rank(rank, d):
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"rank must be an integer in [0, {d}] (at most dim), got {rank!r} (a {type(rank).__name__})")
    if not 0 <= rank <= d:
        raise ValueError(f"rank must be an integer in [0, {d}] (at most dim), got {rank!r}")


@float64
def lowrank_optimal_pgd(design: IID, n: int, rank: int) -> jax.Array:
    """Best rank-r preconditioner (docs/theory.md §3, Eckart-Young in the Sx^{1/2} . M^{1/2} geometry):
    W_r = Sx^{-1/2} [Sx^{1/2} W* M^{1/2}]_r M^{-1/2}."""
    _require(design, (IID,), "lowrank_optimal_pgd")
    _context(design, n)
    _check_rank(rank, design.dim)
    W_star, _ = optimal_pgd(design, n)
    A, sx_half, m_half = _whitened_optimum(design, n, W_star)
    return jnp.linalg.solve(sx_half, _truncate(A, rank)) @ jnp.linalg.inv(m_half)


@float64
def lowrank_optimal_risk(design: IID, n: int, rank: int) -> jax.Array:
    """min_{rank W <= r} L(W) = L* + sum_{i>r} sigma_i(Sx^{1/2} W* M^{1/2})^2 (docs/theory.md §3)."""
    _require(design, (IID,), "lowrank_optimal_risk")
    _context(design, n)
    _check_rank(rank, design.dim)
    W_star, L_star = optimal_pgd(design, n)
    A, _, _ = _whitened_optimum(design, n, W_star)
    s = jnp.linalg.svd(A, compute_uv=False)
    return L_star + jnp.sum(jnp.where(jnp.arange(s.shape[0]) >= rank, s**2, 0.0))


@float64
def lora_optimal_pgd(design: IID, n: int, W0, rank: int) -> jax.Array:
    """Best W0 + Delta with rank Delta <= r on the new design (docs/theory.md §3, LoRA):
    Delta = Sx^{-1/2} [Sx^{1/2} (W*_new - W0) M_new^{1/2}]_r M_new^{-1/2}."""
    _require(design, (IID,), "lora_optimal_pgd")
    _context(design, n)
    _check_rank(rank, design.dim)
    W0 = _square("W0", W0, design.dim)
    W_star, _ = optimal_pgd(design, n)
    A, sx_half, m_half = _whitened_optimum(design, n, W_star - W0)
    return W0 + jnp.linalg.solve(sx_half, _truncate(A, rank)) @ jnp.linalg.inv(m_half)


@float64
def lora_optimal_risk(design: IID, n: int, W0, rank: int) -> jax.Array:
    """min L_new(W0 + Delta), rank Delta <= r: L*_new + sum_{i>r} sigma_i(Sx^{1/2}(W*_new - W0) M^{1/2})^2."""
    _require(design, (IID,), "lora_optimal_risk")
    _context(design, n)
    _check_rank(rank, design.dim)
    W0 = _square("W0", W0, design.dim)
    W_star, L_star = optimal_pgd(design, n)
    A, _, _ = _whitened_optimum(design, n, W_star - W0)
    s = jnp.linalg.svd(A, compute_uv=False)
    return L_star + jnp.sum(jnp.where(jnp.arange(s.shape[0]) >= rank, s**2, 0.0))


def _sampled(design, n, what: str) -> int:
    """n for a Monte Carlo function: a design with ``dim`` and ``sample``, n at most MAX_PER_POSITION."""
    if not (hasattr(design, "dim") and callable(getattr(design, "sample", None))):
        raise TypeError(f"design must be a design (with dim and sample(key, batch, n, dtype)), got "
                        f"{type(design).__name__}")
    n = _context(design, n)
    if n > MAX_PER_POSITION:
        raise ValueError(f"n must be <= {MAX_PER_POSITION} for {what} (it draws n context pairs per prompt), got {n}")
    return n


def _chunks(num_prompts, batch_size):
    check.positive_int("num_prompts", num_prompts)
    check.positive_int("batch_size", batch_size)
    batch = min(batch_size, num_prompts)
    chunks = -(-num_prompts // batch)
    if chunks > 2**31 - 1:  # the batch loop counts in int32
        raise ValueError(f"num_prompts = {num_prompts} is {chunks} batches of {batch}: at most {2**31 - 1} batches; "
                         "use fewer prompts or a larger batch_size")
    return chunks, batch


@float64
def ground_truth(design, n: int, key, num_prompts: int = 200_000, weights=None, batch_size: int = 10_000):
    """Monte Carlo estimate of the PGD-form optimum, the best yhat = <W, x g^T>, g = X^T (weights * y),
    for any design that can be sampled (docs/theory.md §4): the same optimum ``optimal_pgd`` gives in
    closed form, NOT the Bayes risk (the best of all predictors, ``bayes_risk``), which lies below it.

    With F = vec(x g^T), A = E[F F^T], b = E[y F]: W = A^{-1} b, L = E[y^2] - b^T A^{-1} b,
    estimated in float64 from num_prompts sampled prompts (rounded up to whole batches). The
    in-sample L is a least-squares fit's training error: biased low (by about d^2 / num_prompts
    relative) and without a standard error. For an unbiased risk with its SE score W on fresh
    prompts (``monte_carlo_risk``), which is biased high only by W's estimation error.
    """
    n = _sampled(design, n, "ground_truth")
    chunks, batch = _chunks(num_prompts, batch_size)
    w = _weights(weights, n)
    d = design.dim
    if chunks * batch <= d * d:  # A = E[F F^T] is d^2 x d^2: fewer prompts leave it singular
        raise ValueError(f"num_prompts must be > dim^2 = {d * d} for ground_truth (it fits {d * d} coefficients), "
                         f"got {num_prompts}")
    check.memory(f"ground_truth at dim = {d}", 8.0 * (2 * d**4 + batch * (d * d + n * d)),
                 "use a smaller dim or batch_size")

    @jax.jit
    def accumulate(keys):
        def body(carry, k):
            p = design.sample(k, batch, n, F64)
            g = jnp.einsum("bnd,bn->bd", p.X, p.y * w[None, :])
            F = jnp.einsum("bi,bj->bij", p.x, g).reshape(batch, d * d)
            A, b, yy = carry
            return (A + F.T @ F, b + F.T @ p.y_query, yy + p.y_query @ p.y_query), None

        init = (jnp.zeros((d * d, d * d), F64), jnp.zeros(d * d, F64), jnp.zeros((), F64))
        return jax.lax.scan(body, init, keys)[0]

    A, b, yy = accumulate(jax.random.split(key, chunks))
    wvec = jnp.linalg.solve(A, b)
    return wvec.reshape(d, d), (yy - b @ wvec) / (chunks * batch)


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


# --- Multi-step gradient descent: the reference for L-layer models (docs/theory.md §8) ---------------


class MultiStepGD(NamedTuple):
    """L steps of gradient descent w_{l+1} = w_l + gamma_l (X^T y - X^T X w_l) / n from w_0 = 0."""

    step_sizes: np.ndarray  # [L] gamma_l
    risk: float             # exact: the risk polynomial at the exact Wishart moments (``wishart``)
    se: float               # 0.0 (kept so the reference reads like a Monte Carlo estimate)


def _isotropic_scales(design: IID, what: str):
    """(sigma, tau, s^2, s_q^2) of an IID design with cov_x = sigma I, cov_beta = tau I, scalar noise."""
    _require(design, (IID,), what)
    Sx, Sb = np.asarray(design.cov_x, np.float64), np.asarray(design.cov_beta, np.float64)
    d = design.dim
    sigma, tau = Sx[0, 0], Sb[0, 0]
    if not (np.allclose(Sx, sigma * np.eye(d), rtol=0, atol=1e-12 * sigma)
            and np.allclose(Sb, tau * np.eye(d), rtol=0, atol=1e-12 * tau)):
        raise ValueError(f"{what} needs an isotropic design (cov_x and cov_beta multiples of the identity); "
                         "got a non-isotropic one")
    if np.ndim(design.noise_var) != 0:
        raise ValueError(f"{what} needs a scalar noise_var")
    return float(sigma), float(tau), float(design.noise_var), float(design.query_noise_var)


@float64
def context_power_traces(key, dim: int, n: int, num: int, max_power: int) -> jax.Array:
    """``num`` draws of tr((X^T X)^k), k = 0..max_power, for X [n, dim] standard normal: [num, max_power + 1]
    float64 (k = 0 gives dim). Drawn in chunks of 10_000 prompts (memory O(chunk n dim))."""
    check.positive_int("dim", dim)
    check.positive_int("n", n)
    check.positive_int("num", num)
    check.positive_int("max_power", max_power, minimum=0)
    chunks, batch = _chunks(num, 10_000)
    with jax.enable_x64(True):
        return _power_traces(key, dim, n, chunks, batch, max_power)[:num]


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _power_traces(key, dim, n, chunks, batch, max_power):
    def chunk(k):
        X = jax.random.normal(k, (batch, n, dim), F64)
        W = jnp.einsum("bni,bnj->bij", X, X)
        traces, power = [jnp.full((batch,), float(dim), F64)], jnp.broadcast_to(jnp.eye(dim, dtype=F64), W.shape)
        for _ in range(max_power):
            power = power @ W
            traces.append(jnp.trace(power, axis1=1, axis2=2))
        return jnp.stack(traces, axis=1)

    return jax.lax.map(chunk, jax.random.split(key, chunks)).reshape(chunks * batch, max_power + 1)


def _multistep_polynomials(step_sizes):
    """Coefficients (lowest degree first) of q(l)^2 and of l p(l)^2 for q(l) = prod_l (1 - gamma_l l) and
    l p(l) = 1 - q(l): the risk of L-step GD is linear in the spectral power sums tr S^k. Products of
    polynomials written as shifts and one constant matrix (no convolution op): the minimiser
    differentiates this twice, and the convolution's derivatives compile to large programs."""
    q = jnp.ones((1,), step_sizes.dtype)
    for i in range(step_sizes.shape[0]):  # times (1 - gamma_i l)
        zero = jnp.zeros((1,), q.dtype)
        q = jnp.concatenate([q, zero]) - step_sizes[i] * jnp.concatenate([zero, q])
    p = -q[1:]  # (1 - q(l)) / l
    return _squared(q), jnp.concatenate([jnp.zeros((1,), p.dtype), _squared(p)])


def _squared(a):
    """Coefficients of a(l)^2: the sums of a_i a_j over i + j = k, one product by a constant 0/1 matrix."""
    m = a.shape[0]
    sums = np.zeros((2 * m - 1, m * m))
    sums[np.add.outer(np.arange(m), np.arange(m)).ravel(), np.arange(m * m)] = 1.0
    return jnp.asarray(sums, a.dtype) @ jnp.outer(a, a).ravel()


def _multistep_values(step_sizes, moments, sigma, tau, s2, n):
    """Per row of ``moments`` ([rows, K], column k = tr S^k of S = X^T X / n, one draw's or the expectation):
    sigma [tau tr q(sigma S)^2 + (s^2 / n) tr sigma S p(sigma S)^2], the covariance sigma I scaling S^k by
    sigma^k."""
    qq, lpp = _multistep_polynomials(step_sizes)
    t = moments * (sigma ** jnp.arange(moments.shape[1], dtype=F64))[None, :]
    return sigma * (tau * t[:, :qq.shape[0]] @ qq + (s2 / n) * t[:, :lpp.shape[0]] @ lpp)


def _checked_steps(step_sizes) -> np.ndarray:
    gam = np.asarray(step_sizes, np.float64)
    if gam.ndim != 1 or not 1 <= gam.shape[0] <= MAX_STEPS or not np.all(np.isfinite(gam)):
        raise ValueError(f"step_sizes must be a 1-D array of 1 to {MAX_STEPS} finite numbers, got {step_sizes!r}")
    return gam


@float64
def multistep_gd_risk(design: IID, n: int, step_sizes, key=None, num_draws: int | None = None):
    """Risk (mean, se) of L-step GD w_{l+1} = w_l + gamma_l X^T (y - X w_l) / n, w_0 = 0, on an isotropic IID
    design (docs/theory.md §8): with e_l = beta - w_l, e_L = q(S) beta - p(S) X^T eps / n for
    S = X^T X / n, q(S) = prod_l (I - gamma_l S), so L = s_q^2 + sigma E[tau tr q(S)^2 + (s^2/n) tr S p(S)^2],
    linear in m_k = E tr S^k. By default exact: the m_k from ``wishart.sample_covariance_moments`` and se =
    0.0. With ``num_draws`` (and ``key``) given, a Monte Carlo estimate over that many Wishart draws instead
    (``context_power_traces``), with its standard error: an independent check of the exact moments.
    L = 1 is PGD with W = gamma I / n (``pgd_risk``)."""
    sigma, tau, s2, sq2 = _isotropic_scales(design, "multistep_gd_risk")
    _check_n(design, n)
    # zero steps are no steps: every L up to STEP_SLOTS shares one program
    gam = _padded_steps(_checked_steps(step_sizes))
    powers = 2 * gam.shape[0] + 1
    with jax.enable_x64(True):
        if num_draws is None:
            moments = jnp.asarray(wishart.sample_covariance_moments(n, design.dim, powers))[None]
            return float(sq2 + _multistep_mean_sd(gam, moments, sigma, tau, s2, n)[0]), 0.0
        check.positive_int("num_draws", num_draws, minimum=2)
        if key is None:
            raise ValueError("multistep_gd_risk: a Monte Carlo estimate (num_draws given) needs a key")
        traces = context_power_traces(key, design.dim, n, num_draws, powers)
        traces = traces * (1.0 / n) ** jnp.arange(powers + 1, dtype=F64)[None, :]
        mean, sd = _multistep_mean_sd(gam, traces, sigma, tau, s2, n)
        return float(sq2 + mean), float(sd / np.sqrt(num_draws))


@jax.jit
def _multistep_mean_sd(step_sizes, moments, sigma, tau, s2, n):
    """Mean and standard deviation (0 for one row) over the rows of ``_multistep_values``: one compiled
    program, not a dozen eager operations each compiled on its first call."""
    vals = _multistep_values(step_sizes, moments, sigma, tau, s2, n)
    sd = jnp.std(vals, ddof=1) if vals.shape[0] > 1 else jnp.zeros((), vals.dtype)
    return jnp.mean(vals), sd


@float64
def optimal_multistep_gd(design: IID, n: int, steps: int, key=None, num_draws: int | None = None) -> MultiStepGD:
    """The best L-step GD (step sizes gamma_1..gamma_L) on an isotropic IID design, docs/theory.md §8. The
    risk is s_q^2 + sigma [tau E tr q(S)^2 + (s^2 / n) E tr S p(S)^2], linear in the moments m_k = E tr S^k,
    k <= 2L + 1, which are exact (``wishart.sample_covariance_moments``); the polynomial in gamma is
    minimised by damped Newton from ``STEP_STARTS`` starts (``_minimise_steps``; an ArithmeticError if the
    lowest-risk steps found are not a minimum) and its value there is the exact risk (se = 0.0). ``key`` and
    ``num_draws`` are accepted for callers written when the moments were Monte Carlo and are not used. An
    L-layer linear transformer in the form of Ahn et al. (``models.LinearTransformer``) can represent this
    predictor."""
    del key, num_draws  # the moments are exact
    sigma, tau, s2, sq2 = _isotropic_scales(design, "optimal_multistep_gd")
    _check_n(design, n)
    check.integer("steps", steps, minimum=1, maximum=MAX_STEPS)
    one = n / (n + design.dim + 1 + s2 / tau) / sigma  # the optimal single step
    with jax.enable_x64(True):
        starts = _padded_steps(np.asarray(_step_starts(steps, one), np.float64))
        moments = jnp.asarray(_exact_moments(n, design.dim, 2 * starts.shape[1] + 1))
        free = np.arange(starts.shape[1]) < steps  # the padded steps stay 0 (masked in the objective)
        found, values, gradients, hessians = map(np.asarray,
                                                 _minimise_steps(starts, free, moments, sigma, tau, s2, n))
    best = int(np.argmin(np.nan_to_num(values, nan=np.inf)))
    curvature = np.linalg.eigvalsh(hessians[best, :steps, :steps]).min() if np.isfinite(values[best]) else np.nan
    if not (gradients[best] <= STEP_TOLERANCE and curvature > 0):
        raise ArithmeticError(f"optimal_multistep_gd: the lowest-risk steps found are not a minimum of the risk "
                              f"(risk {values[best]:.6g}, relative gradient {gradients[best]:.3g}, at most "
                              f"{STEP_TOLERANCE:g} allowed; smallest Hessian eigenvalue {curvature:.3g}, > 0 needed) "
                              f"for steps = {steps}, n = {n}, d = {design.dim}; the moments may be too large for "
                              "float64: use fewer steps or a shorter context")
    return MultiStepGD(np.sort(found[best, :steps]), float(sq2 + values[best]), 0.0)


def _exact_moments(n: int, d: int, max_power: int) -> np.ndarray:
    """The exact m_k = E tr S^k, k = 0..max_power (the one place the minimiser takes its moments from)."""
    return wishart.sample_covariance_moments(n, d, max_power)


NEWTON_ITERATIONS = 60  # iterations of _minimise_steps from each start
STEP_TOLERANCE = 1e-6  # largest relative gradient accepted at the chosen steps (docs/theory.md §8)
STEP_STARTS = 64  # starts for the best L-step GD (the risk polynomial has several local minima)
STEP_SLOTS = 4  # step-size vectors are padded with zero steps to a multiple of this: one program for L <= 4
# the most GD steps: the risk of L padded steps needs Wishart powers up to 2 L + 1 <= wishart.MAX_DEGREE
MAX_STEPS = (wishart.MAX_DEGREE - 1) // 2 // STEP_SLOTS * STEP_SLOTS


def _padded_steps(steps: np.ndarray) -> np.ndarray:
    """``steps`` [..., L] with zero steps appended up to a multiple of ``STEP_SLOTS``: q(l) = prod (1 - gamma l)
    is unchanged by a zero step, so the risk is too, and every depth up to STEP_SLOTS compiles the same
    programs (the Wishart power traces, the minimiser). On the host: no program to compile for it."""
    slots = -(-steps.shape[-1] // STEP_SLOTS) * STEP_SLOTS
    return np.pad(steps, [(0, 0)] * (steps.ndim - 1) + [(0, slots - steps.shape[-1])])


def _step_starts(steps: int, one: float) -> np.ndarray:
    """[STEP_STARTS, steps] starting step sizes: constant steps at 0.5, 1 and 1.5 times the optimal single
    step ``one``, increasing and decreasing ramps, and log-uniform draws in [one / 4, 4 one] (a fixed
    generator: the same starts every call). The best L-step GD mixes short steps with long overshooting
    ones (docs/theory.md §8), which a few structured starts can miss."""
    structured = [np.full(steps, c) for c in (0.5, 1.0, 1.5)] + [np.linspace(0.5, 2.0, steps),
                                                                 np.linspace(2.0, 0.5, steps)]
    spread = np.exp(np.random.default_rng(steps).uniform(np.log(0.25), np.log(4.0), (STEP_STARTS - 5, steps)))
    return one * np.concatenate([np.stack(structured), spread])


@jax.jit
def _minimise_steps(starts, free, moments, sigma, tau, s2, n):
    """Damped Newton (Levenberg-Marquardt) from every start at once, one compiled program: (step sizes
    [starts, slots], risk [starts], relative gradient [starts], Hessian [starts, slots, slots]) at each
    start's end. Steps where ``free`` is False are held at 0 (their rows of the Hessian are the identity's).
    Each iteration solves (H + lam h I) p = -grad, h the largest diagonal entry of the free steps' Hessian,
    and takes x + p if it lowers the risk (then lam / 4), else keeps x (lam * 4): near a minimum this is
    Newton's method, far from one a short gradient step. The relative gradient is the largest gradient
    entry over h. The risk is a polynomial of degree 2 in each step size, so the Hessian is exact and
    cheap; the fixed ``NEWTON_ITERATIONS`` keep the loop a compiled ``fori_loop``."""
    def objective(g):
        return _multistep_values(jnp.where(free, g, 0.0), moments[None], sigma, tau, s2, n)[0]

    gradient = jax.grad(objective)
    eye = jnp.eye(starts.shape[1], dtype=starts.dtype)
    both_free = free[:, None] & free[None, :]

    def derivatives(x):  # the gradient and, forward over it, the Hessian's columns: one reverse pass, not two
        g, H = jax.vmap(lambda v: jax.jvp(gradient, (x,), (v,)), out_axes=(None, 1))(eye)
        H = jnp.where(both_free, H, eye)
        return jnp.where(free, g, 0.0), H, jnp.max(jnp.where(free, jnp.abs(jnp.diag(H)), 0.0))

    def iteration(_, state):
        x, value, damping = state
        g, H, scale = derivatives(x)
        trial = x - jnp.where(free, jnp.linalg.solve(H + damping * scale * eye, g), 0.0)
        trial_value = objective(trial)
        better = trial_value < value  # False for a NaN trial: it is never taken
        return (jnp.where(better, trial, x), jnp.where(better, trial_value, value),
                jnp.where(better, damping / 4, damping * 4))

    def descend(x0):
        x, value, _ = jax.lax.fori_loop(0, NEWTON_ITERATIONS, iteration,
                                        (x0, objective(x0), jnp.asarray(1e-3, x0.dtype)))
        g, H, scale = derivatives(x)
        return x, value, jnp.max(jnp.abs(g)) / scale, H

    return jax.vmap(descend)(starts)


# --- When SVD truncation of the optimum helps (docs/theory.md §6.1) ------------------------------------


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
            X = jax.random.normal(k, (montecarlo.DRAW_BLOCK, n, d), F64) @ lx.T
            XSb = X @ Sb_j  # [B, n, d]
            K = jnp.einsum("bnd,bmd->bnm", XSb, X) + D[None]
            # tr(Sx Sigma_post) = tr(Sx Sb) - tr(Sx Sb X^T K^+ X Sb)
            explained = jnp.einsum("bnd,bnm,bme,ed->b", XSb, jnp.linalg.pinv(K, hermitian=True), XSb, Sx_j)
            return jnp.trace(Sx_j @ Sb_j) - explained

        total, total_sq = jax.jit(lambda k: montecarlo.block_sums(excess, k, num_draws, group))(key)
        mean, se = montecarlo.estimate(total, total_sq, num_draws)
        return BayesRisk(sq2 + float(mean), float(se))
