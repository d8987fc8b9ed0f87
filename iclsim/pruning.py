"""SVD weight pruning (paper B; THEORY 6): truncation at a clipping rate, module-wise pruning, and
the derivative-free search that picks (layer, module, clipping rate) on validation prompts."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import train

DEFAULT_RATES = (0.0, 0.1, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995)
MODULES = {"attn": ("Wq", "Wk", "Wv", "Wo"), "mlp": ("W_in", "W_out")}


def kept_singular_values(shape, clipping_rate: float) -> int:
    """k = floor(min(m, n) (1 - xi)), at least 1 (small matrices would otherwise reach k = 0)."""
    if not (0.0 <= float(clipping_rate) < 1.0):
        raise ValueError(f"clipping_rate must be in [0, 1), got {clipping_rate!r}")
    return max(1, int(np.floor(min(shape) * (1.0 - float(clipping_rate)) + 1e-9)))


def svd_truncate(W, clipping_rate: float) -> jax.Array:
    """Best rank-k approximation of W (exact SVD) keeping k = kept_singular_values(W.shape, xi)."""
    W = jnp.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"W must be a matrix, got shape {W.shape}")
    k = kept_singular_values(W.shape, clipping_rate)
    U, s, Vt = jnp.linalg.svd(W, full_matrices=False)
    return ((U[:, :k] * s[None, :k]) @ Vt[:k]).astype(W.dtype)


def _module(params, layer: int, module: str):
    """The dict of matrices pruned together: one layer's attention or MLP (one-layer models: the
    whole parameter dict is layer 0's attention)."""
    if "layers" not in params:
        if layer != 0 or module != "attn":
            raise ValueError(f"a one-layer model has only layer 0, module 'attn'; got layer {layer}, module {module!r}")
        return params
    if not 0 <= layer < len(params["layers"]):
        raise ValueError(f"layer must be in [0, {len(params['layers']) - 1}], got {layer}")
    if module not in MODULES or module not in params["layers"][layer]:
        raise ValueError(f"module must be one of {sorted(params['layers'][layer])}, got {module!r}")
    return params["layers"][layer][module]


def prune(params, layer: int, module: str, clipping_rate: float):
    """New parameters with every matrix of (layer, module) SVD-truncated; the input is untouched and
    every other leaf is the same array."""
    target = _module(params, layer, module)
    pruned = {k: svd_truncate(w, clipping_rate) if jnp.ndim(w) == 2 else w for k, w in target.items()}
    if "layers" not in params:
        return pruned
    layers = list(params["layers"])
    layers[layer] = {**layers[layer], module: pruned}
    return {**params, "layers": layers}


def evaluate_candidates(model, params, design, n: int, candidates, key, num_prompts: int):
    """Risk and SE of every pruned model (layer, module, rate) on the same fresh prompts, all
    candidates stacked along one vmapped axis: one compiled evaluation."""
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a)[None, None],
                                     *[prune(params, l, m, r) for l, m, r in candidates])
    risk, se = train.evaluate_sweep(model, stacked, design, [n], key, num_prompts)
    return risk[0, 0], se[0, 0]


class SearchResult(NamedTuple):
    table: list[dict]  # one row per (layer, module, rate): validation risk and se
    best: dict         # the chosen row
    val_before: float
    val_after: float
    test_before: tuple[float, float]
    test_after: tuple[float, float]


def search(model, params, design, n: int, layers: Sequence[int], modules: Sequence[str],
           rates: Sequence[float] = DEFAULT_RATES, val_key=None, test_key=None, num_val: int = 20_000,
           num_test: int = 100_000) -> SearchResult:
    """Paper B's derivative-free algorithm: evaluate every (layer, module, rate) on validation prompts
    (all candidates stacked and vmapped: one compiled evaluation), keep the best (ties to the smaller
    rate; rate 0 is no pruning), and report test risk before and after on other prompts."""
    val_key = jax.random.PRNGKey(1) if val_key is None else val_key
    test_key = jax.random.PRNGKey(2) if test_key is None else test_key
    candidates = [(l, m, float(r)) for l in layers for m in modules for r in rates]
    risk, se = evaluate_candidates(model, params, design, n, candidates, val_key, num_val)
    table = [{"layer": l, "module": m, "clipping_rate": r, "val_risk": float(risk[i]), "val_se": float(se[i])}
             for i, (l, m, r) in enumerate(candidates)]
    best = min(table, key=lambda row: (row["val_risk"], row["clipping_rate"]))
    val_before = min(row["val_risk"] for row in table if row["clipping_rate"] == 0.0) if 0.0 in rates else float(
        train.evaluate(model, params, design, n, val_key, num_val)[0])
    before = train.evaluate(model, params, design, n, test_key, num_test)
    after = train.evaluate(model, prune(params, best["layer"], best["module"], best["clipping_rate"]), design, n,
                           test_key, num_test)
    return SearchResult(table, best, val_before, best["val_risk"], before, after)
