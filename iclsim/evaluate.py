"""Test risk of trained models on fresh prompts: every point of a sweep (design, n, seed) scored on
the same prompts (common random numbers) or each seed on its own, in one compiled program laid out
like training (``layout``), the squared errors accumulated in float64. One network's score is the
public pure function ``make_score``; ``evaluate_sweep`` maps it over a sweep."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as check
from iclsim import compiler, layout, montecarlo, protocols
from iclsim import progress as _progress
from iclsim._precision import float64
from iclsim.prompts import GramPrompts, SharedGramPrompts
from iclsim.designs import _check_n, stack
from iclsim.gram import SAMPLERS, draw, uses_gram
from iclsim.layout import BLOCK, MEMBER

__all__ = ["make_score", "evaluate", "evaluate_sweep", "PairedRisks", "paired_risks"]


# the most prompts one round of the evaluation loop draws, over the networks vmapped on one device: a memory
# bound only. It groups whole draw blocks (``montecarlo.DRAW_BLOCK``; at least one block per round, so more
# than MAX_BATCH // DRAW_BLOCK networks on one device exceed it) and never changes the prompts a key gives.
# History: with jax 0.10.2 on CPU, multi-layer GD-form transformers scored vmapped returned the first network's
# risk for every network at batches of 8000 and more (4096 with 68 networks); every batch up to 5000 was right.
# The cause is XLA CPU's YNNPACK library fusion (on by default): the smallest case found, a vmap over 24
# networks of the float64 sum of float32 squared errors at 10000 prompts, is wrong with it, right without it
# and right with the sum in float32. The evaluation program is compiled without it (``compiler.NO_LIBRARY_FUSION``).
MAX_BATCH = 12_288


def make_score(model, n_slots: int, num_prompts: int = 100_000, batch_size: int = 10_000, sampler: str = "auto"):
    """One network's test risk as a pure function (params, design, n, key) -> ``Estimate(mean, se)`` on
    ``num_prompts`` fresh prompts of ``key`` with n active pairs in ``n_slots`` slots (static), drawn in
    ``model.dtype`` by the one referee (``montecarlo``: fixed draw blocks, squared errors summed in float64):
    the kernel ``evaluate_sweep`` maps over a sweep, for users to jit or vmap themselves (design, n and key
    may be traced). ``batch_size`` only groups draw blocks (memory); Gram draws where
    ``gram.uses_gram(model, design, n_slots, sampler)``, handed to the model as ``SharedGramPrompts`` (the form
    for networks vmapped over one draw; training keeps ``GramPrompts``, docs/performance.md §2.17). Float64 must be on where it is traced (``with
    jax.enable_x64(True):``; RuntimeError otherwise). On CPU compile it with
    ``compiler_options=compiler.evaluation_options(jax.devices())`` (as ``evaluate_sweep`` does: XLA CPU's YNNPACK fusion rounds float32
    differently, and at large vmapped batches summed wrongly, see ``MAX_BATCH``); so compiled, one network's
    score equals ``evaluate_sweep``'s for that point under the same key (the same prompts and float64 sums)."""
    n_slots = check.positive_int("n_slots", n_slots)
    count = montecarlo.check_count("num_prompts", num_prompts)
    group = montecarlo.group_size(count, check.positive_int("batch_size", batch_size))
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")

    def score(params, design, n, key) -> montecarlo.Estimate:
        if not jax.config.jax_enable_x64:  # switching it on inside a trace would mix int32 and int64 values
            raise RuntimeError("make_score's squared errors are summed in float64: call (and jit) the score under "
                               "`with jax.enable_x64(True):` or with jax_enable_x64 set")
        gram = uses_gram(model, design, n_slots, sampler)
        total, total_sq = _risk_sums(model, n_slots, group, gram)(params, design, n, key, count)
        return montecarlo.Estimate(*montecarlo.estimate(total, total_sq, count))

    return score


def _risk_sums(model, n_slots: int, group: int, gram: bool):
    """(params, design, n, key, count) -> the float64 (sum, sum of squares) of the squared errors of ``model``
    on the first ``count`` prompts of ``key`` (``montecarlo.risk_sums``): the core of ``make_score`` and of
    the evaluation program."""

    def predict(params, p):  # a Gram draw is read by every network of a block: SharedGramPrompts' products
        return protocols.predict(model, params, SharedGramPrompts(*p) if isinstance(p, GramPrompts) else p)

    def sums(params, design, n, key, count):
        return montecarlo.risk_sums(lambda p: predict(params, p), design, n_slots, n, key, count, group,
                                    model.dtype, gram)

    return sums


@float64
def evaluate_sweep(model, params, designs, ns: Sequence[int], key, num_prompts: int = 100_000,
                   batch_size: int = 10_000, sampler: str = "auto", devices: Sequence | None = None,
                   n_slots: int | None = None, progress: Callable | None = None):
    """Test risk on fresh prompts of every model of a sweep: an ``Estimate(mean, se)``, each [designs, ns, seeds]
    (unpacks as ``risk, se``).

    ``params``: leaves with leading axes [designs, ns, seeds] (``FitResult.params`` of ``fit_sweep`` over the
    same designs and ns). ``key``: one PRNG key, and every point sees the same prompts (common random
    numbers); or one key per seed, [seeds, 2] uint32 (or typed keys [seeds]), and the points of seed s, all
    designs and ns, see key s's prompts: each seed its own test set, so that an interval over seeds contains
    the variation of the test set, while comparisons within a seed stay paired. Points whose keys are equal
    form one random stream (with one context length a block of them computes each draw once; with several, what
    of a draw depends on n is computed per point). ``ns``: strictly increasing, the list the sweep
    was fitted with (its n axis is matched by position). Prompts have n active pairs padded with zero pairs
    to ``n_slots`` context slots (default max(ns), as ``fit_sweep`` trains); Gram draws where
    ``gram.uses_gram``. The points are laid out in blocks over ``devices`` (default
    ``jax.devices()``) as training lays out points of one seed.

    The prompts a key gives are the first ``num_prompts`` of its fixed draw blocks (``montecarlo``: block b
    from fold_in(key, b), the last block masked): they do not depend on ``batch_size``, on how many
    networks share a device (at most ``MAX_BATCH`` networks x prompts per round, in whole blocks), on the
    device count or the process count, so a network scored alone, inside a sweep or on another machine
    gets the same numbers, and a smaller ``num_prompts`` scores a prefix of a larger one's prompts.
    ``progress``: None (silent) or a function called with ``progress.Progress(done, total, elapsed, remaining)``
    after each of up to ``progress.REPORTS`` chunks of points (the numbers are the same: see above).
    """
    design_list, ns = layout.as_list(designs), check.context_lengths(layout.as_list(ns))
    protocols.check_sweep(model, design_list, "evaluate")  # the door: named errors
    if n_slots is None:
        n_slots = max(ns)
    elif check.positive_int("n_slots", n_slots) < max(ns):
        raise ValueError(f"n_slots must be >= max(ns) = {max(ns)} (the padded context holds every n), got {n_slots}")
    for d in design_list:
        _check_n(d, n_slots)
    num_prompts = montecarlo.check_count("num_prompts", num_prompts)
    check.positive_int("batch_size", batch_size)
    gram = uses_gram(model, design_list, n_slots, sampler)
    check.padding(model, ns, gram, "evaluate_sweep")
    num_seeds = check.sweep_params(params, len(design_list), len(ns))
    shape = (len(design_list), len(ns), num_seeds)
    count = int(np.prod(shape))
    rows = _key_rows(key, num_seeds)
    di, nj, sk = np.unravel_index(np.arange(count), shape)
    # points with equal keys form one random stream: a block's members share it and its draw
    streams = np.zeros(count, int) if rows is None else np.unique(rows, axis=0, return_inverse=True)[1].ravel()[sk]
    stacked = stack(design_list)
    flat = jax.tree_util.tree_map(lambda a: np.asarray(a).reshape((count,) + np.shape(a)[3:]), params)

    def score(points):  # flat point indices -> (total, total_sq) [len(points)], laid out in blocks over the devices
        plan = layout.plan(streams[points], tuple(jax.devices() if devices is None else devices)[:len(points)])
        networks = plan.blocks.size // len(plan.devices)  # networks vmapped together on one device
        group = montecarlo.group_size(num_prompts, min(batch_size, MAX_BATCH // networks))  # memory only
        split = layout.split_design(jax.tree_util.tree_map(lambda a: np.asarray(a)[di[points]], stacked))
        # one context length for every point: n is passed once, unbatched, so that a block's members (one key,
        # one design) share its draw instead of drawing it per member (vmap batches whatever depends on a
        # batched n)
        one_n = len(ns) == 1
        program = _compiled_evaluation(model, n_slots, group, gram, plan.devices, split.treedef, split.shared,
                                       rows is not None, one_n)
        b = plan.blocks
        keys = key if rows is None else jnp.asarray(rows[sk[points][b[:, 0]]])
        n_arg = jnp.asarray(np.asarray(ns)[0]) if one_n else jnp.asarray(np.asarray(ns)[nj[points]][b])
        sums = program(jax.tree_util.tree_map(lambda a: a[points][b], flat), [a[b] for a in split.varying],
                       split.common, n_arg, keys, jnp.asarray(num_prompts, jnp.int32))
        return layout.gather(sums, plan, len(points))

    if progress is None:
        total, total_sq = score(np.arange(count))
    else:  # chunks of points, one report after each (a point's score does not depend on its chunk)
        tracker = _progress.Tracker(progress, count)
        parts = []
        for chunk in np.array_split(np.arange(count), min(count, _progress.REPORTS)):
            with tracker.chunk(len(chunk)):
                parts.append(score(chunk))
        total, total_sq = (np.concatenate(a) for a in zip(*parts))
    mean, se = montecarlo.estimate(total, total_sq, num_prompts)
    return montecarlo.Estimate(np.reshape(np.asarray(mean), shape), np.reshape(np.asarray(se), shape))


def evaluate(model, params, design, n: int, key, num_prompts: int = 100_000, batch_size: int = 10_000,
             sampler: str = "auto", n_slots: int | None = None):
    """Test risk (mean, standard error) of one trained model on num_prompts fresh prompts with n context pairs
    in ``n_slots`` slots (default n: no padding). One point of a multi-n sweep was trained on prompts padded
    to the sweep's max(ns) slots: pass ``n_slots=max(ns)`` to score it as ``evaluate_sweep`` does (a model
    whose prediction depends on the padding, e.g. H3's position filter, scores differently otherwise)."""
    n = check.positive_int("n", n)
    expanded = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None, None, None], params)
    mean, se = evaluate_sweep(model, expanded, design, [n], key, num_prompts, batch_size, sampler,
                              n_slots=n_slots)
    return montecarlo.Estimate(float(mean[0, 0, 0]), float(se[0, 0, 0]))


class PairedRisks(NamedTuple):
    """Per seed, [seeds] each: the risks of a network and of a reference predictor on the same prompts, the
    mean per-prompt difference of their squared errors and the standard errors; the difference's SE is that
    of the per-prompt differences, far below either risk's when the two predict alike."""

    risk: np.ndarray
    risk_se: np.ndarray
    reference: np.ndarray
    reference_se: np.ndarray
    difference: np.ndarray     # mean of (y - f)^2 - (y - g)^2 = risk - reference on these prompts
    difference_se: np.ndarray


@float64
def paired_risks(model, params, reference_params, design, n: int, keys, num_prompts: int = 100_000,
                 batch_size: int = 10_000) -> PairedRisks:
    """Score networks against a reference on shared prompts, seed by seed (docs/theory.md §7: paired
    comparisons). ``params`` and ``reference_params``: two parameter sets of ``model`` with a leading seed
    axis [seeds, ...]; ``keys``: one per seed, [seeds, 2] uint32 (``sweeps.stream_keys``), and seed s's two
    predictors see the same ``num_prompts`` prompts of key s (the referee's draw blocks, ``montecarlo``, in
    ``model.dtype``; ``batch_size`` only groups blocks), the squared errors and their per-prompt differences
    summed in float64. One compiled
    program, vmapped over seeds (for small models: the whole batch of every seed is in memory at once)."""
    n = check.positive_int("n", n)
    _check_n(design, n)
    counts = {name: {np.shape(a)[0] if np.ndim(a) else None for a in jax.tree_util.tree_leaves(tree)}
              for name, tree in (("params", params), ("reference_params", reference_params))}
    seeds = next(iter(counts["params"]))
    for name, found in counts.items():
        if len(found) != 1 or None in found or found != {seeds}:
            raise ValueError(f"{name} must have one leading seed axis on every leaf, the same in params and "
                             f"reference_params; got leading sizes {sorted(found, key=str)} ({name}) and "
                             f"{sorted(counts['params'], key=str)} (params)")
    rows = _key_data(keys, seeds, "keys")
    if rows.ndim != 2:
        raise ValueError(f"keys must be one key per seed, shape ({seeds}, 2) uint32 (sweeps.stream_keys); got one key")
    count = montecarlo.check_count("num_prompts", num_prompts)
    group = montecarlo.group_size(count, check.positive_int("batch_size", batch_size))
    dtype = model.dtype

    @jax.jit
    def sums(params, reference_params, keys):
        def one(p, r, key):
            def errors(k):  # the referee's draw block of key k: the same prompts for both predictors
                prompts = draw(design, k, montecarlo.DRAW_BLOCK, n, n, dtype, False)
                ea = jnp.square(prompts.y_query - check.predictions(protocols.predict(model, p, prompts),
                                                                      prompts.y_query, "paired_risks"))
                eb = jnp.square(prompts.y_query - check.predictions(protocols.predict(model, r, prompts),
                                                                      prompts.y_query, "paired_risks"))
                return ea.astype(jnp.float64), eb.astype(jnp.float64)

            out = []
            for pick in (lambda a, b: a, lambda a, b: b, lambda a, b: a - b):
                out.extend(montecarlo.block_sums(lambda k, pick=pick: pick(*errors(k)), key, count, group))
            return jnp.stack(out)

        return jax.vmap(one)(params, reference_params, keys)

    out = np.asarray(sums(params, reference_params, jnp.asarray(rows)))
    parts = [montecarlo.estimate(out[:, 2 * i], out[:, 2 * i + 1], count) for i in range(3)]
    return PairedRisks(*(np.asarray(a, np.float64) for part in parts for a in part))


def _key_data(key, num_seeds: int, name: str = "key") -> np.ndarray:
    """The data of one PRNG key, [2] uint32, or of one key per seed, [num_seeds, 2] uint32 (raw or typed
    threefry keys); a ValueError naming ``name`` and the accepted forms otherwise."""
    typed = jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key)
    if typed and str(jax.random.key_impl(key)) != "threefry2x32":
        raise ValueError(f"{name} must be a threefry2x32 key (jax.random.PRNGKey), got {jax.random.key_impl(key)}")
    data = np.asarray(jax.random.key_data(key) if typed else key)
    if data.shape == (2,):
        return data
    if data.shape != (num_seeds, 2) or data.dtype != np.uint32:
        got = f"typed keys of shape {np.shape(key)}" if typed else f"shape {data.shape}, dtype {data.dtype}"
        raise ValueError(f"{name} must be one PRNG key (jax.random.PRNGKey: shape (2,)) or one per seed: shape "
                         f"(seeds, 2) = ({num_seeds}, 2) uint32, or typed keys of shape ({num_seeds},); got {got}")
    return data


def _key_rows(key, num_seeds: int, name: str = "key"):
    """None for one key (shared by every point); else the keys' data, [num_seeds, 2] uint32, a row per seed."""
    data = _key_data(key, num_seeds, name)
    return None if data.ndim == 1 else data


@functools.lru_cache(maxsize=64)
def _compiled_evaluation(model, n_slots: int, group: int, gram: bool, devices: tuple, treedef, shared: tuple,
                         block_keys: bool = False, one_n: bool = False):
    """One jitted program per (model, n_slots, draw blocks per round, sampler, devices, shared design leaves,
    one key or a key per block): params, designs, ns, keys and the prompt count are arguments, so other
    sweeps of the same shape never recompile, whatever their prompt count (a validation set and a test set
    share the program where they group alike). ``one_n``: every point has the same context length, passed
    once (a block's members then share one draw)."""

    sums = _risk_sums(model, n_slots, group, gram)

    def point(params, varying, common, n, key, count):
        return sums(params, layout.merge_design(treedef, shared, varying, common), n, key, count)

    options = compiler.evaluation_options(devices)
    kinds = (MEMBER, MEMBER, None, None if one_n else MEMBER, BLOCK if block_keys else None, None)
    return layout.blocked(point, kinds, devices, compiler_options=options)
