"""Float64 asked for locally: iclsim never changes the user's ``jax_enable_x64`` flag.

Closed forms, ground truth, evaluation accumulators and the training engine run under
``jax.enable_x64(True)`` (a context manager scoped to the call): float64 where a computation asks
for it, and integer and index types that do not depend on the caller's global flag, so a float32
training program is the same program whatever that flag says.
"""

from __future__ import annotations

import functools

import jax


def float64(f):
    """Decorate ``f`` so it runs (and traces) with float64 available; results keep their dtype."""

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        with jax.enable_x64(True):
            return f(*args, **kwargs)

    return wrapped

