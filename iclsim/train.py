"""The training engine: one model per sweep point (design, n, seed), trained with optax on a fresh
batch of prompts every step, the step loop in ``jax.lax.scan``, the whole sweep one compiled program.

    fitted = fit_sweep(LinearAttention(d), [IID(d, noise_var=s) for s in noises], ns, seeds, config)
    fitted.params   # leaves [designs, ns, seeds, ...]
    fitted.losses   # [designs, ns, seeds, steps]

Points of one seed share their random stream (common random numbers); context lengths that differ
share the largest n's slots (tokens truncated to the last n, or Gram matrices drawn directly for
models that read only the context Gram matrix: ``gram.uses_gram``). How the points are laid out on
devices is ``layout``'s business; test risk is ``evaluate``'s.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from iclsim import _validate as check
from iclsim import compiler, layout, protocols
from iclsim.designs import GramPrompts, Prompts, _check_n, stack
from iclsim.gram import SAMPLERS, draw, uses_gram
from iclsim.layout import BLOCK, MEMBER
from iclsim.rng import BatchShard

if TYPE_CHECKING:  # the engine never imports the cache: it calls the object it is handed
    from iclsim.cache import SweepCache

__all__ = ["TrainConfig", "FitResult", "fit", "fit_sweep", "squared_loss", "uses_gram", "SAMPLERS",
           "evaluate", "evaluate_sweep"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training settings.

    optimizer: None for Adam on the warmup-cosine schedule (linear warmup over ``warmup_steps`` to
    ``learning_rate``, cosine decay to ``learning_rate * final_lr_fraction`` at ``steps``); or any
    ``optax.GradientTransformation`` (used as given; the schedule fields are then unused); or a
    function schedule -> GradientTransformation (say ``lambda s: optax.chain(optax.clip_by_global_norm(1.0),
    optax.adamw(s, weight_decay=1e-4))``), given the warmup-cosine schedule.
    divergence_factor: training stops with FloatingPointError when a step's loss exceeds this
    multiple of the point's initial loss (for iclsim's small initialisations, about the risk of the
    zero predictor) or is not finite; None checks only finiteness.
    sampler: "auto", "gram" or "tokens" (``gram.uses_gram``).
    dtype: must equal model.dtype, the one dtype prompts are drawn in (``fit_sweep`` raises ValueError otherwise).
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
        if not (self.optimizer is None or isinstance(self.optimizer, optax.GradientTransformation)
                or callable(self.optimizer)):
            raise TypeError(f"optimizer must be None, an optax.GradientTransformation or a function schedule -> "
                            f"GradientTransformation, got {type(self.optimizer).__name__}")

    def schedule(self) -> optax.Schedule:
        """The warmup-cosine learning-rate schedule."""
        return optax.warmup_cosine_decay_schedule(
            0.0, self.learning_rate, min(self.warmup_steps, self.steps - 1), self.steps,
            self.learning_rate * self.final_lr_fraction)

    def transformation(self) -> optax.GradientTransformation:
        """The optax transformation training uses (see ``optimizer``)."""
        if self.optimizer is None:
            return optax.adam(self.schedule())
        if isinstance(self.optimizer, optax.GradientTransformation):
            return self.optimizer
        made = self.optimizer(self.schedule())
        if not isinstance(made, optax.GradientTransformation):
            raise TypeError(f"optimizer(schedule) must return an optax.GradientTransformation, got "
                            f"{type(made).__name__}")
        return made


class FitResult(NamedTuple):
    """params: leaves with leading sweep axes; losses: [..., steps] training loss per step."""

    params: Any
    losses: np.ndarray


def squared_loss(model, params, prompts: Prompts | GramPrompts) -> jax.Array:
    """Mean of (y - model(prompts))^2 over the batch; predictions must be [B] (``_validate.predictions``)."""
    pred = check.predictions(protocols.predict(model, params, prompts), prompts.y_query, "training loss")
    return jnp.mean((prompts.y_query - pred) ** 2)


def fit(model, design, n: int, steps: int = 4000, batch_size: int = 512, learning_rate: float = 1e-2,
        seed: int = 0, **config) -> FitResult:
    """Train one model (see ``fit_sweep``); params and losses without sweep axes."""
    if isinstance(design, (list, tuple)):
        raise TypeError(f"fit trains one model on one design, got a {type(design).__name__} of "
                        f"{len(design)}: use fit_sweep for several designs")
    cfg = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, **config)
    seed = check.integer("seed", seed, check.SEED_MIN, check.SEED_MAX)
    result = fit_sweep(model, design, [check.positive_int("n", n)], [seed], cfg)
    return FitResult(jax.tree_util.tree_map(lambda a: a[0, 0, 0], result.params), result.losses[0, 0, 0])


def fit_sweep(model, designs, ns: Sequence[int], seeds: Sequence[int], config: TrainConfig = TrainConfig(),
              loss_fn: Callable = squared_loss, devices: Sequence | None = None,
              cache: SweepCache | None = None) -> FitResult:
    """Train one model per (design, n, seed) in one compiled, vmapped program.

    ``designs``: one design or a list of same-structure designs (stacked and vmapped);
    ``ns``: context lengths (sharing max(ns) slots); ``seeds``: integer seeds, each giving the
    initialisation and the data stream (shared across designs and ns, so curves use common random
    numbers). The sweep is split over ``devices`` (default ``jax.devices()``, ``layout``).
    With a ``cache`` (a ``cache.SweepCache``; default none) finished points are loaded, not retrained, and
    the rest are trained ``cache.chunk`` points per call and stored. Returns params with leading
    axes [designs, ns, seeds] and losses [designs, ns, seeds, steps]. A non-finite loss, or one above
    ``config.divergence_factor`` times the initial loss, raises FloatingPointError naming the model,
    design, n, seed and step.
    """
    with jax.enable_x64(True):  # integer types fixed whatever the caller's flag; floats stay config.dtype
        return _fit_sweep(model, designs, ns, seeds, config, loss_fn, devices, cache)


def _fit_sweep(model, designs, ns, seeds, config, loss_fn, devices, cache) -> FitResult:
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

    def run(batch):
        idx = np.array([p[0] for p in batch])
        params, losses = _run_points(model, config, n_slots, loss_fn, gram, devices,
                                     jax.tree_util.tree_map(lambda a: np.asarray(a)[idx], stacked),
                                     np.array([ns[p[1]] for p in batch]), np.array([seeds[p[2]] for p in batch]),
                                     small)
        where = [(design_list[i], ns[j], seeds[k]) for i, j, k in batch]
        _check_losses(losses, config.divergence_factor, model, where)
        _check_params(params, model, where)
        return params, losses

    if cache is None:
        params, losses = run(points)
    else:
        # the key: what every point shares (the model, settings, loss, the engine's code and the XLA options
        # its programs get) hashed once, then each point's design, n and seed
        shared = (model, n_slots, config, loss_fn, gram, _fit_sweep, compiler.training_options(small, devices))
        params, losses = layout.load_or_run(
            cache, run, points, jax.eval_shape(model.init, layout.seed_keys([0])[0]),
            lambda p: (*shared, design_list[p[0]], ns[p[1]], seeds[p[2]]))
    shape = (len(design_list), len(ns), len(seeds))
    params = jax.tree_util.tree_map(lambda a: jnp.reshape(a, shape + a.shape[1:]), params)
    return FitResult(params, np.reshape(losses, shape + losses.shape[1:]))


# ---- the optimisation: one point's training as a pure function ----

class TrainState(NamedTuple):
    params: Any  # flat parameter vector (``jax.flatten_util.ravel_pytree``)
    opt_state: Any


def _train_one(model, config: TrainConfig, n_slots: int, loss_fn: Callable, gram: bool, shards: int = 1):
    """A pure function (design, n, key) -> (params, losses) that trains one model. With ``shards``
    > 1 (inside shard_map over the axis "batch" of that size) each shard draws its rows of every
    step's batch (a ``rng.BatchShard`` passed to the draw) and the loss and gradients are averaged
    over the shards."""
    opt = config.transformation()
    rows = config.batch_size // shards
    shard = BatchShard(layout.BATCH_AXIS, shards) if shards > 1 else None

    def train(design, n, key):
        keys = jax.random.split(key, config.steps + 1)  # one split: the initialisation's key and each step's
        # the optimizer runs on one flat vector: a few kernels, not a few per leaf
        params, unravel = jax.flatten_util.ravel_pytree(model.init(keys[0]))
        state = TrainState(params, opt.init(params))

        def step(state, k):
            prompts = draw(design, k, rows, n, n_slots, config.dtype, gram, shard)
            loss, grads = jax.value_and_grad(lambda p: loss_fn(model, unravel(p), prompts))(state.params)
            if shards > 1:  # one all-reduce per step
                both = jax.lax.pmean(jnp.concatenate([loss[None], grads]), layout.BATCH_AXIS)
                loss, grads = both[0], both[1:]
            with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts with floats
                updates, opt_state = opt.update(grads, state.opt_state, state.params)
            ok = jnp.isfinite(loss)  # once non-finite, freeze so the first bad step is reported
            return TrainState(jnp.where(ok, state.params + updates, state.params), opt_state), loss

        state, losses = jax.lax.scan(step, state, keys[1:])
        return unravel(state.params), losses

    return train


def _run_points(model, config, n_slots, loss_fn, gram, devices, designs, ns, seeds, small=None):
    """Train a flat batch of sweep points laid out in seed blocks (``layout.plan``); ``small``: compile
    with ``compiler.SMALL_PROGRAM_OPTIONS`` (default: where the batch is one point)."""
    plan = layout.plan(seeds, devices, config.batch_size)
    split = layout.split_design(designs)
    keys = layout.seed_keys(seeds[plan.blocks[:, 0]])
    one_point = len(np.unique(plan.blocks)) == 1 if small is None else bool(small)  # a single fit
    program = _compiled_sweep(model, config, n_slots, loss_fn, gram, plan.devices, split.treedef, split.shared,
                              plan.shards, one_point)
    b = plan.blocks
    outputs = program([a[b] for a in split.varying], split.common, jnp.asarray(ns[b]), keys)
    return layout.gather(outputs, plan, len(ns))


@functools.lru_cache(maxsize=64)
def _compiled_sweep(model, config: TrainConfig, n_slots: int, loss_fn: Callable, gram: bool, devices: tuple,
                    treedef, shared: tuple, shards: int = 1, one_point: bool = False):
    """One jitted program per (model, config, n_slots, loss, sampler, devices, which design leaves are
    shared): designs, ns and seeds are arguments, so sweeps of the same size over other noise levels,
    context lengths or seeds never recompile. The members of a block share its key, so one draw per
    step serves them all. A single fit on CPU (``one_point``) is compiled with XLA's fusion emitters
    off: compiling is most of a short fit's time, and this shortens it (docs/performance.md §2.8; for
    vmapped sweeps the emitters' faster code pays)."""
    train = _train_one(model, config, n_slots, loss_fn, gram, shards)

    def point(varying, common, n, key):
        return train(layout.merge_design(treedef, shared, varying, common), n, key)

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
    call holds its parameters, gradients and two Adam moments (4 copies), and a step's batch of prompts."""
    size = sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
               for leaf in jax.tree_util.tree_leaves(jax.eval_shape(model.init, jax.random.PRNGKey(0))))
    at_once = points if cache is None else min(points, cache.chunk)
    batch = config.batch_size * (n_slots + 1) * (dim + 1) * np.dtype(config.dtype).itemsize
    check.memory(f"fit_sweep of {at_once} network(s) of {size / 2**20:.3g} MiB of parameters each",
                 float(at_once) * (4 * size + batch), "use a smaller dim, batch_size or sweep")


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


from iclsim.evaluate import evaluate, evaluate_sweep  # noqa: E402  (their home is iclsim.evaluate)
