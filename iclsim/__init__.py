"""iclsim: simulate and check the theory of in-context learning in linear models.

Importing iclsim turns on ``jax_enable_x64`` so closed forms and ground-truth solves run in
float64; models, samplers and training take an explicit dtype (float32 by default).
"""

import jax

jax.config.update("jax_enable_x64", True)

from iclsim import designs, theory  # noqa: E402
from iclsim.designs import (IID, RAG, Drift, Prompts, TaskFeatureAlignment, TaskPool, tokens,  # noqa: E402
                            truncate_context)

__version__ = "0.1.0"

__all__ = ["designs", "theory", "IID", "RAG", "Drift", "Prompts", "TaskFeatureAlignment", "TaskPool", "tokens",
           "truncate_context", "__version__"]
