"""Argument checks shared by designs, theory and models: each raises ValueError (a value out of
range, non-finite, of the wrong shape) or TypeError (not a number at all) naming the parameter and
what it accepts."""

from __future__ import annotations

import numbers
import os

import numpy as np

# the largest context length the closed forms take: float64 holds every integer up to 2**53 exactly
MAX_N = 2**53


def _is_traced(value) -> bool:
    import jax
    return isinstance(value, jax.core.Tracer)


def _scalar(value):
    """A 0-d numpy or concrete JAX array as its scalar; anything else unchanged."""
    if hasattr(value, "__array__") and hasattr(value, "shape") and not _is_traced(value) and np.ndim(value) == 0:
        return np.asarray(value)[()]
    return value


def memory(what: str, nbytes: float, advice: str) -> None:
    """Refuse (MemoryError naming ``what``) a computation whose arrays need more than this machine's
    physical memory, before any is allocated: the allocation would otherwise abort the interpreter."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover (no sysconf)
        total = 2**40
    if nbytes > total:
        raise MemoryError(f"{what} needs about {nbytes / 2**30:.3g} GiB, more than this machine's "
                          f"{total / 2**30:.3g} GiB of memory; {advice}")


def integer(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (Python or numpy, or a 0-d integer array) in [minimum, maximum]: TypeError for
    anything else (a bool, a float even without a fractional part: 1.5 must not become 1 silently),
    ValueError for an out-of-range value."""
    if minimum is not None and maximum is not None:
        accepted = f"an integer in [{minimum}, {maximum}]"
    elif maximum is not None:
        accepted = f"an integer <= {maximum}"
    else:
        accepted = f"an integer >= {minimum}" if minimum is not None else "an integer"
    value = _scalar(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {accepted}, got {value!r} (a {type(value).__name__})")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return value


def positive_int(name: str, value, minimum: int = 1) -> int:
    """An integer >= minimum (see ``integer``)."""
    return integer(name, value, minimum)


def real(name: str, value, low: float | None = None, high: float | None = None, *, low_open: bool = False,
         high_open: bool = False) -> float:
    """A finite real number in the given interval: TypeError for a non-number, ValueError otherwise."""
    lo_b, hi_b = "(" if low_open else "[", ")" if high_open else "]"
    if low is not None and high is not None:
        accepted = f"a number in {lo_b}{low}, {high}{hi_b}"
    elif low is not None:
        accepted = f"a number {'>' if low_open else '>='} {low}"
    elif high is not None:
        accepted = f"a number {'<' if high_open else '<='} {high}"
    else:
        accepted = "a finite number"
    value = _scalar(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {accepted}, got {value!r} (a {type(value).__name__})")
    x = float(value)
    ok = np.isfinite(x)
    if ok and low is not None:
        ok = x > low if low_open else x >= low
    if ok and high is not None:
        ok = x < high if high_open else x <= high
    if not ok:
        raise ValueError(f"{name} must be {accepted} (finite), got {value!r}")
    return x


def real_array(name: str, value, ndim: int | tuple[int, ...] | None = None, finite: bool = True) -> np.ndarray:
    """A float64 array of numbers (TypeError for anything else), of the given ndim, finite."""
    if isinstance(value, (str, bytes, dict, set)) or value is None:
        raise TypeError(f"{name} must be an array of numbers, got {value!r} (a {type(value).__name__})")
    try:
        if np.iscomplexobj(np.asarray(value)):
            raise TypeError(f"{name} must be real: a complex array would lose its imaginary part, got {value!r}")
        arr = np.asarray(value, dtype=np.float64)
    except (ValueError,):
        raise TypeError(f"{name} must be an array of numbers, got {value!r}") from None
    except TypeError as err:
        if "must be real" in str(err):
            raise
        raise TypeError(f"{name} must be an array of numbers, got {value!r}") from None
    if ndim is not None and arr.ndim not in np.atleast_1d(ndim):
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    if finite and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return arr


def nonneg_variance(name: str, value, length: int | None = None) -> np.ndarray:
    """A scalar variance or one variance per position, all finite and >= 0."""
    arr = real_array(name, value, finite=False)
    if arr.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a 1-D array of per-position variances")
    if arr.ndim == 1 and arr.shape[0] < 1:
        raise ValueError(f"{name} must be a scalar or a non-empty 1-D array, got an empty array")
    if length is not None and arr.ndim == 1 and arr.shape[0] != length:
        raise ValueError(f"{name} must have length {length}, got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return arr


def spd_matrix(name: str, value, dim: int) -> np.ndarray:
    """A symmetric positive definite (dim x dim) matrix; None means the identity. The checks are
    relative to the matrix's scale, so a covariance of scale 1e-20 is as valid as one of scale 1."""
    if value is None:
        return np.eye(dim)
    arr = real_array(name, value, finite=False)
    if arr.shape != (dim, dim):
        raise ValueError(f"{name} must have shape ({dim}, {dim}), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    scale = float(np.max(np.abs(arr)))
    if scale == 0 or not np.allclose(arr, arr.T, rtol=1e-10, atol=1e-12 * scale):
        raise ValueError(f"{name} must be symmetric" + (" positive definite (it is zero)" if scale == 0 else ""))
    eig = np.linalg.eigvalsh(arr / scale)
    if eig.min() <= 1e-12 * eig.max():
        raise ValueError(f"{name} must be positive definite (smallest eigenvalue {eig.min() * scale:.3g}, "
                         f"largest {eig.max() * scale:.3g})")
    return arr


def in_range(name: str, value, low: float, high: float, *, closed_high: bool = True) -> float:
    """A finite number in [low, high] (or [low, high)); TypeError for a non-number."""
    value = _scalar(value)
    bracket = "]" if closed_high else ")"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [{low}, {high}{bracket}, got {value!r} (a {type(value).__name__})")
    v = float(value)
    ok = low <= v <= high if closed_high else low <= v < high
    if not np.isfinite(v) or not ok:
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")
    return v


def int_list(name: str, values, minimum: int = 1) -> list[int]:
    """A list of ``name`` values (errors name the entry, ``name``, or the list, ``name + "s"``): integers (Python or numpy, not bool, no fractional floats), each >= minimum, at least one."""
    values = list(values)
    if not values:
        raise ValueError(f"{name}s must hold at least one integer")
    return [positive_int(name, value, minimum) for value in values]


def context_lengths(values) -> list[int]:
    """The context lengths ns of a sweep: integers >= 1, strictly increasing. A sweep's n axis is matched by
    position, so fit_sweep and evaluate_sweep both take the sorted list: scoring [5, 2] against a fit over
    [2, 5] would label every network with the other n (issue 32, finding 4)."""
    ns = int_list("n", values)
    if any(b <= a for a, b in zip(ns, ns[1:])):
        raise ValueError(f"ns must be strictly increasing (the n axis of a sweep is matched by position; fit and "
                         f"score with the same sorted list), got {ns}")
    return ns


# seeds are 64-bit signed integers: 2**63 and above would wrap onto negative seeds (another stream's)
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def seed_list(name: str, values) -> list[int]:
    """Integer seeds (any sign, in [SEED_MIN, SEED_MAX]; Python or numpy integers, not bool or float), at
    least one."""
    values = list(values)
    if not values:
        raise ValueError(f"{name} must hold at least one integer")
    return [integer(name, value, SEED_MIN, SEED_MAX) for value in values]


def float_dtype(name: str, dtype):
    """A dtype iclsim computes in: float32 or float64 (as jnp.float32, np.float64, "float32", ...).
    float16 / bfloat16 lose the digits the checks rely on and integers are not floats: ValueError."""
    try:
        kind = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be a float dtype (jnp.float32 or jnp.float64), got {dtype!r}") from None
    if kind not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"{name} must be float32 or float64, got {kind} ({dtype!r}): half precision loses the "
                         "digits training and the checks rely on")
    return dtype


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


def padding(model, ns, gram: bool, where: str) -> None:
    """A multi-n sweep shares max(ns) slots: shorter contexts are padded with zero tokens, so on token
    prompts the model must declare ``inert_padding = True`` (a zero context token changes nothing: sums
    of products of tokens, or a mask). Gram draws are exact for any n and need no declaration."""
    from iclsim.protocols import inert_padding  # here, not above: protocols imports designs, which imports this

    if len(set(ns)) > 1 and not gram and not inert_padding(model):
        raise ValueError(f"ns = {list(ns)} in {where}: shorter contexts are padded with zero tokens to {max(ns)} slots, "
                         f"and {type(model).__name__} does not declare inert_padding = True. Declare it if a zero "
                         "context token leaves the prediction unchanged (mask them, as a softmax must), or run "
                         "one n per sweep")


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


def predictions(pred, y_query, where: str):
    """Predictions of one batch must have the shape of the labels, [B]: a model returning [B, 1] would
    broadcast (y - pred)^2 to [B, B] and score a different, confidently wrong number. Checked on shapes,
    which are static under jit. Returns ``pred``."""
    if np.shape(pred) != np.shape(y_query):
        raise ValueError(f"{where}: the model's predictions have shape {tuple(np.shape(pred))}, but the labels have "
                         f"shape {tuple(np.shape(y_query))} (one prediction per prompt, [B]); a [B, 1] output would "
                         "broadcast the squared error to [B, B]: return preds[..., 0] or reshape to [B]")
    return pred


def model_fields(model, *positive: str) -> None:
    """The checks every model's fields share: ``dim`` a positive integer, ``dtype`` a float dtype, and each
    field named in ``positive`` (context, steps, layers, ...) a positive integer, in that order."""
    positive_int("dim", model.dim)
    float_dtype("dtype", model.dtype)
    for name in positive:
        positive_int(name, getattr(model, name))
