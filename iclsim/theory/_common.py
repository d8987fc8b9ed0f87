"""Argument checks and small linear-algebra helpers shared by the closed forms of ``iclsim.theory``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as check
from iclsim.designs import _check_n

__all__: list[str] = []

F64 = jnp.float64


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


def _truncate(A, rank):
    U, s, Vt = jnp.linalg.svd(A)
    s = jnp.where(jnp.arange(s.shape[0]) < rank, s, 0.0)
    return (U * s[None, :]) @ Vt


def _check_rank(rank, d):
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"rank must be an integer in [0, {d}] (at most dim), got {rank!r} (a {type(rank).__name__})")
    if not 0 <= rank <= d:
        raise ValueError(f"rank must be an integer in [0, {d}] (at most dim), got {rank!r}")
