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

from iclsim.models._common import Params, context_gram
from iclsim.models.attention import H3, LinearAttention
from iclsim.models.baselines import GD, OLS, Ridge
from iclsim.models.lora import LoRA
from iclsim.models.pgd import PGD, WPGD
from iclsim.models.transformer import FORMS, LinearTransformer
from iclsim.protocols import Effective, normalise_omega

__all__ = ["Params", "Effective", "normalise_omega", "context_gram", "LinearAttention", "H3", "PGD", "WPGD",
           "Ridge", "OLS", "GD", "Frozen", "LoRA", "LinearTransformer", "FORMS"]


# defined here, not in ``lora``: the cache recognises it by its module name, iclsim.models
class Frozen:
    """Holds fixed arrays a model closes over (e.g. pretrained weights); hashed by identity so the
    model stays a valid static configuration for the compiled-program cache."""

    def __init__(self, tree):
        self.tree = tree

    def __repr__(self):
        return f"Frozen(id={id(self):#x})"

