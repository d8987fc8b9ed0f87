"""Baselines (docs/theory.md §2.5): ridge regression, least squares and plain gradient descent with a
learnable step."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from iclsim import _validate as check
from iclsim.designs import Prompts
from iclsim.models._common import Params

__all__ = ["Ridge", "OLS", "GD"]


@dataclasses.dataclass(frozen=True)
class Ridge:
    """Baseline: x^T (X^T X + penalty I)^+ X^T y. penalty = noise variance / task variance is
    the Bayes-optimal (posterior mean) predictor for IID isotropic designs; 0 gives least squares
    (pseudo-inverse, so n < d is allowed)."""

    dim: int
    penalty: float = 0.0
    dtype: Any = jnp.float32
    inert_padding = True  # no biases: zero context tokens add nothing

    def __post_init__(self):
        check.model_fields(self)
        if isinstance(self.penalty, bool) or not (isinstance(self.penalty, (int, float)) or hasattr(self.penalty, "dtype")) \
                or not float(self.penalty) >= 0 or not float(self.penalty) < float("inf"):  # inf: a NaN-prone pinv
            raise ValueError(f"penalty must be >= 0 and finite, got {self.penalty!r}")

    def init(self, key) -> Params:
        return {}

    def apply(self, params: Params, prompts: Prompts) -> jax.Array:
        A = jnp.einsum("bni,bnj->bij", prompts.X, prompts.X) + self.penalty * jnp.eye(self.dim, dtype=self.dtype)[None]
        b = jnp.einsum("bni,bn->bi", prompts.X, prompts.y)
        return jnp.einsum("bi,bi->b", prompts.x, jnp.einsum("bij,bj->bi", jnp.linalg.pinv(A, hermitian=True), b))


def OLS(dim: int, dtype=jnp.float32) -> Ridge:
    """Baseline: ordinary least squares (minimum-norm when n < d)."""
    return Ridge(dim, 0.0, dtype)


@dataclasses.dataclass(frozen=True)
class GD:
    """Baseline: ``steps`` steps of gradient descent on (1/2) sum_i (y_i - x_i.w)^2 from w = 0
    with a learnable step size (training finds the best one); yhat = x.w_k. One step is PGD
    with W = eta I."""

    dim: int
    steps: int = 1
    dtype: Any = jnp.float32
    inert_padding = True  # no biases: zero context tokens add nothing

    def __post_init__(self):
        check.model_fields(self, "steps")

    def init(self, key) -> Params:
        return {"eta": jnp.asarray(0.01, self.dtype)}

    def apply(self, params: Params, prompts: Prompts) -> jax.Array:
        S = jnp.einsum("bni,bnj->bij", prompts.X, prompts.X)
        g = jnp.einsum("bni,bn->bi", prompts.X, prompts.y)

        def step(w, _):
            return w + params["eta"] * (g - jnp.einsum("bij,bj->bi", S, w)), None

        w, _ = jax.lax.scan(step, jnp.zeros_like(prompts.x), None, length=self.steps)
        return jnp.einsum("bi,bi->b", prompts.x, w)
