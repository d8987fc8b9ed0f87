"""The course of training of one-layer multi-head linear attention under gradient flow, in float64
(docs/theory.md, "Training dynamics"): Zhang, Singh, Latham & Saxe (ICML 2025) for the merged and separate
key-query parameterisations (``multihead``), and the limit of Zhang, Frei & Bartlett (JMLR 2024).

Gradient flow d theta / dt = -grad L(theta) on the population loss L = E[(y - yhat)^2] (no factor 1/2), so
plain gradient descent with learning rate eta follows it at time t = eta * step. On the subspace the
models' initialisations and the flow keep (no label in the keys, no features in the value that is read),
both models predict PGD yhat = x^T W (X^T y / n) with W = sum_h v_h Q_h (``multihead``), and with C, M the
moments of ``theory.pgd_moments`` rescaled to g = X^T y / n the loss is
    L(W) = L0 - 2 tr(Sx W C) + tr(Sx W M W^T),    L0 = tr(Sx Sb) + s_q^2.
Where Sb commutes with Sx, in their common eigenbasis C = diag(c_i), M = diag(m_i), and a diagonal W
contributes per direction -2 lam_i c_i w_i + lam_i m_i w_i^2, with c_i = lam_i l_i and
m_i = lam_i^2 l_i (1 + 1/n) + lam_i (tr(Sx Sb) + s^2) / n (lam_i, l_i: the eigenvalues of Sx and Sb).

Merged key-query (two-layer linear network): from the balanced aligned start (KQ_h = u0 I / sqrt(d),
v_h = u0, ``MergedAttention(start="aligned")``) on a white design (Sx, Sb multiples of I) the flow stays on
W = s I / sqrt(d) with ds/dt = 4 s (b - c s): a logistic, one abrupt drop from L0 to the optimum
(``merged_time_course``; the drop time grows like log(1 / u0)).
Separate key-query, rank one (three-layer networks): the fixed points are principal component regressions
W_S = sum_{i in S} (c_i / m_i) e_i e_i^T (``pcr_risks``), and from the aligned start each direction obeys
the scalar ODE dw_i/dt = 6 lam_i K_i^(-1/3) w_i^(4/3) (c_i - m_i w_i) (K_i heads on it, ``separate_kq_flow``),
whose drop time is about 1 / (2 lam_i c_i u0): the components arrive in the order of lam_i c_i
(of the eigenvalues of Sx for isotropic tasks), each after a time inversely proportional to u0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as check
from iclsim import theory
from iclsim._precision import float64
from iclsim.designs import IID

__all__ = ["Spectrum", "PCR", "TimeCourse", "spectrum", "pcr_risks", "pcr_weight", "population_loss",
           "merged_time_course", "merged_drop_time", "separate_kq_flow", "population_flow", "drop_times", "zfb_limit",
           "zfb_limit_risk"]

F64 = jnp.float64


class Spectrum(NamedTuple):
    """The design in the eigenbasis U of Sx (columns sorted by decreasing drive lam_i c_i, the order in
    which separate key-query heads acquire them): lam, c, m per direction (scaled moments), base L0."""

    U: np.ndarray
    lam: np.ndarray
    c: np.ndarray
    m: np.ndarray
    base: float


class PCR(NamedTuple):
    """In-context principal component regression with k = 0..d components (``pcr_risks``): risks[k] the
    closed-form risk of W_k, order the directions (indices into Spectrum.U's columns) in acquisition order."""

    risks: np.ndarray
    reductions: np.ndarray
    spectrum: Spectrum


class TimeCourse(NamedTuple):
    """A theory curve: times [T] and the population loss at them [T] (``weights``: the per-direction
    W entries [T, d] where the theory has them, else None)."""

    times: np.ndarray
    loss: np.ndarray
    weights: np.ndarray | None


def _checked(design, n, what):
    if not isinstance(design, IID):
        raise TypeError(f"{what} has a closed form for IID designs, not {type(design).__name__}")
    if np.ndim(design.noise_var) != 0:
        raise ValueError(f"{what} needs a scalar noise_var (tokens i.i.d. given the task)")
    return check.positive_int("n", n)


@float64
def spectrum(design: IID, n: int) -> Spectrum:
    """The per-direction quantities of the module docstring. Sx and Sb must commute (a common eigenbasis:
    the loss then separates over directions); ValueError naming cov_beta otherwise."""
    n = _checked(design, n, "spectrum")
    mom = theory.pgd_moments(design, n)
    Sx = np.asarray(design.cov_x, np.float64)
    lam, U = np.linalg.eigh(Sx)
    C, M = np.asarray(mom.C) / n, np.asarray(mom.M) / n**2
    c, m = np.einsum("ji,jk,ki->i", U, C, U), np.einsum("ji,jk,ki->i", U, M, U)
    scale = np.abs(M).max()
    if np.abs(U.T @ M @ U - np.diag(m)).max() > 1e-9 * scale or np.abs(U.T @ C @ U - np.diag(c)).max() > 1e-9 * scale:
        raise ValueError("cov_beta must commute with cov_x (a common eigenbasis) for the per-direction dynamics")
    order = np.argsort(-lam * c, kind="stable")
    return Spectrum(U[:, order], lam[order], c[order], m[order], float(mom.base))


def pcr_risks(design: IID, n: int) -> PCR:
    """docs/theory.md: the risk of in-context PCR with the first k directions, k = 0..d (the plateaus of
    separate key-query training): L_k = L0 - sum_{i <= k} lam_i c_i^2 / m_i; L_0 = L0 (predict zero) and
    L_d the PGD optimum (``theory.optimal_pgd``)."""
    sp = spectrum(design, n)
    red = sp.lam * sp.c**2 / sp.m
    return PCR(sp.base - np.concatenate([[0.0], np.cumsum(red)]), red, sp)


def pcr_weight(design: IID, n: int, k: int) -> np.ndarray:
    """W_k of theory's unscaled convention (yhat = x^T W X^T y) for PCR with the first k directions:
    U_k diag(c_i / m_i) U_k^T / n, so ``theory.pgd_risk(design, n, pcr_weight(...))`` is pcr_risks(...).risks[k]."""
    sp = spectrum(design, n)
    k = check.integer("k", k, 0, design.dim)
    Uk = sp.U[:, :k]
    return (Uk * (sp.c[:k] / sp.m[:k])) @ Uk.T / n


def population_loss(design: IID, n: int):
    """L(W) of the module docstring as a jittable function of the scaled W (yhat = x^T W X^T y / n)."""
    n = _checked(design, n, "population_loss")
    with jax.enable_x64(True):
        mom = theory.pgd_moments(design, n)
    Sx, C, M = (jnp.asarray(np.asarray(a), F64) for a in (mom.cov_x, np.asarray(mom.C) / n, np.asarray(mom.M) / n**2))
    base = float(mom.base)

    def loss(W):
        return base - 2 * jnp.trace(Sx @ W @ C) + jnp.trace(Sx @ W @ M @ W.T)

    return loss


def _white(design: IID):
    d = design.dim
    for name in ("cov_x", "cov_beta"):
        A = np.asarray(getattr(design, name), np.float64)
        if np.abs(A - A[0, 0] * np.eye(d)).max() > 1e-12 * abs(A[0, 0]):
            raise ValueError(f"merged_time_course is closed-form for white designs: {name} must be a multiple of I")


@float64
def merged_time_course(design: IID, n: int, times, heads: int = 1, init_scale: float = 1e-2) -> TimeCourse:
    """Merged key-query, H heads from the balanced aligned start u0 = init_scale on a white design: s(t) =
    s* / (1 + (s*/s0 - 1) exp(-4 b t)), s0 = H u0^2, s* = b / c, b = sum_i lam_i c_i / sqrt(d),
    c = sum_i lam_i m_i / d; L(t) = L0 - b^2 / c + c (s - s*)^2. weights: the diagonal entry s / sqrt(d)."""
    n = _checked(design, n, "merged_time_course")
    _white(design)
    check.positive_int("heads", heads)
    u0 = check.real("init_scale", init_scale, 0.0, low_open=True)
    sp = spectrum(design, n)
    d = design.dim
    b, c = np.sum(sp.lam * sp.c) / math.sqrt(d), np.sum(sp.lam * sp.m) / d
    s_star, s0 = b / c, heads * u0**2
    t = check.real_array("times", times, ndim=1)
    s = s_star / (1.0 + (s_star / s0 - 1.0) * np.exp(-4 * b * t))
    loss = sp.base - b**2 / c + c * (s - s_star) ** 2
    return TimeCourse(t, loss, np.repeat((s / math.sqrt(d))[:, None], d, axis=1))


def merged_drop_time(design: IID, n: int, heads: int = 1, init_scale: float = 1e-2) -> float:
    """The time the loss of ``merged_time_course`` crosses the middle (L0 + L*) / 2 of its drop (the
    measure of ``drop_times``): s = s* (1 - 1/sqrt 2), t = log((s*/s0 - 1) / (1/a - 1)) / (4 b), a = 1 - 1/sqrt 2."""
    n = _checked(design, n, "merged_drop_time")
    _white(design)
    sp = spectrum(design, n)
    d = design.dim
    b, c = np.sum(sp.lam * sp.c) / math.sqrt(d), np.sum(sp.lam * sp.m) / d
    a = 1.0 - 0.5**0.5
    return float(np.log((b / c / (heads * init_scale**2) - 1.0) / (1.0 / a - 1.0)) / (4 * b))


def _rk4(f, y0, dt: float, steps_per_record: int, records: int):
    """Classical RK4 of dy/dt = f(y) with step dt, returning y at records x steps_per_record steps [records+1]."""

    def step(y, _):
        k1 = f(y)
        k2 = f(y + 0.5 * dt * k1)
        k3 = f(y + 0.5 * dt * k2)
        k4 = f(y + dt * k3)
        return y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4), None

    def record(y, _):
        y, _ = jax.lax.scan(step, y, None, length=steps_per_record)
        return y, y

    _, ys = jax.lax.scan(record, y0, None, length=records)
    return jnp.concatenate([y0[None], ys])


def _grid(t_end, records, dt):
    t_end = check.real("t_end", t_end, 0.0, low_open=True)
    records = check.positive_int("records", records)
    dt = check.real("dt", dt, 0.0, low_open=True)
    per = max(1, math.ceil(t_end / records / dt))
    return per, t_end / records / per, np.linspace(0.0, t_end, records + 1)


@float64
def separate_kq_flow(design: IID, n: int, t_end: float, heads: int | None = None, init_scale: float = 1e-2,
                     records: int = 400, dt: float = 0.05) -> TimeCourse:
    """Separate key-query, rank one, from the aligned start (``SeparateAttention(start="aligned")``: head h on
    coordinate axis h mod d, so the design's Sx and Sb must be diagonal): the scalar ODEs
    dw_i/dt = 6 lam_i K_i^(-1/3) w_i^(4/3) (c_i - m_i w_i), w_i(0) = K_i u0^3, solved by RK4 in log w_i
    (K_i: heads on axis i; heads default d). weights [T, d] in the coordinate order."""
    n = _checked(design, n, "separate_kq_flow")
    d = design.dim
    heads = d if heads is None else check.positive_int("heads", heads)
    for name in ("cov_x", "cov_beta"):
        A = np.asarray(getattr(design, name), np.float64)
        if np.abs(A - np.diag(np.diag(A))).max() > 0:
            raise ValueError(f"separate_kq_flow follows heads aligned with the coordinate axes: {name} must be diagonal")
    u0 = check.real("init_scale", init_scale, 0.0, low_open=True)
    per, step, times = _grid(t_end, records, dt)
    lam = np.diag(np.asarray(design.cov_x, np.float64))
    mom = theory.pgd_moments(design, n)
    c, m = np.diag(np.asarray(mom.C)) / n, np.diag(np.asarray(mom.M)) / n**2
    K = np.bincount(np.arange(heads) % d, minlength=d).astype(np.float64)
    on = K > 0
    Ks = np.where(on, K, 1.0)
    rate = jnp.asarray(np.where(on, 6 * lam * Ks ** (-1 / 3), 0.0))
    c_, m_ = jnp.asarray(c), jnp.asarray(m)

    def f(logw):  # d log w / dt = 6 lam K^(-1/3) w^(1/3) (c - m w)
        w = jnp.exp(logw)
        return rate * jnp.cbrt(w) * (c_ - m_ * w)

    logw0 = jnp.asarray(np.where(on, np.log(Ks * u0**3), -np.inf))
    w = np.exp(np.asarray(_rk4(f, jnp.where(jnp.isfinite(logw0), logw0, 0.0), step, per, records)))
    w = np.where(on[None], w, 0.0)
    loss = float(mom.base) - np.sum(2 * lam * c * w - lam * m * w**2, axis=1)
    return TimeCourse(times, loss, w)


@float64
def population_flow(model, design: IID, n: int, params, t_end: float, records: int = 400,
                    dt: float = 0.05) -> TimeCourse:
    """The exact gradient flow of the population loss from ``params``, by RK4 in float64:
    d theta/dt = -grad_theta L(W(theta)), W(theta) = n * model.effective_pgd(theta, n).W (the scaled W).
    Exact for ``multihead`` models on their invariant subspace (ValueError if params leave it: a label in
    the keys or features in the value read). ``params``: one network's pytree, or a stack of them with a
    leading axis (e.g. one per seed, as ``fit_sweep`` returns them), then loss is [networks, T].
    weights: None."""
    n = _checked(design, n, "population_flow")
    d = design.dim
    one = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    batched = np.ndim(params["v"]) == len(one["v"].shape) + 1
    stack = params if batched else jax.tree_util.tree_map(lambda a: np.asarray(a)[None], params)
    Q = np.asarray(jax.vmap(model.merged)(stack) if hasattr(model, "merged") else stack["KQ"])
    if np.abs(Q[:, :, :d, d]).max() > 0 or np.abs(np.asarray(stack["v"])[:, :, :d]).max() > 0:
        raise ValueError("population_flow needs params on the invariant subspace: Q_h[:d, d] = 0 and v_h[:d] = 0")
    per, step, times = _grid(t_end, records, dt)
    loss_W = population_loss(design, n)
    first = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0], F64), stack)
    _, unravel = jax.flatten_util.ravel_pytree(first)
    flat = jax.vmap(lambda p: jax.flatten_util.ravel_pytree(p)[0])(jax.tree_util.tree_map(lambda a: jnp.asarray(a, F64),
                                                                                          stack))

    def loss(theta):
        return loss_W(n * model.effective_pgd(unravel(theta), n).W)

    grad = jax.grad(loss)

    def path_loss(y0):
        return jax.vmap(loss)(_rk4(lambda z: -grad(z), y0, step, per, records))

    out = np.asarray(jax.jit(jax.vmap(path_loss))(flat))
    return TimeCourse(times, out if batched else out[0], None)


def drop_times(times, loss, levels) -> np.ndarray:
    """For a ladder of plateau levels L_0 > L_1 > ... (e.g. ``pcr_risks``), the first time the loss falls
    below the midpoint (L_{j-1} + L_j) / 2 of drop j = 1..len(levels)-1 (NaN where it never does). Applied
    alike to trained curves and theory curves."""
    t, L = np.asarray(times, np.float64), np.asarray(loss, np.float64)
    lv = np.asarray(levels, np.float64)
    if t.ndim != 1 or L.shape != t.shape:
        raise ValueError(f"times and loss must be 1-D of the same length, got {t.shape} and {L.shape}")
    out = []
    for j in range(1, len(lv)):
        below = np.nonzero(L < 0.5 * (lv[j - 1] + lv[j]))[0]
        out.append(t[below[0]] if below.size else np.nan)
    return np.asarray(out)


def zfb_limit(design: IID, n: int) -> np.ndarray:
    """Zhang, Frei & Bartlett (JMLR 2024), Theorem 4.1: from their initialisation (one merged head, KQ_11 =
    sigma Theta Theta^T, v_d = sigma, ``MergedAttention(start="aligned")``) gradient flow converges to the
    global optimum, the scaled W = C^T M^{-1}; for w ~ N(0, I), no noise, W = Gamma^{-1} with
    Gamma = (1 + 1/n) Sx + tr(Sx) / n I. Returned scaled (yhat = x^T W X^T y / n)."""
    n = _checked(design, n, "zfb_limit")
    return np.asarray(theory.optimal_pgd(design, n).W) * n


def zfb_limit_risk(train_design: IID, n_train: int, test_design: IID, n_test: int) -> float:
    """The test risk of the gradient-flow limit trained on (train_design, n_train) on prompts of
    (test_design, n_test): a covariance (or task, noise, length) shift, ZFB Sec. 4.2, by ``theory.pgd_risk``."""
    W = zfb_limit(train_design, n_train)
    n_test = _checked(test_design, n_test, "zfb_limit_risk")
    if test_design.dim != train_design.dim:
        raise ValueError(f"test_design.dim must equal train_design.dim = {train_design.dim}, got {test_design.dim}")
    return float(theory.pgd_risk(test_design, n_test, W / n_test))
