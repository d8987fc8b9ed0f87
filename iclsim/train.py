"""The compiled training engine: optax, a fresh batch of prompts every step, the step loop in
``jax.lax.scan``, and whole sweeps (designs x context lengths x seeds) vmapped into one program
whose sweep axis is split over ``jax.devices()`` (``jax.shard_map`` over a Mesh ("sweep", "batch");
spare devices split a seed block's batch, ``batch_shards``).

Points of one seed share their random stream (common random numbers), so the sweep is laid out
as seed blocks (``seed_blocks``): each block draws a step's prompts once for all its members, and
design settings equal across the sweep are passed once, so a single-design curve over n draws and
transforms its prompts once per step, not once per point.

Context lengths that differ share the largest n's slots: models that read the context only through
its Gram matrix train on ``GramPrompts`` drawn directly (``gram.sample_gram``, cost free of n);
the others on tokens drawn at the largest n and truncated (``truncate_context``). Either way one
compiled program trains a whole risk-vs-n curve.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from iclsim import _validate as v
from iclsim import cache as _cache
from iclsim import designs as _designs
from iclsim import gram as _gram
from iclsim.rng import BatchShard
from iclsim._precision import float64
from iclsim.designs import GramPrompts, Prompts
from iclsim.theory import _chunks, mean_and_se, risk_moments

SAMPLERS = ("auto", "gram", "tokens")
BATCH_AXIS = "batch"  # the mesh axis along which devices split a training batch


class TrainState(NamedTuple):
    params: Any
    opt_state: Any


class FitResult(NamedTuple):
    """params: leaves with leading sweep axes; losses: [..., steps] training loss per step."""

    params: Any
    losses: np.ndarray


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training settings: Adam with warmup-cosine decay by default (peak ``learning_rate``,
    final ``learning_rate * final_lr_fraction``)."""

    steps: int = 4000
    batch_size: int = 512
    learning_rate: float = 1e-2
    warmup_steps: int = 200
    final_lr_fraction: float = 1e-3
    dtype: Any = jnp.float32
    sampler: str = "auto"

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        v.positive_int("steps", self.steps)
        v.positive_int("batch_size", self.batch_size)
        v.positive_int("warmup_steps", self.warmup_steps, minimum=0)
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        v.in_range("final_lr_fraction", self.final_lr_fraction, 0.0, 1.0)

    def optimizer(self) -> optax.GradientTransformation:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, self.learning_rate, min(self.warmup_steps, self.steps - 1), self.steps,
            self.learning_rate * self.final_lr_fraction)
        return optax.adam(schedule)


def squared_loss(model, params, prompts: Prompts | GramPrompts) -> jax.Array:
    return jnp.mean((prompts.y_query - model.apply(params, prompts)) ** 2)


def uses_gram(model, designs, n_slots: int, sampler: str = "auto") -> bool:
    """Whether to draw Gram matrices rather than tokens. Exact where the model reads the context
    only through S and every design has a context law (tokens i.i.d. given the latent); "auto"
    then takes the draw with fewer normals: tokens cost n_slots (d + 1) per prompt, the Gram matrix
    about d (d + 1) / 2 + 3 (d + 1), so Gram from n_slots > d / 2 + 3 (measured on a 2-core CPU,
    tokens stay cheaper per step up to n = 15-20: README, Gram sampler). "tokens" forces tokens;
    "gram" forces Gram draws and raises where they would not be exact."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    design_list = _as_list(designs)
    able = getattr(model, "reads_gram", False) and all(getattr(d, "has_context_law", False) for d in design_list)
    if sampler == "gram" and not able:
        raise ValueError(f"sampler='gram' needs a model that reads only the context Gram matrix (LinearAttention, "
                         f"PGD, LoRA of them) and designs with i.i.d. pairs given the latent (IID with scalar "
                         f"noise, RAG, TaskFeatureAlignment, TaskPool); got {_short(model)}")
    if sampler == "auto":
        return able and n_slots > design_list[0].dim / 2 + 3
    return sampler == "gram"


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple, np.ndarray)) else [x]


def _train_one(model, config: TrainConfig, n_max: int, loss_fn: Callable, gram: bool, shards: int = 1):
    """A pure function (design, n, key) -> (params, losses) that trains one model. With ``shards``
    > 1 (inside shard_map over the axis "batch" of that size) each shard draws its rows of every
    step's batch (a ``rng.BatchShard`` passed to the draw) and the loss and gradients are averaged over
    the shards."""
    opt = config.optimizer()
    rows = config.batch_size // shards
    shard = BatchShard(BATCH_AXIS, shards) if shards > 1 else None

    def train(design, n, key):
        keys = jax.random.split(key, config.steps + 1)  # one split: the initialisation's key and each step's
        # Adam on one flat vector: a few kernels, not a few per leaf (0.15-0.2 s less XLA compile at d = 10)
        params, unravel = jax.flatten_util.ravel_pytree(model.init(keys[0]))
        state = TrainState(params, opt.init(params))

        def step(state, k):
            prompts = _gram.draw(design, k, rows, n, n_max, config.dtype, gram, shard)
            loss, grads = jax.value_and_grad(lambda p: loss_fn(model, unravel(p), prompts))(state.params)
            if shards > 1:  # one all-reduce per step
                both = jax.lax.pmean(jnp.concatenate([loss[None], grads]), BATCH_AXIS)
                loss, grads = both[0], both[1:]
            with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts with floats
                updates, opt_state = opt.update(grads, state.opt_state, state.params)
            ok = jnp.isfinite(loss)  # once non-finite, freeze so the first bad step is reported
            return TrainState(jnp.where(ok, state.params + updates, state.params), opt_state), loss

        state, losses = jax.lax.scan(step, state, keys[1:])
        return unravel(state.params), losses

    return train


def fit_sweep(model, designs, ns: Sequence[int], seeds: Sequence[int], config: TrainConfig = TrainConfig(),
              loss_fn: Callable = squared_loss, devices: Sequence | None = None,
              cache: _cache.SweepCache | None = None) -> FitResult:
    """Train one model per (design, n, seed) in one compiled, vmapped program.

    ``designs``: one design or a list of same-structure designs (stacked and vmapped);
    ``ns``: context lengths (sharing max(ns) slots); ``seeds``: integer seeds, each giving the
    initialisation and the data stream (shared across designs and ns, so curves use common random
    numbers). The flattened sweep axis is split over ``devices`` (default ``jax.devices()``).
    With a ``cache`` (default ``cache.current()``) finished points are loaded, not retrained, and
    the rest are trained ``cache.chunk`` points per call and stored. Returns params with leading
    axes [designs, ns, seeds] and losses [designs, ns, seeds, steps]. A non-finite loss raises
    FloatingPointError naming the model, design, n, seed and step.
    """
    with jax.enable_x64(True):  # integer types fixed whatever the caller's flag; floats stay config.dtype
        return _fit_sweep(model, designs, ns, seeds, config, loss_fn, devices, cache)


def _fit_sweep(model, designs, ns, seeds, config, loss_fn, devices, cache) -> FitResult:
    design_list, ns, seeds = _as_list(designs), [int(n) for n in _as_list(ns)], [int(s) for s in _as_list(seeds)]
    for n in ns:
        v.positive_int("n", n)
    n_max = max(ns)
    for d in design_list:
        _designs._check_n(d, n_max)
    gram = uses_gram(model, design_list, n_max, config.sampler)
    devices = tuple(jax.devices() if devices is None else devices)
    cache = _cache.current() if cache is None else cache
    points = [(i, j, k) for i in range(len(design_list)) for j in range(len(ns)) for k in range(len(seeds))]
    stacked = _designs.stack(design_list)

    def run(batch):
        idx = np.array([p[0] for p in batch])
        params, losses = _run_points(model, config, n_max, loss_fn, gram, devices,
                                     jax.tree_util.tree_map(lambda a: np.asarray(a)[idx], stacked),
                                     np.array([ns[p[1]] for p in batch]), np.array([seeds[p[2]] for p in batch]))
        _check_finite(losses, model, [(design_list[i], ns[j], seeds[k]) for i, j, k in batch])
        return params, losses

    if cache is None:
        params, losses = run(points)
    else:
        params, losses = _cached(cache, run, points, jax.eval_shape(model.init, seed_keys([0])[0]),
                                 lambda p: (model, design_list[p[0]], ns[p[1]], seeds[p[2]], n_max, config, loss_fn,
                                            gram))
    shape = (len(design_list), len(ns), len(seeds))
    params = jax.tree_util.tree_map(lambda a: jnp.reshape(a, shape + a.shape[1:]), params)
    return FitResult(params, np.reshape(losses, shape + losses.shape[1:]))


def _run_points(model, config, n_max, loss_fn, gram, devices, designs, ns, seeds):
    """Train a flat batch of sweep points: grouped into seed blocks (``seed_blocks``) whose members
    share one draw of prompts per step, the blocks split over the devices. Design settings equal at
    every point (say the covariance in a noise-level sweep) are passed once, unbatched, so what is
    computed from them alone (X = G L^T) is computed once per block too."""
    count = len(ns)
    shards = batch_shards(len(seed_blocks(seeds, 1)), len(devices), config.batch_size)
    layout = seed_blocks(seeds, len(devices) // shards)
    devices = devices[:len(layout) * shards]
    treedef, shared, varying, common = _split_design(designs)
    keys = seed_keys(seeds[layout[:, 0]])
    program = _compiled_sweep(model, config, n_max, loss_fn, gram, devices, treedef, shared, shards)
    params, losses = program([a[layout] for a in varying], common, jnp.asarray(ns[layout]), keys)
    if jax.process_count() > 1:  # multi-host (jax.distributed): every process gets the whole sweep
        from jax.experimental import multihost_utils
        params, losses = multihost_utils.process_allgather((params, losses), tiled=True)
    flat = layout.ravel()
    first = np.full(count, -1)
    first[flat[::-1]] = np.arange(flat.size)[::-1]  # first slot of each point (padding repeats points)
    return (jax.tree_util.tree_map(lambda a: np.asarray(a).reshape((-1,) + a.shape[2:])[first], params),
            np.asarray(losses).reshape((-1,) + losses.shape[2:])[first])


def seed_keys(seeds) -> np.ndarray:
    """jax.random.PRNGKey(s) for each seed, [len(seeds), 2] uint32, made on the host (threefry's
    seeding: the high and low words of the int64 seed): a cold fit compiles no seeding and stacking
    programs (0.1 s)."""
    words = np.asarray(seeds, np.int64).astype(np.uint64)
    return np.stack([words >> np.uint64(32), words & np.uint64(0xFFFFFFFF)], axis=-1).astype(np.uint32)


def _split_design(stacked):
    """(treedef, shared, varying, common): the leaves of stacked designs (one row per sweep point) that
    are equal in every row are ``shared`` and passed once, unbatched (``common``); the rest vary."""
    leaves, treedef = jax.tree_util.tree_flatten(stacked)
    leaves = [np.asarray(a) for a in leaves]
    shared = tuple(bool(np.all(a == a[:1])) for a in leaves)
    return (treedef, shared, [a for a, same in zip(leaves, shared) if not same],
            [a[0] for a, same in zip(leaves, shared) if same])


def _merge_design(treedef, shared, varying, common):
    varying, common = iter(varying), iter(common)
    return jax.tree_util.tree_unflatten(treedef, [next(common) if same else next(varying) for same in shared])


def _on_devices(batched: Callable, devices: tuple, split: tuple, shards: int = 1):
    """jit ``batched``; with several devices, shard the leading axis of the arguments flagged in
    ``split`` (the others are replicated) and of the outputs over the axis "sweep" of a Mesh
    [devices / shards, shards] (shard_map); along its axis "batch" the ``shards`` devices of a row
    hold the same sweep points and split their batches (``_train_one``), the only communication."""
    if len(devices) == 1:
        return jax.jit(batched)
    mesh = jax.sharding.Mesh(np.array(devices).reshape(-1, shards), ("sweep", BATCH_AXIS))
    spec, whole = jax.sharding.PartitionSpec("sweep"), jax.sharding.PartitionSpec()
    # check_vma off: parameters that start as constants (LoRA's B = 0) would otherwise need pcast to
    # become per-device; outputs are equal along "batch" (its pmean is the only collective)
    return jax.jit(jax.shard_map(batched, mesh=mesh, in_specs=tuple(spec if s else whole for s in split),
                                 out_specs=spec, check_vma=False))


def batch_shards(blocks: int, devices: int, batch_size: int) -> int:
    """Devices that split each seed block's batch: 1 when the blocks fill the devices; with fewer
    blocks (a single fit on a multi-core CPU or a few seeds on many GPUs) the spare devices share the
    blocks' batches, the largest count that divides the devices and the batch and leaves every block
    a device group."""
    return max(s for s in range(1, max(devices // blocks, 1) + 1) if devices % s == 0 and batch_size % s == 0)


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


def _cached(cache, run, points, template, settings):
    """Load the stored points, train the missing ones in balanced chunks, store them."""
    keys = [_cache.fingerprint(*settings(p)) for p in points]
    found = [cache.load(k, template) for k in keys]
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        size = -(-len(missing) // -(-len(missing) // cache.chunk))  # balanced chunks of at most cache.chunk
        for start in range(0, len(missing), size):
            part = missing[start:start + size]
            params, losses = run([points[i] for i in part])
            for row, i in enumerate(part):
                found[i] = (jax.tree_util.tree_map(lambda a: a[row], params), losses[row])
                cache.save(keys[i], *found[i])
    params = jax.tree_util.tree_map(lambda *a: np.stack(a), *[f[0] for f in found])
    return params, np.stack([f[1] for f in found])


@functools.lru_cache(maxsize=64)
def _compiled_sweep(model, config: TrainConfig, n_max: int, loss_fn: Callable, gram: bool, devices: tuple,
                    treedef, shared: tuple, shards: int = 1):
    """One jitted program per (model, config, n_max, loss, sampler, devices, which design leaves are
    shared) taking the varying design leaves and ns [blocks, members], the shared leaves, and keys
    [blocks]: designs, ns and seeds are arguments, so sweeps of the same size over other noise levels,
    context lengths or seeds never recompile. With several devices each trains its share of the
    blocks, ``shards`` devices per block splitting its batch (``batch_shards``)."""
    train = _train_one(model, config, n_max, loss_fn, gram, shards)

    def point(varying, common, n, key):
        return train(_merge_design(treedef, shared, varying, common), n, key)

    # blocks x members; the members of a block share its key, so one draw per step serves them all
    return _on_devices(_map(_map(point, (0, None, 0, None)), (0, None, 0, 0)), devices, (True, False, True, True),
                       shards)


def _map(f: Callable, in_axes: tuple) -> Callable:
    """``jax.vmap(f, in_axes)`` over the leading axis of the arguments whose entry is 0 (the others None),
    except that an axis of size 1 is squeezed and f traced once without batching: a single fit's
    blocks x members is 1 x 1, and tracing the batching rules cost 0.25 s of its 3.7 s cold start."""
    vmapped = jax.vmap(f, in_axes)

    def mapped(*args):
        sizes = {leaf.shape[0] for a, axis in zip(args, in_axes) if axis == 0 for leaf in jax.tree_util.tree_leaves(a)}
        if sizes != {1}:
            return vmapped(*args)
        out = f(*(a if axis is None else jax.tree_util.tree_map(lambda x: x[0], a) for a, axis in zip(args, in_axes)))
        return jax.tree_util.tree_map(lambda x: x[None], out)

    return mapped


def _check_finite(losses, model, points):
    bad = ~np.isfinite(losses)
    if bad.any():
        row, step = np.argwhere(bad)[0]
        design, n, seed = points[row]
        raise FloatingPointError(
            f"training diverged: non-finite loss at step {step} for model {_short(model)} on design "
            f"{_short(design)} with n = {n}, seed = {seed}; lower learning_rate")


def _short(obj) -> str:
    return " ".join(repr(obj).split())


def fit(model, design, n: int, steps: int = 4000, batch_size: int = 512, learning_rate: float = 1e-2,
        seed: int = 0, **config) -> FitResult:
    """Train one model (see ``fit_sweep``); params and losses without sweep axes."""
    cfg = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, **config)
    result = fit_sweep(model, design, [n], [seed], cfg)
    return FitResult(jax.tree_util.tree_map(lambda a: a[0, 0, 0], result.params), result.losses[0, 0, 0])


@float64
def evaluate_sweep(model, params, designs, ns: Sequence[int], key, num_prompts: int = 100_000,
                   batch_size: int = 10_000, sampler: str = "auto", devices: Sequence | None = None):
    """Test risk on fresh prompts of every model of a sweep: (risk, se), each [designs, ns, seeds].
    All models see the same prompts (common random numbers); Gram draws where ``uses_gram``. The
    (design, n) pairs are split over ``devices`` (default ``jax.devices()``); the seeds of a pair
    share its prompts, and where pairs are fewer than devices (one pair: a pruning grid) a pair's
    seeds are split into groups that draw the same prompts on different devices."""
    design_list, ns = _as_list(designs), [int(n) for n in _as_list(ns)]
    n_max = max(ns)
    chunks, batch = _chunks(num_prompts, batch_size)
    gram = uses_gram(model, design_list, n_max, sampler)
    count, num_seeds = len(design_list) * len(ns), jax.tree_util.tree_leaves(params)[0].shape[2]
    devices = tuple(jax.devices() if devices is None else devices)
    groups = max(1, min(num_seeds, len(devices) // count))  # seed groups per pair
    per_group = -(-num_seeds // groups)
    entries = count * groups
    devices = devices[:entries]
    entry = np.arange(entries + (-entries) % len(devices)).clip(max=entries - 1)  # padded by the last entry
    pair, group = np.divmod(entry, groups)
    di, nj = np.divmod(pair, len(ns))
    seed_index = np.arange(groups * per_group).clip(max=num_seeds - 1).reshape(groups, per_group)[group]
    treedef, shared, varying, common = _split_design(
        jax.tree_util.tree_map(lambda a: np.asarray(a)[di], _designs.stack(design_list)))
    program = _compiled_evaluation(model, n_max, chunks, batch, gram, devices, treedef, shared)
    total, total_sq = program(jax.tree_util.tree_map(lambda a: a[di[:, None], nj[:, None], seed_index], params),
                              varying, common, jnp.asarray(np.asarray(ns)[nj]), key)

    def per_point(a):  # [entries, per_group] -> [pairs, seeds]
        return np.asarray(a)[:entries].reshape(count, groups * per_group)[:, :num_seeds]

    mean, se = mean_and_se(per_point(total), per_point(total_sq), chunks * batch)
    shape = (len(design_list), len(ns), num_seeds)
    return np.reshape(mean, shape), np.reshape(se, shape)


@functools.lru_cache(maxsize=64)
def _compiled_evaluation(model, n_max: int, chunks: int, batch: int, gram: bool, devices: tuple, treedef,
                         shared: tuple):
    def seeds(p, varying, common, n, key):
        design = _merge_design(treedef, shared, varying, common)
        return jax.vmap(lambda q: risk_moments(lambda pr: model.apply(q, pr), design, n_max, n, key, chunks, batch,
                                               model.dtype, gram))(p)

    return _on_devices(jax.vmap(seeds, (0, 0, None, 0, None)), devices, (True, True, False, True, False))


def evaluate(model, params, design, n: int, key, num_prompts: int = 100_000, batch_size: int = 10_000,
             sampler: str = "auto"):
    """Test risk (mean, standard error) of one trained model on num_prompts fresh prompts."""
    expanded = jax.tree_util.tree_map(lambda a: a[None, None, None], params)
    mean, se = evaluate_sweep(model, expanded, design, [n], key, num_prompts, batch_size, sampler)
    return float(mean[0, 0, 0]), float(se[0, 0, 0])
