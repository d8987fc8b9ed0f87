"""Linear attention fitted on a finite pretraining set in closed form (docs/theory.md §12), as Lu, Letey,
Zavatone-Veth, Maiti, Pehlevan (PNAS 2025, arXiv:2405.11751) do: the prediction is linear in its
parameters, so ridge regression on P prompts has a closed-form solution.

Lu et al.'s reduced linear attention predicts yhat = <Gamma, H_Z> with Gamma in R^{d x (d+1)} and
H_Z = x [ (d/n) X^T y ; (1/n) y^T y ]^T in their units (x ~ N(0, I/d), beta ~ N(0, I), noise rho). iclsim's
designs draw x ~ N(0, I): prompts in iclsim units with label noise d rho are the paper's prompts with x and
y multiplied by sqrt(d), so here H = x [ X^T y / n ; y^T y / (n d) ]^T / sqrt(d) and the target is y / sqrt(d).
The fit minimises (1/P) sum_mu (y_mu / sqrt(d) - <Gamma, H_mu>)^2 + (lambda / d) ||Gamma||_F^2, the paper's
objective divided by P / d, so lambda is the paper's ridge. In iclsim's linear attention the same predictor
is Q11 = Gamma[:, :d], q12 = Gamma[:, d] / d (query-key block rows of the feature part), p_y = 1, and
its exact ICL error is ``theory.attention_risk`` on fresh tasks divided by d (the finite-d formula).
The same objective can be minimised by gradient descent: ``ReducedAttention`` is the predictor as a trainable
model and ``ridge_objective`` its training loss, so ``train.fit_sweep`` with a stored set of P prompts
(``TrainConfig(pretraining_prompts=P, batch_size=P, optimizer="sgd")``) descends to ``fit_ridge``'s solution on
that set (docs/theory.md §12, "Gradient descent"); ``span_spectrum``, ``heavy_ball`` and ``heavy_ball_bound`` tune
heavy ball on it from the exact spectrum and predict its distance after a number of steps (§12, "Heavy ball").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import _validate as check
from iclsim import theory
from iclsim._precision import float64
from iclsim.designs import IID, Prompts
from iclsim.gram import draw
from iclsim.rng import Stream, stream_keys

__all__ = ["features", "fit_ridge", "attention_form", "attention_params", "icl_error", "lu_design", "ReducedAttention",
           "ridge_objective", "stored_prompts", "span_spectrum", "heavy_ball", "heavy_ball_bound"]

F64 = jnp.float64


def lu_design(dim: int, noise_var: float) -> IID:
    """Fresh-task prompts in iclsim units for Lu et al.'s noise rho: x ~ N(0, I), beta ~ N(0, I), label
    noise d rho (the paper's prompts scaled by sqrt(d); kappa = inf, and the ICL test distribution)."""
    dim = check.positive_int("dim", dim)
    rho = check.real("noise_var", noise_var, 0.0)
    return IID(dim, noise_var=dim * rho)


def features(prompts: Prompts) -> jax.Array:
    """Lu et al.'s H_Z of each prompt, flattened [B, d (d+1)] (module docstring; iclsim units in, paper's
    units out). Zero (padding) context pairs add nothing to the sums, but n is the slot count."""
    B, n, d = prompts.X.shape
    h = jnp.concatenate([jnp.einsum("bni,bn->bi", prompts.X, prompts.y) / n,
                         jnp.einsum("bn,bn->b", prompts.y, prompts.y)[:, None] / (n * d)], axis=1)
    return (prompts.x[:, :, None] * h[:, None, :]).reshape(B, d * (d + 1)) / d**0.5  # a Python float: keeps the prompts' dtype


def fit_ridge(prompts: Prompts, ridge, count=None) -> jax.Array:
    """Gamma [d, d+1] minimising (1/P) sum_mu (y_mu / sqrt(d) - <Gamma, H_mu>)^2 + (ridge / d) ||Gamma||_F^2
    over the first ``count`` prompts of the batch (default all, P = count):
    vec Gamma = (H^T H / P + (ridge / d) I)^{-1} H^T y / (P sqrt(d)). Pure and vmappable (over seeds, and
    over ``count``, which may be traced: the other prompts are masked out, so one compiled program serves a
    whole tau sweep). Runs in the prompts' dtype (ask for float64). ridge = 0 is least squares and needs
    P >= d (d + 1)."""
    B, n, d = prompts.X.shape
    count = B if count is None else count
    H = features(prompts)
    keep = (jnp.arange(B) < count).astype(H.dtype)
    H = H * keep[:, None]
    P = jnp.asarray(count, H.dtype)
    A = H.T @ H / P + (ridge / d) * jnp.eye(d * (d + 1), dtype=H.dtype)
    b = H.T @ (prompts.y_query * keep) / (P * np.sqrt(d))
    return jnp.linalg.solve(A, b).reshape(d, d + 1)


@dataclasses.dataclass(frozen=True)
class ReducedAttention:
    """Lu et al.'s reduced linear attention as a trainable model: params {"Gamma": [d, d+1]}, prediction
    yhat = sqrt(d) <Gamma, H> in iclsim units (``features``; the attention form's prediction, ``attention_form``),
    linear in Gamma. Starts at Gamma = 0 (the key is unused): gradient descent on ``ridge_objective`` then
    never leaves the span of the features, the subspace that holds the ridge solution, so its rate is set by
    the smallest nonzero eigenvalue of the objective's Hessian, not by ridge / d (docs/theory.md §12)."""

    dim: int
    dtype: Any = jnp.float32
    inert_padding = True  # zero context pairs add nothing to H's sums (n stays the slot count, as in ``features``)

    def __post_init__(self):
        check.model_fields(self)

    def init(self, key) -> dict:
        return {"Gamma": jnp.zeros((self.dim, self.dim + 1), self.dtype)}

    def apply(self, params: dict, prompts: Prompts) -> jax.Array:
        d = self.dim
        return d**0.5 * (features(prompts) @ params["Gamma"].reshape(d * (d + 1)))


def ridge_objective(model: ReducedAttention, params: dict, prompts: Prompts, ridge: float) -> jax.Array:
    """``fit_ridge``'s objective on a batch, as a training loss (``train.fit_sweep``'s ``loss_fn`` once ridge is
    bound, e.g. ``functools.partial(ridge_objective, ridge=1e-3)``): mean (y - yhat)^2 / d + (ridge / d)
    ||Gamma||_F^2 = (1/P) sum_mu (y_mu / sqrt(d) - <Gamma, H_mu>)^2 + (ridge / d) ||Gamma||_F^2 on the full set,
    so its minimiser is ``fit_ridge(prompts, ridge)``."""
    d = model.dim
    gamma = params["Gamma"]
    residual = prompts.y_query - model.apply(params, prompts)
    return (jnp.mean(residual**2) + ridge * jnp.sum(gamma**2)) / d


def stored_prompts(design, seeds, count: int, n: int, dtype=jnp.float32) -> Prompts:
    """The stored pretraining sets ``train.fit_sweep`` trains each of ``seeds`` on with ``TrainConfig(
    pretraining_prompts=count)`` and context length n (a sweep over one n), stacked [seeds, count, ...]: drawn
    once from fold_in(PRNGKey(seed), ``rng.Stream.PRETRAINING``) in ``dtype`` (the config's), so a closed-form
    fit on a seed's set is paired with that seed's trained network."""
    count, n = check.positive_int("count", count), check.positive_int("n", n)
    keys = stream_keys(seeds, Stream.PRETRAINING)  # validates the seeds
    with jax.enable_x64(True):  # as fit_sweep draws it
        return _draw(design, jnp.asarray(keys), count, n, jnp.dtype(dtype))


def span_spectrum(H, ridge: float) -> np.ndarray:
    """The eigenvalues, ascending, of A = H^T H / P + (ridge / d) I (half the Hessian of ``ridge_objective`` on
    the set whose P x d(d+1) features are H, ``features``) on the span of H's rows, the subspace gradient descent
    from Gamma = 0 moves in: the nonzero eigenvalues of H^T H / P (above 1e-9 times the largest), plus ridge / d
    (docs/theory.md §12)."""
    H = check.real_array("H", H, ndim=2)
    P, N = H.shape
    d = int(round((np.sqrt(1 + 4 * N) - 1) / 2))
    if d < 1 or d * (d + 1) != N:
        raise ValueError(f"H must have d(d+1) columns (the features of ``features``), got shape {H.shape}")
    ridge = check.real("ridge", ridge, 0.0)
    ev = np.linalg.eigvalsh(H.T @ H / P)
    if not ev[-1] > 0:
        raise ValueError("H has no nonzero feature (every row is zero): the span gradient descent moves in is empty")
    return ev[ev > 1e-9 * ev[-1]] + ridge / d


def heavy_ball(spectra, step_fraction: float) -> tuple[float, float]:
    """Polyak's (learning_rate, momentum) for a quadratic with Hessian eigenvalues in [mu, L], the Hessian 2A of
    ``ridge_objective`` over every spectrum of A in ``spectra`` (``span_spectrum``, e.g. one per seed):
    mu = 2 min lambda_min(A), L = 2 max lambda_max(A) / step_fraction (a margin, step_fraction in (0, 1)),
    learning_rate = 4 / (sqrt(L) + sqrt(mu))^2, momentum = ((sqrt(L) - sqrt(mu)) / (sqrt(L) + sqrt(mu)))^2, whose
    rate on every eigenvalue in [mu, L] is sqrt(momentum) = (sqrt(k) - 1) / (sqrt(k) + 1), k = L / mu
    (docs/theory.md §12)."""
    if isinstance(spectra, np.ndarray) and spectra.ndim == 1:
        raise TypeError("spectra must be a list of spectra, one array per seed (span_spectrum's), got one 1-d array: "
                        "wrap it in a list")
    spectra = [check.real_array("spectra", sp, ndim=1) for sp in spectra]
    if not spectra or any(sp.size == 0 or np.any(sp <= 0) for sp in spectra):
        raise ValueError("spectra must be one or more nonempty arrays of positive eigenvalues (span_spectrum's)")
    step_fraction = check.real("step_fraction", step_fraction, 0.0, 1.0, low_open=True, high_open=True)
    big = np.sqrt(2 * max(sp.max() for sp in spectra) / step_fraction)
    small = np.sqrt(2 * min(sp.min() for sp in spectra))
    return float(4 / (big + small) ** 2), float(((big - small) / (big + small)) ** 2)


def heavy_ball_bound(spectrum, learning_rate: float, momentum: float, steps: int) -> float:
    """max over the Hessian's eigenvalues h = 2 lambda (``spectrum``: A's on the span) of |e_steps / e_0|, e the
    error along h's eigenvector: heavy ball from rest (e_{-1} = e_0, optax's zero velocity) runs e_{t+1} =
    (1 + momentum - learning_rate h) e_t - momentum e_{t-1}. So ||Gamma - Gamma*|| / ||Gamma*|| <= this from
    Gamma_0 = 0, in exact arithmetic; it is rate^steps (rate = sqrt(momentum) where tuned by ``heavy_ball``)
    times a prefactor that grows linearly in steps at the edges of the tuned range, where the roots are double
    (1 + (1 - rate) steps at mu, 1 + (1 + rate) steps at L); momentum 0 gives plain GD's
    max |1 - learning_rate h|^steps (docs/theory.md §12)."""
    h = 2 * check.real_array("spectrum", spectrum, ndim=1)
    if h.size == 0:
        raise ValueError("spectrum must hold at least one eigenvalue (span_spectrum's), got an empty array")
    learning_rate = check.real("learning_rate", learning_rate, 0.0, low_open=True)
    momentum = check.real("momentum", momentum, 0.0, 1.0, high_open=True)
    M = np.zeros((h.size, 2, 2))
    M[:, 0, 0], M[:, 0, 1], M[:, 1, 0] = 1 + momentum - learning_rate * h, -momentum, 1.0
    Mt = np.linalg.matrix_power(M, check.integer("steps", steps, 0))
    return float(np.max(np.abs(Mt[:, 0, 0] + Mt[:, 0, 1])))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _draw(design, keys, count, n, dtype):
    return jax.vmap(lambda k: draw(design, k, count, n, n, dtype))(keys)


def attention_form(gamma) -> tuple[jax.Array, jax.Array]:
    """(Q, v) of iclsim's one-layer linear attention (docs/theory.md §2.2) with the prediction of Gamma on
    iclsim-unit prompts times sqrt(d): Q = [[Gamma[:, :d], Gamma[:, d] / d], [0, 0]], v = e_{d+1}."""
    gamma = jnp.asarray(gamma)
    d = gamma.shape[0]
    if gamma.shape != (d, d + 1):
        raise ValueError(f"gamma must have shape (d, d + 1), got {gamma.shape}")
    Q = jnp.zeros((d + 1, d + 1), gamma.dtype).at[:d, :d].set(gamma[:, :d]).at[:d, d].set(gamma[:, d] / d)
    return Q, jnp.zeros(d + 1, gamma.dtype).at[d].set(1.0)


def attention_params(gamma, dtype=jnp.float32) -> dict:
    """``models.LinearAttention(d)`` parameters (full rank) that predict as the fitted Gamma in iclsim units:
    Wq = Q, Wk = I, Wv = e_{d+1} e_{d+1}^T (so they train on and score like any other network)."""
    Q, v = attention_form(gamma)
    D = Q.shape[0]
    return {"Wq": Q.astype(dtype), "Wk": jnp.eye(D, dtype=dtype),
            "Wv": jnp.zeros((D, D), dtype).at[:, -1].set(v.astype(dtype))}


@float64
def icl_error(gamma, n: int, noise_var: float):
    """The exact finite-d ICL error of Gamma, in the paper's units: the risk of its attention form on fresh
    tasks (``lu_design``) with n context pairs, ``theory.attention_risk`` (docs/theory.md §3.4), divided by
    d. Lu et al.'s finite-d formula e(Gamma) = 1 + rho - (2/d) tr(Gamma A) + ((1 + rho)/d) tr(Gamma^T Gamma B)
    with A = [I; 0], B = [[I/alpha + (1 + 1/n) I/(1 + rho), 0], [0, (1 + rho)(1 + 2/n)]] is the same number."""
    gamma = np.asarray(gamma, np.float64)
    if gamma.ndim != 2 or gamma.shape[1] != gamma.shape[0] + 1 or not np.all(np.isfinite(gamma)):
        raise ValueError(f"gamma must be a finite (d, d + 1) array, got shape {gamma.shape}")
    d = gamma.shape[0]
    Q, v = attention_form(gamma)
    return theory.attention_risk(lu_design(d, noise_var), n, Q, v) / d
