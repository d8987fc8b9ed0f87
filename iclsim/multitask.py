"""The multitask-prompt data model of Li, Tarzanagh, Rawat, Fazel, Oymak, "Gating is Weighting" (arXiv
2504.04308, the multitask prompts of its landscape analysis; docs/theory.md §10): a prompt is K segments,
segment k holding ``per_task`` examples of its own task beta_k, and the query is labelled by a query task beta
whose relevance to segment k is the correlation r_k = E[beta_k . beta] / d.

Tasks: (beta, beta_1..beta_K) jointly Gaussian, E[beta_k beta^T] = r_k I, E[beta_k beta_l^T] = corr_kl I, unit
diagonal (default corr = r r^T off the diagonal: beta_k = r_k beta + sqrt(1 - r_k^2) g_k, independent g_k).
Features x_i, x ~ N(0, I_d); labels y_i = x_i . beta_{k(i)} + noise_var^{1/2} eps_i, y = x . beta + ... .

Delimiters (``delimiters=True``): after segment k < K the prompt holds one delimiter pair, x = e_{d+k} (a marker
channel of its own, K - 1 of them appended to every x) and y = 0. A delimiter adds y x^T = 0 to any sum over the
context, so linear attention, H3 and every WPGD are blind to it; a gate that reads the token sees it, which is
how GLA can weight the segments (the paper's delimiter tokens). Prompts then have n = K per_task + K - 1 pairs
of dimension ``dim`` = d + K - 1; ``positions`` says which are data and which segment each belongs to.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from iclsim import _validate as check
from iclsim.designs import Prompts, _check_n, _dim_fits, _pytree_design, _Design, _query_label
from iclsim.rng import BatchShard, normals

__all__ = ["Multitask"]


@_pytree_design(static=("dim", "task_dim", "per_task", "delimiters"))
class Multitask(_Design):
    """Multitask prompts (module docstring): ``task_dim`` d, ``relevance`` r [K] in [-1, 1], ``per_task``
    examples per segment, task correlations ``corr`` [K, K] (default: r r^T, unit diagonal), label noise
    ``noise_var`` (query: ``query_noise_var``, default the same), ``delimiters`` (a marker pair between
    segments). ``dim`` is derived (d + K - 1 with delimiters, else d); ``fixed_n`` the prompt length."""

    task_dim: int
    relevance: np.ndarray
    per_task: int
    corr: np.ndarray | None = None
    noise_var: float = 0.0
    query_noise_var: float | None = None
    delimiters: bool = True
    dim: int | None = None

    def __post_init__(self):
        d = check.positive_int("task_dim", self.task_dim)
        check.positive_int("per_task", self.per_task)
        r = check.real_array("relevance", self.relevance, ndim=1)
        if r.shape[0] < 1:
            raise ValueError("relevance must hold one correlation per task (K >= 1 entries), got an empty array")
        if np.any(np.abs(r) > 1):
            raise ValueError(f"relevance must have entries in [-1, 1] (correlations with the query task), got {r}")
        K = r.shape[0]
        if self.corr is None:
            corr = np.outer(r, r)
            np.fill_diagonal(corr, 1.0)
        else:
            corr = check.real_array("corr", self.corr, ndim=2)
            if corr.shape != (K, K):
                raise ValueError(f"corr must have shape ({K}, {K}) (one row per task), got {corr.shape}")
            if not np.allclose(corr, corr.T) or not np.allclose(np.diag(corr), 1.0):
                raise ValueError("corr must be symmetric with a unit diagonal (correlations of the task vectors)")
        joint = np.block([[np.ones((1, 1)), r[None, :]], [r[:, None], corr]])
        if np.linalg.eigvalsh(joint).min() < -1e-9:
            raise ValueError("relevance and corr must form a valid correlation matrix of (beta, beta_1..beta_K)")
        if not isinstance(self.delimiters, (bool, np.bool_)):
            raise TypeError(f"delimiters must be a bool, got {self.delimiters!r}")
        noise = check.nonneg_variance("noise_var", self.noise_var)
        if noise.ndim:
            raise ValueError("noise_var must be a scalar (one label noise variance for every example)")
        qn = noise if self.query_noise_var is None else check.nonneg_variance("query_noise_var", self.query_noise_var)
        if qn.ndim:
            raise ValueError("query_noise_var must be a scalar")
        dim = d + (K - 1 if self.delimiters else 0)
        if self.dim is not None and self.dim != dim:
            raise ValueError(f"dim is derived (task_dim + K - 1 marker channels with delimiters = {dim}); "
                             f"got dim={self.dim!r}: leave it out")
        for k, v in {"relevance": r, "corr": corr, "noise_var": noise, "query_noise_var": qn, "dim": dim,
                     "delimiters": bool(self.delimiters)}.items():
            object.__setattr__(self, k, v)
        _dim_fits(self)

    @property
    def tasks(self) -> int:
        """K, the number of tasks (segments) per prompt."""
        return int(np.shape(self.relevance)[0])

    @property
    def fixed_n(self) -> int:
        """The prompt length: K per_task data pairs plus K - 1 delimiters when present."""
        K = self.tasks
        return K * self.per_task + (K - 1 if self.delimiters else 0)

    def positions(self) -> np.ndarray:
        """segment[i] for each context position i (0-based segment index), -1 at a delimiter [n]."""
        K, m = self.tasks, self.per_task
        out = []
        for k in range(K):
            out += [k] * m
            if self.delimiters and k < K - 1:
                out.append(-1)
        return np.asarray(out)

    def sample(self, key, batch: int, n: int, dtype=jnp.float32, shard: BatchShard | None = None) -> Prompts:
        """Prompts X [B, n, dim], y [B, n], x [B, dim], y_query [B], drawn in ``dtype`` (n = ``fixed_n``)."""
        _check_n(self, n, batch)
        d, K, m = self.task_dim, self.tasks, self.per_task
        gt, gX, gx, gn, gq = normals(key, dtype, (batch, K + 1, d), (batch, K, m, d), (batch, d), (batch, K, m),
                                      (batch, 1), shard=shard)
        r = jnp.asarray(self.relevance, dtype)
        joint = jnp.block([[jnp.ones((1, 1), dtype), r[None, :]], [r[:, None], jnp.asarray(self.corr, dtype)]])
        lam, U = jnp.linalg.eigh(joint)
        tasks = jnp.einsum("ij,bjd->bid", U * jnp.sqrt(jnp.clip(lam, 0.0, None))[None, :], gt)
        noise = jnp.sqrt(jnp.asarray(self.noise_var, dtype))
        y = jnp.einsum("bkmd,bkd->bkm", gX, tasks[:, 1:]) + noise * gn
        y_query = _query_label(gx, tasks[:, 0], gq, self.query_noise_var)
        extra = self.dim - d
        pad = jnp.zeros((batch, K, m, extra), dtype)
        X = jnp.concatenate([gX, pad], axis=-1)  # data pairs: zero marker channels
        if not self.delimiters:
            return Prompts(X.reshape(batch, K * m, d), y.reshape(batch, K * m), gx, y_query)
        Xs, ys = [], []
        for k in range(K):  # static loop over the K segments (shapes only)
            Xs.append(X[:, k])
            ys.append(y[:, k])
            if k < K - 1:
                marker = jnp.zeros((self.dim,), dtype).at[d + k].set(1.0)
                Xs.append(jnp.broadcast_to(marker, (batch, 1, self.dim)))
                ys.append(jnp.zeros((batch, 1), dtype))
        x = jnp.concatenate([gx, jnp.zeros((batch, extra), dtype)], axis=-1)
        return Prompts(jnp.concatenate(Xs, axis=1), jnp.concatenate(ys, axis=1), x, y_query)

    def as_drift(self):
        """The same law without delimiters as a ``designs.Drift`` (one task per position: rho_i = r_{k(i)},
        corr_ij = corr_{k(i)k(j)}), for the cross-check against ``theory.optimal_wpgd``."""
        from iclsim.designs import Drift

        seg = np.repeat(np.arange(self.tasks), self.per_task)
        corr = np.asarray(self.corr)[seg][:, seg]
        np.fill_diagonal(corr, 1.0)
        return Drift(self.task_dim, np.asarray(self.relevance)[seg], corr, float(self.noise_var),
                     float(self.query_noise_var))

