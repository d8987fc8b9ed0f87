"""L-layer linear transformers (docs/theory.md §2.4, §8): the GD form of Ahn et al. and the full form of
von Oswald et al."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as check
from iclsim.designs import GramPrompts, Prompts, tokens
from iclsim.models._common import Params, _normal_init

__all__ = ["FORMS", "LinearTransformer"]


FORMS = ("gd", "full")


@dataclasses.dataclass(frozen=True)
class LinearTransformer:
    """L residual linear self-attention layers, keys and values from the n context tokens (docs/theory.md §2, §8).

    form="gd" (default; the parameterisation of Ahn et al. 2023): queries and keys read the features and
    the values the label. Layer l updates every token's label slot,
    y_i <- y_i + w_l (1/n) sum_{j <= n} (x_i^T Wq_l Wk_l^T x_j) y_j, the query's slot starting at 0, and the
    prediction is -y_query (the sign convention of von Oswald et al.). The context slots then hold the
    residuals y_i - x_i^T w_l of L-step preconditioned GD w_{l+1} = w_l + Gamma_l X^T (y - X w_l) / n with
    Gamma_l = -w_l Wq_l Wk_l^T (``preconditioners``), which the network computes exactly; it reads the
    context only through S, so it trains on Gram draws. Params {"layers": [{"attn": {Wq, Wk [d, d],
    w_v []}}]}. Initialised as GD with steps ``init_step`` (Wq = Wk = sqrt(step) I, w_v = -1) plus
    N(0, init_scale^2 / d) on Wq and Wk: from a small random start L >= 3 layers stall in a worse basin
    than the best L-step GD (docs/results.md, trajectory).

    form="full" (von Oswald et al.): H <- H + (1/n) (H Wq)(H_c Wk)^T (H_c Wv) Wo^T on all d + 1
    coordinates, with ``mlp`` H <- H + relu(H W_in) W_out; the prediction is the query's label slot.
    Params {"layers": [{"attn": {Wq, Wk, Wv, Wo}, "mlp": {W_in, W_out}}, ...]}. No biases.
    """

    dim: int
    layers: int
    form: str = "gd"
    mlp: bool = False
    hidden: int | None = None
    init_scale: float = 0.3
    init_step: float = 0.5
    dtype: Any = jnp.float32
    inert_padding = True  # no biases: zero context tokens add nothing

    def __post_init__(self):
        check.model_fields(self, "layers")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        if self.mlp and self.form != "full":
            raise ValueError("mlp=True needs form='full' (the 'gd' form has no MLP)")
        if self.hidden is not None:
            check.positive_int("hidden", self.hidden)
        for name in ("init_scale", "init_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    @property
    def apply_gram(self):
        """``apply`` on GramPrompts in the "gd" form (it reads the context only through S), else None."""
        return self.apply if self.form == "gd" else None

    def init(self, key) -> Params:
        if self.form == "gd":
            d, L = self.dim, self.layers
            s = self.init_scale * d**-0.5
            w = _normal_init(key, self.dtype, Wq=((L, d, d), s), Wk=((L, d, d), s))
            root = jnp.sqrt(jnp.asarray(self.init_step, self.dtype)) * jnp.eye(d, dtype=self.dtype)
            return {"layers": [{"attn": {"Wq": root + w["Wq"][i], "Wk": root + w["Wk"][i],
                                         "w_v": jnp.asarray(-1.0, self.dtype)}} for i in range(L)]}
        D = self.dim + 1
        hid = self.hidden or 2 * D
        s = self.init_scale * D**-0.5
        L = self.layers
        specs = {name: ((L, D, D), s) for name in ("Wq", "Wk", "Wv", "Wo")}
        if self.mlp:
            specs.update(W_in=((L, D, hid), D**-0.5), W_out=((L, hid, D), 0.1 * hid**-0.5))
        w = _normal_init(key, self.dtype, **specs)
        groups = {"attn": ("Wq", "Wk", "Wv", "Wo"), **({"mlp": ("W_in", "W_out")} if self.mlp else {})}
        return {"layers": [{g: {name: w[name][i] for name in names} for g, names in groups.items()} for i in range(L)]}

    def preconditioners(self, params: Params) -> jax.Array:
        """Gamma_l = -w_l Wq_l Wk_l^T [L, d, d] of the "gd" form: invariant to rescalings of Wq, Wk, w_v that
        leave the function unchanged."""
        if self.form != "gd":
            raise ValueError("preconditioners are defined for form='gd'")
        return jnp.stack([-a["attn"]["w_v"] * a["attn"]["Wq"] @ a["attn"]["Wk"].T for a in params["layers"]])

    def steps_params(self, step_sizes) -> Params:
        """Params of the "gd" form that compute L-step GD with scalar steps gamma_l (docs/theory.md §8): layer l
        has Wq = Wk = sqrt(|gamma_l|) I and w_v = -sign(gamma_l) (-1 for a zero step), so Gamma_l = gamma_l I;
        e.g. the best L-step GD of ``theory.optimal_multistep_gd`` as a network (the oracle of the pruning
        studies), scored on the same prompts as trained ones. The one builder of such networks."""
        if self.form != "gd":
            raise ValueError("steps_params is defined for form='gd'")
        gam = np.asarray(step_sizes, np.float64)
        if gam.shape != (self.layers,) or not np.all(np.isfinite(gam)):
            raise ValueError(f"step_sizes must be {self.layers} finite numbers (one per layer), got {step_sizes!r}")
        eye = np.eye(self.dim)
        return {"layers": [{"attn": {"Wq": jnp.asarray(np.sqrt(abs(g)) * eye, self.dtype),
                                     "Wk": jnp.asarray(np.sqrt(abs(g)) * eye, self.dtype),
                                     "w_v": jnp.asarray(-1.0 if g >= 0 else 1.0, self.dtype)}} for g in gam]}

    def gd_iterates(self, params: Params, prompts: Prompts | GramPrompts) -> list[jax.Array]:
        """The "gd" form's implicit weights w_1..w_L [B, d] (prediction after layer l: x^T w_l)."""
        d = self.dim
        if isinstance(prompts, GramPrompts):
            b = prompts.times(jnp.zeros(d + 1, prompts.x.dtype).at[d].set(1.0))[:, :d]

            def Sxx(w):
                return prompts.times(jnp.concatenate([w, jnp.zeros_like(w[:, :1])], axis=1))[:, :d]
        else:
            n = prompts.X.shape[1]
            b = jnp.einsum("bnd,bn->bd", prompts.X, prompts.y) / n

            def Sxx(w):
                return jnp.einsum("bnd,bn->bd", prompts.X, jnp.einsum("bnd,bd->bn", prompts.X, w)) / n
        w, out = jnp.zeros_like(prompts.x), []
        for G in self.preconditioners(params):
            w = w + (b - Sxx(w)) @ G.T
            out.append(w)
        return out

    def hidden_states(self, params: Params, prompts: Prompts) -> list[jax.Array]:
        """Token states after each layer ("full" form): a list of L arrays [B, n+1, d+1]."""
        if self.form != "full":
            raise ValueError("hidden_states is defined for form='full'; the 'gd' form has gd_iterates")
        H = tokens(prompts)
        n = prompts.X.shape[1]
        states = []
        for layer in params["layers"]:
            a = layer["attn"]
            Hc = H[:, :n]
            kv = jnp.einsum("bki,bkj->bij", Hc @ a["Wk"], Hc @ a["Wv"]) / n  # no softmax: (Q K^T) V = Q (K^T V)
            H = H + (H @ a["Wq"]) @ kv @ a["Wo"].T
            if self.mlp:
                H = H + jax.nn.relu(H @ layer["mlp"]["W_in"]) @ layer["mlp"]["W_out"]
            states.append(H)
        return states

    def predictions(self, params: Params, prompts: Prompts | GramPrompts) -> jax.Array:
        """The query prediction after every layer: [L, B]."""
        if self.form == "gd":
            return jnp.stack([jnp.sum(prompts.x * w, axis=-1) for w in self.gd_iterates(params, prompts)])
        return jnp.stack([H[:, -1, -1] for H in self.hidden_states(params, prompts)])

    def apply(self, params: Params, prompts: Prompts | GramPrompts) -> jax.Array:
        if self.form == "gd":
            return jnp.sum(prompts.x * self.gd_iterates(params, prompts)[-1], axis=-1)
        return self.hidden_states(params, prompts)[-1][:, -1, -1]
