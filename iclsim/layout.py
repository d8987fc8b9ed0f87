"""How a sweep of independent points (design, n, seed) is laid out on devices, shared by training
(``train``) and evaluation (``evaluate``).

Points that use the same random stream (training: one seed; evaluation: every point under one key,
common random numbers, or the points of one seed under a key per seed) are grouped into blocks
(``seed_blocks``): a block draws its prompts once and each member (design, n, parameters) transforms
them. A compiled program maps a per-point function over [blocks, members] (``blocked``); with several
devices the blocks are split over the axis "sweep" of a Mesh (``jax.shard_map``), and spare devices
split each block's batch along the axis "batch" (``batch_shards``). Design settings equal at every point
are passed once, unbatched (``split_design``), so what is computed from them alone is computed once per
block.
"""

from __future__ import annotations

import functools
import gc
from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np

__all__ = ["BATCH_AXIS", "Layout", "plan", "seed_blocks", "batch_shards", "DesignSplit",
           "split_design", "merge_design", "blocked", "gather", "load_or_run", "as_list"]

BATCH_AXIS = "batch"  # the mesh axis along which devices split a block's batch
MEMBER, BLOCK = "member", "block"  # how an argument of a per-point function is laid out (``blocked``)


class Layout(NamedTuple):
    """blocks: point indices [blocks, members] (padded by repeating points); shards: devices that
    split each block's batch; devices: the devices used, [blocks per row of the mesh x shards]."""

    blocks: np.ndarray
    shards: int
    devices: tuple


def plan(streams, devices: Sequence, batch_size: int | None = None) -> Layout:
    """The layout of points whose random streams are ``streams`` (one integer per point: points with
    the same stream share a block). With ``batch_size`` spare devices split each block's batch
    (``batch_shards``); without, each block runs on one device."""
    devices = tuple(devices)
    shards = 1 if batch_size is None else batch_shards(len(seed_blocks(streams, 1)), len(devices), batch_size)
    blocks = seed_blocks(streams, len(devices) // shards)
    return Layout(blocks, shards, devices[:len(blocks) * shards])


def seed_blocks(seeds, devices: int) -> np.ndarray:
    """Indices [blocks, members] of sweep points grouped so that each block holds points of one seed.

    Points of one seed see the same random stream (common random numbers), so a block draws each
    step's prompts once and transforms them per member (design, n): a noise-level x n sweep draws
    1 / members of the randomness of training its points apart. Blocks are padded (repeating a point)
    to equal size and their count to a multiple of ``devices``; the block size minimises the work of the
    busiest device, (blocks per device) x (members + 1), counting a block's shared draw as one member.
    """
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(seeds):
        groups.setdefault(int(s), []).append(i)
    largest = max(len(g) for g in groups.values())

    def layout(size):
        count = sum(-(-len(g) // size) for g in groups.values())
        return size, -(-count // devices) * devices

    size, count = min((layout(-(-largest // parts)) for parts in range(1, largest + 1)),
                      key=lambda lc: (lc[1] // devices * (lc[0] + 1), lc[1]))
    rows = []
    for g in groups.values():
        for start in range(0, len(g), size):
            part = g[start:start + size]
            rows.append(part + [part[-1]] * (size - len(part)))
    rows += [rows[-1]] * (count - len(rows))
    return np.array(rows, dtype=int)


def batch_shards(blocks: int, devices: int, batch_size: int) -> int:
    """Devices that split each seed block's batch: 1 when the blocks fill the devices; with fewer
    blocks (a single fit on a multi-core CPU or a few seeds on many GPUs) the spare devices share the
    blocks' batches, the largest count that divides the devices and the batch and leaves every block
    a device group."""
    return max(s for s in range(1, max(devices // blocks, 1) + 1) if devices % s == 0 and batch_size % s == 0)


class DesignSplit(NamedTuple):
    """The leaves of stacked designs (one row per point): ``shared`` flags the leaves equal in every
    row, passed once (``common``, unbatched); the others are ``varying``."""

    treedef: object
    shared: tuple
    varying: list
    common: list


def split_design(stacked) -> DesignSplit:
    """The ``DesignSplit`` of stacked designs (one row per sweep point): leaves equal in every row are passed
    once, unbatched, so a sweep whose points share a covariance does not copy it per point."""
    leaves, treedef = jax.tree_util.tree_flatten(stacked)
    leaves = [np.asarray(a) for a in leaves]
    shared = tuple(bool(np.all(a == a[:1])) for a in leaves)
    return DesignSplit(treedef, shared, [a for a, same in zip(leaves, shared) if not same],
                       [a[0] for a, same in zip(leaves, shared) if same])


def merge_design(treedef, shared, varying, common):
    """The design of one point from its varying leaves and the common ones (inverse of ``split_design``)."""
    varying, common = iter(varying), iter(common)
    return jax.tree_util.tree_unflatten(treedef, [next(common) if same else next(varying) for same in shared])


def blocked(point: Callable, kinds: tuple, devices: tuple, shards: int = 1, compiler_options: dict | None = None
            ) -> Callable:
    """A jitted program mapping ``point`` over [blocks, members]. ``kinds`` gives each argument's
    layout: ``MEMBER`` (leading axes [blocks, members]), ``BLOCK`` (leading axis [blocks], shared by a
    block's members: its key) or None (the same for every point). With several devices the blocks are
    split over the Mesh [devices / shards, shards] ("sweep", "batch"); along "batch" the ``shards``
    devices of a row hold the same points and split their batches (the point's own collective).
    ``compiler_options`` go to ``jax.jit`` (XLA flags for this program alone)."""
    members = _map(point, tuple(0 if k == MEMBER else None for k in kinds))
    program = _map(members, tuple(None if k is None else 0 for k in kinds))
    if len(devices) == 1:
        return _gc_paused(jax.jit(program, compiler_options=compiler_options))
    mesh = jax.sharding.Mesh(np.array(devices).reshape(-1, shards), ("sweep", BATCH_AXIS))
    spec, whole = jax.sharding.PartitionSpec("sweep"), jax.sharding.PartitionSpec()
    # check_vma off: parameters that start as constants (LoRA's B = 0) would otherwise need pcast to
    # become per-device; outputs are equal along "batch" (its pmean is the only collective)
    in_specs = tuple(whole if k is None else spec for k in kinds)
    sharded = jax.shard_map(program, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)
    return _gc_paused(jax.jit(sharded, compiler_options=compiler_options))


def _gc_paused(program: Callable) -> Callable:
    """``program`` called with Python's cyclic garbage collector paused, and resumed after (left alone if
    the caller had it off). Tracing and lowering a program allocate many short-lived objects, and the
    collections they trigger walk every object of the process (hundreds of thousands once JAX is
    imported): part of a cold fit's time (docs/performance.md §2.11). Nothing is lost: cyclic garbage
    made meanwhile is collected by the next collection after the call. The setting is process-wide, so
    threads calling programs at once may see the collector paused for each other's calls. The jitted
    function (its ``lower``, ``trace``) is ``__wrapped__``."""

    @functools.wraps(program)
    def call(*args):
        if not gc.isenabled():
            return program(*args)
        gc.disable()
        try:
            return program(*args)
        finally:
            gc.enable()

    return call


def gather(outputs, layout: Layout, count: int):
    """Per-point outputs [count, ...] as numpy from a program's [blocks, members, ...] outputs (the
    first slot of each point; padding repeats points). Multi-host: every process gets the whole sweep."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        outputs = multihost_utils.process_allgather(outputs, tiled=True)
    flat = layout.blocks.ravel()
    first = np.full(count, -1)
    first[flat[::-1]] = np.arange(flat.size)[::-1]
    return jax.tree_util.tree_map(lambda a: np.asarray(a).reshape((-1,) + a.shape[2:])[first], outputs)


def load_or_run(cache, run: Callable, points: list, template, settings: Callable):
    """Load the stored points of a sweep cache (a ``cache.SweepCache``, passed explicitly by the caller),
    run the missing ones in balanced chunks of at most ``cache.chunk`` points, store them.
    ``run(points) -> (params, losses)``; ``settings(point)`` is what keys a point (``cache.key``).
    Each chunk is trained under the cache's claim on its points (``SweepCache.claim``), so a process that
    needs points another is training waits for them and loads them; one chunk's claims at a time, taken in
    sorted order, so two processes cannot deadlock. ``run`` must not call back into a sweep of the same cache
    (a claim is not re-entrant). The engine never imports the cache: it only calls the object it is handed."""
    keys = [cache.key(*settings(p)) for p in points]
    found = [cache.load(k, template) for k in keys]
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        size = -(-len(missing) // -(-len(missing) // cache.chunk))
        for start in range(0, len(missing), size):
            part = missing[start:start + size]
            with cache.claim([keys[i] for i in part]):  # another process training these: wait, then load them
                for i in part:
                    found[i] = cache.load_after_claim(keys[i], template)
                part = [i for i in part if found[i] is None]
                if part:
                    params, losses = run([points[i] for i in part])
                    for row, i in enumerate(part):
                        found[i] = (jax.tree_util.tree_map(lambda a: a[row], params), losses[row])
                        cache.save(keys[i], *found[i])
    params = jax.tree_util.tree_map(lambda *a: np.stack(a), *[f[0] for f in found])
    return params, np.stack([f[1] for f in found])


def as_list(x) -> list:
    """``x`` as a list: a list, tuple or array element by element, anything else (one design, one n) alone."""
    return list(x) if isinstance(x, (list, tuple, np.ndarray)) else [x]


def _map(f: Callable, in_axes: tuple) -> Callable:
    """``jax.vmap(f, in_axes)`` over the leading axis of the arguments whose entry is 0 (the others None),
    except that an axis of size 1 is squeezed and f traced once without batching: a single fit's
    blocks x members is 1 x 1, and tracing batching rules for it would be compile work for nothing."""
    vmapped = jax.vmap(f, in_axes)

    def mapped(*args):
        sizes = {leaf.shape[0] for a, axis in zip(args, in_axes) if axis == 0 for leaf in jax.tree_util.tree_leaves(a)}
        if sizes != {1}:
            return vmapped(*args)
        out = f(*(a if axis is None else jax.tree_util.tree_map(lambda x: x[0], a) for a, axis in zip(args, in_axes)))
        return jax.tree_util.tree_map(lambda x: x[None], out)

    return mapped
