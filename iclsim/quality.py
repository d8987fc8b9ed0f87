"""Statistics for claims about trained networks (docs/theory.md §7): the quality gate that checks each
network against its reference, intervals over seeds, a sign test, and robust summaries for heavy-tailed
risks. A claim is made only from the networks that pass the gate; the failures are counted and shown."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = ["GATE_TOLERANCE", "Interval", "MedianInterval", "gate", "seed_interval", "sign_test", "robust",
           "median_interval", "median_summary", "finite_or_none", "verdict", "median_verdict", "across_bases", "verdicts_by_base",
           "UNSTABLE"]

UNSTABLE = "unstable across seed bases"

GATE_TOLERANCE = 0.10  # a network passes when its risk is within 10% of its reference (issue 19's bar)

# two-sided 95% quantiles of Student's t, df = 1..30 (beyond: the normal 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


class Interval(NamedTuple):
    """Mean over seeds with its two-sided 95% t-interval; count is the number of seeds."""

    mean: float
    low: float
    high: float
    count: int


def gate(risk, reference, tolerance: float = GATE_TOLERANCE, se=0.0, sigmas: float = 4.0) -> np.ndarray:
    """Pass/fail per network: risk <= (1 + tolerance) reference + sigmas se (se: the Monte Carlo error of
    the risk estimate, so a network is not failed by test-prompt noise alone). Non-finite risks fail."""
    risk, reference, se = (np.asarray(a, np.float64) for a in (risk, reference, se))
    if not 0 <= tolerance < float("inf"):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if not np.all(np.isfinite(reference)) or np.any(reference <= 0):
        raise ValueError("reference must be finite and > 0")
    return np.isfinite(risk) & (risk <= (1 + tolerance) * reference + sigmas * se)


def seed_interval(values) -> Interval:
    """Mean and 95% t-interval over seeds (one value per seed; at least 2)."""
    x = np.asarray(values, np.float64).ravel()
    if x.size < 2:
        raise ValueError(f"seed_interval needs at least 2 values, got {x.size}")
    mean = float(np.mean(x))
    half = (_T975[x.size - 2] if x.size - 1 <= len(_T975) else 1.96) * float(np.std(x, ddof=1)) / math.sqrt(x.size)
    return Interval(mean, mean - half, mean + half, int(x.size))


def sign_test(values) -> float:
    """Two-sided exact sign test p-value of 'the median is 0' (zeros dropped)."""
    x = np.asarray(values, np.float64).ravel()
    x = x[x != 0]
    k, m = int(np.sum(x > 0)), x.size
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(0, min(k, m - k) + 1)) / 2.0**m
    return float(min(1.0, 2 * tail))


def robust(values) -> dict:
    """Mean, median with its order-statistic 95% interval (binomial), and the 10%-trimmed mean: for risks
    whose tails are heavy (a deep linear stack off its training distribution), never a bare mean."""
    x = np.sort(np.asarray(values, np.float64).ravel())
    m = x.size
    if m == 0:
        raise ValueError("robust needs at least one value")
    cut = int(0.1 * m)
    # largest j with P(Binomial(m, 1/2) < j) <= 2.5%: [x_(j), x_(m-j+1)] covers the median with >= 95%
    j, acc = 0, 0.0
    while j < m and acc + math.comb(m, j) / 2.0**m <= 0.025:
        acc += math.comb(m, j) / 2.0**m
        j += 1
    low, high = (x[j - 1], x[m - j]) if j >= 1 else (-np.inf, np.inf)
    return {"mean": float(np.mean(x)), "median": float(np.median(x)), "median_low": float(low),
            "median_high": float(high), "trimmed_mean": float(np.mean(x[cut:m - cut]))}


class MedianInterval(NamedTuple):
    """The median of per-seed values with the order-statistic interval [x_(j), x_(m-j+1)] and its exact
    coverage of the population median, 1 - 2 P(Binomial(m, 1/2) < j) (distribution-free)."""

    median: float
    low: float
    high: float
    coverage: float
    count: int


def median_interval(values, level: float = 0.95) -> MedianInterval:
    """The narrowest symmetric order-statistic interval whose exact coverage of the median is >= ``level``:
    the largest j with 2 P(Binomial(m, 1/2) < j) <= 1 - level. With m = 8 seeds that is [min, max]
    (coverage 0.992); with m = 16, [x_(4), x_(13)] (0.979). Too few seeds for any such interval (m <= 5 at
    95%) give (-inf, inf) and coverage 1.0. Multimodal per-seed values are summarised by this, never by a
    t-interval alone (a t-interval over a two-cluster sample is not a summary of either cluster)."""
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    x = np.sort(np.asarray(values, np.float64).ravel())
    m = x.size
    if m == 0:
        raise ValueError("median_interval needs at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError("median_interval needs finite values (a failed network is left out, never averaged in)")
    below = [math.comb(m, i) / 2.0**m for i in range(m + 1)]  # P(Binomial(m, 1/2) = i)
    j, tail = 0, 0.0
    while j < m and 2 * (tail + below[j]) <= 1.0 - float(level) + 1e-12:
        tail += below[j]
        j += 1
    if j == 0:
        return MedianInterval(float(np.median(x)), -math.inf, math.inf, 1.0, m)
    return MedianInterval(float(np.median(x)), float(x[j - 1]), float(x[m - j]), float(1.0 - 2 * tail), m)


def median_verdict(values, supports_if_positive: bool = True, level: float = 0.95) -> str:
    """'supported' / 'contradicted' when the median's order-statistic interval (``median_interval``, exact
    coverage >= ``level``) excludes 0 on the side the claim predicts / the other side, else 'not resolved at
    this sample size'."""
    iv = median_interval(values, level)
    return verdict(Interval(iv.median, iv.low, iv.high, iv.count), supports_if_positive)


def across_bases(verdicts) -> str:
    """One verdict from the verdicts of independent seed bases: 'supported' or 'contradicted' only where every
    base says so, else ``UNSTABLE`` (the claim's outcome depends on which seeds were drawn)."""
    verdicts = list(verdicts)
    if len(verdicts) < 2:
        raise ValueError(f"across_bases needs the verdicts of at least 2 seed bases, got {len(verdicts)}")
    first = verdicts[0]
    if first in ("supported", "contradicted") and all(v == first for v in verdicts):
        return first
    if all(v == first for v in verdicts):
        return first  # every base unresolved: say so, not "unstable"
    return UNSTABLE


def verdicts_by_base(per_base: dict, supports_if_positive: bool = True) -> dict:
    """Per seed base (``{base: per-seed values}``): the median with its order-statistic interval
    (``median_interval``; None for an unbounded end), its coverage, the count of passing seeds, the mean and
    the ``median_verdict``; a base without values is 'not resolved: no passing seed'. Under "across_bases" the
    one verdict of all bases (``across_bases``): a claim decided only where independent bases agree."""
    out = {}
    for base, values in per_base.items():
        if len(values) == 0:
            out[base] = {"passing_seeds": 0, "verdict": "not resolved: no passing seed"}
            continue
        iv = median_interval(values)
        out[base] = {"median": round(iv.median, 4), "median_interval": [finite_or_none(iv.low), finite_or_none(iv.high)],
                     "median_coverage": round(iv.coverage, 4), "passing_seeds": iv.count,
                     "mean": round(float(np.mean(values)), 4),
                     "verdict": median_verdict(values, supports_if_positive)}
    out["across_bases"] = across_bases([out[b]["verdict"] for b in sorted(per_base)])
    return out


def median_summary(values) -> dict:
    """The median with its order-statistic 95% interval (``robust``; None for an unbounded end) and the sign
    test's p-value, rounded to 4 digits: the summary of per-seed values whose tails are heavy."""
    med = median_interval(values)
    return {"median": round(med.median, 4),
            "median_interval": [finite_or_none(med.low), finite_or_none(med.high)],
            "median_coverage": round(med.coverage, 4), "sign_test_p": round(sign_test(values), 4)}


def finite_or_none(value, digits: int = 4):
    """``value`` rounded, or None where it is not finite (a median interval of too few seeds is unbounded):
    result JSON stays standard (no Infinity)."""
    return round(float(value), digits) if np.isfinite(value) else None


def verdict(interval: Interval, supports_if_positive: bool = True) -> str:
    """'supported' when the interval excludes 0 on the side the claim predicts, 'contradicted' when it
    excludes 0 on the other side, else 'not resolved at this sample size'."""
    if interval.low > 0:
        return "supported" if supports_if_positive else "contradicted"
    if interval.high < 0:
        return "contradicted" if supports_if_positive else "supported"
    return "not resolved at this sample size"
