"""Lu, Letey, Zavatone-Veth, Maiti, Pehlevan, *Asymptotic theory of in-context learning by linear attention*
(PNAS 2025, arXiv:2405.11751): the in-context (ICL) error of linear attention fitted by ridge regression on
P pretraining prompts drawn from k tasks, as d -> infinity with alpha = n/d, kappa = k/d, tau = P/d^2 fixed
(docs/theory.md §12). float64 numpy throughout; nothing here is traced.

Units are the paper's: x ~ N(0, I/d), beta ~ N(0, I), label noise rho, so E y^2 = 1 + rho; the error
includes the query noise (the zero predictor scores 1 + rho). ``pretraining`` maps iclsim's units onto these.

With x = (1 + rho) / alpha and the resolvent of the task Gram matrix
M_kappa(z) = 2 / (z + 1 - 1/kappa + sqrt((z + 1 - 1/kappa)^2 + 4 z / kappa))  (M_inf(z) = 1 / (1 + z)),
ridge lambda > 0: eps > 0 solves 1 - tau + tau lambda / eps = eps M_kappa(x + eps); with nu = x + eps,
m = M_kappa(nu), m' = M_kappa'(nu),
    c = (rho + nu - nu^2 m - eps (1 - 2 nu m - nu^2 m')) / (1 - 2 eps m - eps^2 m' - tau),
    e_ICL = (1 + x)(1 - 2 nu m - nu^2 m' - c (m + eps m')) - 2 (1 - nu m) + 1 + rho.
The ridgeless limit (lambda -> 0) has its own closed form on each side of the interpolation threshold
tau = 1, where it diverges (the double-descent peak).
"""

from __future__ import annotations

import numpy as np

from iclsim import _validate as check

__all__ = ["resolvent", "resolvent_derivative", "ridge_icl_error", "ridgeless_icl_error", "interpolation_peak"]


def _kappa(kappa) -> np.ndarray:
    k = np.asarray(kappa, np.float64)
    if np.any(np.isnan(k)) or np.any(k <= 0):
        raise ValueError(f"kappa must be > 0 (np.inf: a fresh task per prompt), got {kappa!r}")
    return k


def resolvent(z, kappa) -> np.ndarray:
    """M_kappa(z) = 2 / (z + 1 - 1/kappa + sqrt((z + 1 - 1/kappa)^2 + 4 z / kappa)) for z > 0: the
    Stieltjes-type transform of the Marchenko-Pastur law of the k x k task Gram matrix at ratio kappa
    (kappa = inf gives 1 / (1 + z))."""
    z, k = np.asarray(z, np.float64), _kappa(kappa)
    a = z + 1 - 1 / k
    return 2 / (a + np.sqrt(a**2 + 4 * z / k))


def resolvent_derivative(z, kappa) -> np.ndarray:
    """d M_kappa / dz = -(M^2 / 2)(1 + (z + 1 + 1/kappa) / sqrt((z + 1 - 1/kappa)^2 + 4 z / kappa))."""
    z, k = np.asarray(z, np.float64), _kappa(kappa)
    m = resolvent(z, k)
    return -0.5 * m**2 * (1 + (z + 1 + 1 / k) / np.sqrt((z + 1 - 1 / k) ** 2 + 4 * z / k))


def _check(alpha, tau, noise_var):
    alpha = check.real("alpha", alpha, 0.0, low_open=True)
    tau = check.real("tau", tau, 0.0, low_open=True)
    noise_var = check.real("noise_var", noise_var, 0.0)
    return alpha, tau, noise_var


def _root(x, tau, lam, kappa):
    """The eps > 0 with 1 - tau + tau lam / eps - eps M_kappa(x + eps) = 0 (the left side falls from +inf
    to -tau as eps grows: one root), by bisection in log eps to float64 resolution."""
    def f(e):
        return 1 - tau + tau * lam / e - e * resolvent(x + e, kappa)

    lo, hi = lam * tau / (1 + tau + lam * tau) * 1e-3, 1.0
    while f(hi) > 0:
        hi *= 4
    while f(lo) < 0:
        lo /= 4
    for _ in range(200):
        mid = np.sqrt(lo * hi)
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi / lo - 1 < 1e-15:
            break
    return np.sqrt(lo * hi)


def ridge_icl_error(alpha, kappa, tau, noise_var, ridge) -> float:
    """Lu et al.'s asymptotic ICL error of ridge-fitted linear attention (module docstring), for
    alpha = n/d > 0, kappa = k/d in (0, inf], tau = P/d^2 > 0, label noise rho = noise_var >= 0 and
    ridge lambda > 0 (the objective sum_mu (y_mu - <Gamma, H_mu>)^2 + (P/d) lambda ||Gamma||_F^2)."""
    alpha, tau, rho = _check(alpha, tau, noise_var)
    lam = check.real("ridge", ridge, 0.0, low_open=True)
    kappa = float(_kappa(kappa))
    x = (1 + rho) / alpha
    eps = _root(x, tau, lam, kappa)
    nu = x + eps
    m, dm = resolvent(nu, kappa), resolvent_derivative(nu, kappa)
    c = (rho + nu - nu**2 * m - eps * (1 - 2 * nu * m - nu**2 * dm)) / (1 - 2 * eps * m - eps**2 * dm - tau)
    return float((1 + x) * (1 - 2 * nu * m - nu**2 * dm - c * (m + eps * dm)) - 2 * (1 - nu * m) + 1 + rho)


def ridgeless_icl_error(alpha, kappa, tau, noise_var) -> float:
    """The lambda -> 0 limit of ``ridge_icl_error`` (Lu et al.'s ridgeless result), for tau != 1. With
    x = (1 + rho)/alpha, m = M_kappa(x), mu = x M_{kappa/tau}(x):
    tau < 1: tau (1 + x)/(1 - tau) (1 - tau (1 - mu)^2 - (x - rho) mu / x) - 2 tau (1 - mu) + 1 + rho;
    tau > 1: (k* - 1/(tau - 1))(1 + x)(x m)^2 + (3 - 2 tau)/(tau - 1) m x^2
             + ((1 + rho) m / (tau - 1) + 1) x + rho m / (tau - 1) + rho,  k* = 1 / (1 - kappa (m / (kappa + m))^2).
    It diverges at tau = 1 (P = d^2 pretraining prompts, as many as the attention's d(d+1) parameters)."""
    alpha, tau, rho = _check(alpha, tau, noise_var)
    if tau == 1.0:
        raise ValueError("tau must differ from 1 for ridgeless_icl_error (the error diverges at tau = 1)")
    kappa = float(_kappa(kappa))
    x = (1 + rho) / alpha
    m = float(resolvent(x, kappa))
    if tau < 1:
        mu = x * float(resolvent(x, kappa / tau))
        return float(tau * (1 + x) / (1 - tau) * (1 - tau * (1 - mu) ** 2 - (x - rho) / x * mu)
                     - 2 * tau * (1 - mu) + rho + 1)
    k_star = 1 / (1 - kappa * (m / (kappa + m)) ** 2) if np.isfinite(kappa) else 1.0
    return float((k_star - 1 / (tau - 1)) * (1 + x) * (x * m) ** 2 + (3 - 2 * tau) / (tau - 1) * m * x**2
                 + ((1 + rho) / (tau - 1) * m + 1) * x + rho * m / (tau - 1) + rho)


def interpolation_peak(alpha, kappa, noise_var, ridge, low: float = 0.3, high: float = 3.0) -> float:
    """The tau in [low, high] where ``ridge_icl_error`` peaks (golden-section search on log tau after a
    grid of 200 points): the location of the double-descent peak at ridge lambda."""
    low = check.real("low", low, 0.0, low_open=True)
    high = check.real("high", high, low, low_open=True)
    grid = np.geomspace(low, high, 200)
    vals = [ridge_icl_error(alpha, kappa, t, noise_var, ridge) for t in grid]
    i = int(np.argmax(vals))
    a, b = np.log(grid[max(i - 1, 0)]), np.log(grid[min(i + 1, len(grid) - 1)])
    g = (np.sqrt(5) - 1) / 2
    for _ in range(80):
        c, e = b - g * (b - a), a + g * (b - a)
        if ridge_icl_error(alpha, kappa, np.exp(c), noise_var, ridge) > ridge_icl_error(alpha, kappa, np.exp(e),
                                                                                        noise_var, ridge):
            b = e
        else:
            a = c
    return float(np.exp((a + b) / 2))
