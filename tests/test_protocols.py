"""iclsim.protocols: every built-in model and design satisfies its protocol, and check_model /
check_design name what a user's object lacks."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclsim import IID, RAG, Drift, TaskFeatureAlignment, TaskPool, models, protocols

D = 3


@pytest.mark.parametrize("model, gram, pgd", [
    (models.LinearAttention(D), True, True), (models.H3(D, 4), False, True), (models.PGD(D), True, True),
    (models.WPGD(D, 4), False, True), (models.Ridge(D), False, False), (models.GD(D), False, False),
    (models.LinearTransformer(D, 2), True, False)])
def test_builtin_models_satisfy_the_model_protocol(model, gram, pgd):
    assert isinstance(model, protocols.Model)
    assert isinstance(model, protocols.GramModel) == gram
    assert isinstance(model, protocols.PGDModel) == pgd
    protocols.check_model(model, IID(D), 4)


def test_full_form_transformer_reads_tokens():
    """The 'full' form mixes every coordinate, so it must train on tokens, never on Gram draws."""
    model = models.LinearTransformer(D, 2, form="full")
    assert model.reads_gram is False
    protocols.check_model(model, IID(D), 4)


@pytest.mark.parametrize("design, law", [(IID(D), True), (RAG(D, 0.3), True), (TaskFeatureAlignment(D, 0.2), True),
                                         (Drift.ar1(D, 4, 0.5), False), (TaskPool(D, 5), True)])
def test_builtin_designs_satisfy_the_design_protocol(design, law):
    assert isinstance(design, protocols.Design)
    assert isinstance(design, protocols.ContextLawDesign) == law
    protocols.check_design(design, 4)


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
        protocols.check_model(WrongShape(D), IID(D), 4)  # ... but its predictions have the wrong shape

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
        protocols.check_design(ShortQuery(D), 4)
