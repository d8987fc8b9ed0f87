"""Test risk of trained models on fresh prompts: every point of a sweep (design, n, seed) scored on
the same prompts (common random numbers), in one compiled program laid out like training
(``layout``), the squared errors accumulated in float64."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as check
from iclsim import layout
from iclsim._precision import float64
from iclsim.designs import _check_n, stack
from iclsim.gram import uses_gram
from iclsim.layout import MEMBER
from iclsim.theory import _chunks, mean_and_se, risk_moments

__all__ = ["evaluate", "evaluate_sweep"]


# the most prompts one step of the evaluation scan draws: with jax 0.10.2 on CPU, a vmapped scan over
# multi-layer GD-form transformers returned the first member's risk for every member at batches of 8000
# and more (reproduced, cause not found: not the Gram path, not the scalar leaf, not an XLA CPU flag);
# every batch up to 5000 was right; with 68 networks vmapped, 4096 prompts per step failed too, so the bound
# is on networks x prompts per step. tests/test_paper_b.py checks vmapped scores against per-network ones.
MAX_BATCH = 12_288


@float64
def evaluate_sweep(model, params, designs, ns: Sequence[int], key, num_prompts: int = 100_000,
                   batch_size: int = 10_000, sampler: str = "auto", devices: Sequence | None = None):
    """Test risk on fresh prompts of every model of a sweep: (risk, se), each [designs, ns, seeds].

    ``params``: leaves with leading axes [designs, ns, seeds] (``FitResult.params`` of ``fit_sweep``
    over the same designs and ns). All points see the same prompts (common random numbers), with n
    active pairs in max(ns) slots; Gram draws where ``gram.uses_gram``. The points are laid out in
    blocks over ``devices`` (default ``jax.devices()``) as training lays out points of one seed.
    """
    design_list, ns = layout.as_list(designs), check.int_list("n", layout.as_list(ns))
    check.model_for(model, design_list, "evaluate", needs_dtype=True)
    n_slots = max(ns)
    for d in design_list:
        _check_n(d, n_slots)
    check.positive_int("batch_size", batch_size)
    gram = uses_gram(model, design_list, n_slots, sampler)
    check.padding(model, ns, gram, "evaluate_sweep")
    num_seeds = check.sweep_params(params, len(design_list), len(ns))
    shape = (len(design_list), len(ns), num_seeds)
    count = int(np.prod(shape))
    devices = tuple(jax.devices() if devices is None else devices)[:count]
    plan = layout.plan(np.zeros(count, int), devices)  # one random stream: every point in a block shares it
    members = plan.blocks.shape[1]  # networks vmapped together on one device
    chunks, batch = _chunks(num_prompts, max(1, min(batch_size, MAX_BATCH // members)))
    di, nj, _ = np.unravel_index(np.arange(count), shape)
    split = layout.split_design(jax.tree_util.tree_map(lambda a: np.asarray(a)[di], stack(design_list)))
    program = _compiled_evaluation(model, n_slots, chunks, batch, gram, plan.devices, split.treedef, split.shared)
    b = plan.blocks
    flat = jax.tree_util.tree_map(lambda a: np.asarray(a).reshape((count,) + np.shape(a)[3:])[b], params)
    sums = program(flat, [a[b] for a in split.varying], split.common, jnp.asarray(np.asarray(ns)[nj][b]), key)
    total, total_sq = layout.gather(sums, plan, count)
    mean, se = mean_and_se(total, total_sq, chunks * batch)
    return np.reshape(np.asarray(mean), shape), np.reshape(np.asarray(se), shape)


def evaluate(model, params, design, n: int, key, num_prompts: int = 100_000, batch_size: int = 10_000,
             sampler: str = "auto"):
    """Test risk (mean, standard error) of one trained model on num_prompts fresh prompts."""
    n = check.positive_int("n", n)
    expanded = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None, None, None], params)
    mean, se = evaluate_sweep(model, expanded, design, [n], key, num_prompts, batch_size, sampler)
    return float(mean[0, 0, 0]), float(se[0, 0, 0])


@functools.lru_cache(maxsize=64)
def _compiled_evaluation(model, n_slots: int, chunks: int, batch: int, gram: bool, devices: tuple, treedef,
                         shared: tuple):
    """One jitted program per (model, n_slots, prompt count, sampler, devices, shared design leaves):
    params, designs and ns are arguments, so other sweeps of the same shape never recompile."""

    def point(params, varying, common, n, key):
        design = layout.merge_design(treedef, shared, varying, common)
        return risk_moments(lambda p: model.apply(params, p), design, n_slots, n, key, chunks, batch, model.dtype,
                            gram)

    return layout.blocked(point, (MEMBER, MEMBER, None, MEMBER, None), devices)
