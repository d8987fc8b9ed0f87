"""The vocabulary of prompts (docs/theory.md §1): a batch of in-context regression prompts, the same
batch read through its context Gram matrix, the law of a prompt's context tokens given its latent, the token
matrix, and the right-aligned truncation that lets one program train every context length."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from iclsim import _validate as check

__all__ = ["Prompts", "GramPrompts", "SharedGramPrompts", "ContextLaw", "tokens", "truncate_context"]


class Prompts(NamedTuple):
    """A batch of prompts: X [B, n, d], y [B, n], x [B, d], y_query [B]."""

    X: jax.Array
    y: jax.Array
    x: jax.Array
    y_query: jax.Array


class GramPrompts(NamedTuple):
    """A batch of prompts seen through their context Gram matrix S = (1/n_slots) sum_i z_i z_i^T
    [B, d+1, d+1] over the active pairs z_i = [x_i; y_i], all that linear attention, PGD, low-rank
    attention and LoRA read of the context; query x [B, d], y_query [B]. S is kept factored,
    S = L T T^T L^T + c m m^T (factor L [B, d+1, d+1], inner T [B, d+1, k], mean m [B, d+1],
    weight c [B]): the models need only S v and a^T S v, O(d^2) per prompt from the factors
    against O(d^3) to form S."""

    factor: jax.Array
    inner: jax.Array
    mean: jax.Array
    weight: jax.Array
    x: jax.Array
    y_query: jax.Array

    @classmethod
    def from_matrix(cls, S, x, y_query) -> "GramPrompts":
        """From a given S [B, d+1, d+1] (symmetric PSD): L = I, T = S^(1/2)."""
        lam, U = jnp.linalg.eigh(S)
        root = jnp.einsum("bij,bj,bkj->bik", U, jnp.sqrt(jnp.clip(lam, 0.0, None)), U)
        eye = jnp.broadcast_to(jnp.eye(S.shape[-1], dtype=S.dtype), S.shape)
        return cls(eye, root, jnp.zeros(S.shape[:-1], S.dtype), jnp.zeros(S.shape[:1], S.dtype), x, y_query)

    def _inner_coords(self, v) -> jax.Array:
        """T^T L^T v [B, k] for v [B, d+1] or [d+1]."""
        w = jnp.einsum("bji,bj->bi", self.factor, jnp.broadcast_to(v, self.mean.shape))
        return jnp.einsum("bji,bj->bi", self.inner, w)

    def times(self, v) -> jax.Array:
        """S v [B, d+1] for v [B, d+1] or [d+1]."""
        m_v = jnp.einsum("bi,bi->b", self.mean, jnp.broadcast_to(v, self.mean.shape))
        LTw = jnp.einsum("bij,bj->bi", self.factor, jnp.einsum("bij,bj->bi", self.inner, self._inner_coords(v)))
        return LTw + (self.weight * m_v)[:, None] * self.mean

    def quadratic(self, a, v) -> jax.Array:
        """a^T S v [B] for a, v [B, d+1] or [d+1]."""
        m_a = jnp.einsum("bi,bi->b", self.mean, jnp.broadcast_to(a, self.mean.shape))
        m_v = jnp.einsum("bi,bi->b", self.mean, jnp.broadcast_to(v, self.mean.shape))
        return jnp.einsum("bi,bi->b", self._inner_coords(a), self._inner_coords(v)) + self.weight * m_a * m_v

    @property
    def S(self) -> jax.Array:
        """The Gram matrix itself [B, d+1, d+1] (O(d^3) per prompt; for checks and plots)."""
        F = self.factor @ self.inner
        return F @ jnp.swapaxes(F, 1, 2) + self.weight[:, None, None] * jnp.einsum("bi,bj->bij", self.mean, self.mean)


class SharedGramPrompts(GramPrompts):
    """The same batch as ``GramPrompts``, for a batch that many networks read under ``vmap`` (the evaluation
    program, where a block's networks share one draw): its products S v and a^T S v are elementwise products
    and sums instead of dot products. A dot product with one operand shared by the vmapped networks is
    compiled by XLA CPU as a batch of small matrix products, one per prompt; as elementwise products it
    fuses. The values equal ``GramPrompts``' to float rounding (the order of a few-term sum). Under autodiff,
    where every network draws its own prompts (training), ``GramPrompts`` stays the form (docs/performance.md
    §2.17 has the measurements behind both choices)."""

    __slots__ = ()

    def _inner_coords(self, v) -> jax.Array:
        w = jnp.sum(self.factor * jnp.broadcast_to(v, self.mean.shape)[:, :, None], axis=1)
        return jnp.sum(self.inner * w[:, :, None], axis=1)

    def times(self, v) -> jax.Array:
        v = jnp.broadcast_to(v, self.mean.shape)
        u = jnp.sum(self.inner * self._inner_coords(v)[:, None, :], axis=2)
        return jnp.sum(self.factor * u[:, None, :], axis=2) + (self.weight * jnp.sum(self.mean * v, axis=1))[:, None] * self.mean

    def quadratic(self, a, v) -> jax.Array:
        a, v = jnp.broadcast_to(a, self.mean.shape), jnp.broadcast_to(v, self.mean.shape)
        inner = jnp.sum(self._inner_coords(a) * self._inner_coords(v), axis=1)
        return inner + self.weight * jnp.sum(self.mean * a, axis=1) * jnp.sum(self.mean * v, axis=1)


class ContextLaw(NamedTuple):
    """Given the latent (x, beta) of each prompt, its context tokens z_i = [x_i; y_i] are i.i.d.
    N(mean, factor factor^T): mean [B, d+1], factor [B, d+1, d+1]; with the query x [B, d] and
    its label y_query [B] drawn from the same latent."""

    mean: jax.Array
    factor: jax.Array
    x: jax.Array
    y_query: jax.Array


def tokens(prompts: Prompts) -> jax.Array:
    """Token matrix Z [B, n+1, d+1]: rows z_i = [x_i; y_i], last row the query [x; 0]."""
    ctx = jnp.concatenate([prompts.X, prompts.y[..., None]], axis=-1)
    query = jnp.concatenate([prompts.x, jnp.zeros_like(prompts.y_query)[..., None]], axis=-1)
    return jnp.concatenate([ctx, query[:, None, :]], axis=1)


def truncate_context(prompts: Prompts, n) -> Prompts:
    """Keep the last ``n`` context pairs and zero the others (n may be traced).

    Zero tokens are inert in every iclsim model (no biases), so a prompt drawn at n_slots and
    truncated is a prompt of length n, right-aligned so lags to the query are unchanged. This
    is the mask that lets one compiled program train a whole risk-vs-n curve.
    """
    n_slots = prompts.X.shape[1]
    if not check._is_traced(n):
        check.integer("n", n, 0, n_slots)
    keep = (jnp.arange(n_slots) >= n_slots - n).astype(prompts.y.dtype)
    return prompts._replace(X=prompts.X * keep[None, :, None], y=prompts.y * keep[None, :])
