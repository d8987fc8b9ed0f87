"""One-layer attention models (docs/theory.md §2.2, §2.3): linear attention and H3, both reducing to
(weighted) PGD, read at the query."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from iclsim import _validate as check
from iclsim.designs import GramPrompts, Prompts, tokens
from iclsim.protocols import Effective, normalise_omega
from iclsim.models._common import Params, _check_rank, _normal_init, _pgd_subspace_init

__all__ = ["LinearAttention", "H3"]


@dataclasses.dataclass(frozen=True)
class LinearAttention:
    """One-layer single-head linear attention, the query attending to the n context tokens.

    yhat = [z_q^T Wq Wk^T S Wv]_{d+1} = (1/n) sum_i (z_q^T Wq Wk^T z_i)(z_i^T Wv e_{d+1}), S = Z^T Z / n,
    with Wq, Wk in R^{(d+1) x r} (r = d + 1 unless ``rank`` is given) and Wv in R^{(d+1) x (d+1)};
    only the last column [p_x; p_y] of Wv reaches the prediction. The x^T . x_i y_i part is
    x^T W X^T y with W = p_y Q11 + q12 p_x^T (``effective_pgd``); paper A, Theorem 1: at the
    optimum q12 = 0, p_x = 0 and the whole predictor is this PGD.
    """

    dim: int
    rank: int | None = None
    dtype: Any = jnp.float32
    inert_padding = True  # no biases: a zero context token adds nothing to S

    def __post_init__(self):
        check.model_fields(self)
        _check_rank(self.rank, self.dim + 1)

    def init(self, key) -> Params:
        D = self.dim + 1
        r = self.rank or D
        s = D**-0.5
        return _pgd_subspace_init(_normal_init(key, self.dtype, Wq=((D, r), s), Wk=((D, r), s), Wv=((D, D), s)),
                                  self.dim, True)

    def _query_keys(self, params: Params, x: jax.Array) -> jax.Array:
        """a = Wk Wq^T z_q [B, d+1], z_q = [x; 0]: the attention score of token z_i is a^T z_i."""
        zq = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=-1)
        return (zq @ params["Wq"]) @ params["Wk"].T

    def apply_gram(self, params: Params, prompts: GramPrompts) -> jax.Array:
        """``apply`` on GramPrompts: the model reads the context only through S (``protocols.GramModel``)."""
        return self.apply(params, prompts)

    def apply(self, params: Params, prompts: Prompts | GramPrompts) -> jax.Array:
        if isinstance(prompts, GramPrompts):  # a^T S v from S's factors
            return prompts.quadratic(self._query_keys(params, prompts.x), params["Wv"][:, -1])
        Z = tokens(prompts)[:, :-1]  # from tokens: O(n d) per prompt, not the O(n d^2) of forming S
        scores = jnp.einsum("bnj,bj->bn", Z, self._query_keys(params, prompts.x))
        return jnp.mean(scores * (Z @ params["Wv"][:, -1]), axis=1)

    def effective_pgd(self, params: Params, n: int) -> Effective:
        d = self.dim
        Q = params["Wq"] @ params["Wk"].T
        p = params["Wv"][:, d]
        return Effective((p[d] * Q[:d, :d] + jnp.outer(Q[:d, d], p[:d])) / n, None)


@dataclasses.dataclass(frozen=True)
class H3:
    """One-layer H3 (Fu et al. 2023) read at the query, docs/theory.md §2.

    q_i = Wq^T z_i, k_i = Wk^T z_i, v_i = Wv^T z_i (``channels`` p, default d); shift SSM on the
    keys kbar_i = sum_{j < shift_size} s_{c,j} k_{i-j}; diagonal SSM as a causal long convolution
    h = (1/n) sum_i f_{n-i} kbar_i * v_i at the query position n (0-based; only the query output is
    read, so only it is computed); gate o = q_n * h; yhat = w_o^T o. Filter "free": one weight
    per lag 0..n; filter "ssm": f_j = sum_s c_s a_s^j with learnable decays a_s in (0, 1).
    With s = e_0 the x^T . x_i y_i part is WPGD with omega_i = f_{n-i} and
    W = sum_c w_o[c] s_{c,0} Wq[:d,c] (Wk[:d,c] Wv[d,c] + Wv[:d,c] Wk[d,c])^T (``effective_pgd``;
    keys and values can both carry the label). ``context`` is the
    n_slots it is built for (the padded context length of a sweep, its largest n); shorter prompts
    are right-aligned and zero-padded.
    """

    dim: int
    context: int
    channels: int | None = None
    filter: str = "free"
    shift_size: int = 2
    state_size: int = 4
    dtype: Any = jnp.float32
    inert_padding = True  # no biases: zero context tokens add nothing

    def __post_init__(self):
        check.model_fields(self, "context")
        if self.channels is not None:
            check.positive_int("channels", self.channels)
        check.positive_int("shift_size", self.shift_size)
        check.positive_int("state_size", self.state_size)
        if self.filter not in ("free", "ssm"):
            raise ValueError(f"filter must be 'free' or 'ssm', got {self.filter!r}")

    @property
    def p(self) -> int:
        return self.channels or self.dim

    def init(self, key) -> Params:
        D, p, n = self.dim + 1, self.p, self.context
        s = D**-0.5
        params = _normal_init(key, self.dtype, Wq=((D, p), s), Wk=((D, p), s), Wv=((D, p), s), w_o=((p,), p**-0.5),
                              shift=((p, self.shift_size), 0.01))
        params["shift"] = params["shift"].at[:, 0].add(1.0)
        params = _pgd_subspace_init(params, self.dim, False)
        if self.filter == "free":
            params["f"] = jnp.ones((n + 1,), self.dtype)
        else:
            decay = jnp.linspace(0.5, 0.99, self.state_size, dtype=self.dtype)
            params["decay_logit"] = jnp.log(decay / (1 - decay))
            params["c"] = jnp.full((self.state_size,), 1.0 / self.state_size, self.dtype)
        return params

    def kernel(self, params: Params) -> jax.Array:
        """The long-convolution filter f_j, j = 0..n (lag from the query)."""
        if self.filter == "free":
            return params["f"]
        a = jax.nn.sigmoid(params["decay_logit"])
        lags = jnp.arange(self.context + 1, dtype=self.dtype)
        return jnp.einsum("s,js->j", params["c"], a[None, :] ** lags[:, None])

    def apply(self, params: Params, prompts: Prompts) -> jax.Array:
        n = self.context
        if prompts.X.shape[1] != n:
            raise ValueError(f"prompts must have context length {n} (the model's context), got {prompts.X.shape[1]}")
        Z = tokens(prompts)
        q = Z[:, -1] @ params["Wq"]
        k = Z @ params["Wk"]
        vals = Z @ params["Wv"]
        # shift SSM: kbar_i = sum_j s_{c,j} k_{i-j}, causal (zero before the first token)
        padded = jnp.pad(k, ((0, 0), (self.shift_size - 1, 0), (0, 0)))
        kbar = sum(params["shift"][None, None, :, j] * padded[:, self.shift_size - 1 - j: self.shift_size - 1 - j + n + 1]
                   for j in range(self.shift_size))
        f = self.kernel(params)[::-1]  # weight of position i is f_{n - i}
        h = jnp.einsum("i,bic->bc", f / n, kbar * vals)
        return (q * h) @ params["w_o"]

    def effective_pgd(self, params: Params, n: int) -> Effective:
        d = self.dim
        Wq, Wk, Wv = params["Wq"], params["Wk"], params["Wv"]
        label_part = Wk[:d] * Wv[d][None, :] + Wv[:d] * Wk[d][None, :]
        W = (Wq[:d] * (params["w_o"] * params["shift"][:, 0])[None, :]) @ label_part.T / n
        omega = self.kernel(params)[1:][::-1]  # context position i (1-based) has lag n + 1 - i
        return Effective(*normalise_omega(W, omega))
