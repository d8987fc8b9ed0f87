"""The step loop of one point's training as a pure function (``trainer``): the initialisation, then per
step a batch of prompts (fresh from the step's key, or from the stored pretraining set), ``value_and_grad``
of the loss and the optimizer's update on one flat parameter vector, in ``jax.lax.scan``; the record
(``records``) taken at its steps inside the loop. ``train`` maps it over a sweep (``train.make_train``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from iclsim import layout, progress, records
from iclsim.gram import draw
from iclsim.rng import BatchShard, Stream

__all__ = ["TrainState", "trainer"]


class TrainState(NamedTuple):
    """The optimisation's state: the flat parameter vector (``jax.flatten_util.ravel_pytree``) and the
    optimizer's state."""

    params: Any
    opt_state: Any


def trainer(model, config, n_slots: int, loss_fn: Callable, gram: bool, shards: int = 1,
            report_every: int | None = None):
    """A pure function (design, n, key) -> (params, losses [steps], record: ``records.Record`` or None) that
    trains one model (``train.make_train`` is its public face). With
    ``shards`` > 1 (inside shard_map over the axis "batch" of that size) each shard draws its rows of every
    step's batch (a ``rng.BatchShard`` passed to the draw) and the loss and gradients are averaged over the
    shards; a stored pretraining set and a record's evaluation set are held whole by every shard. With
    ``report_every`` the loop calls ``progress.step_done`` after every that many steps (``progress``)."""
    opt = config.transformation()
    rows = config.batch_size // shards
    shard = BatchShard(layout.BATCH_AXIS, shards) if shards > 1 else None
    recording = config.recorded_steps() is not None
    if recording:
        plan, start, write, finish = records.recorder(model, config, loss_fn, n_slots, gram)
    stored = config.pretraining_prompts is not None

    def train(design, n, key):
        keys = jax.random.split(key, config.steps + 1)  # one split: the initialisation's key and each step's
        # the optimizer runs on one flat vector: a few kernels, not a few per leaf
        params, unravel = jax.flatten_util.ravel_pytree(model.init(keys[0]))
        state = TrainState(params, opt.init(params))
        xs = {"key": keys[1:]}
        if stored or report_every:
            xs["t"] = jnp.arange(config.steps, dtype=jnp.int32)
        if stored:
            data = draw(design, jax.random.fold_in(key, np.uint32(Stream.PRETRAINING)), config.pretraining_prompts,
                        n, n_slots, config.dtype, gram)
        if recording:
            evaluation, buffers = start(design, n, key, unravel(params))
            xs.update(flag=jnp.asarray(plan.flags), slot=jnp.asarray(plan.slots))

        def step(carry, x):
            state, order, buffers = carry
            if stored:
                prompts, order = _stored_batch(data, order, x["key"], x["t"], config, rows, shard)
            else:
                prompts = draw(design, x["key"], rows, n, n_slots, config.dtype, gram, shard)
            if recording:  # the predicate is the step's (unbatched under vmap): a cond, run at recorded steps only
                buffers = jax.lax.cond(x["flag"], lambda b: write(b, evaluation, unravel(state.params), x["slot"]),
                                       lambda b: b, buffers)
            loss, grads = jax.value_and_grad(lambda p: loss_fn(model, unravel(p), prompts))(state.params)
            if shards > 1:  # one all-reduce per step
                both = jax.lax.pmean(jnp.concatenate([loss[None], grads]), layout.BATCH_AXIS)
                loss, grads = both[0], both[1:]
            with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts with floats
                updates, opt_state = opt.update(grads, state.opt_state, state.params)
            if report_every:  # the step index alone (unbatched): one host call per device, at these steps only
                jax.lax.cond((x["t"] + 1) % report_every == 0,
                             lambda: jax.debug.callback(progress.step_done, x["t"] + 1, config.steps), lambda: None)
            ok = jnp.isfinite(loss)  # once non-finite, freeze so the first bad step is reported
            return (TrainState(jnp.where(ok, state.params + updates, state.params), opt_state), order, buffers), loss

        order = jnp.arange(config.pretraining_prompts, dtype=jnp.int32) if stored else None
        (state, _, buffers), losses = jax.lax.scan(step, (state, order, buffers if recording else None), xs)
        record = None
        if recording:
            if plan.final:
                buffers = write(buffers, evaluation, unravel(state.params), len(plan.steps) - 1)
            record = finish(buffers)
        return unravel(state.params), losses, record

    return train


def _stored_batch(data, order, key, t, config, rows: int, shard):
    """Step t's batch from the stored pretraining set ``data`` (this shard's ``rows`` of it): the full set in
    its stored order when batch_size == P; else batch t mod m of the epoch's permutation ``order`` (m =
    floor(P / batch_size)), drawn from the step's key at the epoch's first step (a cond: once per epoch)."""
    P, B = config.pretraining_prompts, config.batch_size
    offset = 0 if shard is None else jax.lax.axis_index(shard.axis_name) * rows
    if P == B:
        if shard is None:
            return data, order
        return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, offset, rows), data), order
    position = t % (P // B)
    order = jax.lax.cond(position == 0, lambda: jax.random.permutation(key, P).astype(jnp.int32), lambda: order)
    idx = jax.lax.dynamic_slice_in_dim(order, position * B + offset, rows)
    return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), data), order
