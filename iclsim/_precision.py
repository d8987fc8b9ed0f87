"""Float64 asked for locally: iclsim never changes the user's ``jax_enable_x64`` flag.

Closed forms, ground truth, evaluation accumulators and the training engine run under
``jax.enable_x64(True)`` (a context manager scoped to the call): float64 where a computation asks
for it, and integer and index types that do not depend on the caller's global flag, so a float32
training program is the same program whatever that flag says.

What a ``@float64`` function returns is numpy (float64 arrays, 0-d results as numpy scalars), not JAX
float64 arrays: with x64 off outside the call, the user's own arithmetic on a JAX float64 array
(``risk + 1e-12``, passing it to a jitted function) would truncate it to float32 with a warning. And a
closed form (``iclsim.theory``) whose result is not finite (NaN or inf: an overflow or underflow of
float64 at an extreme scale, a NaN predictor) raises FloatingPointError naming the function, instead of
passing a wrong number on.
"""

from __future__ import annotations

import functools

import jax
import numpy as np


def float64(f):
    """Decorate ``f`` so it runs (and traces) with float64 available; concrete JAX arrays in its result
    become numpy arrays of the same dtype (0-d ones numpy scalars). For the closed forms of
    ``iclsim.theory`` a non-finite float result raises FloatingPointError (elsewhere, say an evaluation's
    rows, NaN may be a value). Traced results (``f`` called inside jit) pass through unchanged."""
    finite = f.__module__.split(".")[:2] == ["iclsim", "theory"]

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        with jax.enable_x64(True):
            result = f(*args, **kwargs)
        return _concrete(result, f.__qualname__, finite)

    return wrapped


def _concrete(result, name: str, finite: bool = True):
    def convert(leaf):
        if isinstance(leaf, jax.core.Tracer) or not isinstance(leaf, (jax.Array, np.ndarray, np.generic, float)):
            return leaf
        if isinstance(leaf, jax.Array):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                return leaf
            leaf = np.asarray(leaf)
            leaf = leaf[()] if leaf.ndim == 0 else leaf
        if finite and np.issubdtype(np.asarray(leaf).dtype, np.inexact) and not np.all(np.isfinite(leaf)):
            raise FloatingPointError(
                f"{name} gave a non-finite result (NaN or inf): a predictor or input gave NaN, or the computation "
                "overflowed or underflowed float64 at these inputs (a covariance, noise variance or step size of "
                "extreme scale?); rescale the problem (risks scale with the variance of y) or use moderate values")
        return leaf

    return jax.tree_util.tree_map(convert, result)
