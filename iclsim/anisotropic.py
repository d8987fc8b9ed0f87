"""Anisotropic designs in a random eigenbasis and how an L-layer GD-form network sits in it (paper B's studies
on data whose singular directions mean something; docs/theory.md §6.3, §8).

Features and tasks with power-law covariances in one shared orthonormal basis V (``eigenbasis``,
``power_law_covariance``); the best L-step GD with preconditioners diagonal in V, an achievable reference
where no closed form exists (``eigenbasis_multistep_gd``, every draw made by the referee ``montecarlo``);
and the geometry of a layer's step matrix Gamma_l and of its factors in V (``subspace_overlap``,
``best_eigen_overlap``, ``random_best_overlap``, ``diagonal_fraction``, ``layer_geometry``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from iclsim import montecarlo, pruning, theory
from iclsim.designs import IID

__all__ = ["eigenbasis", "power_law_covariance", "eigenbasis_multistep_gd", "subspace_overlap", "best_eigen_overlap",
           "random_best_overlap", "diagonal_fraction", "layer_geometry"]


def eigenbasis(dim: int, seed: int) -> np.ndarray:
    """A random orthonormal basis [dim, dim] (columns), Haar-distributed (QR of a Gaussian matrix with the
    signs of R's diagonal moved into Q), drawn from numpy's generator seeded by ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"basis seed must be an integer >= 0, got {seed!r}")
    q, r = np.linalg.qr(np.random.default_rng(int(seed)).standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))[None, :]


def power_law_covariance(dim: int, power: float, basis: np.ndarray) -> np.ndarray:
    """V diag(lambda) V^T with lambda_k proportional to k^-power (k = 1..dim, the columns of V in order of
    decreasing variance), normalised to trace dim (power 0: the identity)."""
    if not (np.isfinite(power) and power >= 0):
        raise ValueError(f"power must be a finite number >= 0, got {power!r}")
    basis = np.asarray(basis, np.float64)
    if basis.shape != (dim, dim) or not np.allclose(basis.T @ basis, np.eye(dim), atol=1e-10):
        raise ValueError(f"basis must be an orthonormal [{dim}, {dim}] matrix (columns), got shape {basis.shape}")
    lam = np.arange(1, dim + 1, dtype=np.float64) ** -float(power)
    lam *= dim / lam.sum()
    return (basis * lam[None, :]) @ basis.T


def eigenbasis_multistep_gd(design: IID, basis, n: int, steps: int, key, num_draws: int = 20_000,
                            num_eval: int | None = None):
    """The best L-step GD w_{l+1} = w_l + Gamma_l (X^T y - X^T X w_l) / n from w_0 = 0 with preconditioners
    diagonal in the data's eigenbasis, Gamma_l = V diag(g_l) V^T: (g [L, d] in the columns' order, risk, se).

    The risk is rotation invariant, so it is computed in eigen-coordinates, where x ~ N(0, diag(lx)),
    beta ~ N(0, diag(lb)): L(g) = s_q^2 + E (w_L - beta)^T diag(lx) (w_L - beta). It is minimised (L-BFGS,
    float64) on ``num_draws`` draws of (X^T X / n, X^T y / n, beta) from two starts, the best isotropic
    L-step steps of the design with the same traces (uniform across directions) and those steps scaled by
    mean(lx) / lx_i; the risk of the minimiser is re-estimated, with its standard error, on ``num_eval``
    fresh draws (default num_draws), unbiased for that predictor, so an achievable
    risk (its per-prompt error is heavy-tailed: take num_eval several times num_draws). Needs Sx and Sb
    diagonal in ``basis``."""
    d = design.dim
    V = np.asarray(basis, np.float64)
    Sx, Sb = (V.T @ np.asarray(m, np.float64) @ V for m in (design.cov_x, design.cov_beta))
    for name, m in (("cov_x", Sx), ("cov_beta", Sb)):
        off = m - np.diag(np.diag(m))
        if np.abs(off).max() > 1e-8 * np.abs(m).max():
            raise ValueError(f"eigenbasis_multistep_gd needs {name} diagonal in basis (largest off-diagonal "
                             f"{np.abs(off).max():.3g})")
    if np.ndim(design.noise_var) != 0:
        raise ValueError("eigenbasis_multistep_gd needs a scalar noise_var")
    lx, lb = np.diag(Sx), np.diag(Sb)
    s2, sq2 = float(design.noise_var), float(design.query_noise_var)
    iso = theory.optimal_multistep_gd(IID(d, noise_var=s2, cov_x=lx.mean() * np.eye(d), cov_beta=lb.mean() * np.eye(d)),
                                      n, steps, jax.random.fold_in(key, 2), 20_000).step_sizes
    group = montecarlo.group_size(num_draws, 20_000)
    with jax.enable_x64(True):
        lx_j, lb_j = jnp.asarray(lx), jnp.asarray(lb)

        def draws(k):  # one draw block of (X^T X / n, X^T y / n, beta) in eigen-coordinates
            kx, kb, ke = jax.random.split(k, 3)
            B = montecarlo.DRAW_BLOCK
            X = jax.random.normal(kx, (B, n, d), jnp.float64) * jnp.sqrt(lx_j)[None, None, :]
            beta = jax.random.normal(kb, (B, d), jnp.float64) * jnp.sqrt(lb_j)[None, :]
            y = jnp.einsum("bnd,bd->bn", X, beta) + np.sqrt(s2) * jax.random.normal(ke, (B, n), jnp.float64)
            return jnp.einsum("bni,bnj->bij", X, X) / n, jnp.einsum("bnd,bn->bd", X, y) / n, beta

        def per_prompt(g, S, b, beta):
            w = jnp.zeros_like(beta)
            for step in range(steps):
                w = w + g[step][None, :] * (b - jnp.einsum("bij,bj->bi", S, w))
            return sq2 + jnp.sum(lx_j[None, :] * (w - beta) ** 2, axis=-1)

        fit = jax.jit(lambda k: montecarlo.block_values(draws, k, num_draws, group))(jax.random.fold_in(key, 0))
        objective = jax.jit(jax.value_and_grad(lambda g: jnp.mean(per_prompt(g.reshape(steps, d), *fit))))

        def fun(x):
            v, g = objective(jnp.asarray(x))
            return float(v), np.asarray(g, np.float64)

        starts = [np.repeat(iso[:, None], d, axis=1), iso[:, None] * (lx.mean() / lx)[None, :]]
        found = [scipy.optimize.minimize(fun, x0.ravel(), jac=True, method="L-BFGS-B", options={"maxiter": 500})
                 for x0 in starts]
        best = min(found, key=lambda r: r.fun if np.isfinite(r.fun) else np.inf)
        g = best.x.reshape(steps, d)
        count = montecarlo.check_count("num_eval", num_draws if num_eval is None else num_eval)
        score = jax.jit(lambda k: montecarlo.block_sums(lambda kb: per_prompt(jnp.asarray(g), *draws(kb)), k, count,
                                                        montecarlo.group_size(count, 20_000)))
        mean, se = montecarlo.estimate(*score(jax.random.fold_in(key, 1)), count)
        return g, float(mean), float(se)


def subspace_overlap(A, B) -> float:
    """||A^T B||_F^2 / k for orthonormal columns A, B [d, k]: 1 for the same subspace, 0 for orthogonal ones,
    k / d in expectation for a uniformly random pair."""
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    if A.shape != B.shape:
        raise ValueError(f"A and B must have the same shape, got {A.shape} and {B.shape}")
    return float(np.sum((A.T @ B) ** 2) / A.shape[1])


def best_eigen_overlap(U, basis) -> float:
    """The overlap of the subspace U [d, k] with the k basis vectors it best matches: the sum of the k largest
    ||U^T v_i||^2 over the columns v_i of ``basis``, over k (1: U is spanned by k of them)."""
    weights = np.sort(np.sum((np.asarray(basis, np.float64).T @ np.asarray(U, np.float64)) ** 2, axis=1))[::-1]
    return float(np.sum(weights[:np.shape(U)[1]]) / np.shape(U)[1])


def random_best_overlap(dim: int, k: int, draws: int = 20_000, seed: int = 0) -> float:
    """The chance level of ``best_eigen_overlap`` for a uniformly random k-dim subspace (Monte Carlo)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((draws, dim, k)))
    w = np.sort(np.sum(q**2, axis=2), axis=1)[:, ::-1]
    return float(np.mean(np.sum(w[:, :k], axis=1)) / k)


def diagonal_fraction(G, basis) -> float:
    """The share of Gamma's anisotropic part A = Gamma - (tr Gamma / d) I that is diagonal in ``basis``:
    ||diag(V^T A V)||^2 / ||A||_F^2 (1: Gamma is diagonal in the data's eigenbasis; for a random traceless
    A about 1 / (d + 1))."""
    G = np.asarray(G, np.float64)
    d = G.shape[0]
    A = G - np.trace(G) / d * np.eye(d)
    R = np.asarray(basis, np.float64).T @ A @ np.asarray(basis, np.float64)
    total = np.sum(A**2)
    return float(np.sum(np.diag(R) ** 2) / total) if total > 0 else float("nan")


def layer_geometry(attn, basis, ranks=(1, 2)) -> dict:
    """One layer's geometry: its step tr(Gamma)/d, the anisotropy ||Gamma - (tr Gamma / d) I||_F / ||Gamma||_F,
    the diagonal fraction in the eigenbasis, and for k in ``ranks`` the overlaps of Gamma's top-k left
    singular subspace with the top-k / bottom-k / best-matching k eigenvectors, the overlap of the factors'
    kept subspaces (the right singular vectors of Wq and Wk, the inner space that Wq_k Wk_k^T keeps) and
    tr(truncated Gamma) / tr(Gamma)."""
    Wq, Wk, wv = (np.asarray(attn[k], np.float64) for k in ("Wq", "Wk", "w_v"))
    G = -wv * Wq @ Wk.T
    d = G.shape[0]
    V = np.asarray(basis, np.float64)
    out = {"step": float(np.trace(G) / d),
           "anisotropy": float(np.linalg.norm(G - np.trace(G) / d * np.eye(d)) / np.linalg.norm(G)),
           "diagonal_fraction": diagonal_fraction(G, V)}
    U = np.linalg.svd(G)[0]
    _, _, Vq = np.linalg.svd(Wq)
    _, _, Vk = np.linalg.svd(Wk)
    for k in ranks:
        out[f"gamma_top{k}_overlap_top"] = subspace_overlap(U[:, :k], V[:, :k])
        out[f"gamma_top{k}_overlap_bottom"] = subspace_overlap(U[:, :k], V[:, d - k:])
        out[f"gamma_top{k}_overlap_best"] = best_eigen_overlap(U[:, :k], V)
        out[f"factor_overlap_rank{k}"] = subspace_overlap(Vq[:k].T, Vk[:k].T)
        Gk = -wv * np.asarray(pruning.svd_truncate(Wq, rank=k), np.float64) @ np.asarray(
            pruning.svd_truncate(Wk, rank=k), np.float64).T
        out[f"trace_kept_rank{k}"] = float(np.trace(Gk) / np.trace(G))
    return out
