"""Paper A, task-feature alignment (docs/theory.md §1.3 and §4): x_i | beta ~ N(alpha beta, I) raises
the effective sample size."""

from iclsim import TaskFeatureAlignment

from ._correlated import QUICK, SETTINGS, correlated_experiment

EXPERIMENT = correlated_experiment(
    "alignment", "Paper A: task-feature alignment", lambda d, a, s2: TaskFeatureAlignment(d, a, s2),
    settings=SETTINGS, quick=QUICK)
