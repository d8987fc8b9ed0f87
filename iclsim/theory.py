"""Closed-form risks of docs/theory.md §3 to §5 and model-free ground truth, all in float64
(asked for locally, ``_precision.float64``: the caller's ``jax_enable_x64`` flag is left alone).

Predictors: PGD yhat = x^T W X^T y and weighted PGD (WPGD) yhat = x^T W X^T (omega * y).
Risk L = E[(y - yhat)^2] over fresh prompts, including the irreducible query noise s_q^2.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as check
from iclsim._precision import float64
from iclsim.designs import IID, RAG, Drift, Prompts, TaskFeatureAlignment, _check_n
from iclsim.gram import draw

__all__ = ["F64", "Optimum", "WeightedOptimum", "Moments", "pgd_moments", "pgd_risk", "attention_risk",
           "optimal_pgd", "rag_effective_risk", "effective_sample_multiplier", "iid_effective_n", "optimal_wpgd",
           "lowrank_optimal_pgd", "lowrank_optimal_risk", "lora_optimal_pgd", "lora_optimal_risk", "ground_truth",
           "risk_moments", "mean_and_se", "monte_carlo_risk", "pgd_predict"]

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


def _weights(weights, n):
    if weights is None:
        return jnp.ones(n, F64)
    w = jnp.asarray(weights, F64)
    if w.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {w.shape}")
    return w


def _square(name, W, d):
    W = jnp.asarray(W, F64)
    if W.shape != (d, d):
        raise ValueError(f"{name} must have shape ({d}, {d}), got {W.shape}")
    return W


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
    _check_n(design, n)
    w = _weights(weights, n)
    Sx, Sb = jnp.asarray(design.cov_x, F64), jnp.asarray(design.cov_beta, F64)
    s_i = jnp.broadcast_to(jnp.asarray(design.noise_var, F64), (n,))
    s1, s2, sn = jnp.sum(w), jnp.sum(w**2), jnp.sum(w**2 * s_i)
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
    _check_n(design, n)
    W = _square("W", W, design.dim)
    w = _weights(weights, n)
    if isinstance(design, Drift):
        rho = jnp.asarray(design.rho, F64)
        return (jnp.asarray(design.query_noise_var, F64) + design.dim - 2 * (w @ rho) * jnp.trace(W)
                + (w @ _drift_K(design) @ w) * jnp.sum(W * W))
    m = pgd_moments(design, n, w)
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
    _check_n(design, n)
    d = design.dim
    if jnp.ndim(design.noise_var) != 0:
        raise ValueError("attention_risk needs a scalar noise_var (tokens i.i.d. given beta)")
    Q = _square("Q", Q, d + 1)
    v = jnp.asarray(v, F64)
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
    """
    _check_n(design, n)
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
    d, s2 = design.dim, float(design.noise_var)
    kappa = effective_sample_multiplier(design)
    return jnp.asarray(d + s2 - d * kappa * n / (kappa * n + kappa + d + s2), F64)


def effective_sample_multiplier(design: RAG) -> float:
    """Paper A's kappa = alpha^2 d + 1 for RAG with gamma = 1."""
    return float(design.alpha) ** 2 * design.dim + 1.0


def iid_effective_n(dim: int, noise_var: float, risk):
    """Effective sample size: the n at which the isotropic IID optimum d + s^2 - n d / (n + d + 1 + s^2)
    equals ``risk`` (inverse of that formula, real-valued): n = r (d + 1 + s^2) / (d - r), r = d + s^2 - L."""
    r = dim + noise_var - np.asarray(risk, np.float64)
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
    _check_n(design, n)
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
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank <= d:
        raise ValueError(f"rank must be an integer in [0, {d}] (at most dim), got {rank!r}")


@float64
def lowrank_optimal_pgd(design: IID, n: int, rank: int) -> jax.Array:
    """Best rank-r preconditioner (docs/theory.md §3, Eckart-Young in the Sx^{1/2} . M^{1/2} geometry):
    W_r = Sx^{-1/2} [Sx^{1/2} W* M^{1/2}]_r M^{-1/2}."""
    _require(design, (IID,), "lowrank_optimal_pgd")
    _check_rank(rank, design.dim)
    W_star, _ = optimal_pgd(design, n)
    A, sx_half, m_half = _whitened_optimum(design, n, W_star)
    return jnp.linalg.solve(sx_half, _truncate(A, rank)) @ jnp.linalg.inv(m_half)


@float64
def lowrank_optimal_risk(design: IID, n: int, rank: int) -> jax.Array:
    """min_{rank W <= r} L(W) = L* + sum_{i>r} sigma_i(Sx^{1/2} W* M^{1/2})^2 (docs/theory.md §3)."""
    _require(design, (IID,), "lowrank_optimal_risk")
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
    _check_rank(rank, design.dim)
    W0 = _square("W0", W0, design.dim)
    W_star, _ = optimal_pgd(design, n)
    A, sx_half, m_half = _whitened_optimum(design, n, W_star - W0)
    return W0 + jnp.linalg.solve(sx_half, _truncate(A, rank)) @ jnp.linalg.inv(m_half)


@float64
def lora_optimal_risk(design: IID, n: int, W0, rank: int) -> jax.Array:
    """min L_new(W0 + Delta), rank Delta <= r: L*_new + sum_{i>r} sigma_i(Sx^{1/2}(W*_new - W0) M^{1/2})^2."""
    _require(design, (IID,), "lora_optimal_risk")
    _check_rank(rank, design.dim)
    W0 = _square("W0", W0, design.dim)
    W_star, L_star = optimal_pgd(design, n)
    A, _, _ = _whitened_optimum(design, n, W_star - W0)
    s = jnp.linalg.svd(A, compute_uv=False)
    return L_star + jnp.sum(jnp.where(jnp.arange(s.shape[0]) >= rank, s**2, 0.0))


def _chunks(num_prompts, batch_size):
    check.positive_int("num_prompts", num_prompts)
    check.positive_int("batch_size", batch_size)
    batch = min(batch_size, num_prompts)
    return -(-num_prompts // batch), batch


@float64
def ground_truth(design, n: int, key, num_prompts: int = 200_000, weights=None, batch_size: int = 10_000):
    """Model-free optimum of yhat = <W, x g^T>, g = X^T (weights * y), for any design (docs/theory.md §4).

    With F = vec(x g^T), A = E[F F^T], b = E[y F]: W = A^{-1} b, L = E[y^2] - b^T A^{-1} b,
    estimated in float64 from num_prompts sampled prompts (rounded up to whole batches). The
    in-sample L is biased low by about d^2 / num_prompts relative; score W on fresh prompts
    (``monte_carlo_risk``) for an unbiased risk.
    """
    _check_n(design, n)
    chunks, batch = _chunks(num_prompts, batch_size)
    w = _weights(weights, n)
    d = design.dim

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
    """Sum and sum of squares of (y - predict)^2 over chunks x batch fresh prompts with n active
    context pairs in n_slots slots (``gram.draw``; pure and vmappable; n may be traced)."""

    def body(carry, k):
        p = draw(design, k, batch, n, n_slots, dtype, gram)
        err = ((p.y_query - predict(p)) ** 2).astype(F64)
        return (carry[0] + jnp.sum(err), carry[1] + jnp.sum(err**2)), None

    zero = jnp.zeros((), F64)
    return jax.lax.scan(body, (zero, zero), jax.random.split(key, chunks))[0]


@float64
def mean_and_se(total, total_sq, count: int):
    """Mean and standard error from a sum and a sum of squares over count samples."""
    mean = total / count
    var = (total_sq / count - mean**2) * count / max(count - 1, 1)
    return mean, jnp.sqrt(jnp.clip(var, 0.0, None) / count)


@float64
def monte_carlo_risk(predict: Callable[[Prompts], jax.Array], design, n: int, key, num_prompts: int = 100_000,
                     batch_size: int = 10_000, dtype=F64):
    """Monte Carlo risk of a predictor: (mean, standard error) of (y - predict(prompts))^2 over
    num_prompts fresh prompts (rounded up to whole batches), sampled in ``dtype``."""
    _check_n(design, n)
    chunks, batch = _chunks(num_prompts, batch_size)
    total, total_sq = jax.jit(lambda k: risk_moments(predict, design, n, n, k, chunks, batch, dtype))(key)
    mean, se = mean_and_se(total, total_sq, chunks * batch)
    return float(mean), float(se)


def pgd_predict(W, weights=None) -> Callable[[Prompts], jax.Array]:
    """The predictor x^T W X^T (weights * y) as a function of a Prompts batch."""

    def predict(p: Prompts):
        wy = p.y if weights is None else p.y * jnp.asarray(weights, p.y.dtype)[None, :]
        return jnp.einsum("bi,ij,bnj,bn->b", p.x, jnp.asarray(W, p.x.dtype), p.X, wy)

    return predict
