"""One threefry stream for every draw of a step: normals, uniforms and fresh keys from a flat draw.

Bit for bit what ``jax.random`` gives for the same key (threefry-2x32, partitionable scheme):
normals by inversion as ``jax.random.normal``, uniforms as ``jax.random.uniform``, keys as
``jax.random.bits``. Drawing every piece of a step from one flat counter range keeps a training
step to one random-number kernel instead of one per ``jax.random`` call. With a ``BatchShard`` a
draw of B rows is one device's rows of the draw of B * count rows (a batch split over devices sees
exactly the prompts of the unsplit run).

Named random streams: an experiment's prompt sets are keyed fold_in(PRNGKey(seed), stream) with a
``Stream`` (``stream_key``, ``stream_keys``). Training splits PRNGKey(seed) into steps + 1 keys and
fold_in(key, i) equals split(key, m)[i], so streams sit at the top of the uint32 range, where no
training run reaches: test prompts never repeat a training step's.
"""

from __future__ import annotations

import enum
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BatchShard", "draw_many", "normal", "normals", "Stream", "reference_stream", "seed_keys", "stream_key",
           "stream_keys"]


@enum.unique
class Stream(enum.IntEnum):
    """The named random streams of fold_in(PRNGKey(seed), stream). The values are the offsets below
    2**32 - 1 that the experiments used before the names, so every existing experiment key is unchanged."""

    TEST = 2**32 - 1  # the test prompts of the risk-curve figures (fig2, lowrank, lora, h3_weighting, RAG/TFA)
    DEPTH_TEST = 2**32 - 2  # pruning_depth: each network's test prompts
    TRAJECTORY_TEST = 2**32 - 3  # trajectory: the test prompts shared by every depth
    VALIDATION = 2**32 - 4  # pruning_search: the validation prompts that choose a pruning
    SEARCH_TEST = 2**32 - 5  # pruning_search: the test prompts that score the chosen pruning
    NULL = 2**32 - 6  # pruning_search: the prompts of the null (untuned) comparison
    ONE_LAYER_TEST = 2**32 - 7  # pruning_one_layer: the test prompts
    RECORD = 2**32 - 8  # training records: each point's fixed evaluation set (``records``)
    PRETRAINING = 2**32 - 9  # finite pretraining: each point's stored set of prompts (``TrainConfig.pretraining_prompts``)
    FINAL = 2**32 - 10  # dynamics_kq: each network's prompts for the final paired comparison with its PGD part
    REFERENCE = 2**32 - 12  # trajectory: the 1-step GD reference; L steps use REFERENCE - L + 1 (``reference_stream``)


# the most steps a reference stream may count down: far below REFERENCE, far above any training step index
MAX_REFERENCE_STEPS = 2**16


def reference_stream(steps: int) -> int:
    """The stream of the multi-step GD reference of ``steps`` steps (trajectory's theory line):
    TEST - 10 - steps = 2**32 - 11 - steps, as before the names (``Stream.REFERENCE`` is steps = 1)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_REFERENCE_STEPS:
        raise ValueError(f"steps must be an integer in [1, {MAX_REFERENCE_STEPS}], got {steps!r}")
    return int(Stream.REFERENCE) - int(steps) + 1


def seed_keys(seeds) -> np.ndarray:
    """jax.random.PRNGKey(s) for each seed, [len(seeds), 2] uint32, made on the host (threefry's seeding:
    the high and low words of the int64 seed), so no seeding program is compiled."""
    words = np.asarray(seeds, np.int64).astype(np.uint64)
    return np.stack([words >> np.uint64(32), words & np.uint64(0xFFFFFFFF)], axis=-1).astype(np.uint32)


def stream_keys(seeds: Sequence[int], stream: int = Stream.TEST) -> np.ndarray:
    """fold_in(PRNGKey(s), stream) for each seed s, [seeds, 2] uint32: each network's own prompt set in the
    named ``stream`` (a ``Stream``, or an integer in [0, 2**32 - 1])."""
    from iclsim import _validate as check

    seeds = check.seed_list("seeds", list(seeds) if isinstance(seeds, (list, tuple, np.ndarray)) else [seeds])
    stream = check.integer("stream", int(stream) if isinstance(stream, Stream) else stream, 0, 2**32 - 1)
    fold = jax.vmap(jax.random.fold_in, (0, None))  # keys made on the host as training makes them (any int64 seed)
    return np.asarray(fold(jnp.asarray(seed_keys(seeds)), np.uint32(stream)))


def stream_key(seed: int, stream: int = Stream.TEST) -> np.ndarray:
    """fold_in(PRNGKey(seed), stream), [2] uint32: one seed's key in the named ``stream``."""
    return stream_keys([seed], stream)[0]


class BatchShard(NamedTuple):
    """Inside ``shard_map`` over ``axis_name`` (``count`` devices), a draw of B rows is rows
    [i B, (i + 1) B), i = lax.axis_index(axis_name), of the same draw of B * count rows, with the
    same fresh keys on every device."""

    axis_name: str
    count: int


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k0, k1, x0, x1):
    """Threefry-2x32, 20 rounds (Salmon et al. 2011), bit for bit jax's threefry2x32 primitive, written
    out with constant rotations: the primitive's CPU lowering loops over its 5 blocks of 4 rounds with
    the rotations as loop-carried values, which XLA cannot turn into constant shifts."""
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
    Bartlett normals, the gamma proposals, the law's normals) would have its threefry rounds and
    inverse-erf polynomial recomputed in each; a loop's output is a buffer, computed once."""
    total = counters.shape[0]
    size = -(-total // chunks)
    pieces = jnp.concatenate([counters, counters[:chunks * size - total]]).reshape(chunks, size)

    def piece(j, out):
        values = _floats(key, pieces[j], j * size + jnp.arange(size), split, dtype)
        return jax.lax.dynamic_update_index_in_dim(out, values, j, 0)

    return jax.lax.fori_loop(0, chunks, piece, jnp.zeros((chunks, size), dtype)).reshape(-1)[:total]


def draw_many(key, dtype, normal_shapes=(), uniform_shapes=(), keys: int = 0, shard: BatchShard | None = None):
    """(normals, uniforms in (0, 1), keys): arrays of the given shapes and ``keys`` fresh keys, all
    from one threefry stream (bits to floats as jax.random.uniform does, normals by inversion as
    jax.random.normal does; the bits equal jax.random.bits(key) over the concatenated pieces).
    One flat draw, because XLA compiles every jax.random call inside a step as its own threefry
    kernel. With ``shard`` each piece is this device's rows of the piece drawn at the full batch."""
    dtype = jnp.dtype(dtype)
    finfo = jnp.finfo(dtype)
    uint = jnp.dtype(f"uint{finfo.bits}")
    shapes = (*normal_shapes, *uniform_shapes)
    sizes = [int(np.prod(s)) for s in shapes]
    total, split = sum(sizes), sum(sizes[:len(normal_shapes)])
    per_key = max(1, 64 // finfo.bits)  # words of one key (two uint32)
    counters = jnp.arange(total + keys * per_key, dtype=jnp.uint32)
    if shard is not None and shard.count > 1:  # piece p, local start s_p: rows [i B, (i + 1) B) of the full piece
        axis_name, shards = shard
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


def normal(key, shape, dtype) -> jax.Array:
    """``jax.random.normal(key, shape, dtype)``, bit for bit (partitionable threefry counts the flattened
    index), drawn as one flat vector and reshaped: XLA compiles a rank-1 threefry loop instead of one over
    every axis of ``shape`` (docs/performance.md §6: the compile of a Monte Carlo draw block)."""
    return jax.random.normal(key, (int(np.prod(shape)),), dtype).reshape(shape)


def normals(key, dtype, *shapes, shard: BatchShard | None = None):
    """Standard normals of several shapes from one flat draw (``draw_many``)."""
    return draw_many(key, dtype, shapes, shard=shard)[0]
