"""Drawing a prompt's context Gram matrix directly, exact in distribution (docs/theory.md §1: the
tokens are i.i.d. given the prompt's latent), with O(d^2) normals per prompt whatever n is.

Given the latent, z_i = mu + L g_i, so sum_i z_i z_i^T = n m m^T + L A L^T with the sample mean
m ~ N(mu, L L^T / n) independent of the scatter A ~ Wishart(I, n - 1), drawn by its Bartlett
factor; the chi-square diagonal by Marsaglia-Tsang gamma draws. ``draw`` is the one entry the
engine uses: Gram prompts, or tokens drawn at n_slots and truncated to the last n.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as check
from iclsim import protocols
from iclsim.designs import GramPrompts, truncate_context
from iclsim.rng import BatchShard, draw_many

__all__ = ["SAMPLERS", "uses_gram", "draw", "sample_gram", "bartlett_factor", "standard_gamma"]

SAMPLERS = ("auto", "gram", "tokens")


def uses_gram(model, designs, n_slots: int, sampler: str = "auto") -> bool:
    """Whether to draw Gram matrices rather than tokens. Exact where the model reads the context
    only through S and every design has a context law (tokens i.i.d. given the latent); "auto"
    then takes the draw with fewer random numbers: tokens cost n_slots (d + 1) per prompt, the Gram
    matrix about d (d + 1) / 2 + (1 + 2 PROPOSALS)(d + 1) (the Bartlett normals, the mean, and a normal
    and a uniform per gamma proposal), so Gram from n_slots > d / 2 + 1 + 2 PROPOSALS (d / 2 + 9; the
    crossover docs/performance.md §2.9 finds for a single fit). "tokens" forces tokens;
    "gram" forces Gram draws and raises where they would not be exact."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    design_list = list(designs) if isinstance(designs, (list, tuple, np.ndarray)) else [designs]
    able = protocols.reads_gram(model) and all(protocols.has_context_law(d) for d in design_list)
    if sampler == "gram" and not able:
        raise ValueError(f"sampler='gram' needs a model that reads only the context Gram matrix (LinearAttention, "
                         f"PGD, LoRA of them) and designs with i.i.d. pairs given the latent (IID with scalar "
                         f"noise, RAG, TaskFeatureAlignment, TaskPool); got {' '.join(repr(model).split())}")
    if sampler == "auto":
        return able and n_slots > design_list[0].dim / 2 + 1 + 2 * PROPOSALS
    return sampler == "gram"


# first-pass Marsaglia-Tsang proposals per entry: a vmapped sweep's rejection loop runs for all members until
# every entry of every member is accepted, so one proposal makes it run most steps and four make it rare
# (the measurement: docs/performance.md §2.9)
PROPOSALS = 4


def _gamma(z, u, key, alpha, shard: BatchShard | None = None, needed=None):
    """Gamma(alpha, 1) draws for alpha >= 1 (Marsaglia & Tsang 2000, ACM TOMS 26(3)). Each entry takes
    the first accepted of its ``PROPOSALS`` first proposals (normals z, uniforms u, shape
    alpha.shape + (PROPOSALS,)): the first success of i.i.d. proposals, so the draw stays exact. While
    any entry has none accepted (a proposal is rejected about 5% of the time at alpha = 1, 0.5% at 6,
    0.1% at 37), every entry gets a fresh proposal from ``key`` and the unaccepted ones take it.
    Redrawing all entries, not only the rejected, keeps the loop free of gathers and scatters (the
    trade-off is measured in docs/performance.md). Entries where ``needed`` (boolean, alpha's
    shape) is False are not waited for: their values are discarded by the caller."""
    shape, dtype = jnp.shape(alpha), z.dtype
    shifted = jnp.reshape(alpha, (-1,)) - 1.0 / 3.0
    c = 1.0 / jnp.sqrt(9.0 * shifted)

    def propose(z, u, shifted=shifted, c=c):
        v = (1.0 + c * z) ** 3
        v_safe = jnp.where(v > 0, v, 1.0)
        ok = (v > 0) & (jnp.log(u) < 0.5 * z**2 + shifted - shifted * v_safe + shifted * jnp.log(v_safe))
        return shifted * v_safe, ok

    def redraw(state):
        key, value, ok = state
        (z,), (u,), (key,) = draw_many(key, dtype, [shifted.shape], [shifted.shape], keys=1, shard=shard)
        new, accepted = propose(z, u)
        return key, jnp.where(ok, value, new), ok | accepted

    values, oks = propose(z.reshape(-1, PROPOSALS), u.reshape(-1, PROPOSALS), shifted[:, None], c[:, None])
    value, ok = values[:, -1], oks[:, -1]
    for k in range(PROPOSALS - 2, -1, -1):  # a select chain (no gather): the first accepted proposal wins
        value, ok = jnp.where(oks[:, k], values[:, k], value), ok | oks[:, k]
    if needed is not None:
        ok = ok | ~jnp.reshape(needed, (-1,))
    _, value, _ = jax.lax.while_loop(lambda s: ~jnp.all(s[2]), redraw, (key, value, ok))
    return value.reshape(shape)


def standard_gamma(key, alpha) -> jax.Array:
    """Exact Gamma(alpha, 1) draws for alpha >= 1 (``_gamma``) from one flat draw per round, where
    jax.random.gamma splits a key per entry and per retry."""
    alpha = jnp.asarray(alpha)
    first = (*alpha.shape, PROPOSALS)
    (z,), (u,), (k,) = draw_many(key, alpha.dtype, [first], [first], keys=1)
    return _gamma(z, u, k, alpha)


def _bartlett(below, odd, z, u, key, dim: int, dof, shard: BatchShard | None = None) -> jax.Array:
    """The Bartlett factor from its draws: below [B, dim (dim - 1) / 2] normals, odd [B] a normal for
    chi^2(1), (z, u) [B, dim, PROPOSALS] the first gamma proposals, key for the redraws."""
    batch, dtype = below.shape[0], below.dtype
    _, cols = np.tril_indices(dim, -1)
    j = jnp.arange(dim)
    chi_dof = jnp.asarray(dof, dtype) - j.astype(dtype)  # degrees of freedom of T_jj^2
    alpha = jnp.broadcast_to(jnp.maximum(chi_dof, 2.0) / 2.0, (batch, dim))
    # columns with fewer than 2 degrees of freedom are not gamma draws (chi^2(1) from odd, or dead): not waited for
    drawn = jnp.broadcast_to(chi_dof[None, :] >= 2, (batch, dim))
    chi2 = 2.0 * _gamma(z, u, key, alpha, shard, needed=drawn)
    chi2 = jnp.where(drawn, chi2, jnp.where(chi_dof[None, :] == 1, odd[:, None] ** 2, 0.0))
    vals = jnp.concatenate([below * (cols < jnp.asarray(dof)).astype(dtype)[None, :], jnp.sqrt(chi2),
                            jnp.zeros((batch, 1), dtype)], axis=1)
    # a fresh array: JAX caches a constant by its object, whatever x64 setting it was made under
    return vals[:, _bartlett_places(dim).copy()].reshape(batch, dim, dim)


@functools.lru_cache(maxsize=None)
def _bartlett_places(dim: int) -> np.ndarray:
    """For each entry of a dim x dim lower-triangular T in row-major order, its place in
    [below (tril_indices order), diagonal, 0]: T is one gather, not a scatter into zeros."""
    rows, cols = np.tril_indices(dim, -1)
    places = np.full((dim, dim), len(rows) + dim)
    places[rows, cols] = np.arange(len(rows))
    places[np.arange(dim), np.arange(dim)] = len(rows) + np.arange(dim)
    return places.ravel()


def _bartlett_shapes(batch: int, dim: int):
    return [(batch, dim * (dim - 1) // 2), (batch,), (batch, dim, PROPOSALS)], [(batch, dim, PROPOSALS)]


def bartlett_factor(key, batch: int, dim: int, dof, dtype=jnp.float32) -> jax.Array:
    """Lower-triangular T [batch, dim, dim] with T T^T ~ Wishart_dim(I, dof), for an integer dof >= 0
    that may be traced (Bartlett decomposition, extended to dof < dim where the Wishart is singular):
    column j is alive only for j < dof, T_jj^2 ~ chi^2(dof - j), T_ij ~ N(0, 1) for i > j."""
    check.positive_int("batch", batch)
    check.positive_int("dim", dim)
    if not check._is_traced(dof):
        check.integer("dof", dof, 0)
    normal_shapes, uniform_shapes = _bartlett_shapes(batch, dim)
    (below, odd, z), (u,), (k,) = draw_many(key, dtype, normal_shapes, uniform_shapes, keys=1)
    return _bartlett(below, odd, z, u, k, dim, dof)


def sample_gram(design, key, batch: int, n, n_slots: int, dtype=jnp.float32,
                shard: BatchShard | None = None) -> GramPrompts:
    """Prompts of n context pairs drawn as their Gram matrix S = (1/n_slots) sum_i z_i z_i^T, exact
    in distribution, with O(d^2) normals per prompt whatever n is (n may be traced).

    Given the latent, z_i = mu + L g_i with g_i i.i.d. N(0, I), so sum_i z_i z_i^T = n m m^T + L A L^T
    with the sample mean m = mu + L gbar, gbar ~ N(0, I / n), independent of the scatter
    A = sum_i (g_i - gbar)(g_i - gbar)^T ~ Wishart(I, n - 1), drawn by ``bartlett_factor``. S stays
    factored (``GramPrompts``): L, the Bartlett factor / sqrt(n_slots), m and c = n / n_slots.
    With ``shard`` the batch is this device's rows of the batch of ``batch * shard.count``.
    """
    if not protocols.has_context_law(design):
        raise ValueError(f"design {type(design).__name__} has no context law: its context pairs are not "
                         "i.i.d. given the latent (per-position noise or drift); draw tokens instead")
    check.positive_int("batch", batch)
    n_slots = check.positive_int("n_slots", n_slots)
    if not check._is_traced(n):
        check.integer("n", n, 1, n_slots)
    D = design.dim + 1
    normal_shapes, uniform_shapes = _bartlett_shapes(batch, D)
    law_normals, law_uniforms = design.law_draws(batch)
    normals_, uniforms, (kg,) = draw_many(key, dtype, [(batch, D), *normal_shapes, *law_normals],
                                          [*uniform_shapes, *law_uniforms], keys=1, shard=shard)
    (gbar, below, odd, z), (u,) = normals_[:4], uniforms[:1]
    law = design.law_from(normals_[4:], uniforms[1:])
    n_arr = jnp.asarray(n, dtype)
    m = law.mean + jnp.einsum("bij,bj->bi", law.factor, gbar) / jnp.sqrt(n_arr)
    T = _bartlett(below, odd, z, u, kg, D, n - 1, shard)
    return GramPrompts(law.factor, T / np.sqrt(n_slots).astype(dtype), m,
                       jnp.broadcast_to(n_arr / n_slots, (batch,)), law.x, law.y_query)


def draw(design, key, batch: int, n, n_slots: int, dtype=jnp.float32, gram: bool = False,
         shard: BatchShard | None = None):
    """A batch of prompts with n active context pairs in n_slots slots: GramPrompts when ``gram``,
    else tokens drawn at n_slots and truncated to the last n (``truncate_context``). With ``shard``
    the batch is this device's rows of the batch of ``batch * shard.count`` (a design without
    ``sample_shard``, ``protocols.draws_shards``, draws the whole batch and keeps its rows)."""
    if gram:
        return sample_gram(design, key, batch, n, n_slots, dtype, shard)
    if shard is None or shard.count == 1:
        prompts = design.sample(key, batch, n_slots, dtype)
    elif protocols.draws_shards(design):
        prompts = design.sample_shard(key, batch, n_slots, dtype, shard)
    else:
        full = design.sample(key, batch * shard.count, n_slots, dtype)
        start = jax.lax.axis_index(shard.axis_name) * batch
        prompts = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, batch), full)
    return truncate_context(prompts, n)
