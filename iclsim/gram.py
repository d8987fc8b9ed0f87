"""Drawing a prompt's context Gram matrix directly, exact in distribution (docs/theory.md §1: the
tokens are i.i.d. given the prompt's latent), with O(d^2) normals per prompt whatever n is.

Given the latent, z_i = mu + L g_i, so sum_i z_i z_i^T = n m m^T + L A L^T with the sample mean
m ~ N(mu, L L^T / n) independent of the scatter A ~ Wishart(I, n - 1), drawn by its Bartlett
factor; the chi-square diagonal by Marsaglia-Tsang gamma draws. ``draw`` is the one entry the
engine uses: Gram prompts, or tokens drawn at n_slots and truncated to the last n.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as check
from iclsim.designs import GramPrompts, truncate_context
from iclsim.rng import BatchShard, draw_many

__all__ = ["SAMPLERS", "uses_gram", "draw", "sample_gram", "bartlett_factor", "standard_gamma"]

SAMPLERS = ("auto", "gram", "tokens")


def uses_gram(model, designs, n_slots: int, sampler: str = "auto") -> bool:
    """Whether to draw Gram matrices rather than tokens. Exact where the model reads the context
    only through S and every design has a context law (tokens i.i.d. given the latent); "auto"
    then takes the draw with fewer random numbers: tokens cost n_slots (d + 1) per prompt, the Gram
    matrix about d (d + 1) / 2 + (1 + 2 PROPOSALS)(d + 1) (the Bartlett normals, the mean, and a normal
    and a uniform per gamma proposal), so Gram from n_slots > d / 2 + 1 + 2 PROPOSALS (d / 2 + 9; a
    single fit's measured crossover, docs/performance.md §2.9). "tokens" forces tokens;
    "gram" forces Gram draws and raises where they would not be exact."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    design_list = list(designs) if isinstance(designs, (list, tuple, np.ndarray)) else [designs]
    able = getattr(model, "reads_gram", False) and all(getattr(d, "has_context_law", False) for d in design_list)
    if sampler == "gram" and not able:
        raise ValueError(f"sampler='gram' needs a model that reads only the context Gram matrix (LinearAttention, "
                         f"PGD, LoRA of them) and designs with i.i.d. pairs given the latent (IID with scalar "
                         f"noise, RAG, TaskFeatureAlignment, TaskPool); got {' '.join(repr(model).split())}")
    if sampler == "auto":
        return able and n_slots > design_list[0].dim / 2 + 1 + 2 * PROPOSALS
    return sampler == "gram"


# Marsaglia-Tsang proposals per entry and round: with one, a vmapped sweep's rejection loop ran about 2.5
# rounds per step for all members (it runs until every entry of every member is accepted); with four, a
# second round is rare (docs/performance.md §2.9)
PROPOSALS = 4


def _with_gamma(draw, alpha, needed=None):
    """(pieces, Gamma(alpha, 1) draws) for alpha >= 1 (Marsaglia & Tsang 2000, ACM TOMS 26(3)).

    ``draw(r) -> (pieces, z, u)`` is round r of a step's random numbers (``draw_many(..., repeat=r)``):
    any pieces, and the normals z and uniforms u [alpha.shape + (PROPOSALS,)] of the gamma proposals. Each
    entry takes the first accepted of its round-0 proposals; while an entry has none accepted (a proposal
    is rejected about 5% of the time at alpha = 1, 0.5% at 6, 0.1% at 37), the next round is drawn and
    such entries take the first accepted of their proposals in it. An entry's value is thus the first
    success of i.i.d. proposals: exact. Everything else comes from round 0, and since the rounds are one
    loop around the whole draw, the step's threefry and inverse-erf kernels are compiled once, not again for
    the redraws (no separate redraw kernels, no fresh key). Entries where ``needed`` (boolean, alpha's
    shape) is False are not waited for (their values are discarded by the caller; they stay 0)."""
    shape = jnp.shape(alpha)
    shifted = jnp.reshape(alpha, (-1, 1)) - 1.0 / 3.0
    c = 1.0 / jnp.sqrt(9.0 * shifted)

    def first_accepted(z, u):
        z, u = z.reshape(-1, PROPOSALS), u.reshape(-1, PROPOSALS)
        v = (1.0 + c * z) ** 3
        v_safe = jnp.where(v > 0, v, 1.0)
        oks = (v > 0) & (jnp.log(u) < 0.5 * z**2 + shifted - shifted * v_safe + shifted * jnp.log(v_safe))
        values = shifted * v_safe
        value, ok = values[:, -1], oks[:, -1]
        for k in range(PROPOSALS - 2, -1, -1):  # a select chain (no gather): the first accepted proposal wins
            value, ok = jnp.where(oks[:, k], values[:, k], value), ok | oks[:, k]
        return value, ok

    def body(state):
        r, pieces, value, ok = state
        new_pieces, z, u = draw(r)
        new_value, accepted = first_accepted(z, u)
        pieces = jax.tree_util.tree_map(lambda old, new: jnp.where(r == 0, new, old), pieces, new_pieces)
        return r + 1, pieces, jnp.where(ok, value, new_value), ok | accepted

    pieces, z, _ = jax.eval_shape(draw, 0)
    pieces = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), pieces)
    ok = jnp.zeros(shifted.shape[0], bool) if needed is None else ~jnp.reshape(needed, (-1,))
    state = (jnp.zeros((), jnp.uint32), pieces, jnp.zeros(shifted.shape[0], z.dtype), ok)
    # at least round 0 (its pieces); then while a needed entry has no accepted proposal
    _, pieces, value, _ = jax.lax.while_loop(lambda s: (s[0] == 0) | ~jnp.all(s[3]), body, state)
    return pieces, value.reshape(shape)


def standard_gamma(key, alpha) -> jax.Array:
    """Exact Gamma(alpha, 1) draws for alpha >= 1 (``_with_gamma``) from one flat draw per round, where
    jax.random.gamma splits a key per entry and per retry."""
    alpha = jnp.asarray(alpha)
    shapes = [(*alpha.shape, PROPOSALS)]

    def draw(r):
        (z,), (u,), _ = draw_many(key, alpha.dtype, shapes, shapes, repeat=r)
        return (), z, u

    return _with_gamma(draw, alpha)[1]


def _bartlett(draw, dim: int, dof, batch: int, dtype):
    """(pieces, T): the Bartlett factor T [batch, dim, dim] from ``draw(r) -> ((below, odd, *rest), z, u)``,
    round r of the step's draws (``_with_gamma``): below [batch, dim (dim - 1) / 2] normals, odd [batch] a
    normal for chi^2(1), (z, u) [batch, dim, PROPOSALS] the gamma proposals; ``pieces`` is round 0's
    (below, odd, *rest)."""
    _, cols = np.tril_indices(dim, -1)
    j = jnp.arange(dim)
    chi_dof = jnp.asarray(dof, dtype) - j.astype(dtype)  # degrees of freedom of T_jj^2
    alpha = jnp.broadcast_to(jnp.maximum(chi_dof, 2.0) / 2.0, (batch, dim))
    # columns with fewer than 2 degrees of freedom are not gamma draws (chi^2(1) from odd, or dead): not waited for
    drawn = jnp.broadcast_to(chi_dof[None, :] >= 2, (batch, dim))
    pieces, gamma = _with_gamma(draw, alpha, drawn)
    below, odd = pieces[:2]
    chi2 = jnp.where(drawn, 2.0 * gamma, jnp.where(chi_dof[None, :] == 1, odd[:, None] ** 2, 0.0))
    vals = jnp.concatenate([below * (cols < jnp.asarray(dof)).astype(dtype)[None, :], jnp.sqrt(chi2),
                            jnp.zeros((batch, 1), dtype)], axis=1)
    # a fresh array: JAX caches a constant by its object, whatever x64 setting it was made under
    return pieces, vals[:, _bartlett_places(dim).copy()].reshape(batch, dim, dim)


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

    def draw(r):
        (below, odd, z), (u,), _ = draw_many(key, dtype, normal_shapes, uniform_shapes, repeat=r)
        return (below, odd), z, u

    return _bartlett(draw, dim, dof, batch, dtype)[1]


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
    if not getattr(design, "has_context_law", False):
        raise ValueError(f"design {type(design).__name__} has no context law: its context pairs are not "
                         "i.i.d. given the latent (per-position noise or drift); draw tokens instead")
    check.positive_int("batch", batch)
    n_slots = check.positive_int("n_slots", n_slots)
    if not check._is_traced(n):
        check.integer("n", n, 1, n_slots)
    D = design.dim + 1
    normal_shapes, uniform_shapes = _bartlett_shapes(batch, D)
    law_normals, law_uniforms = design.law_draws(batch)

    def draw(r):  # round r of the step's draws (only the gamma proposals of rounds after 0 are used)
        normals_, uniforms, _ = draw_many(key, dtype, [(batch, D), *normal_shapes, *law_normals],
                                          [*uniform_shapes, *law_uniforms], shard=shard, repeat=r)
        (gbar, below, odd, z), (u,) = normals_[:4], uniforms[:1]
        return (below, odd, gbar, normals_[4:], uniforms[1:]), z, u

    (_, _, gbar, law_normals_, law_uniforms_), T = _bartlett(draw, D, n - 1, batch, dtype)
    law = design.law_from(law_normals_, law_uniforms_)
    n_arr = jnp.asarray(n, dtype)
    m = law.mean + jnp.einsum("bij,bj->bi", law.factor, gbar) / jnp.sqrt(n_arr)
    return GramPrompts(law.factor, T / np.sqrt(n_slots).astype(dtype), m,
                       jnp.broadcast_to(n_arr / n_slots, (batch,)), law.x, law.y_query)


def draw(design, key, batch: int, n, n_slots: int, dtype=jnp.float32, gram: bool = False,
         shard: BatchShard | None = None):
    """A batch of prompts with n active context pairs in n_slots slots: GramPrompts when ``gram``,
    else tokens drawn at n_slots and truncated to the last n (``truncate_context``). With ``shard``
    the batch is this device's rows of the batch of ``batch * shard.count`` (a design whose
    ``sample`` takes no ``shard`` draws the whole batch and keeps its rows)."""
    if gram:
        return sample_gram(design, key, batch, n, n_slots, dtype, shard)
    if shard is None or shard.count == 1:
        prompts = design.sample(key, batch, n_slots, dtype)
    elif "shard" in inspect.signature(design.sample).parameters:
        prompts = design.sample(key, batch, n_slots, dtype, shard=shard)
    else:
        full = design.sample(key, batch * shard.count, n_slots, dtype)
        start = jax.lax.axis_index(shard.axis_name) * batch
        prompts = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, batch), full)
    return truncate_context(prompts, n)
