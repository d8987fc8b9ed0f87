"""Former home of the theory bridge and the sweep helper, kept so older imports work: see
``iclsim.bridge`` (effective, exact_risk) and ``iclsim.sweeps`` (risk_curves, worst, worst_exact_gap)."""

from iclsim.bridge import Effective, effective, exact_risk
from iclsim.sweeps import risk_curves, worst, worst_exact_gap

__all__ = ["Effective", "effective", "exact_risk", "risk_curves", "worst", "worst_exact_gap"]
