"""The parts the models share: the parameter pytree type, one-draw initialisation, rank checks, the
subspace start of paper A's optimum, and the context Gram matrix S = Z^T Z / n."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp

from iclsim.designs import GramPrompts, Prompts, tokens
from iclsim.rng import normals

__all__ = ["Params", "context_gram"]


Params = dict[str, Any]


def _normal_init(key, dtype, **specs) -> Params:
    """{name: scale * N(0, 1) of shape} for specs name=(shape, scale), all from one flat draw
    (``rng.normals``): XLA compiles each jax.random call in a training program as its own kernel, so
    one draw per matrix would compile one kernel per matrix."""
    draws = normals(key, dtype, *[shape for shape, _ in specs.values()])
    return {name: scale * g for (name, (_, scale)), g in zip(specs.items(), draws)}


def _check_rank(rank, dim):
    # numpy integers too, as theory takes them (numbers.Integral); a bool is not a rank
    if rank is not None and (isinstance(rank, bool) or type(rank).__name__ == "bool_"
                             or not isinstance(rank, numbers.Integral) or not 1 <= rank <= dim):
        raise ValueError(f"rank must be an integer in [1, {dim}] (at most dim) or None, got {rank!r}")


def _pgd_subspace_init(params: Params, d: int, output_column: bool) -> Params:
    """Start in the subspace of paper A's Theorem 1 optimum: no label in the keys (Wk[d] = 0) and no
    features in the value that reaches the output (Wv[:d, d] = 0 for attention, Wv[:d] = 0 for H3).
    From a fully random start, low-rank models got stuck in a worse stationary point that routes a
    rank through the label path, and from this start none did (the runs: docs/performance.md §7)."""
    Wv = params["Wv"]
    Wv = Wv.at[:d, d].set(0.0) if output_column else Wv.at[:d].set(0.0)
    return {**params, "Wk": params["Wk"].at[d].set(0.0), "Wv": Wv}


def context_gram(prompts: Prompts | GramPrompts) -> jax.Array:
    """S = (1/n) sum_i z_i z_i^T over the n context slots z_i = [x_i; y_i]: [B, d+1, d+1]
    (drawn directly when the prompts are ``GramPrompts``)."""
    if isinstance(prompts, GramPrompts):
        return prompts.S
    Z = tokens(prompts)[:, :-1]
    return jnp.einsum("bni,bnj->bij", Z, Z) / Z.shape[1]
