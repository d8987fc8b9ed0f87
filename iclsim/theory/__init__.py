"""The theory iclsim checks, in float64 (asked for locally, ``_precision.float64``: the caller's
``jax_enable_x64`` flag is left alone), one module per section of docs/theory.md:

- ``pgd``: one-layer closed forms, the risk of PGD / weighted PGD for any W and of the whole one-layer
  linear attention, and their optima (§3.1, §3.2, §3.4, §5);
- ``lowrank``: the best rank-r preconditioner and LoRA update (§3.3);
- ``correlated``: RAG and task-feature alignment (§4);
- ``truncation``: when SVD truncation of the optimum helps (§6.1);
- ``multistep``: L-step gradient descent with the exact Wishart moments, the L-layer reference (§8);
- ``bayes``: the Bayes risk, the floor under every predictor (§9);
- ``sampled``: the Monte Carlo pieces (PGD-form ground truth for any design, a predictor's risk on fresh
  prompts), every draw made by the one referee ``iclsim.montecarlo`` (§7).

Every public name is re-exported here: ``theory.optimal_pgd``, ``theory.multistep_gd_risk``, ...
"""

from iclsim.theory import bayes, correlated, lowrank, multistep, pgd, sampled, truncation
from iclsim.theory._common import F64, MAX_PER_POSITION
from iclsim.theory.bayes import BayesRisk, bayes_risk
from iclsim.theory.correlated import effective_sample_multiplier, rag_effective_risk
from iclsim.theory.lowrank import lora_optimal_pgd, lora_optimal_risk, lowrank_optimal_pgd, lowrank_optimal_risk
from iclsim.theory.multistep import (MAX_STEPS, NEWTON_ITERATIONS, STEP_SLOTS, STEP_STARTS, STEP_TOLERANCE,
                                     MultiStepGD, context_power_traces, multistep_gd_risk, optimal_multistep_gd)
from iclsim.theory.pgd import (Moments, Optimum, WeightedOptimum, attention_risk, iid_effective_n, optimal_pgd,
                               optimal_wpgd, pgd_moments, pgd_risk)
from iclsim.theory.sampled import ground_truth, mean_and_se, monte_carlo_risk, pgd_predict, risk_moments
from iclsim.theory.truncation import (DirectionGains, direction_gains, noise_threshold, predict_zero_risk,
                                      truncated_optimum_risk)

__all__ = ["F64", "MAX_PER_POSITION", "Optimum", "WeightedOptimum", "Moments", "pgd_moments", "pgd_risk",
           "attention_risk", "optimal_pgd", "rag_effective_risk", "effective_sample_multiplier", "iid_effective_n",
           "optimal_wpgd", "lowrank_optimal_pgd", "lowrank_optimal_risk", "lora_optimal_pgd", "lora_optimal_risk",
           "ground_truth", "risk_moments", "mean_and_se", "monte_carlo_risk", "pgd_predict", "MultiStepGD", "MAX_STEPS",
           "NEWTON_ITERATIONS", "STEP_SLOTS", "STEP_STARTS", "STEP_TOLERANCE", "context_power_traces",
           "multistep_gd_risk", "optimal_multistep_gd", "DirectionGains", "truncated_optimum_risk", "direction_gains",
           "noise_threshold", "predict_zero_risk", "BayesRisk", "bayes_risk",
           "bayes", "correlated", "lowrank", "multistep", "pgd", "sampled", "truncation"]
