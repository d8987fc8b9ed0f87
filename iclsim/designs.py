"""Data designs of docs/theory.md §1: samplers of in-context regression prompts.

A prompt holds n context pairs (x_i, y_i) and a query (x, y). Every design is a frozen
dataclass registered as a pytree (array fields are leaves, ``dim`` is static), so designs that
differ only in their numbers can be stacked and vmapped over in one compiled sweep.
``sample(key, batch, n, dtype, shard=None)`` is pure and jit-compatible; with a
``rng.BatchShard`` it draws one device's rows of the batch split over devices. Random numbers
come from ``iclsim.rng``; Gram-matrix draws from ``iclsim.gram``. The prompt types (``Prompts``,
``GramPrompts``, ``ContextLaw``, ``tokens``, ``truncate_context``) live in ``iclsim.prompts`` and are
re-exported here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as check
from iclsim.prompts import ContextLaw, GramPrompts, Prompts, tokens, truncate_context
from iclsim.rng import BatchShard, draw_many, normals

__all__ = ["Prompts", "GramPrompts", "ContextLaw", "tokens", "truncate_context", "stack", "IID", "RAG",
           "TaskFeatureAlignment", "Drift", "TaskPool", "Design"]


def _pytree_design(static=("dim",)):
    """Register a frozen dataclass as a pytree whose unflatten skips validation (for tracers)."""

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        data = [k for k in names if k not in static]

        def flatten(obj):
            return [getattr(obj, k) for k in data], tuple(getattr(obj, k) for k in static)

        def unflatten(aux, children):
            obj = object.__new__(cls)
            for k, val in zip(static, aux):
                object.__setattr__(obj, k, val)
            for k, val in zip(data, children):
                object.__setattr__(obj, k, val)
            return obj

        jax.tree_util.register_pytree_node(cls, flatten, unflatten)
        return cls

    return wrap


def _dim_fits(design) -> None:
    """A design holds (and its checks and samplers build) a few dim x dim float64 matrices: refuse a dim whose
    matrices cannot fit in memory (MemoryError naming it) before allocating one (--set dim=100000 aborted)."""
    d = design.dim
    check.memory(f"{type(design).__name__}(dim={d}) (its dim x dim covariances)", 8.0 * 4 * d * d,
                 "use a smaller dim")


def stack(designs) -> object:
    """Stack designs of one type and structure along a new leading axis, for ``jax.vmap``. Designs of
    different types, or whose fields differ in shape (another dim, per-position noise beside a scalar),
    are a ValueError naming the first that differs."""
    designs = list(designs)
    if not designs:
        raise ValueError("designs must hold at least one design")
    first = designs[0]
    for i, other in enumerate(designs[1:], 1):
        if type(other) is not type(first):
            raise ValueError(f"designs of one sweep must be of one type: design 0 is a {type(first).__name__}, design "
                             f"{i} a {type(other).__name__}; run one sweep per design type")
        shapes = [np.shape(a) for a in jax.tree_util.tree_leaves(first)], \
            [np.shape(a) for a in jax.tree_util.tree_leaves(other)]
        if jax.tree_util.tree_structure(first) != jax.tree_util.tree_structure(other) or shapes[0] != shapes[1]:
            raise ValueError(f"designs of one sweep must have fields of one shape: design {i} ({_brief(other)}) "
                             f"differs from design 0 ({_brief(first)}) (another dim, or per-position noise beside a "
                             "scalar?); run them as separate sweeps")
    return jax.tree_util.tree_map(lambda *a: np.stack(a), *designs)


def _brief(design) -> str:
    return " ".join(repr(design).split())[:120]


def _set(obj, **fields):
    for k, val in fields.items():
        object.__setattr__(obj, k, val)


def _prompts(X, x, betas, beta, noise, query_noise, noise_var, query_noise_var) -> Prompts:
    """Labels y_i = <x_i, beta_i> + s_i noise_i (betas [B, d], or per position [B, n, d]) and
    y = <x, beta> + s_q query_noise; noise_var is a scalar or per position."""
    dtype, n = X.dtype, X.shape[1]
    signal = jnp.einsum("bnd,bd->bn", X, betas) if betas.ndim == 2 else jnp.einsum("bnd,bnd->bn", X, betas)
    s = jnp.sqrt(jnp.broadcast_to(jnp.asarray(noise_var, dtype), (n,)))[None, :]
    return Prompts(X, signal + s * noise, x, _query_label(x, beta, query_noise, query_noise_var))


def _query_label(x, beta, query_noise, query_noise_var):
    """y = <x, beta> + s_q query_noise (query_noise [B, 1])."""
    return jnp.einsum("bd,bd->b", x, beta) + jnp.sqrt(jnp.asarray(query_noise_var, x.dtype)) * query_noise[:, 0]


def _law(mean_x, A, beta, noise_var, x, query_noise, query_noise_var) -> ContextLaw:
    """The law of z_i = [x_i; x_i.beta + s h] for x_i = mean_x + A g: mean [mean_x; mean_x.beta] and
    factor [[A, 0], [beta^T A, s]] (A [d, d] shared or [B, d, d]); with the query x and its label."""
    B, d = beta.shape
    dtype = beta.dtype
    A = jnp.broadcast_to(A, (B, d, d))
    s = jnp.broadcast_to(jnp.sqrt(jnp.asarray(noise_var, dtype)), (B, 1, 1))
    top = jnp.concatenate([A, jnp.zeros((B, d, 1), dtype)], axis=2)
    bottom = jnp.concatenate([jnp.einsum("bi,bij->bj", beta, A)[:, None, :], s], axis=2)
    mean = jnp.concatenate([mean_x, jnp.einsum("bi,bi->b", mean_x, beta)[:, None]], axis=1)
    return ContextLaw(mean, jnp.concatenate([top, bottom], axis=1), x, _query_label(x, beta, query_noise, query_noise_var))


_UNCHECKED = object()


def _check_n(design, n, batch=_UNCHECKED):
    check.positive_int("n", n)
    if batch is not _UNCHECKED:  # sample() passes its batch, None included: it must be a positive integer
        check.positive_int("batch", batch)
    fixed = design.fixed_n
    if fixed is not None and n != fixed:
        raise ValueError(f"n must equal {fixed} for this design (its per-position arrays), got {n}")


class _Design:
    @property
    def fixed_n(self) -> int | None:
        """Context length the design's per-position arrays fix, or None."""
        return None

    def sample_shard(self, key, batch: int, n: int, dtype, shard: BatchShard) -> Prompts:
        """This device's rows of the batch of ``batch * shard.count`` prompts (``protocols.draws_shards``)."""
        return self.sample(key, batch, n, dtype, shard=shard)

    def context_law(self, key, batch: int, dtype=jnp.float32, shard: BatchShard | None = None) -> ContextLaw:
        """The law of the context pairs given each prompt's latent, with the query and its label,
        drawn from ``key``: ``law_from`` of the draws of the shapes ``law_draws`` names (designs with
        ``has_context_law``; ``sample_gram`` takes the same draws from its own single draw)."""
        normal_shapes, uniform_shapes = self.law_draws(batch)
        z, u, _ = draw_many(key, dtype, normal_shapes, uniform_shapes, shard=shard)
        return self.law_from(z, u)


@_pytree_design()
class IID(_Design):
    """docs/theory.md §1.1: x_i, x ~ N(0, cov_x), beta ~ N(0, cov_beta), y_i = x_i.beta + N(0, s_i^2).

    ``noise_var`` is a scalar or one variance per context position; ``query_noise_var``
    defaults to the scalar ``noise_var`` (it must be given when the noise is per position).
    """

    dim: int
    cov_x: np.ndarray | None = None
    cov_beta: np.ndarray | None = None
    noise_var: float | np.ndarray = 0.0
    query_noise_var: float | None = None

    def __post_init__(self):
        d = check.positive_int("dim", self.dim)
        _dim_fits(self)
        noise = check.nonneg_variance("noise_var", self.noise_var)
        if self.query_noise_var is None:
            if noise.ndim:
                raise ValueError("query_noise_var is required when noise_var is per position")
            qn = noise
        else:
            qn = check.nonneg_variance("query_noise_var", self.query_noise_var)
            if qn.ndim:
                raise ValueError("query_noise_var must be a scalar")
        _set(self, cov_x=check.spd_matrix("cov_x", self.cov_x, d),
             cov_beta=check.spd_matrix("cov_beta", self.cov_beta, d), noise_var=noise, query_noise_var=qn)

    @property
    def fixed_n(self):
        return None if np.ndim(self.noise_var) == 0 else np.shape(self.noise_var)[0]

    def sample(self, key, batch: int, n: int, dtype=jnp.float32, shard: BatchShard | None = None) -> Prompts:
        _check_n(self, n, batch)
        d = self.dim
        gb, gX, gx, gn, gq = normals(key, dtype, (batch, d), (batch, n, d), (batch, d), (batch, n), (batch, 1),
                                      shard=shard)
        lx = jnp.linalg.cholesky(jnp.asarray(self.cov_x, dtype))
        beta = gb @ jnp.linalg.cholesky(jnp.asarray(self.cov_beta, dtype)).T
        return _prompts(gX @ lx.T, gx @ lx.T, beta, beta, gn, gq, self.noise_var, self.query_noise_var)

    @property
    def has_context_law(self) -> bool:
        return np.ndim(self.noise_var) == 0

    def law_draws(self, batch: int):
        if not self.has_context_law:
            raise ValueError("context_law needs a scalar noise_var (per-position noise makes the pairs non-identical)")
        return [(batch, self.dim), (batch, self.dim), (batch, 1)], []

    def law_from(self, normals, uniforms) -> ContextLaw:
        """Given beta: z_i ~ N(0, [[C, C beta], [beta^T C, beta^T C beta + s^2]]), C = cov_x."""
        (gb, gx, gq), dtype = normals, normals[0].dtype
        lx = jnp.linalg.cholesky(jnp.asarray(self.cov_x, dtype))
        beta = gb @ jnp.linalg.cholesky(jnp.asarray(self.cov_beta, dtype)).T
        x = gx @ lx.T
        return _law(jnp.zeros_like(x), lx, beta, self.noise_var, x, gq, self.query_noise_var)


@_pytree_design()
class RAG(_Design):
    """docs/theory.md §1.2, retrieval-augmented: x ~ N(0, I), x_i | x ~ N(alpha x, gamma^2 I), beta ~ N(0, I).

    Default gamma = 1 gives paper A's effective sample-size multiplier kappa = alpha^2 d + 1;
    ``RAG.marginal_isotropic`` takes gamma^2 = 1 - alpha^2 so x_i ~ N(0, I) marginally.
    """

    dim: int
    alpha: float
    gamma: float = 1.0
    noise_var: float = 0.0

    def __post_init__(self):
        check.positive_int("dim", self.dim)
        _dim_fits(self)
        alpha = check.in_range("alpha", self.alpha, -1.0, 1.0)
        gamma = check.real("gamma", self.gamma)
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma!r}")
        noise = check.nonneg_variance("noise_var", self.noise_var)
        if noise.ndim:
            raise ValueError("noise_var must be a scalar for RAG")
        _set(self, alpha=np.float64(alpha), gamma=np.float64(gamma), noise_var=noise)

    @classmethod
    def marginal_isotropic(cls, dim: int, alpha: float, noise_var: float = 0.0) -> "RAG":
        if not abs(check.real("alpha", alpha)) < 1:
            raise ValueError(f"alpha must be in (-1, 1) for the marginally isotropic RAG, got {alpha}")
        return cls(dim, alpha, float(np.sqrt(1 - alpha**2)), noise_var)

    def sample(self, key, batch: int, n: int, dtype=jnp.float32, shard: BatchShard | None = None) -> Prompts:
        _check_n(self, n, batch)
        d = self.dim
        beta, gX, x, gn, gq = normals(key, dtype, (batch, d), (batch, n, d), (batch, d), (batch, n), (batch, 1),
                                      shard=shard)
        X = jnp.asarray(self.alpha, dtype) * x[:, None, :] + jnp.asarray(self.gamma, dtype) * gX
        return _prompts(X, x, beta, beta, gn, gq, self.noise_var, self.noise_var)

    has_context_law = True

    def law_draws(self, batch: int):
        return [(batch, self.dim), (batch, self.dim), (batch, 1)], []

    def law_from(self, normals, uniforms) -> ContextLaw:
        """Given (x, beta): x_i = alpha x + gamma g_i, y_i = x_i.beta + s h_i."""
        (beta, x, gq), d, dtype = normals, self.dim, normals[0].dtype
        A = jnp.asarray(self.gamma, dtype) * jnp.eye(d, dtype=dtype)
        return _law(jnp.asarray(self.alpha, dtype) * x, A, beta, self.noise_var, x, gq, self.noise_var)


@_pytree_design()
class TaskFeatureAlignment(_Design):
    """docs/theory.md §1.3: beta ~ N(0, I), x_i | beta ~ N(alpha beta, I), query x ~ N(0, I) independent."""

    dim: int
    alpha: float
    noise_var: float = 0.0

    def __post_init__(self):
        check.positive_int("dim", self.dim)
        _dim_fits(self)
        alpha = check.in_range("alpha", self.alpha, -1.0, 1.0)
        noise = check.nonneg_variance("noise_var", self.noise_var)
        if noise.ndim:
            raise ValueError("noise_var must be a scalar for TaskFeatureAlignment")
        _set(self, alpha=np.float64(alpha), noise_var=noise)

    def sample(self, key, batch: int, n: int, dtype=jnp.float32, shard: BatchShard | None = None) -> Prompts:
        _check_n(self, n, batch)
        d = self.dim
        beta, gX, x, gn, gq = normals(key, dtype, (batch, d), (batch, n, d), (batch, d), (batch, n), (batch, 1),
                                      shard=shard)
        X = jnp.asarray(self.alpha, dtype) * beta[:, None, :] + gX
        return _prompts(X, x, beta, beta, gn, gq, self.noise_var, self.noise_var)

    has_context_law = True

    def law_draws(self, batch: int):
        return [(batch, self.dim), (batch, self.dim), (batch, 1)], []

    def law_from(self, normals, uniforms) -> ContextLaw:
        """Given beta: x_i = alpha beta + g_i, y_i = x_i.beta + s h_i; the query x is independent."""
        (beta, x, gq), d, dtype = normals, self.dim, normals[0].dtype
        return _law(jnp.asarray(self.alpha, dtype) * beta, jnp.eye(d, dtype=dtype), beta, self.noise_var, x, gq,
                    self.noise_var)


@_pytree_design()
class Drift(_Design):
    """docs/theory.md §1.4, temporally heterogeneous prompts: x_i, x ~ N(0, I), y_i = x_i.beta_i + noise.

    The per-position tasks beta_i and the query task beta are jointly Gaussian with
    E[beta beta_i^T] = rho_i I and E[beta_i beta_j^T] = corr_ij I. ``rho`` has one entry per
    context position (its length fixes n); ``corr`` defaults to rho rho^T with a unit diagonal
    (generator (a): beta_i = rho_i beta + sqrt(1 - rho_i^2) g_i). ``Drift.ar1`` builds AR(1)
    drift toward the query, corr_ij = g^|i-j|, rho_i = g^(n+1-i).
    """

    dim: int
    rho: np.ndarray
    corr: np.ndarray | None = None
    noise_var: float | np.ndarray = 0.0
    query_noise_var: float | None = None

    def __post_init__(self):
        check.positive_int("dim", self.dim)
        _dim_fits(self)
        rho = check.real_array("rho", self.rho, finite=False)
        if rho.ndim != 1 or rho.shape[0] < 1:
            raise ValueError(f"rho must be a 1-D array with one entry per context position, got shape {rho.shape}")
        if not np.all(np.isfinite(rho)) or np.any(np.abs(rho) > 1):
            raise ValueError("rho must have entries in [-1, 1]")
        n = rho.shape[0]
        if self.corr is None:
            corr = np.outer(rho, rho)
            np.fill_diagonal(corr, 1.0)
        else:
            corr = check.real_array("corr", self.corr)
            if corr.shape != (n, n):
                raise ValueError(f"corr must have shape ({n}, {n}), got {corr.shape}")
            if not np.allclose(corr, corr.T) or not np.allclose(np.diag(corr), 1.0):
                raise ValueError("corr must be symmetric with a unit diagonal")
        joint = np.block([[np.ones((1, 1)), rho[None, :]], [rho[:, None], corr]])
        if np.linalg.eigvalsh(joint).min() < -1e-9:
            raise ValueError("corr and rho must form a valid correlation matrix of (beta, beta_1..beta_n)")
        noise = check.nonneg_variance("noise_var", self.noise_var, length=n)
        if self.query_noise_var is None:
            if noise.ndim:
                raise ValueError("query_noise_var is required when noise_var is per position")
            qn = noise
        else:
            qn = check.nonneg_variance("query_noise_var", self.query_noise_var)
            if qn.ndim:
                raise ValueError(f"query_noise_var must be a scalar (the query's noise), got shape {qn.shape}")
        _set(self, rho=rho, corr=corr, noise_var=noise, query_noise_var=qn)

    @classmethod
    def ar1(cls, dim: int, n: int, g: float, noise_var=0.0, query_noise_var=None) -> "Drift":
        """AR(1) drift toward the query: corr_ij = g^|i-j|, rho_i = g^(n+1-i), g in [0, 1]."""
        check.positive_int("n", n)
        g = check.in_range("g", g, 0.0, 1.0)
        i = np.arange(1, n + 1)
        return cls(dim, g ** (n + 1 - i), g ** np.abs(i[:, None] - i[None, :]), noise_var, query_noise_var)

    @property
    def fixed_n(self):
        return np.shape(self.rho)[0]

    def sample(self, key, batch: int, n: int, dtype=jnp.float32, shard: BatchShard | None = None) -> Prompts:
        _check_n(self, n, batch)
        d = self.dim
        gt, X, x, gn, gq = normals(key, dtype, (batch, n + 1, d), (batch, n, d), (batch, d), (batch, n), (batch, 1),
                                      shard=shard)
        rho = jnp.asarray(self.rho, dtype)
        joint = jnp.block([[jnp.ones((1, 1), dtype), rho[None, :]], [rho[:, None], jnp.asarray(self.corr, dtype)]])
        lam, U = jnp.linalg.eigh(joint)
        root = U * jnp.sqrt(jnp.clip(lam, 0.0, None))[None, :]
        tasks = jnp.einsum("ij,bjd->bid", root, gt)
        return _prompts(X, x, tasks[:, 1:], tasks[:, 0], gn, gq, self.noise_var, self.query_noise_var)


@_pytree_design()
class TaskPool(_Design):
    """A finite pool of pretraining tasks (docs/theory.md §6): beta drawn uniformly from ``num_tasks`` fixed
    tasks beta_k ~ N(0, I) (drawn once from ``pool_seed``); x_i, x ~ N(0, I); noise as IID."""

    dim: int
    num_tasks: int
    noise_var: float = 0.0
    pool_seed: int = 0
    pool: np.ndarray | None = None

    def __post_init__(self):
        check.positive_int("dim", self.dim)
        _dim_fits(self)
        check.positive_int("num_tasks", self.num_tasks)
        check.integer("pool_seed", self.pool_seed, 0)
        noise = check.nonneg_variance("noise_var", self.noise_var)
        if noise.ndim:
            raise ValueError("noise_var must be a scalar for TaskPool")
        pool = np.random.default_rng(self.pool_seed).normal(size=(self.num_tasks, self.dim))
        _set(self, noise_var=noise, pool=pool, pool_seed=np.int64(self.pool_seed), num_tasks=np.int64(self.num_tasks))

    def sample(self, key, batch: int, n: int, dtype=jnp.float32, shard: BatchShard | None = None) -> Prompts:
        _check_n(self, n, batch)
        d = self.dim
        (gX, x, gn, gq), (u,), _ = draw_many(key, dtype, [(batch, n, d), (batch, d), (batch, n), (batch, 1)],
                                             [(batch,)], shard=shard)
        beta = self._task(u, dtype)
        return _prompts(gX, x, beta, beta, gn, gq, self.noise_var, self.noise_var)

    has_context_law = True

    def _task(self, u, dtype):
        """The pool task at index floor(u K) for uniforms u in (0, 1) (K = num_tasks)."""
        K = self.pool.shape[0]
        return jnp.asarray(self.pool, dtype)[jnp.minimum((u * K).astype(jnp.int32), K - 1)]

    def law_draws(self, batch: int):
        return [(batch, self.dim), (batch, 1)], [(batch,)]

    def law_from(self, normals, uniforms) -> ContextLaw:
        """Given the pool task beta: x_i ~ N(0, I), y_i = x_i.beta + s h_i."""
        (x, gq), (u,), d, dtype = normals, uniforms, self.dim, normals[0].dtype
        beta = self._task(u, dtype)
        return _law(jnp.zeros_like(x), jnp.eye(d, dtype=dtype), beta, self.noise_var, x, gq, self.noise_var)


Design = IID | RAG | TaskFeatureAlignment | Drift | TaskPool
