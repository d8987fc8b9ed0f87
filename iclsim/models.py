"""Trainable in-context regressors (docs/theory.md §2) as pure functions over parameter pytrees.

Every model is a frozen dataclass (its configuration, hashable, static under jit) with
``init(key) -> params`` and ``apply(params, prompts) -> yhat [B]``. Sums over the context are
taken as means over its n slots (the 1/n scaling of paper A, which keeps the optimum O(1) and
training well conditioned). The models that reduce to (weighted) PGD also have
``effective_pgd(params, n_slots) -> Effective(W, omega)``: the W of theory's unscaled convention
yhat = x^T W X^T y and, for H3 and WPGD, the per-position weights omega normalised to mean
|omega| = 1 (None for the uniform-weight models), that the weights implement on prompts with
n_slots context slots (in a padded sweep, the padded length).
No model has biases, so zero (padded) context tokens are inert: see ``truncate_context``.
The models that read the context only through its Gram matrix implement ``apply_gram`` (the
capability of ``protocols.GramModel``); ``Effective`` and ``normalise_omega`` live in ``protocols``.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as check
from iclsim import protocols
from iclsim.designs import GramPrompts, Prompts, tokens
from iclsim.protocols import Effective, normalise_omega
from iclsim.rng import normals

__all__ = ["Params", "Effective", "normalise_omega", "context_gram", "LinearAttention", "H3", "PGD", "WPGD",
           "Ridge", "OLS", "GD", "Frozen", "LoRA", "LinearTransformer"]

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
    rank through the label path (measured: 4 of 18 runs at d = 4, n = 8, 15-37% above the optimum;
    0 of 18 with this start)."""
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
        check.positive_int("dim", self.dim)
        check.float_dtype("dtype", self.dtype)
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
        check.positive_int("dim", self.dim)
        check.float_dtype("dtype", self.dtype)
        check.positive_int("context", self.context)
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


@dataclasses.dataclass(frozen=True)
class PGD:
    """The reduced predictor yhat = (1/n) x^T W X^T y, W full or W = U V^T of rank r."""

    dim: int
    rank: int | None = None
    dtype: Any = jnp.float32
    inert_padding = True  # no biases: zero context tokens add nothing

    def __post_init__(self):
        check.positive_int("dim", self.dim)
        check.float_dtype("dtype", self.dtype)
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
        check.positive_int("dim", self.dim)
        check.float_dtype("dtype", self.dtype)
        check.positive_int("context", self.context)

    def init(self, key) -> Params:
        d = self.dim
        return {**_normal_init(key, self.dtype, W=((d, d), 0.01 / d)), "omega": jnp.ones((self.context,), self.dtype)}

    def apply(self, params: Params, prompts: Prompts) -> jax.Array:
        g = jnp.einsum("bnj,bn->bj", prompts.X, prompts.y * params["omega"][None, :]) / self.context
        return jnp.einsum("bi,ij,bj->b", prompts.x, params["W"], g)

    def effective_pgd(self, params: Params, n: int) -> Effective:
        return Effective(*normalise_omega(params["W"] / n, params["omega"]))


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
        check.positive_int("dim", self.dim)
        check.float_dtype("dtype", self.dtype)
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
        check.positive_int("dim", self.dim)
        check.float_dtype("dtype", self.dtype)
        check.positive_int("steps", self.steps)

    def init(self, key) -> Params:
        return {"eta": jnp.asarray(0.01, self.dtype)}

    def apply(self, params: Params, prompts: Prompts) -> jax.Array:
        S = jnp.einsum("bni,bnj->bij", prompts.X, prompts.X)
        g = jnp.einsum("bni,bn->bi", prompts.X, prompts.y)

        def step(w, _):
            return w + params["eta"] * (g - jnp.einsum("bij,bj->bi", S, w)), None

        w, _ = jax.lax.scan(step, jnp.zeros_like(prompts.x), None, length=self.steps)
        return jnp.einsum("bi,bi->b", prompts.x, w)


class Frozen:
    """Holds fixed arrays a model closes over (e.g. pretrained weights); hashed by identity so the
    model stays a valid static configuration for the compiled-program cache."""

    def __init__(self, tree):
        self.tree = tree

    def __repr__(self):
        return f"Frozen(id={id(self):#x})"


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Low-rank adaptation of a frozen base model (docs/theory.md §3, LoRA): each target matrix becomes
    W_t + A_t B_t^T with A_t [m, r] random and B_t [k, r] zero at init, so training starts at the
    pretrained model. On attention's factors (targets Wq, Wk) the effective W moves by rank <= 2r;
    on PGD's W by rank <= r."""

    base: Any
    base_params: Frozen
    rank: int
    targets: tuple[str, ...]
    dtype: Any = jnp.float32

    def __post_init__(self):
        check.positive_int("rank", self.rank)
        check.float_dtype("dtype", self.dtype)
        missing = [t for t in self.targets if t not in self.base_params.tree]
        if missing or not self.targets:
            raise ValueError(f"targets must name matrices of the base model ({sorted(self.base_params.tree)}), "
                             f"got {self.targets!r}")
        for t in self.targets:
            if self.rank > min(self.base_params.tree[t].shape):
                raise ValueError(f"rank must be <= {min(self.base_params.tree[t].shape)} for {t}, got {self.rank}")

    @property
    def inert_padding(self) -> bool:
        return protocols.inert_padding(self.base)

    @property
    def apply_gram(self):
        """``apply`` on GramPrompts where the base model reads only the Gram matrix, else None."""
        return self.apply if protocols.reads_gram(self.base) else None

    def init(self, key) -> Params:
        shapes = {t: self.base_params.tree[t].shape for t in self.targets}
        A = _normal_init(key, self.dtype, **{t: ((m, self.rank), m**-0.5) for t, (m, _) in shapes.items()})
        return {t: {"A": A[t], "B": jnp.zeros((k, self.rank), self.dtype)} for t, (_, k) in shapes.items()}

    def merged(self, params: Params) -> Params:
        merged = dict(self.base_params.tree)
        for t in self.targets:
            merged[t] = merged[t] + params[t]["A"] @ params[t]["B"].T
        return merged

    def apply(self, params: Params, prompts: Prompts | GramPrompts) -> jax.Array:
        return protocols.predict(self.base, self.merged(params), prompts)

    def effective_pgd(self, params: Params, n: int) -> Effective:
        return self.base.effective_pgd(self.merged(params), n)


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
        check.positive_int("dim", self.dim)
        check.float_dtype("dtype", self.dtype)
        check.positive_int("layers", self.layers)
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
