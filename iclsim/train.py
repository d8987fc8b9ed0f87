"""The training engine: one model per sweep point (design, n, seed), trained with optax on a fresh
batch of prompts every step (or on a stored set of ``TrainConfig.pretraining_prompts`` prompts), the
step loop in ``jax.lax.scan``, the whole sweep one compiled program.

    fitted = fit_sweep(LinearAttention(d), [IID(d, noise_var=s) for s in noises], ns, seeds, config)
    fitted.params   # leaves [designs, ns, seeds, ...]
    fitted.losses   # [designs, ns, seeds, steps]

Points of one seed share their random stream (common random numbers); context lengths that differ
share the largest n's slots (tokens truncated to the last n, or Gram matrices drawn directly for
models that read only the context Gram matrix: ``gram.uses_gram``). How the points are laid out on
devices is ``layout``'s business; test risk is ``evaluate``'s. One point's training is the public pure
function ``make_train`` (jit, vmap or scan it yourself); ``fit_sweep`` maps it over the sweep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from iclsim import _validate as check
from iclsim import compiler, layout, loop, protocols, rng
from iclsim import progress as _progress
from iclsim.designs import GramPrompts, Prompts, _check_n, stack
from iclsim.gram import SAMPLERS, uses_gram
from iclsim.layout import BLOCK, MEMBER
from iclsim.records import Record

if TYPE_CHECKING:  # the engine never imports the cache: it calls the object it is handed
    from iclsim.cache import SweepCache

__all__ = ["TrainConfig", "FitResult", "Record", "make_train", "fit", "fit_sweep", "squared_loss", "uses_gram",
           "SAMPLERS"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training settings.

    optimizer: None for Adam on the warmup-cosine schedule (linear warmup over ``warmup_steps`` to
    ``learning_rate``, cosine decay to ``learning_rate * final_lr_fraction`` at ``steps``); "sgd" for plain
    gradient descent, ``optax.sgd(learning_rate)`` at a constant learning rate (no warmup, no decay): the
    Euler discretisation, step ``learning_rate``, of the gradient flow d theta / dt = -grad L(theta) that
    theories of the training dynamics describe (full-batch when ``batch_size == pretraining_prompts``, else
    its stochastic version; with ``momentum``, heavy ball); any ``optax.GradientTransformation`` (used as
    given; the schedule fields are then unused); or a function schedule -> GradientTransformation (say ``lambda s: optax.chain(
    optax.clip_by_global_norm(1.0), optax.adamw(s, weight_decay=1e-4))``), given the warmup-cosine schedule.
    momentum: with optimizer "sgd", Polyak's heavy ball ``optax.sgd(learning_rate, momentum=momentum)``,
    v <- g + momentum v, theta <- theta - learning_rate v, i.e. theta_{t+1} = theta_t - learning_rate g_t +
    momentum (theta_t - theta_{t-1}): on a quadratic with Hessian eigenvalues in [mu, L], learning_rate =
    4 / (sqrt(L) + sqrt(mu))^2 and momentum = ((sqrt(L) - sqrt(mu)) / (sqrt(L) + sqrt(mu)))^2 contract at
    (sqrt(k) - 1) / (sqrt(k) + 1) per step (k = L / mu) instead of plain GD's (k - 1) / (k + 1), to the same
    minimiser (docs/theory.md §12). In [0, 1); 0 (the default) is plain gradient descent, the very
    transformation ``optax.sgd(learning_rate)``; > 0 only with optimizer "sgd".
    divergence_factor: training stops with FloatingPointError when a step's loss exceeds this
    multiple of the point's initial loss (for iclsim's small initialisations, about the risk of the
    zero predictor) or is not finite; None checks only finiteness.
    sampler: "auto", "gram" or "tokens" (``gram.uses_gram``).
    dtype: must equal model.dtype, the one dtype prompts are drawn in (``fit_sweep`` raises ValueError otherwise).
    record_every / record_steps (at most one): record the course of training (``records``, ``FitResult.record``)
    at steps 0, K, 2K, ... and ``steps`` (record_every = K), or at the given increasing steps in [0, steps]
    (step s: the parameters after s updates); None records nothing. record_prompts: the size of each point's
    fixed evaluation set the recorded loss is measured on; None (the default) takes batch_size
    (``recorded_prompts``): a record is one forward pass over as many prompts as a training step sees, so
    recording costs a fixed fraction of a run whatever the batch (docs/performance.md §2.13). The set's Monte
    Carlo error (a relative SE of about sqrt(2 / record_prompts) of the loss for Gaussian residuals: 6% at
    512) is an offset that moves slowly with the parameters, not noise from step to step (the same prompts
    at every step), so the curve stays smooth; pass more prompts where the level itself is compared.
    summarize: None, or a function params -> pytree
    of arrays recorded beside the loss (``records.preconditioner_spectrum``, ``records.layer_step_sizes``).
    pretraining_prompts: None trains on fresh prompts every step (infinite pretraining data); P trains on
    one stored set of P prompts per point, drawn once from fold_in(PRNGKey(seed), ``rng.Stream.PRETRAINING``)
    (finite pretraining data, Lu et al. 2025): epochs of floor(P / batch_size) steps, each epoch a fresh
    permutation of the set (from the key of its first step) cut into batches (the last P mod batch_size
    of a permutation unused that epoch); with P == batch_size every step is the full set, in its stored
    order (full-batch training).
    """

    steps: int = 4000
    batch_size: int = 512
    learning_rate: float = 1e-2
    warmup_steps: int = 200
    final_lr_fraction: float = 1e-3
    dtype: Any = jnp.float32
    sampler: str = "auto"
    optimizer: Any = None
    divergence_factor: float | None = 1e6
    record_every: int | None = None
    record_steps: tuple | None = None
    record_prompts: int | None = None
    summarize: Callable | None = None
    pretraining_prompts: int | None = None
    momentum: float = 0.0

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        check.positive_int("steps", self.steps)
        check.positive_int("batch_size", self.batch_size)
        check.positive_int("warmup_steps", self.warmup_steps, minimum=0)
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating, np.integer)) or not 0 < lr < np.inf:
            raise ValueError(f"learning_rate must be > 0 and finite (a number, not a bool), got {lr!r}")
        check.float_dtype("dtype", self.dtype)
        check.in_range("final_lr_fraction", self.final_lr_fraction, 0.0, 1.0)
        if self.divergence_factor is not None and not (np.isfinite(self.divergence_factor)
                                                       and self.divergence_factor > 1):
            raise ValueError(f"divergence_factor must be a finite number > 1 or None, got {self.divergence_factor!r}")
        if isinstance(self.optimizer, str):
            if self.optimizer not in OPTIMIZERS:
                raise ValueError(f"optimizer must be None, one of {OPTIMIZERS}, an optax.GradientTransformation or a "
                                 f"function schedule -> GradientTransformation, got {self.optimizer!r}")
        elif not (self.optimizer is None or isinstance(self.optimizer, optax.GradientTransformation)
                  or callable(self.optimizer)):
            raise TypeError(f"optimizer must be None, one of {OPTIMIZERS}, an optax.GradientTransformation or a "
                            f"function schedule -> GradientTransformation, got {type(self.optimizer).__name__}")
        object.__setattr__(self, "momentum", check.in_range("momentum", self.momentum, 0.0, 1.0, closed_high=False))
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(f"momentum > 0 (heavy ball) needs optimizer='sgd', got momentum = {self.momentum!r} with "
                             f"optimizer = {self.optimizer!r}")
        self._check_records()
        if self.pretraining_prompts is not None:
            P = check.positive_int("pretraining_prompts", self.pretraining_prompts)
            if self.batch_size > P:
                raise ValueError(f"batch_size must be <= pretraining_prompts = {P} (a batch is drawn from the stored "
                                 f"set; batch_size = pretraining_prompts is full-batch training), got {self.batch_size}")

    def _check_records(self):
        if self.record_prompts is not None:
            check.positive_int("record_prompts", self.record_prompts)
        if self.record_every is not None and self.record_steps is not None:
            raise ValueError("give at most one of record_every and record_steps")
        if self.record_every is not None:
            check.integer("record_every", self.record_every, 1, self.steps)
        if self.record_steps is not None:
            if isinstance(self.record_steps, (str, bytes)) or not hasattr(self.record_steps, "__len__"):
                raise TypeError(f"record_steps must be a sequence of integers, got {type(self.record_steps).__name__}")
            steps = tuple(check.integer("record_steps[]", s, 0, self.steps) for s in self.record_steps)
            if not steps or any(b <= a for a, b in zip(steps, steps[1:])):
                raise ValueError(f"record_steps must be non-empty and strictly increasing in [0, steps = {self.steps}], "
                                 f"got {self.record_steps!r}")
            object.__setattr__(self, "record_steps", steps)  # hashable, and one form in the cache key
        if self.summarize is not None:
            if not callable(self.summarize):
                raise TypeError(f"summarize must be None or a function params -> pytree of arrays, got "
                                f"{type(self.summarize).__name__}")
            if self.recorded_steps() is None:
                raise ValueError("summarize needs record_every or record_steps (the steps to record at)")

    def recorded_prompts(self) -> int:
        """The size of each point's record evaluation set: ``record_prompts``, or batch_size where it is None."""
        return self.batch_size if self.record_prompts is None else self.record_prompts

    def recorded_steps(self) -> tuple | None:
        """The recorded steps, increasing in [0, steps] (see ``record_every``, ``record_steps``); None when off."""
        if self.record_steps is not None:
            return self.record_steps
        if self.record_every is None:
            return None
        return tuple(range(0, self.steps, self.record_every)) + (self.steps,)

    def schedule(self) -> optax.Schedule:
        """The warmup-cosine learning-rate schedule."""
        return optax.warmup_cosine_decay_schedule(
            0.0, self.learning_rate, min(self.warmup_steps, self.steps - 1), self.steps,
            self.learning_rate * self.final_lr_fraction)

    def transformation(self) -> optax.GradientTransformation:
        """The optax transformation training uses (see ``optimizer``)."""
        if self.optimizer is None:
            return optax.adam(self.schedule())
        if self.optimizer == "sgd":
            return optax.sgd(self.learning_rate, momentum=self.momentum or None)  # 0: plain GD, optax.sgd(lr)
        if isinstance(self.optimizer, optax.GradientTransformation):
            return self.optimizer
        made = self.optimizer(self.schedule())
        if not isinstance(made, optax.GradientTransformation):
            raise TypeError(f"optimizer(schedule) must return an optax.GradientTransformation, got "
                            f"{type(made).__name__}")
        return made


OPTIMIZERS = ("sgd",)  # the optimizers named by a string (None: Adam on the warmup-cosine schedule)


class FitResult(NamedTuple):
    """params: leaves with leading sweep axes; losses: [..., steps] training (batch) loss per step; record: a
    ``Record`` (steps [R], loss [..., R], summaries [..., R, ...]) where ``TrainConfig`` records, else None."""

    params: Any
    losses: Any
    record: Record | None = None


def squared_loss(model, params, prompts: Prompts | GramPrompts) -> jax.Array:
    """Mean of (y - model(prompts))^2 over the batch; predictions must be [B] (``_validate.predictions``)."""
    pred = check.predictions(protocols.predict(model, params, prompts), prompts.y_query, "training loss")
    return jnp.mean((prompts.y_query - pred) ** 2)


def make_train(model, config: TrainConfig, n_slots: int, loss_fn: Callable = squared_loss) -> Callable:
    """One point's training as a pure function (key, design, n) -> FitResult(params, losses [steps], record):
    the kernel ``fit_sweep`` maps over a sweep, for users to jit, vmap or scan themselves.

    ``key``: the point's PRNGKey(seed) ([2] uint32), split into the initialisation's key and one per step
    (the stored set of ``pretraining_prompts`` and the record's evaluation set come from its named streams
    ``rng.Stream.PRETRAINING`` and ``RECORD``); ``design``: one design (its leaves may be traced); ``n``: the
    active context pairs (may be traced), prompts padded to ``n_slots`` slots (static: the sweep's max(ns)).
    Gram draws where ``gram.uses_gram(model, design, n_slots, config.sampler)``. No divergence check (that
    is ``fit_sweep``'s, on the host). ``jax.vmap(make_train(...))`` over keys, stacked designs and ns gives
    ``fit_sweep``'s numbers when traced with float64 on (``with jax.enable_x64(True):``, as ``fit_sweep``
    traces it: integer types are then 64-bit); traced with it off, the same prompts and steps give numbers
    that differ at float32 rounding (the optimizer's step counts are int32)."""
    check.positive_int("n_slots", n_slots)
    if jnp.dtype(config.dtype) != jnp.dtype(getattr(model, "dtype", config.dtype)):
        raise ValueError(f"TrainConfig.dtype ({jnp.dtype(config.dtype)}) must equal model.dtype "
                         f"({jnp.dtype(model.dtype)}): model.dtype is the one dtype prompts are drawn in")

    def train(key, design, n) -> FitResult:
        gram = uses_gram(model, design, n_slots, config.sampler)
        return FitResult(*loop.trainer(model, config, n_slots, loss_fn, gram)(design, n, key))

    return train


def fit(model, design, n: int, steps: int = 4000, batch_size: int = 512, learning_rate: float = 1e-2,
        seed: int = 0, **config) -> FitResult:
    """Train one model (see ``fit_sweep``); params, losses and record without sweep axes."""
    if isinstance(design, (list, tuple)):
        raise TypeError(f"fit trains one model on one design, got a {type(design).__name__} of "
                        f"{len(design)}: use fit_sweep for several designs")
    cfg = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, **config)
    seed = check.integer("seed", seed, check.SEED_MIN, check.SEED_MAX)
    result = fit_sweep(model, design, [check.positive_int("n", n)], [seed], cfg)
    first = functools.partial(jax.tree_util.tree_map, lambda a: a[0, 0, 0])
    record = None if result.record is None else result.record._replace(
        loss=result.record.loss[0, 0, 0], summaries=first(result.record.summaries))
    return FitResult(first(result.params), result.losses[0, 0, 0], record)


def fit_sweep(model, designs, ns: Sequence[int], seeds: Sequence[int], config: TrainConfig = TrainConfig(),
              loss_fn: Callable = squared_loss, devices: Sequence | None = None,
              cache: SweepCache | None = None, progress: Callable | None = None) -> FitResult:
    """Train one model per (design, n, seed) in one compiled, vmapped program.

    ``designs``: one design or a list of same-structure designs (stacked and vmapped);
    ``ns``: context lengths (sharing max(ns) slots); ``seeds``: integer seeds, each giving the
    initialisation and the data stream (shared across designs and ns, so curves use common random
    numbers). The sweep is split over ``devices`` (default ``jax.devices()``, ``layout``).
    With a ``cache`` (a ``cache.SweepCache``; default none) finished points are loaded, not retrained, and
    the rest are trained ``cache.chunk`` points per call and stored. Returns params with leading
    axes [designs, ns, seeds], losses [designs, ns, seeds, steps] and, where ``config`` records, a
    ``Record`` (steps [R], loss [designs, ns, seeds, R], summaries [designs, ns, seeds, R, ...]). Each point
    computes ``make_train(model, config, max(ns), loss_fn)(PRNGKey(seed), design, n)``. A non-finite loss,
    or one above ``config.divergence_factor`` times the initial loss, raises FloatingPointError naming the
    model, design, n, seed and step. ``progress``: None (silent) or a function called with
    ``progress.Progress(done, total, elapsed, remaining)`` as points finish (``progress.printer()`` prints
    them); the numbers are the same with or without it.
    """
    with jax.enable_x64(True):  # integer types fixed whatever the caller's flag; floats stay config.dtype
        return _fit_sweep(model, designs, ns, seeds, config, loss_fn, devices, cache, progress)


def _fit_sweep(model, designs, ns, seeds, config, loss_fn, devices, cache, report=None) -> FitResult:
    design_list = layout.as_list(designs)
    ns, seeds = check.context_lengths(layout.as_list(ns)), check.seed_list("seeds", layout.as_list(seeds))
    protocols.check_sweep(model, design_list, "fit_sweep", config.dtype)  # the door; model.dtype is the one dtype
    n_slots = max(ns)
    for d in design_list:
        _check_n(d, n_slots)
    gram = uses_gram(model, design_list, n_slots, config.sampler)
    check.padding(model, ns, gram, "fit_sweep")
    devices = tuple(jax.devices() if devices is None else devices)
    if cache is not None and isinstance(config.optimizer, optax.GradientTransformation):
        warnings.warn("the sweep cache cannot fingerprint an optax GradientTransformation object (its settings live "
                      "in closures): training without the cache; pass a module-level function schedule -> "
                      "GradientTransformation as TrainConfig.optimizer to cache it", stacklevel=3)
        cache = None
    points = [(i, j, k) for i in range(len(design_list)) for j in range(len(ns)) for k in range(len(seeds))]
    _fits(model, config, len(points), n_slots, design_list[0].dim, cache)
    stacked = stack(design_list)
    # a single fit's program gets ``compiler.SMALL_PROGRAM_OPTIONS``: decided by the sweep, not by how many of its points
    # a cache left to train, so a point's numbers are those its key names
    small = len(points) == 1
    recording = config.recorded_steps() is not None
    tracker = None if report is None else _progress.Tracker(report, len(points))
    every = None if report is None else max(1, config.steps // _progress.REPORTS)

    def run(batch):  # -> (what a cache entry holds: params, or params and the record's arrays; losses)
        idx = np.array([p[0] for p in batch])
        with contextlib.nullcontext() if tracker is None else tracker.chunk(len(batch)):
            out = _run_points(model, config, n_slots, loss_fn, gram, devices,
                              jax.tree_util.tree_map(lambda a: np.asarray(a)[idx], stacked),
                              np.array([ns[p[1]] for p in batch]), np.array([seeds[p[2]] for p in batch]), small,
                              every)
        where = [(design_list[i], ns[j], seeds[k]) for i, j, k in batch]
        _check_losses(out.losses, config.divergence_factor, model, where)
        _check_params(out.params, model, where)
        return ({"params": out.params, "record": out.record[1:]} if recording else out.params), out.losses

    if cache is None:
        payload, losses = run(points)
    else:
        # the key: what every point shares (the model, settings, loss, the engine's code and the XLA options
        # its programs get) hashed once, then each point's design, n and seed
        shared = (model, n_slots, config, loss_fn, gram, _fit_sweep, compiler.training_options(small, devices))
        template = jax.eval_shape(model.init, rng.seed_keys([0])[0])
        if recording:
            out = jax.eval_shape(make_train(model, config, n_slots, loss_fn), rng.seed_keys([0])[0],
                                 design_list[0], n_slots)
            template = {"params": out.params, "record": out.record[1:]}
        payload, losses = layout.load_or_run(
            cache, run, points, template, lambda p: (*shared, design_list[p[0]], ns[p[1]], seeds[p[2]]))
    if tracker is not None:
        tracker.finish()
    shape = (len(design_list), len(ns), len(seeds))
    unflat = functools.partial(jax.tree_util.tree_map, lambda a: np.reshape(a, shape + np.shape(a)[1:]))
    params, record = (payload["params"], payload["record"]) if recording else (payload, None)
    if record is not None:
        record = Record(np.asarray(config.recorded_steps()), *unflat(tuple(record)))
    params = jax.tree_util.tree_map(lambda a: jnp.reshape(a, shape + a.shape[1:]), params)
    return FitResult(params, np.reshape(losses, shape + losses.shape[1:]), record)


def _run_points(model, config, n_slots, loss_fn, gram, devices, designs, ns, seeds, small=None,
                report_every=None) -> FitResult:
    """Train a flat batch of sweep points laid out in seed blocks (``layout.plan``): FitResult with leading
    axis [points]; ``small``: compile with ``compiler.SMALL_PROGRAM_OPTIONS`` (default: where the batch is one
    point); ``report_every``: the program reports its steps to ``progress`` (``loop.trainer``)."""
    plan = layout.plan(seeds, devices, config.batch_size)
    split = layout.split_design(designs)
    keys = rng.seed_keys(seeds[plan.blocks[:, 0]])
    one_point = len(np.unique(plan.blocks)) == 1 if small is None else bool(small)  # a single fit
    program = _compiled_sweep(model, config, n_slots, loss_fn, gram, plan.devices, split.treedef, split.shared,
                              plan.shards, one_point, report_every)
    b = plan.blocks
    outputs = program([a[b] for a in split.varying], split.common, jnp.asarray(ns[b]), keys)
    return layout.gather(outputs, plan, len(ns))


@functools.lru_cache(maxsize=64)
def _compiled_sweep(model, config: TrainConfig, n_slots: int, loss_fn: Callable, gram: bool, devices: tuple,
                    treedef, shared: tuple, shards: int = 1, one_point: bool = False, report_every: int | None = None):
    """One jitted program per (model, config, n_slots, loss, sampler, devices, which design leaves are
    shared): designs, ns and seeds are arguments, so sweeps of the same size over other noise levels,
    context lengths or seeds never recompile. The members of a block share its key, so one draw per
    step serves them all. Compiler options come from ``compiler.training_options`` (a single fit on CPU,
    ``one_point``, gets its own; why and what it buys: docs/performance.md §2.8)."""
    train = loop.trainer(model, config, n_slots, loss_fn, gram, shards, report_every)

    def point(varying, common, n, key):
        return FitResult(*train(layout.merge_design(treedef, shared, varying, common), n, key))

    options = compiler.training_options(one_point, devices)
    return layout.blocked(point, (MEMBER, None, MEMBER, BLOCK), devices, shards, options)


def _check_losses(losses, factor, model, points):
    """FloatingPointError at the first step whose loss is not finite or above ``factor`` times the
    point's initial loss (skipped where that loss is 0)."""
    initial = losses[:, :1]
    bad = ~np.isfinite(losses)
    if factor is not None:
        with np.errstate(invalid="ignore", over="ignore"):
            bad |= (initial > 0) & (losses > factor * initial)
    if bad.any():
        row, step = np.argwhere(bad)[0]
        design, n, seed = points[row]
        what = (f"non-finite loss at step {step}" if not np.isfinite(losses[row, step]) else
                f"loss {losses[row, step]:.3g} at step {step} is above divergence_factor = {factor:g} times the "
                f"initial loss {initial[row, 0]:.3g}")
        raise FloatingPointError(
            f"training diverged: {what} for model {_short(model)} on design {_short(design)} with n = {n}, "
            f"seed = {seed}; lower learning_rate (or raise TrainConfig.divergence_factor)")


def _fits(model, config, points: int, n_slots: int, dim: int, cache) -> None:
    """Refuse (MemoryError) a sweep whose arrays cannot fit in memory, before compiling: each network in a
    call holds its parameters, gradients and two Adam moments (4 copies), a step's batch of prompts, and its
    stored pretraining set and record evaluation set where configured."""
    size = sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
               for leaf in jax.tree_util.tree_leaves(jax.eval_shape(model.init, jax.random.PRNGKey(0))))
    at_once = points if cache is None else min(points, cache.chunk)
    held = config.batch_size + (config.pretraining_prompts or 0) + (config.recorded_prompts() if config.recorded_steps() else 0)
    batch = held * (n_slots + 1) * (dim + 1) * np.dtype(config.dtype).itemsize
    check.memory(f"fit_sweep of {at_once} network(s) of {size / 2**20:.3g} MiB of parameters each",
                 float(at_once) * (4 * size + batch),
                 "use a smaller dim, batch_size, pretraining_prompts, record_prompts or sweep")


def _check_params(params, model, points):
    """FloatingPointError where a point's parameters are not finite although every loss was: the last
    optimizer update (after the last loss) overflowed."""
    bad = np.zeros(len(points), bool)
    for leaf in jax.tree_util.tree_leaves(params):
        leaf = np.asarray(leaf)
        bad |= ~np.isfinite(leaf.reshape(leaf.shape[0], -1)).all(axis=1)
    if bad.any():
        design, n, seed = points[int(np.argmax(bad))]
        raise FloatingPointError(
            f"training diverged: the last optimizer update made the parameters non-finite for model {_short(model)} "
            f"on design {_short(design)} with n = {n}, seed = {seed}; lower learning_rate")


def _short(obj) -> str:
    return " ".join(repr(obj).split())


