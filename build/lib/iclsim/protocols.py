"""What iclsim asks of a design and of a model: typed protocols (``typing.Protocol``, checkable
with ``isinstance``) and ``check_design`` / ``check_model``, which name what is missing.

A design (docs/theory.md §1) draws prompts; a model (docs/theory.md §2) maps parameters and
prompts to predictions. ``train.fit_sweep``, ``train.evaluate`` and ``iclsim.testing`` use
nothing else, so a user's own design or model that satisfies these protocols trains, is scored
and is property-tested like the built-in ones. docs/extending.md works two examples.

Design (required):
  dim: int                      the feature dimension d (static: it fixes array shapes)
  fixed_n: int | None           the context length the design's arrays fix (Drift), or None
  sample(key, batch, n, dtype) -> designs.Prompts   X [B, n, d], y [B, n], x [B, d], y_query [B];
                                a pure, jit-compatible function of the key
  and the design must be a pytree (a registered dataclass, ``jax.tree_util.register_dataclass``)
  with ``dim`` static: ``fit_sweep`` stacks designs that differ in their numbers and passes them
  to one compiled program.
Design (optional, ``ContextLawDesign``): has_context_law = True with law_draws(batch) and
  law_from(normals, uniforms) -> designs.ContextLaw, for designs whose context pairs are i.i.d.
  N(mean, factor factor^T) given a latent; models that read only the Gram matrix then train on
  Gram draws whose cost does not grow with n (``designs.sample_gram``).

Model (required):
  dtype                         the dtype prompts are drawn in for training and evaluation
  init(key) -> params           a pytree of arrays
  apply(params, prompts) -> yhat [B]
  Padding: sweeps over n draw prompts at the largest n and zero the leading context pairs
  (``designs.truncate_context``), so a zero context token must be inert: contribute nothing to
  the prediction (true of any model without biases whose context enters through sums of
  products of tokens; a softmax over the context is NOT inert and must mask zero tokens). A model
  says so with ``inert_padding = True``; ``fit_sweep`` and ``evaluate_sweep`` refuse a sweep over
  several n on token prompts for a model that does not (Gram draws need no declaration).
  A model with a ``context`` field (H3, WPGD) is instead handed prompts of exactly that length.
Model (optional):
  reads_gram: bool              True when apply also accepts designs.GramPrompts (it reads the
                                context only through S = Z^T Z / n)
  effective_pgd(params, n)      the preconditioner W [d, d] the weights implement in theory's
                                convention yhat = x^T W X^T y (or (W, omega) for weighted PGD,
                                omega normalised to mean |omega| = 1); ``effective`` reads either
                                as an ``EffectivePGD`` named tuple
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Design", "ContextLawDesign", "Model", "GramModel", "PGDModel", "EffectivePGD", "effective",
           "check_design", "check_model"]


@runtime_checkable
class Design(Protocol):
    """Draws prompts: ``dim``, ``fixed_n`` and ``sample(key, batch, n, dtype) -> Prompts``."""

    dim: int
    fixed_n: int | None

    def sample(self, key, batch: int, n: int, dtype=jnp.float32): ...


@runtime_checkable
class ContextLawDesign(Design, Protocol):
    """A design whose context pairs are i.i.d. given a latent (Gram sampling, ``designs.sample_gram``)."""

    has_context_law: bool

    def law_draws(self, batch: int): ...

    def law_from(self, normals, uniforms): ...


@runtime_checkable
class Model(Protocol):
    """A trainable predictor: ``dtype``, ``init(key) -> params``, ``apply(params, prompts) -> yhat [B]``."""

    dtype: Any

    def init(self, key): ...

    def apply(self, params, prompts): ...


@runtime_checkable
class GramModel(Model, Protocol):
    """A model that reads the context only through its Gram matrix and accepts GramPrompts."""

    reads_gram: bool


@runtime_checkable
class PGDModel(Model, Protocol):
    """A model whose weights implement (weighted) one-step PGD: ``effective_pgd(params, n)``."""

    def effective_pgd(self, params, n: int): ...


class EffectivePGD(NamedTuple):
    """W [d, d] in theory's convention yhat = x^T W X^T (omega * y); omega [n] or None (uniform)."""

    W: jax.Array
    omega: jax.Array | None


def effective(model, params, n: int) -> EffectivePGD:
    """``model.effective_pgd(params, n)`` as an EffectivePGD, whether it returns W or (W, omega)."""
    if not callable(getattr(model, "effective_pgd", None)):
        raise TypeError(f"{type(model).__name__} has no effective_pgd(params, n): it does not implement PGD")
    out = model.effective_pgd(params, n)
    if isinstance(out, tuple):
        if len(out) != 2:
            raise TypeError(f"effective_pgd must return W or (W, omega), got a tuple of length {len(out)}")
        return EffectivePGD(*out)
    return EffectivePGD(out, None)


def _missing(obj, names: list[str]) -> list[str]:
    return [name for name in names if not hasattr(obj, name)]


def check_design(design, n: int | None = None, key=None) -> None:
    """Raise TypeError naming what ``design`` lacks of the Design protocol; with ``n``, also draw
    two prompts of n context pairs and check the shapes and dtype of what ``sample`` returns."""
    kind = type(design).__name__
    missing = _missing(design, ["dim", "fixed_n", "sample"])
    if missing:
        raise TypeError(f"design {kind} is missing {', '.join(missing)} (the Design protocol needs dim, fixed_n and "
                        "sample(key, batch, n, dtype); see iclsim.protocols)")
    if not callable(design.sample):
        raise TypeError(f"design {kind}: sample must be a method sample(key, batch, n, dtype)")
    if isinstance(design.dim, bool) or not isinstance(design.dim, (int, np.integer)) or design.dim < 1:
        raise TypeError(f"design {kind}: dim must be an integer >= 1, got {design.dim!r}")
    if getattr(design, "has_context_law", False):
        lacking = [m for m in ("law_draws", "law_from") if not callable(getattr(design, m, None))]
        if lacking:
            raise TypeError(f"design {kind} sets has_context_law but lacks {', '.join(lacking)}")
    leaves, treedef = jax.tree_util.tree_flatten(design)
    if len(leaves) == 1 and leaves[0] is design:
        raise TypeError(f"design {kind} is not a pytree: register it (jax.tree_util.register_dataclass, with dim "
                        "as a meta field) so fit_sweep can stack and trace it")
    if n is not None:
        p = design.sample(jax.random.PRNGKey(0) if key is None else key, 2, n, jnp.float32)
        d = design.dim
        expected = {"X": (2, n, d), "y": (2, n), "x": (2, d), "y_query": (2,)}
        for name, shape in expected.items():
            arr = getattr(p, name, None)
            if arr is None or tuple(arr.shape) != shape:
                got = None if arr is None else tuple(arr.shape)
                raise TypeError(f"design {kind}: sample(key, 2, {n}) must return Prompts with {name} of shape "
                                f"{shape}, got {got}")
            if arr.dtype != jnp.float32:
                raise TypeError(f"design {kind}: sample must draw in the dtype it is given (float32), {name} is "
                                f"{arr.dtype}")


def check_model(model, design=None, n: int | None = None, key=None) -> None:
    """Raise TypeError naming what ``model`` lacks of the Model protocol (init, apply, dtype; a
    bool reads_gram and a callable effective_pgd if present); with a design and n, also init and
    apply it to two prompts drawn in model.dtype and check the prediction's shape [2] and dtype."""
    kind = type(model).__name__
    missing = _missing(model, ["init", "apply", "dtype"])
    if missing:
        hint = " (dtype: the dtype prompts are drawn in, e.g. jnp.float32)" if "dtype" in missing else ""
        raise TypeError(f"model {kind} is missing {', '.join(missing)}{hint}; the Model protocol needs "
                        "init(key) -> params, apply(params, prompts) -> yhat [B] and dtype (see iclsim.protocols)")
    for name in ("init", "apply"):
        if not callable(getattr(model, name)):
            raise TypeError(f"model {kind}: {name} must be callable")
    if hasattr(model, "reads_gram") and not isinstance(model.reads_gram, (bool, np.bool_)):
        raise TypeError(f"model {kind}: reads_gram must be a bool, got {model.reads_gram!r}")
    if hasattr(model, "effective_pgd") and not callable(model.effective_pgd):
        raise TypeError(f"model {kind}: effective_pgd must be a method effective_pgd(params, n)")
    try:
        hash(model)
    except TypeError:
        raise TypeError(f"model {kind} must be hashable (a frozen dataclass): it is a static argument of the "
                        "compiled training program") from None
    if design is not None and n is not None:
        k1, k2 = jax.random.split(jax.random.PRNGKey(0) if key is None else key)
        params = model.init(k1)
        yhat = model.apply(params, design.sample(k2, 2, n, model.dtype))
        if tuple(jnp.shape(yhat)) != (2,):
            raise TypeError(f"model {kind}: apply must return one prediction per prompt, shape (2,) for 2 prompts, "
                            f"got {tuple(jnp.shape(yhat))}")
        if jnp.result_type(yhat) != jnp.dtype(model.dtype):
            raise TypeError(f"model {kind}: apply returned {jnp.result_type(yhat)} for prompts in its dtype "
                            f"{jnp.dtype(model.dtype)}")
