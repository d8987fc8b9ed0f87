"""SVD weight pruning (paper B; docs/theory.md §6): truncation to a kept rank (or paper B's clipping rate),
module-wise pruning, the evaluation of many pruned networks on paired prompts, and the derivative-free
search that picks (layer, module, rank) on validation prompts and reports the change on test prompts."""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as _check
from iclsim import evaluate, montecarlo

__all__ = ["DEFAULT_RATES", "MODULES", "OPERATIONS", "Candidate", "SearchResult", "apply_candidate", "kept_singular_values", "ranks_for_rates",
           "svd_truncate", "prune", "module_shape", "evaluate_candidates", "candidate_networks", "select_networks",
           "search", "rate_options",
           "select_on_validation", "multistep_gd_params", "evaluate_networks", "prompt_errors", "RobustChange",
           "robust_change", "paired_prompt_change"]

DEFAULT_RATES = (0.0, 0.1, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995)
MODULES = {"attn": ("Wq", "Wk", "Wv", "Wo"), "mlp": ("W_in", "W_out")}


OPERATIONS = ("svd", "delete", "scale", "random", "product_svd")


class Candidate(NamedTuple):
    """One edited network: an operation ``op`` on (layer, module).

    - "svd" (paper B's operator): every matrix of the module SVD-truncated to ``rank``; rank None is the
      unpruned network (list it first in a search).
    - Controls, the trivial operations that could explain a pruning effect (docs/theory.md §6.3):
      "delete": the layer's update removed (its value scale w_v or Wv set to 0: the GD step deleted);
      "scale": the layer's update multiplied by the scalar ``value`` (w_v or Wv times value);
      "random": every matrix of the module projected on a random subspace of the same ``rank``
      (W -> W P, P the projection on ``rank`` orthonormal directions drawn from numpy's generator seeded
      by ``value``, one P shared by the module's matrices of the same width, so Wq Wk^T -> Wq P Wk^T): truncation with directions that carry no information;
      "product_svd": the query-key product Q = Wq Wk^T truncated to ``rank`` by its own SVD (Wq -> U_k S_k,
      Wk -> V_k), factorisation-free: in the GD form the layer's step matrix Gamma_l = -w_v Q is truncated
      itself, whatever singular directions its factors happen to have."""

    layer: int
    module: str
    rank: int | None
    op: str = "svd"
    value: float | int | None = None

    @property
    def unpruned(self) -> bool:
        """True for the network left as trained (op "svd", rank None)."""
        return self.op == "svd" and self.rank is None


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


def apply_candidate(params, candidate: Candidate):
    """The parameters of one candidate (``Candidate``'s operations); the input is untouched."""
    c = Candidate(*candidate)
    if c.op not in OPERATIONS:
        raise ValueError(f"op must be one of {OPERATIONS}, got {c.op!r}")
    if c.op == "svd":
        return params if c.rank is None else prune(params, c.layer, c.module, rank=c.rank)
    target = _module(params, c.layer, c.module)
    if c.op in ("delete", "scale"):
        factor = 0.0 if c.op == "delete" else c.value
        if isinstance(factor, bool) or not isinstance(factor, (int, float, np.floating, np.integer)) \
                or not np.isfinite(factor):
            raise ValueError(f"value must be a finite scalar for op 'scale', got {c.value!r}")
        name = "w_v" if "w_v" in target else "Wv" if "Wv" in target else None
        if name is None:
            raise ValueError(f"op {c.op!r} needs a value map (w_v or Wv) in module {c.module!r}; it has "
                             f"{sorted(target)}")
        edited = {**target, name: target[name] * jnp.asarray(factor, target[name].dtype)}
    elif c.op == "random":
        if isinstance(c.value, bool) or not isinstance(c.value, (int, np.integer)) or c.value < 0:
            raise ValueError(f"value must be an integer seed >= 0 for op 'random', got {c.value!r}")
        matrices = {k: w for k, w in target.items() if jnp.ndim(w) == 2}
        width = min(w.shape[1] for w in matrices.values())
        rank = _rank(c.rank, width)
        rng = np.random.default_rng(int(c.value))
        projections: dict[int, np.ndarray] = {}  # one subspace per width: Wq P (Wk P)^T = Wq P Wk^T
        edited = dict(target)
        for k, w in matrices.items():
            if w.shape[1] not in projections:
                basis, _ = np.linalg.qr(rng.standard_normal((w.shape[1], rank)))
                projections[w.shape[1]] = basis @ basis.T
            edited[k] = w @ jnp.asarray(projections[w.shape[1]], w.dtype)
    else:  # product_svd
        if "Wq" not in target or "Wk" not in target:
            raise ValueError(f"op 'product_svd' needs Wq and Wk in module {c.module!r}; it has {sorted(target)}")
        Q = target["Wq"] @ target["Wk"].T
        rank = _rank(c.rank, min(*Q.shape, target["Wq"].shape[1]))
        U, sv, Vt = jnp.linalg.svd(Q, full_matrices=False)
        pad = target["Wq"].shape[1] - rank
        Wq = jnp.pad(U[:, :rank] * sv[None, :rank], ((0, 0), (0, pad)))
        Wk = jnp.pad(Vt[:rank].T, ((0, 0), (0, pad)))
        edited = {**target, "Wq": Wq.astype(target["Wq"].dtype), "Wk": Wk.astype(target["Wk"].dtype)}
    if "layers" not in params:
        return edited
    layers = list(params["layers"])
    layers[c.layer] = {**layers[c.layer], c.module: edited}
    return {**params, "layers": layers}


_apply = apply_candidate


def evaluate_candidates(model, params, design, n: int, candidates: Sequence[Candidate], key, num_prompts: int):
    """Risk and SE [seeds, candidates] of every pruned network of every seed (``params`` with a leading seed
    axis), all stacked along one vmapped axis: one compiled evaluation. ``key``: one key, every network on
    the same fresh prompts; or one per seed ([seeds, 2]), each seed's networks on its own prompts. Either
    way the candidates of a seed share their prompts (common random numbers: their differences are paired).
    Scored by ``evaluate_networks``, the one scorer of network lists; ``candidate_networks`` builds the
    networks, for a caller that scores the same candidates on several test settings."""
    seeds = jax.tree_util.tree_leaves(params)[0].shape[0]
    evaluate._key_rows(key, seeds)  # checked before the SVDs
    return evaluate_networks(model, candidate_networks(params, candidates), design, n, key, num_prompts)


def candidate_networks(params, candidates: Sequence[Candidate]):
    """The parameters of every candidate of every seed (``apply_candidate``; ``params`` with a leading seed
    axis), as host arrays with leading axes [seeds, candidates]: what ``evaluate_networks`` scores."""
    seeds = jax.tree_util.tree_leaves(params)[0].shape[0]
    if not candidates:
        raise ValueError("candidates must not be empty")
    per_seed = [jax.tree_util.tree_map(lambda a: a[s], params) for s in range(seeds)]
    # stacked on the host: jnp.stack of thousands of operands compiles one concatenation per count
    return jax.tree_util.tree_map(
        lambda *a: np.stack([np.asarray(x) for x in a]).reshape((seeds, len(candidates)) + np.shape(a[0])),
        *[_apply(p, c) for p in per_seed for c in candidates])


def select_networks(networks, indices: Sequence[int]):
    """The candidates ``indices`` (positions along axis 1) of ``candidate_networks``' output."""
    index = np.asarray(indices)
    if index.ndim != 1 or index.size == 0 or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"indices must be a non-empty list of integer positions, got {indices!r}")
    return jax.tree_util.tree_map(lambda a: a[:, index], networks)


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
           num_test: int = 100_000, null_key=None, networks=None) -> SearchResult:
    """Paper B's derivative-free algorithm as a protocol, for every seed at once (``params`` with a leading
    seed axis): evaluate every candidate on validation prompts, keep the best (ties to the earlier
    candidate: list the unpruned one first), and score the choice on separate test prompts, paired
    with the unpruned network. The null control sizes the winner's curse: the same minimum taken over
    the unpruned network scored on len(candidates) independent validation sets, whose apparent gain
    over the validation set is pure selection noise (``null_key``; None skips it: NaN). Each key is one
    key (every seed on the same prompts) or one per seed ([seeds, 2]: each seed its own validation, test
    and null sets, so that an interval over seeds contains the variation of the sets). Each set is
    exactly num_val (num_test) prompts of the referee's fixed draw blocks (``montecarlo``): the same prompts
    whatever the batch size or the number of networks per device. ``networks``: the candidates' parameters
    when the caller has built them already (``candidate_networks(params, candidates)``; the same numbers)."""
    candidates = [Candidate(*c) for c in candidates]
    if not candidates or not candidates[0].unpruned:
        raise ValueError("candidates[0] must be the unpruned network (op 'svd', rank None), the reference of the "
                         "search")
    seeds = jax.tree_util.tree_leaves(params)[0].shape[0]
    for name, key in (("val_key", val_key), ("test_key", test_key), ("null_key", null_key)):
        if name != "null_key" or key is not None:  # checked before any evaluation; no null_key: no null control
            evaluate._key_data(key, seeds, name)
    if networks is None:
        networks = candidate_networks(params, candidates)
    elif np.shape(jax.tree_util.tree_leaves(networks)[0])[:2] != (seeds, len(candidates)):
        raise ValueError(f"networks must have leading axes [seeds, candidates] = [{seeds}, {len(candidates)}] "
                         f"(candidate_networks(params, candidates)), got {np.shape(jax.tree_util.tree_leaves(networks)[0])[:2]}")
    elif not all(np.array_equal(np.asarray(a)[:, 0], np.asarray(b)) for a, b in
                 zip(jax.tree_util.tree_leaves(networks), jax.tree_util.tree_leaves(params))):
        raise ValueError("networks[:, 0] must be the unpruned networks (params), the search's reference: build them "
                         "with candidate_networks(params, candidates)")
    val, _ = evaluate_networks(model, networks, design, n, val_key, num_val)
    test, test_se = evaluate_networks(model, networks, design, n, test_key, num_test)
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


def rate_options(shape, rates: Sequence[float] = DEFAULT_RATES) -> list[tuple[float, int | None]]:
    """Paper B's clipping-rate grid on a matrix of ``shape`` as the distinct networks it gives: (rate, kept
    rank) in increasing rate, each kept rank once with the smallest rate that reaches it, the full rank as
    None (rate 0 keeps every singular value: the unpruned network). Paper B's code (LASER's
    ``do_low_rank``) keeps int(min(m, n) (1 - rate)) values; ``kept_singular_values`` keeps at least 1 where
    that reaches 0, so on d = 5 the grid {0, 0.1, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995} is ranks 5, 4, 2, 1
    (0.75 and above all keep rank 1): four distinct networks, one of them unpruned."""
    rates = [float(r) for r in rates]
    if not rates or any(b <= a for a, b in zip(rates, rates[1:])):
        raise ValueError(f"rates must be a non-empty increasing sequence of clipping rates, got {rates!r}")
    full = min(shape)
    out: list[tuple[float, int | None]] = []
    for rate, k in zip(rates, ranks_for_rates(shape, rates, distinct=False)):
        rank = None if k == full else k
        if all(rank != r for _, r in out):
            out.append((rate, rank))
    return out


def select_on_validation(val_risk) -> np.ndarray:
    """Paper B's choice: per row (a seed), the index of the option with the lowest validation risk, ties to the
    earlier option (list options in increasing clipping rate, the unpruned first: a tie keeps the smaller
    rate, as the authors' ``torch.argmax`` over accuracies in rate order does). NaN risks are never chosen
    (a row of NaNs is a ValueError)."""
    val = np.asarray(val_risk, np.float64)
    if val.ndim != 2 or val.shape[1] == 0:
        raise ValueError(f"val_risk must be [seeds, options] with at least one option, got shape {val.shape}")
    if np.any(np.all(np.isnan(val), axis=1)):
        raise ValueError("val_risk has a row with no finite risk: no option can be chosen")
    return np.argmin(np.where(np.isnan(val), np.inf, val), axis=1)  # first minimum: ties to the earlier option


def multistep_gd_params(dim: int, step_sizes, dtype=jnp.float32):
    """Parameters of a GD-form ``models.LinearTransformer(dim, L)`` that computes L-step GD with the given
    steps, Gamma_l = gamma_l I (``LinearTransformer.steps_params``, docs/theory.md §8). With
    ``theory.optimal_multistep_gd``'s steps for a test distribution this is the oracle: the best L-step GD
    re-tuned for the test design and context length."""
    from iclsim.models import LinearTransformer

    steps = np.asarray(step_sizes, np.float64)
    if steps.ndim != 1 or steps.size == 0:
        raise ValueError(f"step_sizes must be a non-empty 1-D array of finite numbers, got {step_sizes!r}")
    return LinearTransformer(_check.positive_int("dim", dim), steps.size, dtype=dtype).steps_params(steps)


def evaluate_networks(model, networks, design, n: int, key, num_prompts: int):
    """Risk and SE [seeds, k] of networks with leading axes [seeds, k] (seed s's k networks: its edits, an
    oracle, ...), in one vmapped program. ``key``: one key, or one per seed ([seeds, 2]): seed s's k
    networks see the same prompts (paired) and other seeds other prompts (``evaluate_candidates`` for
    networks that are not all edits of one trained network)."""
    leaves = jax.tree_util.tree_leaves(networks)
    if not leaves or np.ndim(leaves[0]) < 2:
        raise ValueError("networks must have leading axes [seeds, k]")
    seeds, k = np.shape(leaves[0])[:2]
    rows = evaluate._key_rows(key, seeds)
    stacked = jax.tree_util.tree_map(lambda a: jnp.reshape(jnp.asarray(a), (1, 1, seeds * k) + np.shape(a)[2:]),
                                     networks)
    keys = key if rows is None else np.repeat(rows, k, axis=0)
    risk, se = evaluate.evaluate_sweep(model, stacked, design, [n], keys, num_prompts)
    return risk[0, 0].reshape(seeds, k), se[0, 0].reshape(seeds, k)


def prompt_errors(model, networks, design, n: int, key, num_prompts: int, batch: int = 10_000) -> np.ndarray:
    """Per-prompt squared errors (y_query - prediction)^2, [k, prompts] (float64 from the model's dtype), of k
    networks (leading axis k) on the same ``num_prompts`` prompts of ``key``: exactly the prompts the referee
    draws for that key (``montecarlo.prompt_values``, fixed draw blocks; ``batch`` bounds memory only), the
    paired per-prompt changes whose tails a mean hides (``robust_change``)."""
    num_prompts = montecarlo.check_count("num_prompts", num_prompts)
    _check.positive_int("batch", batch)
    _check.positive_int("n", n)
    key = jnp.asarray(evaluate._key_data(key, 1, "key"))
    group = montecarlo.group_size(num_prompts, batch)
    return np.asarray(_prompt_errors(model, networks, design, key, n, num_prompts, group), np.float64).T


@functools.partial(jax.jit, static_argnames=("model", "n", "count", "group"))
def _prompt_errors(model, networks, design, key, n: int, count: int, group: int):
    """Squared errors [count, k] of k networks on ``prompt_errors``'s prompts (one compiled program per model,
    context length, count and grouping)."""
    def errors(p):
        return jnp.swapaxes((p.y_query[None] - jax.vmap(lambda q: model.apply(q, p))(networks)) ** 2, 0, 1)

    return montecarlo.prompt_values(errors, design, n, key, count, group, model.dtype)


class RobustChange(NamedTuple):
    """The change of the risk from ``before`` to ``after`` (per-prompt squared errors of two networks on the
    same prompts), as the mean and as robust summaries beside it.

    - mean_change: (mean after - mean before) / mean before, the change every risk table reports;
    - winsorised_change: the same with every squared error above c = the ``quantile``-quantile of the
      before-errors counted as c (one threshold for both networks);
    - median_difference: the median of the per-prompt differences after - before, divided by mean before;
    - top_share: the share of the total change sum(after - before) carried by the 1 - ``quantile``
      fraction of prompts with the largest |after - before| (near 1: a few contexts carry the mean)."""

    mean_change: float
    winsorised_change: float
    median_difference: float
    top_share: float
    quantile: float
    count: int


def robust_change(before, after, quantile: float = 0.999) -> RobustChange:
    """``RobustChange`` of paired per-prompt squared errors ``before`` and ``after`` (same prompts, same order)."""
    a, b = (np.asarray(x, np.float64).ravel() for x in (before, after))
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"before and after must be paired arrays of at least 2 errors, got sizes {a.size}, {b.size}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))) or np.any(a < 0) or np.any(b < 0):
        raise ValueError("before and after must be finite squared errors (>= 0)")
    if not 0.0 < float(quantile) < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
    base = float(np.mean(a))
    if base <= 0:
        raise ValueError("before must have a positive mean squared error")
    c = float(np.quantile(a, quantile))
    ca, cb = np.minimum(a, c), np.minimum(b, c)
    diff = b - a
    top = max(1, int(round((1.0 - float(quantile)) * diff.size)))
    largest = np.argsort(-np.abs(diff), kind="stable")[:top]
    total = float(np.sum(diff))
    return RobustChange(float((np.mean(b) - base) / base), float((np.mean(cb) - np.mean(ca)) / np.mean(ca)),
                        float(np.median(diff) / base), float(np.sum(diff[largest]) / total) if total != 0 else np.nan,
                        float(quantile), int(diff.size))


def paired_prompt_change(model, params, edited, design, n: int, key, num_prompts: int,
                         quantile: float = 0.999) -> RobustChange:
    """``robust_change`` from ``params`` to ``edited`` (two networks of ``model``) on one seed's prompts
    (``prompt_errors`` keyed by ``key``)."""
    both = jax.tree_util.tree_map(lambda a, b: jnp.stack([jnp.asarray(a), jnp.asarray(b)]), params, edited)
    err = prompt_errors(model, both, design, n, key, num_prompts)
    return robust_change(err[0], err[1], quantile)
