"""Training records: the course of training seen at chosen steps (``TrainConfig.record_every`` or
``record_steps``), for comparing trained networks with theories of the dynamics (gradient flow on
linear attention: Zhang, Singh, Latham & Saxe 2025; Zhang, Frei & Bartlett 2024).

At each recorded step s (the parameters after s optimizer updates; 0 is the initialisation) the
engine records the training loss on a fixed evaluation set, not the noisy batch loss: the first
``TrainConfig.recorded_prompts()`` prompts (``record_prompts``, by default the batch size) drawn from
fold_in(PRNGKey(seed), ``rng.Stream.RECORD``) with the point's design, n and n_slots (``evaluation_key``),
the same at every step, drawn once per point, and independent of the layout (alone, in a sweep, over any devices). With ``TrainConfig.summarize``
it records ``summarize(params)`` too, a pytree of arrays: ``preconditioner_spectrum`` (PGD-form
models) and ``layer_step_sizes`` (the GD-form ``LinearTransformer``) are ready-made. Inside the
compiled step loop a recorded step is a ``lax.cond`` whose predicate is the step index (not batched,
so the cond stays a cond under vmap), so the evaluation runs only at recorded steps; with recording
off the loop is the unrecorded program.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from iclsim.gram import draw
from iclsim.rng import Stream

__all__ = ["Record", "evaluation_key", "preconditioner_spectrum", "layer_step_sizes"]


class Record(NamedTuple):
    """What a training run records (``FitResult.record``): ``steps`` [R] the optimizer steps after which each
    entry was taken (0: the initialisation; the last is ``TrainConfig.steps`` where recorded); ``loss``
    [..., R] the training loss (``loss_fn``) of the parameters on the point's fixed evaluation set;
    ``summaries`` the pytree ``TrainConfig.summarize(params)`` with leaves [..., R, ...], or None."""

    steps: Any
    loss: Any
    summaries: Any


def evaluation_key(key) -> jax.Array:
    """The key of a point's record evaluation set from its training key PRNGKey(seed):
    fold_in(key, ``Stream.RECORD``), equal to ``rng.stream_key(seed, Stream.RECORD)``."""
    return jax.random.fold_in(key, np.uint32(Stream.RECORD))


def preconditioner_spectrum(model, n: int) -> Callable:
    """A ``TrainConfig.summarize`` for PGD-form models (those with ``effective_pgd``): params -> the eigenvalues
    [d], ascending, of the symmetric part of the effective preconditioner Gamma = n W, W =
    ``model.effective_pgd(params, n).W`` (docs/theory.md §3: the predictor (1/n) x^T Gamma X^T y). Computed in
    the model's dtype inside the training program (not ``protocols.effective``'s float64 reading)."""
    if not callable(getattr(model, "effective_pgd", None)):
        raise TypeError(f"preconditioner_spectrum needs a model with effective_pgd(params, n) (a PGD-form model), "
                        f"got {type(model).__name__}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int (the context slots effective_pgd is read at), got {n!r}")
    n = int(n)

    def spectrum(params):
        gamma = n * jnp.asarray(model.effective_pgd(params, n)[0])
        return jnp.linalg.eigvalsh(0.5 * (gamma + gamma.T))

    return spectrum


def layer_step_sizes(model) -> Callable:
    """A ``TrainConfig.summarize`` for the GD-form ``LinearTransformer``: params -> [L] the step size each layer
    implements, tr(Gamma_l) / d with Gamma_l = -w_l Wq_l Wk_l^T (``LinearTransformer.preconditioners``;
    docs/theory.md §8: layer l takes the step w_{l+1} = w_l + Gamma_l X^T (y - X w_l) / n, gamma_l when
    Gamma_l = gamma_l I)."""
    if getattr(model, "form", None) != "gd" or not callable(getattr(model, "preconditioners", None)):
        raise TypeError(f"layer_step_sizes needs a LinearTransformer with form='gd', got {' '.join(repr(model).split())}")

    def step_sizes(params):
        gammas = model.preconditioners(params)
        return jnp.trace(gammas, axis1=1, axis2=2) / gammas.shape[-1]

    return step_sizes


# ---- the engine's side (``train``) ----

class _Plan(NamedTuple):
    steps: tuple  # the recorded steps, increasing, in [0, T]
    flags: np.ndarray  # [T] bool: record before step t's update
    slots: np.ndarray  # [T] int32: the record slot of step t (where flagged)
    final: bool  # T itself is recorded (after the scan)


def plan(steps: tuple, total: int) -> _Plan:
    """Where in a loop of ``total`` steps each recorded step is taken."""
    flags, slots = np.zeros(total, bool), np.zeros(total, np.int32)
    for slot, s in enumerate(steps):
        if s < total:
            flags[s], slots[s] = True, slot
    return _Plan(tuple(steps), flags, slots, steps[-1] == total)


def recorder(model, config, loss_fn: Callable, n_slots: int, gram: bool):
    """(start, write, finish) for one point's training loop: start(design, n, key, params) draws the
    evaluation set once and the empty buffers; write(buffers, prompts, params, slot) fills a slot;
    finish(buffers) -> Record."""
    p = plan(config.recorded_steps(), config.steps)
    count = len(p.steps)

    def measure(params, prompts):
        loss = loss_fn(model, params, prompts)
        return loss, (None if config.summarize is None else config.summarize(params))

    def start(design, n, key, params):
        prompts = draw(design, evaluation_key(key), config.recorded_prompts(), n, n_slots, config.dtype, gram)
        shapes = jax.eval_shape(measure, params, prompts)
        buffers = jax.tree_util.tree_map(lambda s: jnp.zeros((count,) + s.shape, s.dtype), shapes)
        return prompts, buffers

    def write(buffers, prompts, params, slot):
        return jax.tree_util.tree_map(lambda b, v: b.at[slot].set(v), buffers, measure(params, prompts))

    def finish(buffers):
        return Record(jnp.asarray(p.steps, jnp.int32), *buffers)

    return p, start, write, finish
