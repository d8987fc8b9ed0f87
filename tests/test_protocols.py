"""iclsim.protocols, the contract: every built-in model and design satisfies its protocol, capabilities
are methods (apply_gram, effective_pgd -> Effective), check_model / check_design / check_sweep name what a
user's object lacks at the door of fit_sweep and evaluate_sweep, and model.dtype is the one dtype."""

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclsim import IID, RAG, Drift, TaskFeatureAlignment, TaskPool, bridge, gram, models, protocols, train
from iclsim.evaluate import evaluate_sweep

D = 3


def _traced(check, *args):
    """A protocol check made while tracing (jax.eval_shape): what it checks of a model's or a design's
    output is shapes and dtypes, which tracing gives, with nothing compiled or run."""
    return jax.eval_shape(lambda: check(*args))


@pytest.mark.parametrize("model, gram, pgd", [
    (models.LinearAttention(D), True, True), (models.H3(D, 4), False, True), (models.PGD(D), True, True),
    (models.WPGD(D, 4), False, True), (models.Ridge(D), False, False), (models.GD(D), False, False),
    (models.LinearTransformer(D, 2), True, False)])
def test_builtin_models_satisfy_the_model_protocol(model, gram, pgd):
    assert isinstance(model, protocols.Model)
    assert isinstance(model, protocols.GramModel) == gram
    assert isinstance(model, protocols.PGDModel) == pgd
    _traced(protocols.check_model, model, IID(D), 4)


def test_full_form_transformer_reads_tokens():
    """The 'full' form mixes every coordinate, so it must train on tokens, never on Gram draws."""
    model = models.LinearTransformer(D, 2, form="full")
    assert model.apply_gram is None and not protocols.reads_gram(model)
    assert not isinstance(model, protocols.GramModel)  # an apply_gram of None does not count
    assert not gram.uses_gram(model, IID(D), 40)
    _traced(protocols.check_model, model, IID(D), 4)


def test_lora_reads_gram_exactly_when_its_base_does():
    """LoRA's apply_gram follows its base. Catches a capability declared for the wrapper whatever it wraps."""
    attention, h3 = models.LinearAttention(D), models.H3(D, 4)
    on_attention = models.LoRA(attention, models.Frozen(attention.init(jax.random.PRNGKey(0))), 1, ("Wq",))
    on_h3 = models.LoRA(h3, models.Frozen(h3.init(jax.random.PRNGKey(0))), 1, ("Wq",))
    assert protocols.reads_gram(on_attention) and isinstance(on_attention, protocols.GramModel)
    assert not protocols.reads_gram(on_h3) and not isinstance(on_h3, protocols.GramModel)


@pytest.mark.parametrize("design, law", [(IID(D), True), (RAG(D, 0.3), True), (TaskFeatureAlignment(D, 0.2), True),
                                         (Drift.ar1(D, 4, 0.5), False), (TaskPool(D, 5), True)])
def test_builtin_designs_satisfy_the_design_protocol(design, law):
    assert isinstance(design, protocols.Design)
    assert isinstance(design, protocols.ContextLawDesign) == law
    _traced(protocols.check_design, design, 4)


def test_effective_reads_w_and_w_omega():
    W = jnp.eye(D)
    att = protocols.effective(models.PGD(D), {"W": 4.0 * W}, 4)
    assert att.omega is None and np.allclose(att.W, W)
    wp = protocols.effective(models.WPGD(D, 4), {"W": 4.0 * W, "omega": jnp.array([1.0, 2.0, 3.0, 2.0])}, 4)
    assert np.allclose(wp.omega, [0.5, 1.0, 1.5, 1.0]) and np.allclose(wp.W, 2.0 * W)  # mean |omega| = 1
    with pytest.raises(TypeError, match="Ridge has no effective_pgd"):
        protocols.effective(models.Ridge(D), {}, 4)


@dataclasses.dataclass(frozen=True)
class NoDtype:
    dim: int

    def init(self, key):
        return {"w": jnp.zeros(self.dim, jnp.float32)}

    def apply(self, params, prompts):
        return prompts.x @ params["w"]


@dataclasses.dataclass(frozen=True)
class WrongShape(NoDtype):
    dtype: Any = jnp.float32

    def apply(self, params, prompts):
        return prompts.X @ params["w"]  # [B, n], one per context pair


def test_check_model_names_what_is_missing():
    assert not isinstance(NoDtype(D), protocols.Model)
    with pytest.raises(TypeError, match="model NoDtype is missing dtype"):
        protocols.check_model(NoDtype(D))
    protocols.check_model(WrongShape(D))  # structurally fine ...
    with pytest.raises(TypeError, match=r"one prediction per prompt, shape \(2,\) .* got \(2, 4\)"):
        _traced(protocols.check_model, WrongShape(D), IID(D), 4)  # ... but its predictions have the wrong shape

    class Unhashable(WrongShape):
        __hash__ = None

    with pytest.raises(TypeError, match="must be hashable"):
        protocols.check_model(Unhashable(D))


class PlainDesign:
    """Samples fine but is neither a pytree nor declares fixed_n."""

    dim = D

    def sample(self, key, batch, n, dtype=jnp.float32):
        return IID(D).sample(key, batch, n, dtype)


def test_check_design_names_what_is_missing():
    with pytest.raises(TypeError, match="design PlainDesign is missing fixed_n"):
        protocols.check_design(PlainDesign())
    PlainDesign.fixed_n = None
    try:
        with pytest.raises(TypeError, match="is not a pytree"):
            protocols.check_design(PlainDesign())
    finally:
        del PlainDesign.fixed_n


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ShortQuery:
    dim: int = dataclasses.field(metadata={"static": True})
    fixed_n = None

    def sample(self, key, batch, n, dtype=jnp.float32):
        p = IID(self.dim).sample(key, batch, n, dtype)
        return p._replace(x=p.x[:, :-1])


def test_check_design_draws_and_checks_shapes():
    protocols.check_design(ShortQuery(D))
    with pytest.raises(TypeError, match=r"x of shape \(2, 3\), got \(2, 2\)"):
        _traced(protocols.check_design, ShortQuery(D), 4)


@dataclasses.dataclass(frozen=True)
class BareW:
    """A user PGD model whose effective_pgd returns a bare W (the old guide allowed it)."""

    dim: int
    dtype: Any = jnp.float32

    def init(self, key):
        return {"W": jnp.arange(self.dim**2, dtype=jnp.float32).reshape(self.dim, self.dim)}

    def apply(self, params, prompts):
        return jnp.einsum("bi,ij,bnj,bn->b", prompts.x, params["W"], prompts.X, prompts.y) / prompts.X.shape[1]

    def effective_pgd(self, params, n):
        return params["W"] / n


@pytest.mark.parametrize("d", [2, 3])
def test_a_bare_w_from_effective_pgd_is_a_named_error(d):
    """A bare W is refused with a TypeError naming Effective, at d = 2 as at d = 3. Catches the old
    ``W, omega = model.effective_pgd(...)``, which read a 2 x 2 W as W = its first row, omega = its second."""
    model = BareW(d)
    params = model.init(jax.random.PRNGKey(0))
    for read in (lambda: protocols.effective(model, params, 4), lambda: bridge.effective(model, params, 4, 4)):
        with pytest.raises(TypeError, match=r"BareW.effective_pgd must return protocols.Effective\(W, omega\).*"
                                            rf"array of shape \({d}, {d}\)"):
            read()


def test_effective_checks_the_shapes_of_w_and_omega():
    """A (W, omega) pair is read as an Effective; a W that is not square or an omega that is not one weight
    per slot is a ValueError naming the field. Catches shapes passed on unchecked into the closed forms."""
    W = jnp.eye(D)
    for out, message in (((W[0], None), "W of shape"), ((W, jnp.ones(3)), r"omega of shape \(3,\)")):
        broken = type("Broken", (BareW,), {"effective_pgd": lambda self, params, n, out=out: out})(D)
        with pytest.raises(ValueError, match=message):
            protocols.effective(broken, {}, 4)
    pair = type("Pair", (BareW,), {"effective_pgd": lambda self, params, n: (W, jnp.array([1.0, 1.0, 3.0, 3.0]))})(D)
    got = protocols.effective(pair, {}, 2, 4)  # omega over the 2 active (last) slots, mean |omega| = 1
    assert np.allclose(got.omega, [1.0, 1.0]) and np.allclose(got.W, 3.0 * W) and got.W.dtype == jnp.float64


def test_train_config_dtype_must_agree_with_the_model_dtype():
    """model.dtype is the one dtype: a TrainConfig in another dtype is a ValueError naming both.
    Catches training draws in TrainConfig.dtype while evaluation draws in model.dtype."""
    model = models.PGD(D, dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"TrainConfig.dtype \(float32\) must equal model.dtype \(float64\)"):
        train.fit_sweep(model, IID(D), [4], [0], train.TrainConfig(steps=2))


def test_the_door_of_fit_sweep_and_evaluate_sweep_names_what_is_missing():
    """fit_sweep and evaluate_sweep check the model and the designs before anything is traced: a model
    without dtype and a design that is not a pytree get the protocol's named TypeErrors. Catches a sweep
    that fails deep inside tracing with an unrelated message."""
    with pytest.raises(TypeError, match="fit_sweep needs model.dtype"):
        train.fit_sweep(NoDtype(D), IID(D), [4], [0], train.TrainConfig(steps=2))
    with pytest.raises(TypeError, match="model NoInit is missing init"):
        train.fit_sweep(type("NoInit", (), {"dtype": jnp.float32, "apply": NoDtype.apply})(), IID(D), [4], [0])
    PlainDesign.fixed_n = None
    try:
        with pytest.raises(TypeError, match="design PlainDesign is not a pytree"):
            evaluate_sweep(WrongShape(D), {"w": np.zeros((1, 1, 1, D))}, PlainDesign(), [4], jax.random.PRNGKey(0))
    finally:
        del PlainDesign.fixed_n


@dataclasses.dataclass(frozen=True)
class FlaggedGram:
    """A user model that still declares the old flag reads_gram = True (and whose apply takes GramPrompts)."""

    dim: int
    dtype: Any = jnp.float32
    reads_gram = True

    def init(self, key):
        return models.PGD(self.dim).init(key)

    def apply(self, params, prompts):
        return models.PGD(self.dim).apply(params, prompts)


def test_the_old_reads_gram_flag_still_selects_gram_draws_with_a_warning():
    """Backward compatibility: reads_gram = True without apply_gram still selects Gram draws, with a
    DeprecationWarning naming apply_gram. Catches user models silently moved to token draws."""
    with pytest.warns(DeprecationWarning, match="implement apply_gram"):
        assert gram.uses_gram(FlaggedGram(D), IID(D), 40)
    with warnings.catch_warnings():  # the built-in models declare the capability as a method: no warning
        warnings.simplefilter("error")
        assert gram.uses_gram(models.PGD(D), IID(D), 40)
