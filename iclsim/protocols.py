"""The contract between iclsim's engine and the objects it trains and scores: the shared vocabulary
(``Prompts``, ``GramPrompts``, ``ContextLaw``, ``Effective``, ``Estimate``), the typed protocols of a
design and of a model (``typing.Protocol``, checkable with ``isinstance``), the capability queries the
engine asks (``reads_gram``, ``inert_padding``, ``implements_pgd``, ``has_context_law``,
``draws_shards``), the one reading of a PGD-form model (``effective``), and the checks at the door
(``check_design``, ``check_model``, ``check_sweep``), which name what is missing.

A design (docs/theory.md §1) draws prompts; a model (docs/theory.md §2) maps parameters and
prompts to predictions. ``train.fit_sweep`` and ``evaluate.evaluate_sweep`` check both once at the door
(``check_sweep``) and ask them nothing but what is here, so a user's own design or model that satisfies
these protocols trains, is scored and is property-tested like the built-in ones. docs/extending.md works
two examples. Capabilities are methods, not flags: a model that reads only the Gram matrix implements
``apply_gram``; a PGD-form model implements ``effective_pgd`` returning an ``Effective``.

Design (required):
  dim: int                      the feature dimension d (static: it fixes array shapes)
  fixed_n: int | None           the context length the design's arrays fix (Drift), or None
  sample(key, batch, n, dtype) -> Prompts   X [B, n, d], y [B, n], x [B, d], y_query [B];
                                a pure, jit-compatible function of the key
  and the design must be a pytree (a registered dataclass, ``jax.tree_util.register_dataclass``)
  with ``dim`` static: ``fit_sweep`` stacks designs that differ in their numbers and passes them
  to one compiled program.
Design (optional):
  has_context_law = True with law_draws(batch) and law_from(normals, uniforms) -> ContextLaw
                                (``ContextLawDesign``), for designs whose context pairs are i.i.d.
                                N(mean, factor factor^T) given a latent: models that read only the Gram
                                matrix then train on Gram draws whose cost does not grow with n
                                (``gram.sample_gram``).
  sample_shard(key, batch, n, dtype, shard) -> Prompts   this device's rows of the batch of
                                batch * shard.count prompts (``rng.BatchShard``); without it a device
                                draws the whole batch and keeps its rows.

Model (required):
  dtype                         the one dtype: prompts are drawn in it for training and evaluation
                                (``TrainConfig.dtype`` must agree, ``check_sweep``)
  init(key) -> params           a pytree of arrays
  apply(params, prompts) -> yhat [B]
  and the model must be hashable (a frozen dataclass): it is a static argument of the compiled programs.
  Padding: sweeps over n draw prompts at the largest n and zero the leading context pairs
  (``designs.truncate_context``), so a zero context token must be inert: contribute nothing to
  the prediction (true of any model without biases whose context enters through sums of
  products of tokens; a softmax over the context is NOT inert and must mask zero tokens). A model
  says so with ``inert_padding = True``; ``fit_sweep`` and ``evaluate_sweep`` refuse a sweep over
  several n on token prompts for a model that does not (Gram draws need no declaration).
  A model with a ``context`` field (H3, WPGD) is instead handed prompts of exactly that length.
Model (optional capabilities, methods):
  apply_gram(params, gram_prompts) -> yhat [B]   the model reads the context only through
                                S = Z^T Z / n and predicts from ``GramPrompts`` (``GramModel``). A model
                                whose capability depends on its configuration returns None from an
                                ``apply_gram`` property where it has none (LoRA of a token model,
                                LinearTransformer(form="full")).
  effective_pgd(params, n) -> Effective(W, omega)   the weighted-PGD predictor x^T W X^T (omega * y)
                                the weights implement, in theory's unscaled convention (omega None for
                                plain PGD) (``PGDModel``); ``effective`` reads it, and refuses a bare W.
Deprecated: ``reads_gram = True`` (a flag) still selects Gram draws for a model without ``apply_gram``
(``apply`` then receives GramPrompts), with a DeprecationWarning.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from iclsim._precision import float64
from iclsim.designs import ContextLaw, GramPrompts, Prompts

__all__ = ["Prompts", "GramPrompts", "ContextLaw", "Effective", "EffectivePGD", "Estimate", "normalise_omega",
           "Design", "ContextLawDesign", "Model", "GramModel", "PGDModel", "reads_gram", "inert_padding",
           "implements_pgd", "has_context_law", "draws_shards", "predict", "effective", "check_design",
           "check_model", "check_sweep"]


class Effective(NamedTuple):
    """What ``effective_pgd`` returns: the weighted-PGD predictor x^T W X^T (omega * y) a model implements,
    W [d, d] in theory's unscaled convention (docs/theory.md §3) and omega [n] (None: uniform, plain PGD)."""

    W: jax.Array
    omega: jax.Array | None


EffectivePGD = Effective  # the former name


class Estimate(NamedTuple):
    """A Monte Carlo estimate (``montecarlo``): the sample mean and its standard error (arrays for a
    batch of points)."""

    mean: Any
    se: Any


def normalise_omega(W, omega):
    """Move the scale of omega into W so that mean |omega| = 1 (the predictor is unchanged)."""
    scale = jnp.mean(jnp.abs(omega))
    scale = jnp.where(scale > 0, scale, 1.0)
    return W * scale, omega / scale


@runtime_checkable
class Design(Protocol):
    """Draws prompts: ``dim``, ``fixed_n`` and ``sample(key, batch, n, dtype) -> Prompts``."""

    dim: int
    fixed_n: int | None

    def sample(self, key, batch: int, n: int, dtype=jnp.float32): ...


@runtime_checkable
class ContextLawDesign(Design, Protocol):
    """A design whose context pairs are i.i.d. given a latent (Gram sampling, ``gram.sample_gram``)."""

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
    """A model that reads the context only through its Gram matrix: ``apply_gram(params, GramPrompts)``
    (an ``apply_gram`` that is None does not count: ``isinstance`` is then False)."""

    def apply_gram(self, params, prompts: GramPrompts): ...


@runtime_checkable
class PGDModel(Model, Protocol):
    """A model whose weights implement (weighted) one-step PGD: ``effective_pgd(params, n) -> Effective``."""

    def effective_pgd(self, params, n: int) -> Effective: ...


def reads_gram(model) -> bool:
    """Whether ``model`` reads the context only through its Gram matrix: it implements ``apply_gram`` (not
    None). A model without it that sets the deprecated flag ``reads_gram = True`` counts, with a warning."""
    method = getattr(model, "apply_gram", None)
    if method is not None:
        if not callable(method):
            raise TypeError(f"model {type(model).__name__}: apply_gram must be a method apply_gram(params, "
                            f"gram_prompts) (or None), got {method!r}")
        return True
    if getattr(model, "reads_gram", False) is True:
        warnings.warn(f"{type(model).__name__}.reads_gram = True is deprecated: implement apply_gram(params, "
                      "gram_prompts) instead (see iclsim.protocols)", DeprecationWarning, stacklevel=3)
        return True
    return False


def inert_padding(model) -> bool:
    """Whether ``model`` declares that a zero context token leaves its prediction unchanged
    (``inert_padding = True``), so a multi-n sweep may pad its token prompts."""
    return getattr(model, "inert_padding", False) is True


def implements_pgd(model) -> bool:
    """Whether ``model`` implements ``effective_pgd`` (not None)."""
    return callable(getattr(model, "effective_pgd", None))


def has_context_law(design) -> bool:
    """Whether ``design``'s context pairs are i.i.d. given a latent (``has_context_law`` True and
    ``law_draws`` / ``law_from``): Gram draws of it are exact."""
    return getattr(design, "has_context_law", False) is True


def draws_shards(design) -> bool:
    """Whether ``design`` draws one device's rows of a split batch itself (``sample_shard``)."""
    return callable(getattr(design, "sample_shard", None))


def predict(model, params, prompts) -> jax.Array:
    """The model's predictions: ``apply_gram`` on GramPrompts where the model implements it, else ``apply``."""
    if isinstance(prompts, GramPrompts) and getattr(model, "apply_gram", None) is not None:
        return model.apply_gram(params, prompts)
    return model.apply(params, prompts)


@float64
def effective(model, params, n: int, n_slots: int | None = None) -> Effective:
    """The ``Effective`` (W, omega) in float64 a PGD-form model implements on prompts of n active pairs
    padded to n_slots (default n): ``model.effective_pgd(params, n_slots)``, with omega re-normalised over
    the n active positions (padded ones are untrained; mean |omega| = 1). The one reading of a PGD model
    (``bridge.effective`` is this function). A bare W, or anything but an Effective (or a (W, omega)
    pair), is a TypeError: a 2 x 2 W would otherwise unpack as W = its first row, omega = its second."""
    kind = type(model).__name__
    if not implements_pgd(model):
        raise TypeError(f"{kind} has no effective_pgd(params, n): it does not implement PGD")
    n_slots = n if n_slots is None else n_slots
    out = model.effective_pgd(params, n_slots)
    if not isinstance(out, tuple) or len(out) != 2:
        got = f"an array of shape {np.shape(out)}" if hasattr(out, "shape") else f"a {type(out).__name__}"
        raise TypeError(f"{kind}.effective_pgd must return protocols.Effective(W, omega) (omega None for plain PGD), "
                        f"got {got}")
    W, omega = out
    W = jnp.asarray(W, jnp.float64)
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"{kind}.effective_pgd returned W of shape {W.shape}; Effective.W must be square [d, d]")
    if omega is None:
        return Effective(W, None)
    omega = jnp.asarray(omega, jnp.float64)
    if omega.shape != (n_slots,):
        raise ValueError(f"{kind}.effective_pgd(params, {n_slots}) returned omega of shape {omega.shape}; "
                         f"Effective.omega must be None or one weight per context slot, shape ({n_slots},)")
    return Effective(*normalise_omega(W, omega[n_slots - n:]))


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
    if has_context_law(design):
        lacking = [m for m in ("law_draws", "law_from") if not callable(getattr(design, m, None))]
        if lacking:
            raise TypeError(f"design {kind} sets has_context_law but lacks {', '.join(lacking)}")
    leaves, treedef = jax.tree_util.tree_flatten(design)
    if len(leaves) == 1 and leaves[0] is design:
        raise TypeError(f"design {kind} is not a pytree: register it (jax.tree_util.register_dataclass, with dim "
                        "as a meta field) so fit_sweep can stack and trace it")
    if n is not None:  # traced, not run: shapes and dtypes need no compiled program
        p = jax.eval_shape(lambda k: design.sample(k, 2, n, jnp.float32), jax.random.PRNGKey(0) if key is None else key)
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
    """Raise TypeError naming what ``model`` lacks of the Model protocol (init, apply, dtype, hashable;
    apply_gram and effective_pgd callable where present, inert_padding a bool); with a design and n, also
    init and apply it to two prompts drawn in model.dtype and check the prediction's shape [2] and dtype."""
    if isinstance(model, type):
        raise TypeError(f"model must be an instance, got the class {model.__name__}; construct it first, e.g. "
                        f"{model.__name__}(dim=...)")
    kind = type(model).__name__
    missing = _missing(model, ["init", "apply", "dtype"])
    if missing:
        hint = " (dtype: the dtype prompts are drawn in, e.g. jnp.float32)" if "dtype" in missing else ""
        raise TypeError(f"model {kind} is missing {', '.join(missing)}{hint}; the Model protocol needs "
                        "init(key) -> params, apply(params, prompts) -> yhat [B] and dtype (see iclsim.protocols)")
    for name in ("init", "apply"):
        if not callable(getattr(model, name)):
            raise TypeError(f"model {kind}: {name} must be callable")
    for name in ("apply_gram", "effective_pgd"):
        method = getattr(model, name, None)
        if method is not None and not callable(method):
            raise TypeError(f"model {kind}: {name} must be a method (or None), got {method!r}")
    if hasattr(model, "reads_gram") and not isinstance(model.reads_gram, (bool, np.bool_)):
        raise TypeError(f"model {kind}: reads_gram (deprecated: implement apply_gram) must be a bool, got "
                        f"{model.reads_gram!r}")
    if hasattr(model, "inert_padding") and not isinstance(model.inert_padding, (bool, np.bool_)):
        raise TypeError(f"model {kind}: inert_padding must be a bool, got {model.inert_padding!r}")
    try:
        hash(model)
    except TypeError:
        raise TypeError(f"model {kind} must be hashable (a frozen dataclass): it is a static argument of the "
                        "compiled training program") from None
    if design is not None and n is not None:
        k1, k2 = jax.random.split(jax.random.PRNGKey(0) if key is None else key)
        # traced, not run (jax.eval_shape): the shape and dtype of a prediction need no compiled program
        yhat = jax.eval_shape(lambda a, b: model.apply(model.init(a), design.sample(b, 2, n, model.dtype)), k1, k2)
        shape = tuple(getattr(yhat, "shape", ()))
        if not hasattr(yhat, "dtype") or shape != (2,):
            raise TypeError(f"model {kind}: apply must return one prediction per prompt, shape (2,) for 2 prompts, "
                            f"got {shape if hasattr(yhat, 'dtype') else type(yhat).__name__}")
        if jnp.dtype(yhat.dtype) != jnp.dtype(model.dtype):
            raise TypeError(f"model {kind}: apply returned {jnp.dtype(yhat.dtype)} for prompts in its dtype "
                            f"{jnp.dtype(model.dtype)}")


def check_sweep(model, designs, where: str, dtype=None) -> None:
    """The door of ``fit_sweep`` and ``evaluate_sweep``: the model and every design satisfy their
    protocols (``check_model``, ``check_design``: TypeError naming what is missing), their dims agree,
    and ``dtype`` (``TrainConfig.dtype``), where given, equals ``model.dtype``, the one dtype (ValueError)."""
    from iclsim import _validate as check

    for design in designs:
        check_design(design)
    check.model_for(model, designs, where, needs_dtype=True)
    check_model(model)
    if dtype is not None and jnp.dtype(dtype) != jnp.dtype(model.dtype):
        raise ValueError(f"TrainConfig.dtype ({jnp.dtype(dtype)}) must equal model.dtype ({jnp.dtype(model.dtype)}) "
                         f"in {where}: model.dtype is the one dtype prompts are drawn in for training and "
                         f"evaluation; set TrainConfig(dtype={jnp.dtype(model.dtype)}) or the model's dtype")
