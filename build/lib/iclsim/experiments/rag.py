"""Paper A, RAG (docs/theory.md §1.2 and §4): in-context examples that resemble the query,
x_i | x ~ N(alpha x, I), raise the effective sample size by kappa = alpha^2 d + 1 (large-d
approximation, dashed)."""

from iclsim import RAG, theory

from ._correlated import QUICK, SETTINGS, correlated_experiment

EXPERIMENT = correlated_experiment(
    "rag", "Paper A: retrieval-augmented demonstrations (RAG)", lambda d, a, s2: RAG(d, a, noise_var=s2),
    settings=SETTINGS, quick=QUICK, approximation=theory.rag_effective_risk,
    approximation_label="kappa n approximation")
