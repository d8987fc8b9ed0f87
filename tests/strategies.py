"""The suite's hypothesis strategies are the public ones of ``iclsim.testing``; this module keeps
the old names for tests that import them from here."""

from iclsim.testing import (alignment_designs, correlated_designs, covariances, designs, drift_designs,  # noqa: F401
                            iid_designs, power_law_covariances, rag_designs, spiked_covariances, task_pool_designs,
                            variances)
from iclsim.testing import spd_covariances as spd  # noqa: F401
