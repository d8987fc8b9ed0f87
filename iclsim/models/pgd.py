"""The reduced predictors PGD and weighted PGD (docs/theory.md §2.1) as trainable models."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from iclsim import _validate as check
from iclsim.designs import GramPrompts, Prompts
from iclsim.protocols import Effective, normalise_omega
from iclsim.models._common import Params, _check_rank, _normal_init

__all__ = ["PGD", "WPGD"]


@dataclasses.dataclass(frozen=True)
class PGD:
    """The reduced predictor yhat = (1/n) x^T W X^T y, W full or W = U V^T of rank r."""

    dim: int
    rank: int | None = None
    dtype: Any = jnp.float32
    inert_padding = True  # no biases: zero context tokens add nothing

    def __post_init__(self):
        check.model_fields(self)
        _check_rank(self.rank, self.dim)

    def init(self, key) -> Params:
        d = self.dim
        if self.rank is None:
            return _normal_init(key, self.dtype, W=((d, d), 0.01 / d))
        return _normal_init(key, self.dtype, U=((d, self.rank), d**-0.5), V=((d, self.rank), d**-0.5))

    def weight(self, params: Params) -> jax.Array:
        return params["W"] if self.rank is None else params["U"] @ params["V"].T

    def effective_pgd(self, params: Params, n: int) -> Effective:
        return Effective(self.weight(params) / n, None)

    def apply_gram(self, params: Params, prompts: GramPrompts) -> jax.Array:
        """``apply`` on GramPrompts: the model reads the context only through S (``protocols.GramModel``)."""
        return self.apply(params, prompts)

    def apply(self, params: Params, prompts: Prompts | GramPrompts) -> jax.Array:
        if isinstance(prompts, GramPrompts):
            g = prompts.times(jnp.zeros(self.dim + 1, prompts.x.dtype).at[self.dim].set(1.0))[:, :self.dim]  # S[:d, d]
        else:
            g = jnp.einsum("bnd,bn->bd", prompts.X, prompts.y) / prompts.X.shape[1]  # (1/n) X^T y
        return jnp.einsum("bi,ij,bj->b", prompts.x, self.weight(params), g)


@dataclasses.dataclass(frozen=True)
class WPGD:
    """Weighted PGD yhat = (1/n) x^T W X^T (omega * y) with a learnable weight per context position;
    ``context`` is the n_slots it is built for (one weight per slot)."""

    dim: int
    context: int
    dtype: Any = jnp.float32
    inert_padding = True  # no biases: zero context tokens add nothing

    def __post_init__(self):
        check.model_fields(self, "context")

    def init(self, key) -> Params:
        d = self.dim
        return {**_normal_init(key, self.dtype, W=((d, d), 0.01 / d)), "omega": jnp.ones((self.context,), self.dtype)}

    def apply(self, params: Params, prompts: Prompts) -> jax.Array:
        g = jnp.einsum("bnj,bn->bj", prompts.X, prompts.y * params["omega"][None, :]) / self.context
        return jnp.einsum("bi,ij,bj->b", prompts.x, params["W"], g)

    def effective_pgd(self, params: Params, n: int) -> Effective:
        return Effective(*normalise_omega(params["W"] / n, params["omega"]))
