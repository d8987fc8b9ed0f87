"""The bridge from a trained model to the theory: the (W, omega) of weighted PGD a trained model
implements on prompts of n active pairs in n_slots slots, and its closed-form risk (docs/theory.md §3
to §5), both in float64. ``effective`` is ``protocols.effective``, the one reading of a PGD-form model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import theory
from iclsim._precision import float64
from iclsim.designs import IID
from iclsim.models import LinearAttention, LoRA
from iclsim.protocols import Effective, effective

__all__ = ["Effective", "effective", "exact_risk"]


@float64
def exact_risk(model, params, design, n: int, n_slots: int, W=None, omega=None):
    """Closed-form risk of a trained model on prompts of n active pairs in n_slots slots, or None where
    there is none. One-layer attention (and LoRA of it) on IID with scalar noise: the whole attention,
    ``theory.attention_risk`` of Q = Wq Wk^T n / n_slots (S sums the n active pairs over n_slots) and
    v = Wv[:, d+1]; otherwise L(W) of the effective (W, omega) (``effective``, or as given)."""
    base, p = (model.base, model.merged(params)) if isinstance(model, LoRA) else (model, params)
    if isinstance(base, LinearAttention) and isinstance(design, IID) and np.ndim(design.noise_var) == 0:
        p = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), p)
        return float(theory.attention_risk(design, n, p["Wq"] @ p["Wk"].T * (n / n_slots), p["Wv"][:, -1]))
    if W is None:
        W, omega = effective(model, params, n, n_slots)
    try:
        return float(theory.pgd_risk(design, n, W, omega))
    except TypeError:  # no closed form for general W on this design
        return None
