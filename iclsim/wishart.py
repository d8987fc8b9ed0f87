"""Exact moments of a Wishart matrix W = X^T X, X [n, d] with iid N(0, 1) entries (docs/theory.md §8).

The risk of L-step gradient descent on isotropic data is linear in the power sums E tr S^k of the sample
covariance S = W / n, k <= 2L + 1. They have an exact recursion from Gaussian integration by parts,
E[X_ai F(X)] = E[dF / dX_ai], applied to tr W^{m+1} = sum_ai X_ai (X W^m)_ai times a product P of traces:

    E[tr W^{m+1} P] = (n + m) E[tr W^m P] + sum_{r=0}^{m-1} E[tr W^{r+1} tr W^{m-1-r} P]
                      + sum over the factors tr W^j of P of 2 j E[tr W^{m+j} P / tr W^j],

with tr W^0 = d. Every term on the right has total degree (the sum of the powers) one less than the left,
so the recursion closes on products of traces and ends at the empty product, 1. It runs in Python
integers (exact for any n, d and degree), memoised over the sorted tuple of powers.
"""

from __future__ import annotations

import functools
from fractions import Fraction

import numpy as np

from iclsim import _validate as check

__all__ = ["MAX_DEGREE", "trace_product_moment", "power_moment", "sample_covariance_moments"]

# the largest total degree sum(powers) accepted (2L + 1 for up to 24 GD steps); the memoised states are its partitions
MAX_DEGREE = 49


def trace_product_moment(powers, n: int, d: int) -> int:
    """E prod_p tr W^p, W = X^T X, X [n, d] iid N(0, 1), exactly (a Python int), by the integration-by-parts
    recursion of the module docstring. ``powers``: non-negative integers (tr W^0 = d), total at most
    ``MAX_DEGREE``. E.g. E (tr W)^2 = (nd)^2 + 2nd (tr W is chi-squared with nd degrees of freedom)."""
    n = check.positive_int("n", n)
    d = check.positive_int("d", d)
    if isinstance(powers, (str, bytes)) or not hasattr(powers, "__iter__"):
        raise TypeError(f"powers must be a sequence of non-negative integers, got {powers!r}")
    powers = [check.integer("powers", p, minimum=0) for p in powers]
    if sum(powers) > MAX_DEGREE:
        raise ValueError(f"powers must sum to at most MAX_DEGREE = {MAX_DEGREE}, got {sum(powers)}")
    return _expectation(powers, n, d)


def power_moment(k: int, n: int, d: int) -> int:
    """E tr W^k exactly (a Python int), W = X^T X, X [n, d] iid N(0, 1); symmetric in (n, d). E tr W = nd,
    E tr W^2 = nd (n + d + 1)."""
    k = check.integer("k", k, minimum=0, maximum=MAX_DEGREE)
    return trace_product_moment((k,), n, d)


def sample_covariance_moments(n: int, d: int, max_power: int) -> np.ndarray:
    """m_k = E tr S^k for S = X^T X / n, k = 0..max_power, as float64 [max_power + 1] (m_0 = d). Each is the
    exact rational E tr W^k / n^k rounded once to float64 (the integers themselves can exceed float64's
    range; the ratio is formed exactly first). An OverflowError names k if a ratio does not fit."""
    n = check.positive_int("n", n)
    d = check.positive_int("d", d)
    max_power = check.integer("max_power", max_power, minimum=0, maximum=MAX_DEGREE)
    out = np.empty(max_power + 1, np.float64)
    for k in range(max_power + 1):
        try:
            out[k] = float(Fraction(power_moment(k, n, d), n**k))
        except OverflowError:
            raise OverflowError(f"E tr S^{k} for n = {n}, d = {d} exceeds float64's range; use a lower "
                                "max_power") from None
    return out


def _expectation(powers, n: int, d: int) -> int:
    """E prod tr W^p with the zero powers taken out as factors d, the rest sorted for the memo."""
    zeros = sum(1 for p in powers if p == 0)
    return d**zeros * _moment(tuple(sorted((p for p in powers if p), reverse=True)), n, d)


@functools.lru_cache(maxsize=None)
def _moment(powers: tuple, n: int, d: int) -> int:
    """E prod tr W^p for ``powers`` sorted decreasing, all >= 1: the recursion applied to the first factor."""
    if not powers:
        return 1
    m, rest = powers[0] - 1, list(powers[1:])
    total = (n + m) * _expectation([m] + rest, n, d)
    for r in range(m):
        total += _expectation([r + 1, m - 1 - r] + rest, n, d)
    for i, j in enumerate(rest):
        total += 2 * j * _expectation([m + j] + rest[:i] + rest[i + 1:], n, d)
    return total
