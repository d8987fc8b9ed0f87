"""iclsim: simulate and check the theory of in-context learning in linear models.

Importing iclsim changes no global state: closed forms, ground truth and evaluation ask for
float64 locally (``jax.enable_x64`` around the call), and models, samplers and training take an
explicit dtype (float32 by default).
"""

from iclsim import designs, gram, rng, theory
from iclsim.designs import (IID, RAG, Drift, Prompts, TaskFeatureAlignment, TaskPool, tokens,
                            truncate_context)

__version__ = "0.1.0"

# the other submodules load on first access (PEP 562), so ``import iclsim`` pulls in neither matplotlib
# (plotting) nor hypothesis (testing, a test dependency)
_SUBMODULES = ("anisotropic", "asymptotics", "bound", "bridge", "cache", "cli", "compiler", "configs", "depth",
               "dmmse", "dynamics", "evaluate", "fingerprint", "gating", "gla", "layout", "loop", "models",
               "montecarlo", "multihead", "multitask", "plotting", "pretraining", "progress", "prompts", "protocols",
               "pruning", "quality", "records", "registry", "results", "runner", "sweeps", "testing", "train",
               "wishart")


def __getattr__(name):
    if name in _SUBMODULES:
        import importlib
        return importlib.import_module(f"iclsim.{name}")
    raise AttributeError(f"module 'iclsim' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))

__all__ = ["designs", "gram", "rng", "theory", "IID", "RAG", "Drift", "Prompts", "TaskFeatureAlignment", "TaskPool",
           "tokens", "truncate_context", "__version__"]
