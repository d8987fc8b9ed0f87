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


def int_list(name: str, values, minimum: int = 1) -> list[int]:
    """A list of ``name`` values (errors name the entry, ``name``, or the list, ``name + "s"``): integers (Python or numpy, not bool, no fractional floats), each >= minimum, at least one."""
    values = list(values)
    if not values:
        raise ValueError(f"{name}s must hold at least one integer")
    return [positive_int(name, value, minimum) for value in values]


def seed_list(name: str, values) -> list[int]:
    """Integer seeds (any sign; Python or numpy integers, not bool or float), at least one."""
    values = list(values)
    if not values:
        raise ValueError(f"{name} must hold at least one integer")
    return [integer(name, value) for value in values]


def integer(name: str, value) -> int:
    """A Python or numpy integer of any sign (not bool, not float)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def model_for(model, designs, where: str, needs_dtype: bool = False) -> None:
    """A model fits the designs it meets: same ``dim`` where the model declares one, and a ``dtype``
    where the caller computes in the model's dtype (evaluation)."""
    if needs_dtype and not hasattr(model, "dtype"):
        raise TypeError(f"{where} needs model.dtype (the dtype the model computes in, e.g. jnp.float32); "
                        f"{type(model).__name__} has none")
    dim = getattr(model, "dim", None)
    for design in designs:
        if dim is not None and design.dim != dim:
            raise ValueError(f"model dim ({dim}) must equal design dim ({design.dim}) in {where}: "
                             f"{type(model).__name__}(dim={dim}) on {type(design).__name__}(dim={design.dim})")


def sweep_params(params, designs: int, ns: int) -> int:
    """Check parameters against the sweep they are evaluated on: every leaf has leading axes
    [designs, ns, seeds] with one seed count, and finite values. Returns the seed count."""
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(params)
    seeds = set()
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) < 3 or shape[:2] != (designs, ns):
            raise ValueError(f"params leaf {jax.tree_util.keystr(path)} has shape {shape}, but the sweep needs "
                             f"leading axes [designs, ns, seeds] = [{designs}, {ns}, seeds]: evaluate the params of "
                             f"fit_sweep on the same designs and ns")
        seeds.add(shape[2])
        if not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError(f"params leaf {jax.tree_util.keystr(path)} has non-finite values: a diverged or "
                             f"corrupted model cannot be scored")
    if len(seeds) > 1:
        raise ValueError(f"params leaves disagree on the seed axis (sizes {sorted(seeds)})")
    return seeds.pop() if seeds else 1
