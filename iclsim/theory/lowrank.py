"""Low rank and LoRA (docs/theory.md §3.3): the best rank-r PGD preconditioner and the best rank-r update
of a given W0, by Eckart-Young in the Sx^{1/2} . M^{1/2} geometry, and their risks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from iclsim._precision import float64
from iclsim.designs import IID
from iclsim.theory._common import (_check_rank, _context, _require, _square, _sym_sqrt,
                                     _truncate)
from iclsim.theory.pgd import optimal_pgd, pgd_moments

__all__ = ["lowrank_optimal_pgd", "lowrank_optimal_risk", "lora_optimal_pgd", "lora_optimal_risk"]


def _whitened_optimum(design: IID, n: int, target):
    """Sx^{1/2} (target) M^{1/2} and the maps back, for the Eckart-Young forms of docs/theory.md §3."""
    m = pgd_moments(design, n)
    sx_half, m_half = _sym_sqrt(m.cov_x), _sym_sqrt(m.M)
    return sx_half @ target @ m_half, sx_half, m_half


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
    W0, _, (A, sx_half, m_half) = _lora_shift(design, n, W0, rank, "lora_optimal_pgd")
    return W0 + jnp.linalg.solve(sx_half, _truncate(A, rank)) @ jnp.linalg.inv(m_half)


@float64
def lora_optimal_risk(design: IID, n: int, W0, rank: int) -> jax.Array:
    """min L_new(W0 + Delta), rank Delta <= r: L*_new + sum_{i>r} sigma_i(Sx^{1/2}(W*_new - W0) M^{1/2})^2."""
    _, L_star, (A, _, _) = _lora_shift(design, n, W0, rank, "lora_optimal_risk")
    s = jnp.linalg.svd(A, compute_uv=False)
    return L_star + jnp.sum(jnp.where(jnp.arange(s.shape[0]) >= rank, s**2, 0.0))


def _lora_shift(design, n: int, W0, rank: int, caller: str):
    """The LoRA closed forms' shared start: the checked W0, the new design's L*, and the whitened shift
    (A, Sx^{1/2}, M^{1/2}) of W*_new - W0 (``_whitened_optimum``)."""
    _require(design, (IID,), caller)
    _context(design, n)
    _check_rank(rank, design.dim)
    W0 = _square("W0", W0, design.dim)
    W_star, L_star = optimal_pgd(design, n)
    return W0, L_star, _whitened_optimum(design, n, W_star - W0)
