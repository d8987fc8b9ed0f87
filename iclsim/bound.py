"""Paper B's generalisation bound over the implicit gradient-descent trajectory (its Theorem 2 and Lemma 6),
evaluated for the L-layer GD-form linear transformer (docs/theory.md §6.2).

Layer t of the GD form is the preconditioned step w_t = w_{t-1} + Gamma_t X^T r_{t-1} / n, r_{t-1} = y - X w_{t-1}
(§8). Paper B's implicit update of layer t, Delta W_t = (1/n) sum_i (Wv h_i)(Wk h_i)^T Wq, writes only the
query's label slot, so in this model its trajectory G_t = Delta W_t (I + W_{t-1}) is the GD increment itself:
G_t = Gamma_t v_t with v_t = X^T r_{t-1} / n, a mean over the n demonstrations of g_i = Gamma_t x_i r_i. Paper B
models the implicit gradient's noise as Gaussian with the covariance of that mean, C_t = Cov(g_i) / n, and
bounds the generalisation gap by

    gap <= sqrt( (R^2 / n) sum_t E[ p_t log((A_t + tr C_t) / p_t) - log pdet C_t ] ),

where p_t = rank(Gamma_t) is the dimension the layer's update lives in (a deleted layer has p_t = 0 and adds
nothing, paper B's Appendix B.6), and A_t is

- Theorem 2 as stated: ||Delta W_t||_F^2 ||I + W_{t-1}||_F^2 = ||G_t||^2 (d + 1 + ||w_{t-1}||^2);
- Lemma 6 with g~ = 0 (before Theorem 2's relaxation, exact here): ||G_t||^2;
- Example 1's factor-norm form, ||Delta W_t||_F^2 replaced by (sum_i ||Wv h_i|| ||Wk h_i|| ||Wq||_F / n)^2
  (the triangle inequality; paper B writes the sum of squares, which is not a bound), times
  ||I + W_{t-1}||_F^2: the only form that depends on the factors rather than on Gamma_t.

The first two depend on Gamma_t only (invariant to Wq -> Wq A, Wk -> Wk A^{-T}, w_v -> c w_v, Wq -> Wq / c);
every form is invariant to a rescaling of Gamma_t itself (G_t and C_t scale together). R, the loss's
sub-Gaussian constant, is set to 1: it scales every bound alike. Float64; Monte Carlo over contexts drawn
from the data setting by the referee (``montecarlo``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as _check
from iclsim import montecarlo
from iclsim._precision import float64

__all__ = ["TrajectoryBound", "trajectory_bound", "layer_term"]

# a singular value of Gamma_t below RANK_RTOL times the largest counts as zero: trained factors are float32
# (relative rounding ~1e-7 per entry), so a truncated product keeps its rank well above this and its
# discarded directions well below.
RANK_RTOL = 1e-5


class TrajectoryBound(NamedTuple):
    """Paper B's bound for each network (leading axes: the networks; last axis of the per-layer parts: the
    layers). ``bound`` = sqrt(sum_t terms / n) with R = 1; likewise ``lemma_bound`` and ``factor_bound``."""

    terms: np.ndarray         # [..., L] Theorem 2's per-layer term, E[p log((||G||^2 ||I + W||_F^2 + tr C) / p) - log pdet C]
    bound: np.ndarray         # [...]
    lemma_terms: np.ndarray   # [..., L] Lemma 6 (g~ = 0): ||G_t||^2 instead of Theorem 2's relaxation
    lemma_bound: np.ndarray   # [...]
    factor_terms: np.ndarray  # [..., L] Example 1's factor norms in place of ||Delta W_t||_F^2
    factor_bound: np.ndarray  # [...]
    support: np.ndarray       # [..., L] p_t = rank(Gamma_t), the dimension of the layer's update (0: deleted)
    gradient_sq: np.ndarray   # [..., L] E ||G_t||^2, the squared implicit gradient
    noise_trace: np.ndarray   # [..., L] E tr C_t, the implicit-gradient noise


def layer_term(A, noise_trace, log_pdet, support):
    """One layer's term of paper B's bound (docs/theory.md §6.2): p log((A + tr C) / p) - log pdet C, and 0
    where the layer's update is zero (p = 0). ``A`` is the squared implicit-gradient norm in the form chosen."""
    p = jnp.asarray(support, jnp.float64)
    safe = jnp.maximum(p, 1.0)
    value = p * jnp.log((A + noise_trace) / safe) - log_pdet
    return jnp.where(p > 0, value, 0.0)


def _one_network(params, X, y, n_active):
    """Per context and layer (terms, lemma terms, factor terms, ||G||^2, tr C), each [B, L], and the support
    [L] of one network on contexts X [B, n, d], y [B, n]."""
    layers = params["layers"]
    Wq = jnp.stack([jnp.asarray(a["attn"]["Wq"], jnp.float64) for a in layers])
    Wk = jnp.stack([jnp.asarray(a["attn"]["Wk"], jnp.float64) for a in layers])
    wv = jnp.stack([jnp.asarray(a["attn"]["w_v"], jnp.float64) for a in layers])
    gamma = -wv[:, None, None] * Wq @ jnp.swapaxes(Wk, 1, 2)
    d = X.shape[-1]
    n = n_active
    U, s, _ = jnp.linalg.svd(gamma)                                        # [L, d, d], [L, d]
    mask = (s > RANK_RTOL * s[:, :1]) & (s[:, :1] > 0)                     # [L, d]
    support = jnp.sum(mask, axis=1)
    B = jnp.swapaxes(U, 1, 2) @ gamma                                      # U^T Gamma: the update in its own basis
    wq_fro = jnp.linalg.norm(Wq, axis=(1, 2))
    w = jnp.zeros(X.shape[:1] + (d,), jnp.float64)
    terms, lemma, factor, g2s, trs = [], [], [], [], []
    for t in range(len(layers)):
        r = y - jnp.einsum("bnd,bd->bn", X, w)                             # residuals after t layers
        m = mask[t].astype(jnp.float64)
        g = jnp.einsum("ed,bnd,bn->bne", B[t], X, r) * m[None, None]                  # per-demonstration implicit gradients
        G = jnp.mean(g, axis=1)                                            # [B, d]
        C = (jnp.einsum("bne,bnf->bef", g, g) / n - G[:, :, None] * G[:, None, :]) / n
        Cm = C * (m[:, None] * m[None, :])[None] + jnp.diag(1.0 - m)[None]  # identity off the support
        log_pdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(jnp.linalg.cholesky(Cm), axis1=-2, axis2=-1)), axis=-1)
        tr = jnp.trace(C, axis1=-2, axis2=-1)
        g2 = jnp.sum(G * G, axis=-1)
        carry = d + 1.0 + jnp.sum(w * w, axis=-1)                          # ||I + W_{t-1}||_F^2
        # Example 1: ||Delta W_t||_F <= (1/n) sum_i ||Wv h_i|| ||Wk h_i|| ||Wq||_F, Wv h_i = w_v r_i e_{d+1}
        keys = jnp.linalg.norm(jnp.einsum("dk,bnd->bnk", Wk[t], X), axis=-1)
        fac = (jnp.abs(wv[t]) * jnp.mean(jnp.abs(r) * keys, axis=1) * wq_fro[t]) ** 2
        terms.append(layer_term(g2 * carry, tr, log_pdet, support[t]))
        lemma.append(layer_term(g2, tr, log_pdet, support[t]))
        factor.append(layer_term(fac * carry, tr, log_pdet, support[t]))
        g2s.append(g2)
        trs.append(tr)
        w = w + jnp.einsum("ed,bd->be", gamma[t], jnp.einsum("bnd,bn->bd", X, r) / n)
    per_context = tuple(jnp.stack(parts, axis=-1) for parts in (terms, lemma, factor, g2s, trs))
    return per_context, support


def trajectory_bound(model, params, design, n: int, key, num_contexts: int = 2000) -> TrajectoryBound:
    """Paper B's Theorem 2 (and its Lemma 6 and Example 1 forms) for GD-form ``models.LinearTransformer``
    networks on contexts of ``n`` demonstrations drawn from ``design`` (docs/theory.md §6.2), in float64.

    ``params``: one network, or a leading network axis (e.g. seeds, or seeds x pruned candidates flattened).
    ``key``: one PRNG key (every network on the same contexts: their differences are paired) or one key per
    network ([networks, 2]). The expectation over contexts is a Monte Carlo mean over ``num_contexts`` contexts
    of the referee's draw blocks (the same contexts whatever the number of networks)."""
    if getattr(model, "form", None) != "gd" or not hasattr(model, "preconditioners"):
        raise ValueError("trajectory_bound needs a GD-form models.LinearTransformer (form='gd')")
    _check.positive_int("n", n)
    _check.positive_int("num_contexts", num_contexts)
    if n < 2:
        raise ValueError(f"n must be an integer >= 2 (the noise covariance needs two demonstrations), got {n}")
    if getattr(design, "dim", model.dim) != model.dim:
        raise ValueError(f"design dimension {design.dim} does not match the model's dim {model.dim}")
    leaf = jnp.asarray(params["layers"][0]["attn"]["Wq"])
    if leaf.ndim not in (2, 3):
        raise ValueError(f"params must be one network or have one leading network axis; Wq has shape {leaf.shape}")
    single = leaf.ndim == 2
    batched = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], params) if single else params
    count = jnp.asarray(batched["layers"][0]["attn"]["Wq"]).shape[0]
    keys = np.asarray(jax.random.key_data(key) if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key)
                      else key)
    if keys.shape == (2,):
        keys = np.broadcast_to(keys, (count, 2))
    elif keys.shape != (count, 2):
        raise ValueError(f"key must be one PRNG key or one per network ([{count}, 2]), got shape {keys.shape}")
    out = _evaluate(batched, design, n, jnp.asarray(keys, jnp.uint32), num_contexts)
    if single:
        out = [o[0] for o in out]
    terms, lemma, factor, support, g2, tr = out
    return TrajectoryBound(terms, _total(terms, n), lemma, _total(lemma, n), factor, _total(factor, n), support,
                           g2, tr)


def _total(terms, n):
    """sqrt(sum_t term_t / n): Theorem 2 with R = 1 (float64)."""
    return np.sqrt(np.sum(np.asarray(terms, np.float64), axis=-1) / n)


def _grouped(params, keys, design, num_contexts, n):
    """The per-layer parts of every network: chunks of networks one after another (lax.map: memory), the networks
    of a chunk vmapped, each averaged over its own num_contexts contexts of n demonstrations, the referee's draws
    of its key (``montecarlo.prompt_totals``: fixed draw blocks, summed block by block)."""

    def one(p, k):
        def totals(prompts, valid):
            per_context, _ = _one_network(p, prompts.X, prompts.y, n)
            return tuple(jnp.sum(jnp.where(valid[:, None], v, 0.0), axis=0) for v in per_context)

        group = montecarlo.group_size(num_contexts, num_contexts)  # every block in one round: memory as one draw
        sums = montecarlo.prompt_totals(totals, design, n, k, num_contexts, group, jnp.float64)
        terms, lemma, factor, g2, tr = (v / num_contexts for v in sums)
        return terms, lemma, factor, _support(p), g2, tr

    return jax.lax.map(lambda a: jax.vmap(one)(*a), (params, keys))


def _support(params):
    """p_t = rank(Gamma_t) [L] of one network (singular values above RANK_RTOL times the largest)."""
    Wq = jnp.stack([jnp.asarray(a["attn"]["Wq"], jnp.float64) for a in params["layers"]])
    Wk = jnp.stack([jnp.asarray(a["attn"]["Wk"], jnp.float64) for a in params["layers"]])
    wv = jnp.stack([jnp.asarray(a["attn"]["w_v"], jnp.float64) for a in params["layers"]])
    s = jnp.linalg.svd(-wv[:, None, None] * Wq @ jnp.swapaxes(Wk, 1, 2), compute_uv=False)
    return jnp.sum((s > RANK_RTOL * s[:, :1]) & (s[:, :1] > 0), axis=1)


# compiled once per process for each shape (chunks, contexts, n, layers; the design's structure): the
# experiments call it per setting, the tests many times. One program for all chunks: a Python loop calling a
# compiled chunk program again hung on XLA CPU (jaxlib of this project) once a second chunk ran.
_program = jax.jit(_grouped, static_argnums=(3, 4))
_static_program = jax.jit(_grouped, static_argnums=(2, 3, 4))


@float64
def _evaluate(params, design, n, keys, num_contexts, chunk: int = 64):
    """Per network: the per-layer parts, in chunks of ``chunk`` networks; the last chunk is padded."""
    leaves = jax.tree_util.tree_leaves(design)
    program = _static_program if len(leaves) == 1 and leaves[0] is design else _program  # a test double: static
    count = keys.shape[0]
    size = min(chunk, count)
    pad = -count % size
    grouped = jax.tree_util.tree_map(
        lambda a: jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]).reshape((-1, size) + a.shape[1:]),
        (params, keys))
    out = program(*grouped, design, num_contexts, n)
    return [np.asarray(o).reshape((-1,) + o.shape[2:])[:count] for o in out]
