"""Gated linear attention (GLA) read at the query, in the weighted-PGD form of Li, Tarzanagh, Rawat, Fazel,
Oymak, "Gating is Weighting" (arXiv 2504.04308; docs/theory.md §10.1).

Token z_t = [x_t; r_t] with r_t the label slot (r_t = y_t on the context, 0 at the query, position n + 1).
A layer l runs the GLA recurrence on the label row of its state, key x_t, value r_t, query W_l^T x_t:

    S_t = g_t * S_{t-1} + x_t r_t   (context t <= n; the query only gates: S_{n+1} = g_{n+1} * S_n),
    r_t <- r_t - x_t^T W_l S_t / n,

with the gate a function of the token, g_t = sigmoid(a^T z_t + c): a scalar (``gate="scalar"``, a [d+1], c) or a
vector over the d key channels (``gate="vector"``, A [d, d+1], c [d], applied elementwise). The prediction is
yhat = -r_{n+1} after ``layers`` layers. Unrolled, S_t = sum_{j <= t} omega_{tj} * x_j r_j with
omega_{tj} = prod_{j < s <= t} g_s (the parallel form: a masked cumulative product, computed in log space),
so one layer is WPGD yhat = x^T W (1/n) sum_j omega_j * x_j y_j with data-dependent weights
omega_j = prod_{j < s <= n+1} g_s (``effective_wpgd``) and L layers are L such steps on the residuals (the
paper's multilayer GLA as multi-step WPGD). Constant gates g give omega_j = g^(n+1-j), H3's exponential filter;
gates of 1 give linear attention's PGD. ``form`` picks the recurrent (lax.scan) or the parallel computation;
they agree to rounding. No biases on the context path: a zero context token (x = 0, y = 0) adds nothing to S,
but its gate still multiplies, so padding is NOT inert (``inert_padding = False``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from iclsim import _validate as check
from iclsim import rng
from iclsim.designs import Prompts

__all__ = ["GLA", "EffectiveWPGD"]

Params = dict[str, Any]


class EffectiveWPGD(NamedTuple):
    """What one GLA layer implements on given prompts: yhat = x^T W X^T (omega * y), unscaled convention (W
    holds the 1/n); W [d, d] shared by the prompts, omega [B, n] (scalar gates) or [B, n, d] (vector gates:
    one weight per sample and key channel, yhat = x^T W sum_j (omega_j * x_j) y_j)."""

    W: jax.Array
    omega: jax.Array


@dataclasses.dataclass(frozen=True)
class GLA:
    """Gated linear attention in WPGD form (module docstring): ``dim`` d, ``gate`` "scalar" or "vector",
    ``layers`` L >= 1, ``form`` "recurrent" (lax.scan over the sequence) or "parallel" (masked cumulative
    products), ``gate_bias`` the initial c (sigmoid(c) the initial gate), ``dtype``."""

    dim: int
    gate: str = "scalar"
    layers: int = 1
    form: str = "parallel"
    gate_bias: float = 4.0
    dtype: Any = jnp.float32
    inert_padding = False  # a padded token's gate multiplies the weights of everything before it

    def __post_init__(self):
        check.model_fields(self, "layers")
        if self.gate not in ("scalar", "vector"):
            raise ValueError(f"gate must be 'scalar' or 'vector', got {self.gate!r}")
        if self.form not in ("recurrent", "parallel"):
            raise ValueError(f"form must be 'recurrent' or 'parallel', got {self.form!r}")
        check.real("gate_bias", self.gate_bias)

    @property
    def channels(self) -> int:
        """Gates per token: 1 (scalar) or d (vector)."""
        return 1 if self.gate == "scalar" else self.dim

    def init(self, key) -> Params:
        """W_l = 0.01 I / d-ish noise, gate weights 0 and biases ``gate_bias`` (near-constant initial gates)."""
        L, d, g = self.layers, self.dim, self.channels
        W = 0.01 / d * rng.normal(key, (L, d, d), self.dtype)
        return {"W": W, "gate_w": jnp.zeros((L, g, d + 1), self.dtype),
                "gate_b": jnp.full((L, g), self.gate_bias, self.dtype)}

    def log_gates(self, params: Params, layer: int, X, r) -> jax.Array:
        """log g_t for the n + 1 tokens [B, n+1, channels] of one layer (X [B, n+1, d], r [B, n+1])."""
        Z = jnp.concatenate([X, r[..., None]], axis=-1)
        return jax.nn.log_sigmoid(Z @ params["gate_w"][layer].T + params["gate_b"][layer][None, None, :])

    def _states_parallel(self, logg, V) -> jax.Array:
        """S_t = sum_{j <= t} exp(C_t - C_j) * V_j, C = cumsum log g: [B, T, channels] x V [B, T, d]."""
        C = jnp.cumsum(logg, axis=1)  # [B, T, g]
        T = V.shape[1]
        mask = jnp.tril(jnp.ones((T, T), bool))
        diff = jnp.where(mask[None, :, :, None], C[:, :, None, :] - C[:, None, :, :], -jnp.inf)
        return jnp.einsum("btjg,bjd->btd", jnp.exp(diff), V) if self.gate == "scalar" else \
            jnp.einsum("btjd,bjd->btd", jnp.exp(diff), V)

    def _states_recurrent(self, logg, V) -> jax.Array:
        """The same S_t by lax.scan over the sequence: S_t = g_t * S_{t-1} + V_t."""
        g = jnp.exp(logg)

        def step(S, inputs):
            g_t, v_t = inputs
            S = g_t * S + v_t
            return S, S

        S0 = jnp.zeros((V.shape[0], V.shape[2]), V.dtype)
        _, out = jax.lax.scan(step, S0, (jnp.swapaxes(g, 0, 1), jnp.swapaxes(V, 0, 1)))
        return jnp.swapaxes(out, 0, 1)

    def apply(self, params: Params, prompts: Prompts) -> jax.Array:
        """yhat [B] = -r_{n+1} after the layers (module docstring)."""
        B, n, d = prompts.X.shape
        if d != self.dim:
            raise ValueError(f"prompts have dim {d}, the GLA was built for dim {self.dim}")
        X = jnp.concatenate([prompts.X, prompts.x[:, None, :]], axis=1)  # [B, n+1, d]
        r = jnp.concatenate([prompts.y, jnp.zeros((B, 1), prompts.y.dtype)], axis=1)
        is_context = (jnp.arange(n + 1) < n).astype(prompts.y.dtype)
        states = self._states_parallel if self.form == "parallel" else self._states_recurrent
        for layer in range(self.layers):
            logg = self.log_gates(params, layer, X, r)
            V = X * (r * is_context[None, :])[..., None]  # value r_t on key x_t; the query writes nothing
            S = states(logg, V)
            r = r - jnp.einsum("btd,de,bte->bt", X, params["W"][layer], S) / n
        return -r[:, -1]

    def effective_wpgd(self, params: Params, prompts: Prompts) -> EffectiveWPGD:
        """The data-dependent WPGD one layer implements on these prompts: W = W_1 / n and
        omega_j = prod_{j < s <= n+1} g_s (per key channel for vector gates), so that
        yhat = x^T W X^T (omega * y) reproduces ``apply`` (docs/theory.md §10.1)."""
        if self.layers != 1:
            raise ValueError(f"effective_wpgd reads a one-layer GLA (one WPGD step); this GLA has layers={self.layers}")
        B, n, _ = prompts.X.shape
        X = jnp.concatenate([prompts.X, prompts.x[:, None, :]], axis=1)
        r = jnp.concatenate([prompts.y, jnp.zeros((B, 1), prompts.y.dtype)], axis=1)
        logg = self.log_gates(params, 0, X, r)  # [B, n+1, g]
        after = jnp.cumsum(logg[:, ::-1], axis=1)[:, ::-1]  # sum_{s >= j} log g_s
        omega = jnp.exp(after[:, 1:])  # position j (0-based, < n): sum over s > j, query included
        omega = omega[..., 0] if self.gate == "scalar" else omega
        return EffectiveWPGD(params["W"][0] / n, omega)
