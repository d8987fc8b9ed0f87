"""The compiled training engine: optax, a fresh batch of prompts every step, the step loop in
``jax.lax.scan``, and whole sweeps (designs x context lengths x seeds) vmapped into one program.

Context lengths that differ are drawn at the largest n and truncated (``truncate_context``),
so one compiled program trains a whole risk-vs-n curve.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from iclsim import _validate as v
from iclsim import designs as _designs
from iclsim.designs import Prompts, truncate_context
from iclsim.theory import _chunks, mean_and_se, risk_moments


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

    def __post_init__(self):
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


def squared_loss(model, params, prompts: Prompts) -> jax.Array:
    return jnp.mean((prompts.y_query - model.apply(params, prompts)) ** 2)


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple, np.ndarray)) else [x]


def _train_one(model, config: TrainConfig, n_max: int, loss_fn: Callable):
    """A pure function (design, n, key) -> (params, losses) that trains one model."""
    opt = config.optimizer()

    def train(design, n, key):
        init_key, data_key = jax.random.split(key)
        params = model.init(init_key)
        state = TrainState(params, opt.init(params))

        def step(state, k):
            prompts = truncate_context(design.sample(k, config.batch_size, n_max, config.dtype), n)
            loss, grads = jax.value_and_grad(lambda p: loss_fn(model, p, prompts))(state.params)
            with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts with floats
                updates, opt_state = opt.update(grads, state.opt_state, state.params)
            ok = jnp.isfinite(loss)  # once non-finite, freeze so the first bad step is reported
            params = jax.tree_util.tree_map(lambda p, u: jnp.where(ok, p + u, p), state.params, updates)
            return TrainState(params, opt_state), loss

        state, losses = jax.lax.scan(step, state, jax.random.split(data_key, config.steps))
        return state.params, losses

    return train


def fit_sweep(model, designs, ns: Sequence[int], seeds: Sequence[int], config: TrainConfig = TrainConfig(),
              loss_fn: Callable = squared_loss) -> FitResult:
    """Train one model per (design, n, seed) in one compiled, vmapped program.

    ``designs``: one design or a list of same-structure designs (stacked and vmapped);
    ``ns``: context lengths (drawn at max(ns), truncated per model); ``seeds``: integer seeds,
    each giving the initialisation and the data stream (shared across designs and ns, so curves
    use common random numbers). Returns params with leading axes [designs, ns, seeds] and
    losses [designs, ns, seeds, steps]. A non-finite loss raises FloatingPointError naming the
    model, design, n, seed and step.
    """
    design_list, ns, seeds = _as_list(designs), [int(n) for n in _as_list(ns)], [int(s) for s in _as_list(seeds)]
    for n in ns:
        v.positive_int("n", n)
    n_max = max(ns)
    for d in design_list:
        _designs._check_n(d, n_max)
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    params, losses = _compiled_sweep(model, config, n_max, loss_fn)(_designs.stack(design_list), jnp.asarray(ns), keys)
    losses = np.asarray(losses)
    _check_finite(losses, model, design_list, ns, seeds)
    return FitResult(params, losses)


@functools.lru_cache(maxsize=64)
def _compiled_sweep(model, config: TrainConfig, n_max: int, loss_fn: Callable):
    """One jitted program per (model, config, n_max, loss): designs, ns and seeds are arguments,
    so sweeps over noise levels, context lengths or seeds of the same shapes never recompile."""
    train = _train_one(model, config, n_max, loss_fn)
    return jax.jit(jax.vmap(jax.vmap(jax.vmap(train, (None, None, 0)), (None, 0, None)), (0, None, None)))


def _check_finite(losses, model, design_list, ns, seeds):
    bad = ~np.isfinite(losses)
    if bad.any():
        i, j, k, step = np.argwhere(bad)[0]
        raise FloatingPointError(
            f"training diverged: non-finite loss at step {step} for model {_short(model)} on design "
            f"{_short(design_list[i])} with n = {ns[j]}, seed = {seeds[k]}; lower learning_rate")


def _short(obj) -> str:
    return " ".join(repr(obj).split())


def fit(model, design, n: int, steps: int = 4000, batch_size: int = 512, learning_rate: float = 1e-2,
        seed: int = 0, **config) -> FitResult:
    """Train one model (see ``fit_sweep``); params and losses without sweep axes."""
    cfg = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, **config)
    result = fit_sweep(model, design, [n], [seed], cfg)
    return FitResult(jax.tree_util.tree_map(lambda a: a[0, 0, 0], result.params), result.losses[0, 0, 0])


def evaluate_sweep(model, params, designs, ns: Sequence[int], key, num_prompts: int = 100_000,
                   batch_size: int = 10_000):
    """Test risk on fresh prompts of every model of a sweep: (risk, se), each [designs, ns, seeds].
    All models see the same prompts (common random numbers)."""
    design_list, ns = _as_list(designs), [int(n) for n in _as_list(ns)]
    n_max = max(ns)
    chunks, batch = _chunks(num_prompts, batch_size)
    total, total_sq = _compiled_evaluation(model, n_max, chunks, batch)(
        params, _designs.stack(design_list), jnp.asarray(ns), key)
    mean, se = mean_and_se(total, total_sq, chunks * batch)
    return np.asarray(mean), np.asarray(se)


@functools.lru_cache(maxsize=64)
def _compiled_evaluation(model, n_max: int, chunks: int, batch: int):
    def one(p, design, n, key):
        return risk_moments(lambda pr: model.apply(p, pr), design, n_max, n, key, chunks, batch, model.dtype)

    return jax.jit(jax.vmap(jax.vmap(jax.vmap(one, (0, None, None, None)), (0, None, 0, None)), (0, 0, None, None)))


def evaluate(model, params, design, n: int, key, num_prompts: int = 100_000, batch_size: int = 10_000):
    """Test risk (mean, standard error) of one trained model on num_prompts fresh prompts."""
    expanded = jax.tree_util.tree_map(lambda a: a[None, None, None], params)
    mean, se = evaluate_sweep(model, expanded, design, [n], key, num_prompts, batch_size)
    return float(mean[0, 0, 0]), float(se[0, 0, 0])
