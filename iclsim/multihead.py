"""Multi-head one-layer linear attention in the two parameterisations of Zhang, Singh, Latham & Saxe
("Training Dynamics of In-Context Learning in Linear Attention", ICML 2025; docs/theory.md, "Training
dynamics"): key and query merged into one matrix per head (``MergedAttention``, their ATTN_M) or kept
separate with rank r per head (``SeparateAttention``, their ATTN_S).

Both read the query token z_q = [x; 0] against the n context tokens z_i = [x_i; y_i] through the context
Gram matrix S = Z^T Z / n (the 1/n scaling of ``models.LinearAttention``):

    yhat = sum_h z_q^T Q_h S v_h,   Q_h = KQ_h (merged)   or   Q_h = Wq_h Wk_h^T (separate),

with v_h the row of head h's value matrix that writes the label slot (the only row the prediction reads).
Initialisation, as in the authors' code: every entry N(0, scale^2) for the merged model and
N(0, scale^2 / (H r (d+1))) for the separate one (value: / (H (d+1)^2)), then the key's label input and the
value's feature inputs set to zero (Q_h[:d, d] = 0, v_h[:d] = 0), a subspace the population gradient flow
keeps (the terms they would add are odd in the task vector). ``start="aligned"`` starts instead on the
class of initialisations the theory solves in closed form (``dynamics``): balanced heads aligned with the
coordinate axes (the eigenbasis of a diagonal feature covariance), every factor of size ``scale``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as check
from iclsim.designs import GramPrompts, Prompts, tokens
from iclsim.protocols import Effective
from iclsim.rng import normals

__all__ = ["STARTS", "MergedAttention", "SeparateAttention"]

STARTS = ("random", "aligned")


def _check_common(model):
    check.model_fields(model, "heads")
    scale = model.init_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < np.inf:
        raise ValueError(f"init_scale must be a finite number > 0, got {scale!r}")
    if model.start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {model.start!r}")


def _predict(Q, v, prompts: Prompts | GramPrompts) -> jax.Array:
    """sum_h z_q^T Q_h S v_h for Q [H, D, D], v [H, D]: from the Gram factors, or from tokens in O(n d H)."""
    x = prompts.x
    zq = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=-1)
    a = jnp.einsum("bi,hij->bhj", zq, Q)  # [B, H, D]: head h scores token z_i by a_h . z_i
    if isinstance(prompts, GramPrompts):
        return sum(prompts.quadratic(a[:, h], v[h]) for h in range(v.shape[0]))
    Z = tokens(prompts)[:, :-1]
    scores = jnp.einsum("bnj,bhj->bhn", Z, a)
    values = jnp.einsum("bnj,hj->bhn", Z, v)
    return jnp.sum(jnp.mean(scores * values, axis=-1), axis=1)


def _effective(Q, v, d: int, n: int) -> Effective:
    """The PGD x^T W X^T y the heads implement (theory's unscaled W, ``models.LinearAttention``):
    W = sum_h (v_h[d] Q_h[:d, :d] + Q_h[:d, d] v_h[:d]^T) / n."""
    W = jnp.einsum("h,hij->ij", v[:, d], Q[:, :d, :d]) + jnp.einsum("hi,hj->ij", Q[:, :d, d], v[:, :d])
    return Effective(W / n, None)


@dataclasses.dataclass(frozen=True)
class MergedAttention:
    """H-head linear attention with merged key-query matrices KQ_h [d+1, d+1] and value rows v_h [d+1]
    (ATTN_M): yhat = sum_h z_q^T KQ_h S v_h. On the subspace KQ_h[:d, d] = 0, v_h[:d] = 0 it is the two-layer
    linear network W = sum_h v_h[d] KQ_h[:d, :d] on the cubic features x (X^T y / n)^T (Zhang et al. 2025,
    Sec. 3), whose gradient flow has two fixed points (W = 0 and the optimum) and one abrupt drop.
    ``init_scale``: the std of every entry (start "random") or the size of each balanced aligned factor
    (start "aligned": KQ_h[:d, :d] = scale I / sqrt(d), v_h[d] = scale)."""

    dim: int
    heads: int = 1
    init_scale: float = 1e-2
    start: str = "random"
    dtype: Any = jnp.float32
    inert_padding = True  # no biases: a zero context token adds nothing to S

    def __post_init__(self):
        _check_common(self)

    def apply_gram(self, params, prompts: GramPrompts) -> jax.Array:
        """``apply`` on GramPrompts (the model reads the context only through S)."""
        return self.apply(params, prompts)

    def init(self, key):
        d, D, H, s = self.dim, self.dim + 1, self.heads, self.init_scale
        if self.start == "aligned":
            Q = jnp.zeros((H, D, D), self.dtype).at[:, :d, :d].set(s * d**-0.5 * jnp.eye(d, dtype=self.dtype))
            return {"KQ": Q, "v": jnp.zeros((H, D), self.dtype).at[:, d].set(s)}
        Q, v = normals(key, self.dtype, (H, D, D), (H, D))
        return {"KQ": (s * Q).at[:, :d, d].set(0.0), "v": (s * v).at[:, :d].set(0.0)}

    def apply(self, params, prompts: Prompts | GramPrompts) -> jax.Array:
        return _predict(params["KQ"], params["v"], prompts)

    def effective_pgd(self, params, n: int) -> Effective:
        return _effective(params["KQ"], params["v"], self.dim, n)


@dataclasses.dataclass(frozen=True)
class SeparateAttention:
    """H-head linear attention with separate query and key matrices Wq_h, Wk_h [d+1, r] and value rows v_h
    (ATTN_S): yhat = sum_h z_q^T Wq_h Wk_h^T S v_h. With rank r = 1 each head is a three-layer linear network
    v_h[d] (Wq_h[:d] Wk_h[:d]^T) and the gradient flow goes saddle to saddle, each head in turn taking one
    principal component of the features (Zhang et al. 2025, Sec. 4): in-context principal component regression.
    ``init_scale``: the authors' scale (start "random": entries N(0, scale^2 / fan), fan = H r (d+1) for Wq and Wk
    and H (d+1)^2 for the value) or the size of each balanced factor (start "aligned": head h's query and key
    scale e_{h mod d} in its first rank column, value v_h[d] = scale)."""

    dim: int
    heads: int = 1
    rank: int = 1
    init_scale: float = 1e-2
    start: str = "random"
    dtype: Any = jnp.float32
    inert_padding = True  # no biases: a zero context token adds nothing to S

    def __post_init__(self):
        _check_common(self)
        check.integer("rank", self.rank, 1, self.dim + 1)

    def apply_gram(self, params, prompts: GramPrompts) -> jax.Array:
        """``apply`` on GramPrompts (the model reads the context only through S)."""
        return self.apply(params, prompts)

    def init(self, key):
        d, D, H, r, s = self.dim, self.dim + 1, self.heads, self.rank, self.init_scale
        if self.start == "aligned":
            axes = jnp.zeros((H, D, r), self.dtype).at[jnp.arange(H), jnp.arange(H) % d, 0].set(s)
            return {"Wq": axes, "Wk": axes, "v": jnp.zeros((H, D), self.dtype).at[:, d].set(s)}
        q, k, v = normals(key, self.dtype, (H, D, r), (H, D, r), (H, D))
        fan = (H * r * D) ** -0.5
        return {"Wq": s * fan * q, "Wk": (s * fan * k).at[:, d].set(0.0), "v": (s * v / (H**0.5 * D)).at[:, :d].set(0.0)}

    def merged(self, params) -> jax.Array:
        """Q_h = Wq_h Wk_h^T [H, d+1, d+1]."""
        return jnp.einsum("hir,hjr->hij", params["Wq"], params["Wk"])

    def apply(self, params, prompts: Prompts | GramPrompts) -> jax.Array:
        return _predict(self.merged(params), params["v"], prompts)

    def effective_pgd(self, params, n: int) -> Effective:
        return _effective(self.merged(params), params["v"], self.dim, n)
