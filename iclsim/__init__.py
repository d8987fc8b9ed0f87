"""iclsim: simulate and check the theory of in-context learning in linear models.

Importing iclsim changes no global state: closed forms, ground truth and evaluation ask for
float64 locally (``jax.enable_x64`` around the call), and models, samplers and training take an
explicit dtype (float32 by default).
"""

from iclsim import designs, gram, rng, theory
from iclsim.designs import (IID, RAG, Drift, Prompts, TaskFeatureAlignment, TaskPool, tokens,
                            truncate_context)

__version__ = "0.1.0"

__all__ = ["designs", "gram", "rng", "theory", "IID", "RAG", "Drift", "Prompts", "TaskFeatureAlignment", "TaskPool",
           "tokens", "truncate_context", "__version__"]
