"""Data designs of THEORY.md section 1: samplers of in-context regression prompts.

A prompt holds n context pairs (x_i, y_i) and a query (x, y). Every design is a frozen
dataclass registered as a pytree (array fields are leaves, ``dim`` is static), so designs that
differ only in their numbers can be stacked and vmapped over in one compiled sweep.
``sample(key, batch, n, dtype)`` is pure and jit-compatible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as v


class Prompts(NamedTuple):
    """A batch of prompts: X [B, n, d], y [B, n], x [B, d], y_query [B]."""

    X: jax.Array
    y: jax.Array
    x: jax.Array
    y_query: jax.Array


class GramPrompts(NamedTuple):
    """A batch of prompts seen through their context Gram matrix S = (1/n_slots) sum_i z_i z_i^T
    [B, d+1, d+1] over the active pairs z_i = [x_i; y_i], all that linear attention, PGD, low-rank
    attention and LoRA read of the context; query x [B, d], y_query [B]. S is kept factored,
    S = L T T^T L^T + c m m^T (factor L [B, d+1, d+1], inner T [B, d+1, k], mean m [B, d+1],
    weight c [B]): the models need only S v and a^T S v, O(d^2) per prompt from the factors
    against O(d^3) to form S (forming S took 25 of 57 ms per step of a 64-model sweep)."""

    factor: jax.Array
    inner: jax.Array
    mean: jax.Array
    weight: jax.Array
    x: jax.Array
    y_query: jax.Array

    @classmethod
    def from_matrix(cls, S, x, y_query) -> "GramPrompts":
        """From a given S [B, d+1, d+1] (symmetric PSD): L = I, T = S^(1/2)."""
        lam, U = jnp.linalg.eigh(S)
        root = jnp.einsum("bij,bj,bkj->bik", U, jnp.sqrt(jnp.clip(lam, 0.0, None)), U)
        eye = jnp.broadcast_to(jnp.eye(S.shape[-1], dtype=S.dtype), S.shape)
        return cls(eye, root, jnp.zeros(S.shape[:-1], S.dtype), jnp.zeros(S.shape[:1], S.dtype), x, y_query)

    def _inner_coords(self, v) -> jax.Array:
        """T^T L^T v [B, k] for v [B, d+1] or [d+1]."""
        w = jnp.einsum("bji,bj->bi", self.factor, jnp.broadcast_to(v, self.mean.shape))
        return jnp.einsum("bji,bj->bi", self.inner, w)

    def times(self, v) -> jax.Array:
        """S v [B, d+1] for v [B, d+1] or [d+1]."""
        m_v = jnp.einsum("bi,bi->b", self.mean, jnp.broadcast_to(v, self.mean.shape))
        LTw = jnp.einsum("bij,bj->bi", self.factor, jnp.einsum("bij,bj->bi", self.inner, self._inner_coords(v)))
        return LTw + (self.weight * m_v)[:, None] * self.mean

    def quadratic(self, a, v) -> jax.Array:
        """a^T S v [B] for a, v [B, d+1] or [d+1]."""
        m_a = jnp.einsum("bi,bi->b", self.mean, jnp.broadcast_to(a, self.mean.shape))
        m_v = jnp.einsum("bi,bi->b", self.mean, jnp.broadcast_to(v, self.mean.shape))
        return jnp.einsum("bi,bi->b", self._inner_coords(a), self._inner_coords(v)) + self.weight * m_a * m_v

    @property
    def S(self) -> jax.Array:
        """The Gram matrix itself [B, d+1, d+1] (O(d^3) per prompt; for checks and plots)."""
        F = self.factor @ self.inner
        return F @ jnp.swapaxes(F, 1, 2) + self.weight[:, None, None] * jnp.einsum("bi,bj->bij", self.mean, self.mean)


class ContextLaw(NamedTuple):
    """Given the latent (x, beta) of each prompt, its context tokens z_i = [x_i; y_i] are i.i.d.
    N(mean, factor factor^T): mean [B, d+1], factor [B, d+1, d+1]; with the query x [B, d] and
    its label y_query [B] drawn from the same latent."""

    mean: jax.Array
    factor: jax.Array
    x: jax.Array
    y_query: jax.Array


def tokens(prompts: Prompts) -> jax.Array:
    """Token matrix Z [B, n+1, d+1]: rows z_i = [x_i; y_i], last row the query [x; 0]."""
    ctx = jnp.concatenate([prompts.X, prompts.y[..., None]], axis=-1)
    query = jnp.concatenate([prompts.x, jnp.zeros_like(prompts.y_query)[..., None]], axis=-1)
    return jnp.concatenate([ctx, query[:, None, :]], axis=1)


def truncate_context(prompts: Prompts, n) -> Prompts:
    """Keep the last ``n`` context pairs and zero the others (n may be traced).

    Zero tokens are inert in every iclsim model (no biases), so a prompt drawn at n_max and
    truncated is a prompt of length n, right-aligned so lags to the query are unchanged. This
    is the mask that lets one compiled program train a whole risk-vs-n curve.
    """
    n_max = prompts.X.shape[1]
    if not v._is_traced(n):
        v.integer("n", n, 0, n_max)
    keep = (jnp.arange(n_max) >= n_max - n).astype(prompts.y.dtype)
    return prompts._replace(X=prompts.X * keep[None, :, None], y=prompts.y * keep[None, :])


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


def stack(designs) -> object:
    """Stack designs of one type and structure along a new leading axis, for ``jax.vmap``."""
    return jax.tree_util.tree_map(lambda *a: np.stack(a), *designs)


def _set(obj, **fields):
    for k, val in fields.items():
        object.__setattr__(obj, k, val)


_BATCH_SHARD: list[tuple[str, int]] = []  # (axis name, shards) while tracing a batch-split training step


@contextlib.contextmanager
def batch_shard(axis_name: str, shards: int):
    """Inside (at trace time, under ``shard_map`` over ``axis_name``), a draw of B rows (the leading
    axis of every shape drawn) gives rows [i B, (i + 1) B) of the same draw of B * shards rows,
    i = lax.axis_index(axis_name), and the same fresh keys on every shard: a training batch split
    over devices sees exactly the prompts of the unsplit run."""
    _BATCH_SHARD.append((axis_name, shards))
    try:
        yield
    finally:
        _BATCH_SHARD.pop()


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k0, k1, x0, x1):
    """Threefry-2x32, 20 rounds (Salmon et al. 2011), bit for bit jax's threefry2x32 primitive, written
    out with constant rotations (the primitive's CPU lowering loops over its 5 blocks of 4 rounds with
    the rotations as loop-carried values: 16 ns per word in training against about 2 here)."""
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for block in range(5):
        for r in _ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
        x0, x1 = x0 + ks[(block + 1) % 3], x1 + ks[(block + 2) % 3] + np.uint32(block + 1)
    return x0, x1


def _threefry_bits(key, counters, uint) -> jax.Array:
    """Threefry-2x32 bits at the given counters, equal to jax.random.bits(key, (N,), uint)[counters]
    (its partitionable scheme: the block (0, i) gives word i)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(key)) != "threefry2x32":
            raise ValueError(f"key must be a threefry2x32 key (jax.random.PRNGKey), got {jax.random.key_impl(key)}")
        key = jax.random.key_data(key)
    if not jax.config.jax_threefry_partitionable:
        raise RuntimeError("iclsim draws need jax_threefry_partitionable=True (the JAX default)")
    hi, lo = _threefry2x32(key[0], key[1], jnp.zeros_like(counters), counters)
    if uint == jnp.uint64:
        return (hi.astype(uint) << np.uint64(32)) | lo.astype(uint)
    return hi ^ lo


def _floats(key, counters, index, split: int, dtype) -> jax.Array:
    """The threefry bits at ``counters`` as floats: normals where index < split (by inversion, as
    jax.random.normal), uniforms in (0, 1) elsewhere (as jax.random.uniform, floored at tiny)."""
    finfo = jnp.finfo(dtype)
    uint = jnp.dtype(f"uint{finfo.bits}")
    bits = _threefry_bits(key, counters, uint)
    one = np.array(1.0, dtype).view(uint)
    unit = jax.lax.bitcast_convert_type((bits >> (finfo.bits - finfo.nmant)) | one, dtype) - 1.0
    lo = np.nextafter(np.array(-1.0, dtype), np.array(0.0, dtype))
    z = np.sqrt(2.0).astype(dtype) * jax.scipy.special.erfinv(jnp.maximum(lo, unit * (1.0 - lo) + lo))
    return jnp.where(index < split, z, jnp.maximum(finfo.tiny, unit))


def _floats_once(key, counters, split: int, dtype, chunks: int = 2) -> jax.Array:
    """``_floats`` of all counters, computed in a loop over ``chunks`` pieces. XLA CPU fuses cheap
    elementwise work into every consumer, so a flat draw read as several pieces (the sample mean, the
    Bartlett normals, the gamma proposals, the law's normals) had its threefry rounds and inverse-erf
    polynomial recomputed in each; a loop's output is computed once (d = 10, n = 20: 2000 training steps
    0.91-1.22 -> 0.74-0.92 s, XLA compile 1.25-1.50 -> 1.12-1.24 s)."""
    total = counters.shape[0]
    size = -(-total // chunks)
    pieces = jnp.concatenate([counters, counters[:chunks * size - total]]).reshape(chunks, size)

    def piece(j, out):
        values = _floats(key, pieces[j], j * size + jnp.arange(size), split, dtype)
        return jax.lax.dynamic_update_index_in_dim(out, values, j, 0)

    return jax.lax.fori_loop(0, chunks, piece, jnp.zeros((chunks, size), dtype)).reshape(-1)[:total]


def draw_many(key, dtype, normal_shapes=(), uniform_shapes=(), keys: int = 0):
    """(normals, uniforms in (0, 1), keys): arrays of the given shapes and ``keys`` fresh keys, all
    from one threefry stream (bits to floats as jax.random.uniform does, normals by inversion as
    jax.random.normal does; the bits equal jax.random.bits(key) over the concatenated pieces).
    XLA CPU compiles every jax.random call inside a step as its own threefry kernel (about 0.25 s
    each), and a flat draw runs about 3x faster than a multi-dimensional one. Under ``batch_shard``
    each piece is this shard's rows of the piece drawn at the full batch."""
    dtype = jnp.dtype(dtype)
    finfo = jnp.finfo(dtype)
    uint = jnp.dtype(f"uint{finfo.bits}")
    shapes = (*normal_shapes, *uniform_shapes)
    sizes = [int(np.prod(s)) for s in shapes]
    total, split = sum(sizes), sum(sizes[:len(normal_shapes)])
    per_key = max(1, 64 // finfo.bits)  # words of one key (two uint32)
    counters = jnp.arange(total + keys * per_key, dtype=jnp.uint32)
    if _BATCH_SHARD:  # piece p, local start s_p, is rows [i B, (i + 1) B) of the full piece at shards * s_p
        axis_name, shards = _BATCH_SHARD[-1]
        row = jax.lax.axis_index(axis_name).astype(jnp.uint32)
        ends = np.cumsum(sizes).astype(np.uint32)
        shift = np.uint32((shards - 1) * total)  # the keys' words: the same on every shard
        for end, size in zip(ends[::-1], sizes[::-1]):  # an elementwise select chain, fused into the draw
            shift = jnp.where(counters >= end, shift, np.uint32(shards - 1) * (end - size) + row * np.uint32(size))
        counters = counters + shift
    flat = _floats_once(key, counters[:total], split, dtype) if total else jnp.zeros((0,), dtype)
    words = _threefry_bits(key, counters[total:], uint).reshape(keys, per_key)
    words = jax.lax.bitcast_convert_type(words.reshape(keys, 2, -1) if finfo.bits < 32 else words,
                                         jnp.uint32).reshape(keys, 2)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        words = [jax.random.wrap_key_data(w, impl=jax.random.key_impl(key)) for w in words]
    return _cut(flat[:split], normal_shapes), _cut(flat[split:], uniform_shapes), list(words)


def _cut(flat, shapes) -> list[jax.Array]:
    """Consecutive pieces of ``flat`` reshaped to ``shapes``."""
    ends = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
    return [flat[a:b].reshape(shape) for a, b, shape in zip(ends[:-1], ends[1:], shapes)]


def normals(key, dtype, *shapes):
    """Standard normals of several shapes from one flat draw (``draw_many``)."""
    return draw_many(key, dtype, shapes)[0]


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


def _check_n(design, n, batch=None):
    v.positive_int("n", n)
    if batch is not None:
        v.positive_int("batch", batch)
    fixed = design.fixed_n
    if fixed is not None and n != fixed:
        raise ValueError(f"n must equal {fixed} for this design (its per-position arrays), got {n}")


class _Design:
    @property
    def fixed_n(self) -> int | None:
        """Context length the design's per-position arrays fix, or None."""
        return None

    def context_law(self, key, batch: int, dtype=jnp.float32) -> ContextLaw:
        """The law of the context pairs given each prompt's latent, with the query and its label,
        drawn from ``key``: ``law_from`` of the draws of the shapes ``law_draws`` names (designs with
        ``has_context_law``; ``sample_gram`` takes the same draws from its own single draw)."""
        normal_shapes, uniform_shapes = self.law_draws(batch)
        z, u, _ = draw_many(key, dtype, normal_shapes, uniform_shapes)
        return self.law_from(z, u)


@_pytree_design()
class IID(_Design):
    """THEORY 1.1: x_i, x ~ N(0, cov_x), beta ~ N(0, cov_beta), y_i = x_i.beta + N(0, s_i^2).

    ``noise_var`` is a scalar or one variance per context position; ``query_noise_var``
    defaults to the scalar ``noise_var`` (it must be given when the noise is per position).
    """

    dim: int
    cov_x: np.ndarray | None = None
    cov_beta: np.ndarray | None = None
    noise_var: float | np.ndarray = 0.0
    query_noise_var: float | None = None

    def __post_init__(self):
        d = v.positive_int("dim", self.dim)
        noise = v.nonneg_variance("noise_var", self.noise_var)
        if self.query_noise_var is None:
            if noise.ndim:
                raise ValueError("query_noise_var is required when noise_var is per position")
            qn = noise
        else:
            qn = v.nonneg_variance("query_noise_var", self.query_noise_var)
            if qn.ndim:
                raise ValueError("query_noise_var must be a scalar")
        _set(self, cov_x=v.spd_matrix("cov_x", self.cov_x, d),
             cov_beta=v.spd_matrix("cov_beta", self.cov_beta, d), noise_var=noise, query_noise_var=qn)

    @property
    def fixed_n(self):
        return None if np.ndim(self.noise_var) == 0 else np.shape(self.noise_var)[0]

    def sample(self, key, batch: int, n: int, dtype=jnp.float32) -> Prompts:
        _check_n(self, n, batch)
        d = self.dim
        gb, gX, gx, gn, gq = normals(key, dtype, (batch, d), (batch, n, d), (batch, d), (batch, n), (batch, 1))
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
    """THEORY 1.2, retrieval-augmented: x ~ N(0, I), x_i | x ~ N(alpha x, gamma^2 I), beta ~ N(0, I).

    Default gamma = 1 gives paper A's effective sample-size multiplier kappa = alpha^2 d + 1;
    ``RAG.marginal_isotropic`` takes gamma^2 = 1 - alpha^2 so x_i ~ N(0, I) marginally.
    """

    dim: int
    alpha: float
    gamma: float = 1.0
    noise_var: float = 0.0

    def __post_init__(self):
        v.positive_int("dim", self.dim)
        alpha = v.in_range("alpha", self.alpha, -1.0, 1.0)
        gamma = v.real("gamma", self.gamma)
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma!r}")
        noise = v.nonneg_variance("noise_var", self.noise_var)
        if noise.ndim:
            raise ValueError("noise_var must be a scalar for RAG")
        _set(self, alpha=np.float64(alpha), gamma=np.float64(gamma), noise_var=noise)

    @classmethod
    def marginal_isotropic(cls, dim: int, alpha: float, noise_var: float = 0.0) -> "RAG":
        if not abs(v.real("alpha", alpha)) < 1:
            raise ValueError(f"alpha must be in (-1, 1) for the marginally isotropic RAG, got {alpha}")
        return cls(dim, alpha, float(np.sqrt(1 - alpha**2)), noise_var)

    def sample(self, key, batch: int, n: int, dtype=jnp.float32) -> Prompts:
        _check_n(self, n, batch)
        d = self.dim
        beta, gX, x, gn, gq = normals(key, dtype, (batch, d), (batch, n, d), (batch, d), (batch, n), (batch, 1))
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
    """THEORY 1.3: beta ~ N(0, I), x_i | beta ~ N(alpha beta, I), query x ~ N(0, I) independent."""

    dim: int
    alpha: float
    noise_var: float = 0.0

    def __post_init__(self):
        v.positive_int("dim", self.dim)
        alpha = v.in_range("alpha", self.alpha, -1.0, 1.0)
        noise = v.nonneg_variance("noise_var", self.noise_var)
        if noise.ndim:
            raise ValueError("noise_var must be a scalar for TaskFeatureAlignment")
        _set(self, alpha=np.float64(alpha), noise_var=noise)

    def sample(self, key, batch: int, n: int, dtype=jnp.float32) -> Prompts:
        _check_n(self, n, batch)
        d = self.dim
        beta, gX, x, gn, gq = normals(key, dtype, (batch, d), (batch, n, d), (batch, d), (batch, n), (batch, 1))
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
    """THEORY 1.4, temporally heterogeneous prompts: x_i, x ~ N(0, I), y_i = x_i.beta_i + noise.

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
        v.positive_int("dim", self.dim)
        rho = v.real_array("rho", self.rho, finite=False)
        if rho.ndim != 1 or rho.shape[0] < 1:
            raise ValueError(f"rho must be a 1-D array with one entry per context position, got shape {rho.shape}")
        if not np.all(np.isfinite(rho)) or np.any(np.abs(rho) > 1):
            raise ValueError("rho must have entries in [-1, 1]")
        n = rho.shape[0]
        if self.corr is None:
            corr = np.outer(rho, rho)
            np.fill_diagonal(corr, 1.0)
        else:
            corr = v.real_array("corr", self.corr)
            if corr.shape != (n, n):
                raise ValueError(f"corr must have shape ({n}, {n}), got {corr.shape}")
            if not np.allclose(corr, corr.T) or not np.allclose(np.diag(corr), 1.0):
                raise ValueError("corr must be symmetric with a unit diagonal")
        joint = np.block([[np.ones((1, 1)), rho[None, :]], [rho[:, None], corr]])
        if np.linalg.eigvalsh(joint).min() < -1e-9:
            raise ValueError("corr and rho must form a valid correlation matrix of (beta, beta_1..beta_n)")
        noise = v.nonneg_variance("noise_var", self.noise_var, length=n)
        if self.query_noise_var is None:
            if noise.ndim:
                raise ValueError("query_noise_var is required when noise_var is per position")
            qn = noise
        else:
            qn = v.nonneg_variance("query_noise_var", self.query_noise_var)
            if qn.ndim:
                raise ValueError(f"query_noise_var must be a scalar (the query's noise), got shape {qn.shape}")
        _set(self, rho=rho, corr=corr, noise_var=noise, query_noise_var=qn)

    @classmethod
    def ar1(cls, dim: int, n: int, g: float, noise_var=0.0, query_noise_var=None) -> "Drift":
        """AR(1) drift toward the query: corr_ij = g^|i-j|, rho_i = g^(n+1-i), g in [0, 1]."""
        v.positive_int("n", n)
        g = v.in_range("g", g, 0.0, 1.0)
        i = np.arange(1, n + 1)
        return cls(dim, g ** (n + 1 - i), g ** np.abs(i[:, None] - i[None, :]), noise_var, query_noise_var)

    @property
    def fixed_n(self):
        return np.shape(self.rho)[0]

    def sample(self, key, batch: int, n: int, dtype=jnp.float32) -> Prompts:
        _check_n(self, n, batch)
        d = self.dim
        gt, X, x, gn, gq = normals(key, dtype, (batch, n + 1, d), (batch, n, d), (batch, d), (batch, n), (batch, 1))
        rho = jnp.asarray(self.rho, dtype)
        joint = jnp.block([[jnp.ones((1, 1), dtype), rho[None, :]], [rho[:, None], jnp.asarray(self.corr, dtype)]])
        lam, U = jnp.linalg.eigh(joint)
        root = U * jnp.sqrt(jnp.clip(lam, 0.0, None))[None, :]
        tasks = jnp.einsum("ij,bjd->bid", root, gt)
        return _prompts(X, x, tasks[:, 1:], tasks[:, 0], gn, gq, self.noise_var, self.query_noise_var)


@_pytree_design()
class TaskPool(_Design):
    """A finite pool of pretraining tasks (THEORY 6): beta drawn uniformly from ``num_tasks`` fixed
    tasks beta_k ~ N(0, I) (drawn once from ``pool_seed``); x_i, x ~ N(0, I); noise as IID."""

    dim: int
    num_tasks: int
    noise_var: float = 0.0
    pool_seed: int = 0
    pool: np.ndarray | None = None

    def __post_init__(self):
        v.positive_int("dim", self.dim)
        v.positive_int("num_tasks", self.num_tasks)
        v.integer("pool_seed", self.pool_seed, 0)
        noise = v.nonneg_variance("noise_var", self.noise_var)
        if noise.ndim:
            raise ValueError("noise_var must be a scalar for TaskPool")
        pool = np.random.default_rng(self.pool_seed).normal(size=(self.num_tasks, self.dim))
        _set(self, noise_var=noise, pool=pool, pool_seed=np.int64(self.pool_seed), num_tasks=np.int64(self.num_tasks))

    def sample(self, key, batch: int, n: int, dtype=jnp.float32) -> Prompts:
        _check_n(self, n, batch)
        d = self.dim
        (gX, x, gn, gq), (u,), _ = draw_many(key, dtype, [(batch, n, d), (batch, d), (batch, n), (batch, 1)], [(batch,)])
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


# ---- Drawing the context Gram matrix directly (THEORY 1: tokens i.i.d. given the latent) ----

def _gamma(z, u, key, alpha):
    """Gamma(alpha, 1) draws for alpha >= 1 (Marsaglia & Tsang 2000, ACM TOMS 26(3)) from a first
    proposal per entry (normal z, uniform u, same shape as alpha); while any entry is rejected (1-5%
    each round), every entry gets a fresh proposal from ``key`` and the rejected ones take it.
    Redrawing all entries, not only the rejected, keeps the loop free of gathers and scatters: its
    draw is cheap next to their compile time (0.4 s less per training program on CPU)."""
    shape, dtype = jnp.shape(alpha), z.dtype
    shifted = jnp.reshape(alpha, (-1,)) - 1.0 / 3.0
    c = 1.0 / jnp.sqrt(9.0 * shifted)

    def propose(z, u):
        v = (1.0 + c * z) ** 3
        v_safe = jnp.where(v > 0, v, 1.0)
        ok = (v > 0) & (jnp.log(u) < 0.5 * z**2 + shifted - shifted * v_safe + shifted * jnp.log(v_safe))
        return shifted * v_safe, ok

    def redraw(state):
        key, value, ok = state
        (z,), (u,), (key,) = draw_many(key, dtype, [shifted.shape], [shifted.shape], keys=1)
        new, accepted = propose(z, u)
        return key, jnp.where(ok, value, new), ok | accepted

    value, ok = propose(z.reshape(-1), u.reshape(-1))
    _, value, _ = jax.lax.while_loop(lambda s: ~jnp.all(s[2]), redraw, (key, value, ok))
    return value.reshape(shape)


def standard_gamma(key, alpha) -> jax.Array:
    """Exact Gamma(alpha, 1) draws for alpha >= 1 (``_gamma``) from one flat draw per round;
    jax.random.gamma splits a key per entry and per retry (2.0 ms for 5632 draws on CPU)."""
    alpha = jnp.asarray(alpha)
    (z,), (u,), (k,) = draw_many(key, alpha.dtype, [alpha.shape], [alpha.shape], keys=1)
    return _gamma(z, u, k, alpha)


def _bartlett(below, odd, z, u, key, dim: int, dof) -> jax.Array:
    """The Bartlett factor from its draws: below [B, dim (dim - 1) / 2] normals, odd [B] a normal for
    chi^2(1), (z, u) [B, dim] the first gamma proposals, key for the redraws."""
    batch, dtype = below.shape[0], below.dtype
    _, cols = np.tril_indices(dim, -1)
    j = jnp.arange(dim)
    chi_dof = jnp.asarray(dof, dtype) - j.astype(dtype)  # degrees of freedom of T_jj^2
    alpha = jnp.broadcast_to(jnp.maximum(chi_dof, 2.0) / 2.0, (batch, dim))
    chi2 = 2.0 * _gamma(z, u, key, alpha)
    chi2 = jnp.where(chi_dof[None, :] >= 2, chi2, jnp.where(chi_dof[None, :] == 1, odd[:, None] ** 2, 0.0))
    vals = jnp.concatenate([below * (cols < jnp.asarray(dof)).astype(dtype)[None, :], jnp.sqrt(chi2),
                            jnp.zeros((batch, 1), dtype)], axis=1)
    return vals[:, _bartlett_places(dim)].reshape(batch, dim, dim)


@functools.lru_cache(maxsize=None)
def _bartlett_places(dim: int) -> np.ndarray:
    """For each entry of a dim x dim lower-triangular T in row-major order, its place in
    [below (tril_indices order), diagonal, 0]: T is one gather (a scatter into zeros took 7 ms per
    step of a 64-model sweep)."""
    rows, cols = np.tril_indices(dim, -1)
    places = np.full((dim, dim), len(rows) + dim)
    places[rows, cols] = np.arange(len(rows))
    places[np.arange(dim), np.arange(dim)] = len(rows) + np.arange(dim)
    return places.ravel()


def _bartlett_shapes(batch: int, dim: int):
    return [(batch, dim * (dim - 1) // 2), (batch,), (batch, dim)], [(batch, dim)]


def bartlett_factor(key, batch: int, dim: int, dof, dtype=jnp.float32) -> jax.Array:
    """Lower-triangular T [batch, dim, dim] with T T^T ~ Wishart_dim(I, dof), for an integer dof >= 0
    that may be traced (Bartlett decomposition, extended to dof < dim where the Wishart is singular):
    column j is alive only for j < dof, T_jj^2 ~ chi^2(dof - j), T_ij ~ N(0, 1) for i > j."""
    v.positive_int("batch", batch)
    v.positive_int("dim", dim)
    if not v._is_traced(dof):
        v.integer("dof", dof, 0)
    normal_shapes, uniform_shapes = _bartlett_shapes(batch, dim)
    (below, odd, z), (u,), (k,) = draw_many(key, dtype, normal_shapes, uniform_shapes, keys=1)
    return _bartlett(below, odd, z, u, k, dim, dof)


def sample_gram(design, key, batch: int, n, n_slots: int, dtype=jnp.float32) -> GramPrompts:
    """Prompts of n context pairs drawn as their Gram matrix S = (1/n_slots) sum_i z_i z_i^T, exact
    in distribution, with O(d^2) normals per prompt whatever n is (n may be traced).

    Given the latent, z_i = mu + L g_i with g_i i.i.d. N(0, I), so sum_i z_i z_i^T = n m m^T + L A L^T
    with the sample mean m = mu + L gbar, gbar ~ N(0, I / n), independent of the scatter
    A = sum_i (g_i - gbar)(g_i - gbar)^T ~ Wishart(I, n - 1), drawn by ``bartlett_factor``. S stays
    factored (``GramPrompts``): L, the Bartlett factor / sqrt(n_slots), m and c = n / n_slots.
    """
    if not getattr(design, "has_context_law", False):
        raise ValueError(f"design {type(design).__name__} has no context law: its context pairs are not "
                         "i.i.d. given the latent (per-position noise or drift); draw tokens instead")
    v.positive_int("batch", batch)
    n_slots = v.positive_int("n_slots", n_slots)
    if not v._is_traced(n):
        v.integer("n", n, 1, n_slots)
    D = design.dim + 1
    normal_shapes, uniform_shapes = _bartlett_shapes(batch, D)
    law_normals, law_uniforms = design.law_draws(batch)
    normals_, uniforms, (kg,) = draw_many(key, dtype, [(batch, D), *normal_shapes, *law_normals],
                                          [*uniform_shapes, *law_uniforms], keys=1)
    (gbar, below, odd, z), (u,) = normals_[:4], uniforms[:1]
    law = design.law_from(normals_[4:], uniforms[1:])
    n_arr = jnp.asarray(n, dtype)
    m = law.mean + jnp.einsum("bij,bj->bi", law.factor, gbar) / jnp.sqrt(n_arr)
    T = _bartlett(below, odd, z, u, kg, D, n - 1)
    return GramPrompts(law.factor, T / np.sqrt(n_slots).astype(dtype), m,
                       jnp.broadcast_to(n_arr / n_slots, (batch,)), law.x, law.y_query)


def draw(design, key, batch: int, n, n_slots: int, dtype=jnp.float32, gram: bool = False):
    """A batch of prompts with n active context pairs in n_slots slots: GramPrompts when ``gram``,
    else tokens drawn at n_slots and truncated to the last n (``truncate_context``)."""
    if gram:
        return sample_gram(design, key, batch, n, n_slots, dtype)
    return truncate_context(design.sample(key, batch, n_slots, dtype), n)
