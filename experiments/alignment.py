"""Paper A, task-feature alignment (THEORY 1.3 and 4): x_i | beta ~ N(alpha beta, I) raises the
effective sample size."""

from iclsim import TaskFeatureAlignment, studies

EXPERIMENT = studies.correlated_experiment(
    "alignment", "Paper A: task-feature alignment", lambda d, a, s2: TaskFeatureAlignment(d, a, s2))
