"""Multi-step gradient descent, the reference for L-layer models (docs/theory.md §8): the exact risk of
L-step GD on an isotropic IID design from the exact Wishart moments (``iclsim.wishart``), the best step
sizes by damped Newton, and a Monte Carlo check of the moments through the referee."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as check
from iclsim import montecarlo, rng, wishart
from iclsim._precision import float64
from iclsim.designs import IID, _check_n
from iclsim.theory._common import F64, _require

__all__ = ["MultiStepGD", "MAX_STEPS", "context_power_traces", "multistep_gd_risk", "optimal_multistep_gd"]


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
    float64 (k = 0 gives dim). The draws are the referee's (``montecarlo.block_values``: block b of X from
    fold_in(key, b)), at most 10_000 per loop round (memory O(round n dim)); ``multistep_gd_risk``'s Monte
    Carlo estimate averages over the same draws."""
    check.positive_int("dim", dim)
    check.positive_int("n", n)
    num = montecarlo.check_count("num", num)
    check.positive_int("max_power", max_power, minimum=0)
    with jax.enable_x64(True):
        return _power_traces(key, dim, n, num, max_power)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _power_traces(key, dim, n, num, max_power):
    return montecarlo.block_values(lambda k: _block_traces(k, dim, n, max_power), key, num,
                                   montecarlo.group_size(num, 10_000))


def _block_traces(key, dim, n, max_power):
    """tr((X^T X)^k), k = 0..max_power, of one draw block of X [DRAW_BLOCK, n, dim]: [DRAW_BLOCK, max_power + 1]."""
    X = rng.normal(key, (montecarlo.DRAW_BLOCK, n, dim), F64)
    W = jnp.einsum("bni,bnj->bij", X, X)
    traces, power = [jnp.full((X.shape[0],), float(dim), F64)], jnp.broadcast_to(jnp.eye(dim, dtype=F64), W.shape)
    for _ in range(max_power):
        power = power @ W
        traces.append(jnp.trace(power, axis1=1, axis2=2))
    return jnp.stack(traces, axis=1)


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
    (the referee's draws of ``context_power_traces``, summed by ``montecarlo.block_sums``), with its standard error: an independent check of the exact moments.
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
        scale = (1.0 / n) ** jnp.arange(powers + 1, dtype=F64)

        def values(k):  # the risk polynomial at each draw's tr S^k, S = X^T X / n
            return _multistep_values(jnp.asarray(gam), _block_traces(k, design.dim, n, powers) * scale[None, :],
                                     sigma, tau, s2, n)

        group = montecarlo.group_size(num_draws, 10_000)
        total, total_sq = jax.jit(lambda k: montecarlo.block_sums(values, k, num_draws, group))(key)
        mean, se = montecarlo.estimate(total, total_sq, num_draws)
        return float(sq2 + mean), float(se)


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
