"""Correlated designs (docs/theory.md §4): the moments E1, E2 of RAG and task-feature alignment, whose PGD
optimum is a multiple of the identity, and paper A's effective-sample approximation for RAG."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from iclsim._precision import float64
from iclsim.designs import RAG, TaskFeatureAlignment
from iclsim.theory._common import F64, _context, _require

__all__ = ["rag_effective_risk", "effective_sample_multiplier"]


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
