"""SVD weight pruning (paper B; docs/theory.md §6): truncation to a kept rank (or paper B's clipping rate),
module-wise pruning, the evaluation of many pruned networks on paired prompts, and the derivative-free
search that picks (layer, module, rank) on validation prompts and reports the change on test prompts."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as _check
from iclsim import evaluate

__all__ = ["DEFAULT_RATES", "MODULES", "Candidate", "SearchResult", "kept_singular_values", "ranks_for_rates",
           "svd_truncate", "prune", "module_shape", "evaluate_candidates", "search"]

DEFAULT_RATES = (0.0, 0.1, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995)
MODULES = {"attn": ("Wq", "Wk", "Wv", "Wo"), "mlp": ("W_in", "W_out")}


class Candidate(NamedTuple):
    """One pruned network: the matrices of (layer, module) truncated to ``rank`` (None: not pruned)."""

    layer: int
    module: str
    rank: int | None


def kept_singular_values(shape, clipping_rate: float) -> int:
    """Paper B's operator: k = floor(min(m, n) (1 - xi)), at least 1 (small matrices would reach k = 0)."""
    if not (0.0 <= float(clipping_rate) < 1.0):
        raise ValueError(f"clipping_rate must be in [0, 1), got {clipping_rate!r}")
    return max(1, int(np.floor(min(shape) * (1.0 - float(clipping_rate)) + 1e-9)))


def ranks_for_rates(shape, rates: Sequence[float], distinct: bool = True) -> list[int]:
    """The kept rank of each clipping rate for a matrix of ``shape``. With ``distinct`` a grid whose rates
    reach the same rank (on a 6-wide matrix 0.75, 0.9, ..., 0.995 all keep rank 1) is refused, naming them."""
    ranks = [kept_singular_values(shape, r) for r in rates]
    if distinct:
        seen: dict[int, float] = {}
        for rate, k in zip(rates, ranks):
            if k in seen:
                raise ValueError(f"rates {seen[k]!r} and {rate!r} both keep rank {k} of a {shape[0]}x{shape[1]} "
                                 "matrix; pass distinct ranks or distinct=False")
            seen[k] = rate
    return ranks


def svd_truncate(W, clipping_rate: float | None = None, *, rank: int | None = None) -> jax.Array:
    """Best rank-k approximation of W (exact SVD, Eckart-Young): k = ``rank``, or
    kept_singular_values(W.shape, clipping_rate); exactly one of the two is given."""
    W = jnp.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"W must be a matrix, got shape {W.shape}")
    if not isinstance(W, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(W))):
        raise ValueError("W must be finite (the SVD of a matrix holding NaN or inf is NaN)")
    if (clipping_rate is None) == (rank is None):
        raise ValueError("give exactly one of clipping_rate and rank")
    k = kept_singular_values(W.shape, clipping_rate) if rank is None else _rank(rank, min(W.shape))
    U, s, Vt = jnp.linalg.svd(W, full_matrices=False)
    return ((U[:, :k] * s[None, :k]) @ Vt[:k]).astype(W.dtype)


def _rank(rank, limit: int) -> int:
    _check.positive_int("rank", rank)
    if rank > limit:
        raise ValueError(f"rank must be an integer in [1, {limit}] (the smaller side of the matrix), got {rank!r}")
    return int(rank)


def _module(params, layer: int, module: str):
    """The dict of matrices pruned together: one layer's attention or MLP (one-layer models: the
    whole parameter dict is layer 0's attention)."""
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise ValueError(f"layer must be an integer, got {layer!r}")
    if "layers" not in params:
        if layer != 0 or module != "attn":
            raise ValueError(f"a one-layer model has only layer 0, module 'attn'; got layer {layer}, module {module!r}")
        return params
    if not 0 <= layer < len(params["layers"]):
        raise ValueError(f"layer must be in [0, {len(params['layers']) - 1}], got {layer}")
    if module not in MODULES or module not in params["layers"][layer]:
        raise ValueError(f"module must be one of {sorted(params['layers'][layer])}, got {module!r}")
    return params["layers"][layer][module]


def module_shape(params, layer: int, module: str) -> tuple[int, int]:
    """The smallest matrix shape of (layer, module): the ranks that truncation can distinguish."""
    shapes = [tuple(w.shape) for w in _module(params, layer, module).values() if jnp.ndim(w) == 2]
    return min(shapes, key=min)


def prune(params, layer: int, module: str, clipping_rate: float | None = None, *, rank: int | None = None):
    """New parameters with every matrix of (layer, module) SVD-truncated (``svd_truncate``; rank is capped
    at each matrix's smaller side); the input is untouched and every other leaf is the same array."""
    target = _module(params, layer, module)
    if rank is not None:
        _rank(rank, max(min(w.shape) for w in target.values() if jnp.ndim(w) == 2))
    pruned = {k: (svd_truncate(w, clipping_rate) if rank is None else svd_truncate(w, rank=min(rank, min(w.shape))))
              if jnp.ndim(w) == 2 else w for k, w in target.items()}
    if "layers" not in params:
        return pruned
    layers = list(params["layers"])
    layers[layer] = {**layers[layer], module: pruned}
    return {**params, "layers": layers}


def _apply(params, c: Candidate):
    return params if c.rank is None else prune(params, c.layer, c.module, rank=c.rank)


def evaluate_candidates(model, params, design, n: int, candidates: Sequence[Candidate], key, num_prompts: int):
    """Risk and SE [seeds, candidates] of every pruned network of every seed (``params`` with a leading seed
    axis), all stacked along one vmapped axis: one compiled evaluation. ``key``: one key, every network on
    the same fresh prompts; or one per seed ([seeds, 2]), each seed's networks on its own prompts. Either
    way the candidates of a seed share their prompts (common random numbers: their differences are paired)."""
    seeds = jax.tree_util.tree_leaves(params)[0].shape[0]
    if not candidates:
        raise ValueError("candidates must not be empty")
    rows = evaluate._key_rows(key, seeds)  # checked before the SVDs
    per_seed = [jax.tree_util.tree_map(lambda a: a[s], params) for s in range(seeds)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a)[None, None],
                                     *[_apply(p, c) for p in per_seed for c in candidates])
    keys = key if rows is None else np.repeat(rows, len(candidates), axis=0)
    risk, se = evaluate.evaluate_sweep(model, stacked, design, [n], keys, num_prompts)
    return risk[0, 0].reshape(seeds, len(candidates)), se[0, 0].reshape(seeds, len(candidates))


class SearchResult(NamedTuple):
    """Per seed: the chosen candidate (index into ``candidates``), validation risk before/after, the test
    risk before/after on other prompts (paired), and the null control's apparent validation gain."""

    candidates: list[Candidate]
    val_risk: np.ndarray      # [seeds, candidates]
    chosen: np.ndarray        # [seeds] index of the validation minimum (ties to the unpruned / larger rank)
    val_before: np.ndarray    # [seeds]
    val_after: np.ndarray     # [seeds]
    test_before: np.ndarray   # [seeds]
    test_after: np.ndarray    # [seeds]
    test_se: np.ndarray       # [seeds] SE of test_after
    null_gain: np.ndarray     # [seeds] val_before - min over candidates of the unpruned network on fresh prompts


def search(model, params, design, n: int, candidates: Sequence[Candidate], val_key, test_key, num_val: int = 20_000,
           num_test: int = 100_000, null_key=None) -> SearchResult:
    """Paper B's derivative-free algorithm as a protocol, for every seed at once (``params`` with a leading
    seed axis): evaluate every candidate on validation prompts, keep the best (ties to the earlier
    candidate: list the unpruned one first), and score the choice on separate test prompts, paired
    with the unpruned network. The null control sizes the winner's curse: the same minimum taken over
    the unpruned network scored on len(candidates) independent validation sets, whose apparent gain
    over the validation set is pure selection noise (``null_key``; None skips it: NaN). Each key is one
    key (every seed on the same prompts) or one per seed ([seeds, 2]: each seed its own validation, test
    and null sets, so that an interval over seeds contains the variation of the sets). Each set is
    num_val (num_test) prompts rounded up to whole evaluation batches, whose size depends on how many
    networks share a device (``evaluate.evaluate_sweep``)."""
    candidates = [Candidate(*c) for c in candidates]
    if candidates[0].rank is not None:
        raise ValueError("candidates[0] must be the unpruned network (rank None), the reference of the search")
    seeds = jax.tree_util.tree_leaves(params)[0].shape[0]
    for name, key in (("val_key", val_key), ("test_key", test_key), ("null_key", null_key)):
        if name != "null_key" or key is not None:  # checked before any evaluation; no null_key: no null control
            evaluate._key_data(key, seeds, name)
    val, _ = evaluate_candidates(model, params, design, n, candidates, val_key, num_val)
    test, test_se = evaluate_candidates(model, params, design, n, candidates, test_key, num_test)
    chosen = np.argmin(val, axis=1)  # first minimum: ties go to the earlier candidate
    rows = np.arange(val.shape[0])
    null = np.full(val.shape[0], np.nan)
    if null_key is not None:
        copies = _null_control(model, params, design, n, len(candidates), null_key, num_val)
        null = val[:, 0] - np.min(copies, axis=1)
    return SearchResult(candidates, val, chosen, val[:, 0], val[rows, chosen], test[:, 0], test[rows, chosen],
                        test_se[rows, chosen], null)


def _null_control(model, params, design, n: int, copies: int, key, num_prompts: int) -> np.ndarray:
    """Risk [seeds, copies] of each seed's unpruned network on ``copies`` independent prompt sets, copy i
    drawn from fold_in(key, i) (``key`` one key or one per seed): one evaluation of seeds x copies networks."""
    seeds = jax.tree_util.tree_leaves(params)[0].shape[0]
    base = np.broadcast_to(evaluate._key_data(key, seeds, "null_key").astype(np.uint32), (seeds, 2))
    fold = jax.vmap(jax.vmap(jax.random.fold_in, (None, 0)), (0, None))
    keys = np.asarray(fold(jnp.asarray(base), jnp.arange(copies))).reshape(seeds * copies, 2)
    repeated = jax.tree_util.tree_map(lambda a: jnp.repeat(jnp.asarray(a), copies, axis=0)[None, None], params)
    risk, _ = evaluate.evaluate_sweep(model, repeated, design, [n], keys, num_prompts)
    return risk[0, 0].reshape(seeds, copies)
