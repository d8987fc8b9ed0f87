"""Argument checks shared by designs, theory and models: each raises ValueError naming the
parameter and its allowed range."""

from __future__ import annotations

import numpy as np


def positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def nonneg_variance(name: str, value, length: int | None = None) -> np.ndarray:
    """A scalar variance or one variance per position, all finite and >= 0."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a 1-D array of per-position variances")
    if length is not None and arr.ndim == 1 and arr.shape[0] != length:
        raise ValueError(f"{name} must have length {length}, got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return arr


def spd_matrix(name: str, value, dim: int) -> np.ndarray:
    """A symmetric positive definite (dim x dim) matrix; None means the identity."""
    if value is None:
        return np.eye(dim)
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (dim, dim):
        raise ValueError(f"{name} must have shape ({dim}, {dim}), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    if not np.allclose(arr, arr.T, rtol=1e-10, atol=1e-12):
        raise ValueError(f"{name} must be symmetric")
    eig = np.linalg.eigvalsh(arr)
    if eig.min() <= 1e-12 * max(1.0, eig.max()):
        raise ValueError(f"{name} must be positive definite (smallest eigenvalue {eig.min():.3g})")
    return arr


def in_range(name: str, value, low: float, high: float, *, closed_high: bool = True) -> float:
    v = float(value)
    ok = low <= v <= high if closed_high else low <= v < high
    if not np.isfinite(v) or not ok:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")
    return v
