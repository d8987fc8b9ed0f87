"""Paper A, RAG (THEORY 1.2 and 4): in-context examples that resemble the query, x_i | x ~ N(alpha x, I),
raise the effective sample size by kappa = alpha^2 d + 1 (large-d approximation, dashed)."""

from iclsim import RAG, studies, theory

EXPERIMENT = studies.correlated_experiment(
    "rag", "Paper A: retrieval-augmented demonstrations (RAG)",
    lambda d, a, s2: RAG(d, a, noise_var=s2), theory.rag_effective_risk, "kappa n approximation")
