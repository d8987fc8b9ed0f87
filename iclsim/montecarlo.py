"""The Monte Carlo referee: the one place where fresh prompts (or other draws) are made from a key and
a per-draw statistic is summed into an ``Estimate(mean, se)`` (docs/theory.md §7).

Draws come in fixed draw blocks of ``DRAW_BLOCK``: block b is drawn from ``jax.random.fold_in(key, b)``
and a count of N draws is the first N draws of blocks 0, 1, ... (the tail of the last block is masked
out). Memory batching only groups whole blocks (``group`` blocks per loop round, vmapped), and the
sums are accumulated block by block in block order, so the draws a key gives and the float64 sums
over them do not depend on the batch size, on how many networks share a device, on the device count
or on the process count: the same network scored alone or inside a sweep sees the same prompts.
A smaller count is a prefix of a larger one (the first N draws of the same key).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from iclsim import _validate as check
from iclsim import compiler
from iclsim._precision import float64
from iclsim.gram import draw
from iclsim.protocols import Estimate

__all__ = ["DRAW_BLOCK", "MAX_BLOCKS", "Estimate", "check_count", "blocks", "group_size", "block_sums", "block_totals",
           "block_values", "prompt_totals", "prompt_values", "risk_sums", "estimate", "mean", "risk", "risks"]

F64 = jnp.float64

# draws per block: the unit a key's stream is cut into (block b from fold_in(key, b)). Part of the definition
# of every Monte Carlo number, so never tie it to memory: change it and every estimate moves (at the Monte
# Carlo level).
DRAW_BLOCK = 250


MAX_BLOCKS = 2**31 - 1  # the block index is an int32 loop counter


def check_count(name: str, count) -> int:
    """``count`` as a positive int whose draw blocks fit the int32 block index; a ValueError naming
    ``name`` otherwise (a count of 1e15 would otherwise run, effectively forever, or wrap)."""
    count = check.positive_int(name, count)
    if blocks(count) > MAX_BLOCKS:
        raise ValueError(f"{name} = {count} is {blocks(count)} draw blocks of {DRAW_BLOCK}: at most {MAX_BLOCKS} "
                         f"blocks ({MAX_BLOCKS * DRAW_BLOCK} draws); use fewer")
    return count


def blocks(count):
    """Draw blocks holding ``count`` draws: ceil(count / DRAW_BLOCK) (count may be traced)."""
    return (count + DRAW_BLOCK - 1) // DRAW_BLOCK


def group_size(count: int, batch_size: int) -> int:
    """Blocks per loop round for at most ``batch_size`` draws per round: floor(batch_size / DRAW_BLOCK),
    at least one and at most the blocks ``count`` needs. Grouping changes memory and speed only."""
    return max(1, min(int(batch_size) // DRAW_BLOCK, int(blocks(int(count)))))


def block_sums(values: Callable, key, count, group: int = 1):
    """(sum, sum of squares) in float64 of the first ``count`` draws of the block stream of ``key``:
    ``values(key_b) -> [..., DRAW_BLOCK]`` is the statistic of block b's draws, key_b = fold_in(key, b) (leading
    axes, several statistics of the same draws, give sums of that shape, each as it would be alone).

    ``group`` blocks are drawn per loop round (vmapped over their keys); each block is summed on its own
    and the block sums are added in block order, so the result is the same for every ``group``. Pure,
    vmappable; ``count`` may be traced (a traced loop bound: not reverse-differentiable)."""
    group = check.positive_int("group", group)
    count = jnp.asarray(count)
    index = count.dtype  # one integer type throughout (strict dtype promotion)
    rounds = (blocks(count) + group - 1) // group
    offsets = jnp.arange(DRAW_BLOCK, dtype=index)

    def round_(r, carry):
        ids = r * group + jnp.arange(group, dtype=index)
        vals = jax.vmap(lambda b: values(jax.random.fold_in(key, b)))(ids).astype(F64)  # [group, ..., DRAW_BLOCK]
        valid = ids[:, None] * DRAW_BLOCK + offsets[None, :] < count
        vals = jnp.where(valid.reshape((group,) + (1,) * (vals.ndim - 2) + (DRAW_BLOCK,)), vals, 0.0)
        # the squares materialised before they are added: fused, a square and an add may become one
        # fused multiply-add in some groupings and not others (sums of squares an ulp apart: docs/performance.md §7)
        sums, squares = _pairwise_sum(vals), _pairwise_sum(jax.lax.optimization_barrier(vals**2))
        # block by block, in order: the same additions whatever the grouping
        return jax.lax.fori_loop(0, group, lambda j, c: (c[0] + sums[j], c[1] + squares[j]), carry)

    zero = jnp.zeros(jax.eval_shape(values, jax.random.fold_in(key, 0)).shape[:-1], F64)
    return jax.lax.fori_loop(0, rounds, round_, (zero, zero))


def _pairwise_sum(vals):
    """Sums over the last axis as a fixed tree of elementwise additions (zero-padded to a power of two,
    halved until one column is left): the same additions whatever the leading shape, where XLA's
    reductions may vectorise a [group, DRAW_BLOCK] sum differently for different groups (an ulp apart:
    docs/performance.md §7)."""
    width = 1 << (vals.shape[-1] - 1).bit_length()
    vals = jnp.pad(vals, [(0, 0)] * (vals.ndim - 1) + [(0, width - vals.shape[-1])])
    while width > 1:
        width //= 2
        vals = vals[..., :width] + vals[..., width:]
    return vals[..., 0]


def block_totals(totals: Callable, key, count, group: int = 1):
    """Float64 sums, of any shape, over the first ``count`` draws of the block stream of ``key``:
    ``totals(key_b, valid) -> pytree`` is block b's total over its draws where ``valid`` [DRAW_BLOCK] is True
    (False on the masked tail of the last block), key_b = fold_in(key, b). The block totals are added in
    block order; ``group`` blocks are drawn per loop round (vmapped), which changes memory and speed, not the
    draws. For a per-draw scalar and its squares (a mean with its standard error) use ``block_sums``. Pure,
    vmappable; ``count`` may be traced."""
    group = check.positive_int("group", group)
    count = jnp.asarray(count)
    index = count.dtype
    rounds = (blocks(count) + group - 1) // group
    offsets = jnp.arange(DRAW_BLOCK, dtype=index)

    def one(b):
        return jax.tree_util.tree_map(lambda a: jnp.asarray(a, F64),
                                      totals(jax.random.fold_in(key, b), b * DRAW_BLOCK + offsets < count))

    zero = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, F64), jax.eval_shape(one, jnp.zeros((), index)))

    def round_(r, carry):
        sums = jax.vmap(one)(r * group + jnp.arange(group, dtype=index))
        return jax.lax.fori_loop(0, group, lambda j, c: jax.tree_util.tree_map(lambda a, s: a + s[j], c, sums), carry)

    return jax.lax.fori_loop(0, rounds, round_, zero)


def block_values(values: Callable, key, count: int, group: int = 1):
    """The per-draw values of the first ``count`` draws of the block stream of ``key``, in draw order:
    ``values(key_b) -> pytree`` with leading axis [DRAW_BLOCK] gives block b's draws' values (key_b =
    fold_in(key, b)); every leaf of the result has leading axis [count]. For statistics a caller keeps per
    draw (per-prompt errors, a fixed sample to minimise over); the draws are those ``block_sums`` sums.
    ``group`` blocks per loop round (memory and speed only); ``count`` concrete."""
    count = check_count("count", count)
    group = check.positive_int("group", group)
    group = min(group, blocks(count))
    rounds = -(-blocks(count) // group)
    ids = jnp.arange(rounds * group, dtype=jnp.int32).reshape(rounds, group)
    out = jax.lax.map(lambda r: jax.vmap(lambda b: values(jax.random.fold_in(key, b)))(r), ids)
    return jax.tree_util.tree_map(lambda a: a.reshape((rounds * group * DRAW_BLOCK,) + a.shape[3:])[:count], out)


def prompt_totals(totals: Callable, design, n: int, key, count, group: int = 1, dtype=F64,
                  n_slots: int | None = None, gram: bool = False):
    """``block_totals`` over fresh prompts of ``design`` with n context pairs (in n_slots slots, default n;
    ``gram.draw``) drawn in ``dtype``: ``totals(prompts, valid) -> pytree`` is a block's total over its
    prompts where ``valid`` [DRAW_BLOCK] is True."""
    n_slots = n if n_slots is None else n_slots
    return block_totals(lambda k, valid: totals(draw(design, k, DRAW_BLOCK, n, n_slots, dtype, gram), valid),
                        key, count, group)


def prompt_values(statistic: Callable, design, n: int, key, count: int, group: int = 1, dtype=F64,
                  n_slots: int | None = None, gram: bool = False):
    """``block_values`` over fresh prompts of ``design`` (as ``prompt_totals``): ``statistic(prompts)`` gives
    one value (any trailing shape) per prompt, leading axis [DRAW_BLOCK]; the result has leading axis [count],
    the prompts in draw order (the same prompts ``mean`` averages over for the same key)."""
    n_slots = n if n_slots is None else n_slots
    return block_values(lambda k: statistic(draw(design, k, DRAW_BLOCK, n, n_slots, dtype, gram)), key, count, group)


def risk_sums(predict: Callable, design, n_slots: int, n, key, count, group: int, dtype, gram: bool = False):
    """``block_sums`` of the squared error (y - predict(prompts))^2 on prompts with n active context pairs
    in n_slots slots (``gram.draw``: Gram draws where ``gram``), drawn in ``dtype``. n may be traced."""

    def values(k):
        p = draw(design, k, DRAW_BLOCK, n, n_slots, dtype, gram)
        return (p.y_query - check.predictions(predict(p), p.y_query, "risk")) ** 2

    return block_sums(values, key, count, group)


@float64
def estimate(total, total_sq, count) -> Estimate:
    """The Estimate from a sum and a sum of squares over ``count`` draws: the mean and the standard error
    sqrt(s^2 / count) with the unbiased sample variance s^2."""
    count = check.positive_int("count", count)
    mean_ = total / count
    var = (total_sq / count - mean_**2) * count / max(count - 1, 1)
    return Estimate(mean_, jnp.sqrt(jnp.clip(var, 0.0, None) / count))


@float64
def mean(statistic: Callable, design, n: int, key, num_prompts: int = 100_000, batch_size: int = 10_000,
         dtype=F64, n_slots: int | None = None, gram: bool = False) -> Estimate:
    """Estimate of E[statistic(prompts)] from ``num_prompts`` fresh prompts of ``design`` with n context
    pairs (in n_slots slots, default n; ``gram.draw``) drawn in ``dtype``; statistic maps a Prompts batch
    to one value per prompt [B]. Exactly ``num_prompts`` prompts (the last block masked), at most
    ``batch_size`` per round (rounded down to whole blocks, at least one); sums in float64."""
    num_prompts = check_count("num_prompts", num_prompts)
    check.positive_int("batch_size", batch_size)
    if not callable(statistic):
        raise TypeError(f"statistic must be a function of a Prompts batch, got {type(statistic).__name__}")
    n_slots = n if n_slots is None else n_slots
    group = group_size(num_prompts, batch_size)

    def values(k):
        s = statistic(draw(design, k, DRAW_BLOCK, n, n_slots, dtype, gram))
        if jnp.shape(s) != (DRAW_BLOCK,):
            raise ValueError(f"the statistic must give one value per prompt, shape ({DRAW_BLOCK},) for a block of "
                             f"{DRAW_BLOCK}, got shape {tuple(jnp.shape(s))} (a predictor returning [B, 1] "
                             "broadcasts to [B, B])")
        return s

    total, total_sq = jax.jit(lambda k: block_sums(values, k, num_prompts, group))(key)
    m, se = estimate(total, total_sq, num_prompts)
    return Estimate(float(m), float(se))


def risk(predict: Callable, design, n: int, key, num_prompts: int = 100_000, batch_size: int = 10_000,
         dtype=F64) -> Estimate:
    """Estimate of the risk E[(y - predict(prompts))^2] on fresh prompts (``mean``)."""
    if not callable(predict):
        raise TypeError(f"predict must be a function of a Prompts batch, got {type(predict).__name__}")
    return mean(lambda p: (p.y_query - check.predictions(predict(p), p.y_query, "risk")) ** 2, design, n, key,
                num_prompts, batch_size, dtype)


@float64
def risks(predicts, design, n: int, key, num_prompts: int = 100_000, batch_size: int = 10_000,
          dtype=F64) -> list[Estimate]:
    """``risk`` of each predictor of the sequence ``predicts`` on the same fresh prompts, in one program: each
    draw block is drawn once and scored by every predictor. Each estimate is ``risk``'s for that predictor alone
    with the same arguments: the same prompts and the same per-block pairwise sums added in block order. The
    predictors being compiled together (work they share, such as X^T X, computed once), a per-prompt value can
    differ from its own program's at round-off (one ulp of a mean, seen with XLA CPU's fusion emitters off)."""
    predicts = list(predicts)
    if not predicts or not all(callable(f) for f in predicts):
        raise TypeError("predicts must be a non-empty sequence of functions of a Prompts batch")
    num_prompts = check_count("num_prompts", num_prompts)
    check.positive_int("batch_size", batch_size)
    group = group_size(num_prompts, batch_size)

    def values(k):  # [len(predicts), DRAW_BLOCK]
        p = draw(design, k, DRAW_BLOCK, n, n, dtype)
        return jnp.stack([(p.y_query - check.predictions(f(p), p.y_query, "risk")) ** 2 for f in predicts])

    def sums(k):  # [len(predicts)] each: block_sums with the predictors as a leading axis
        return block_sums(values, k, num_prompts, group)

    # XLA CPU's fusion emitters off (``compiler.SMALL_PROGRAM_OPTIONS``): a smaller program to compile
    # (docs/performance.md §2.15), the sums ``risk``'s up to round-off (tests/test_montecarlo_risks.py)
    options = compiler.SMALL_PROGRAM_OPTIONS if jax.default_backend() == "cpu" else None
    out = []
    totals, squares = jax.jit(sums, compiler_options=options)(key)
    for total, total_sq in zip(totals, squares):
        m, se = estimate(total, total_sq, num_prompts)
        out.append(Estimate(float(m), float(se)))
    return out
