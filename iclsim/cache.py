"""Resumable sweeps: every trained sweep point (model, design, n, seed, training settings) is
stored on disk under a hash of its settings, so a sweep re-run after an interruption trains only
the points that are missing. Files are written atomically (temporary file, then rename).
``persist_compilations`` keeps the compiled XLA programs on disk too, so a later run loads them.

    with cache.active(cache.SweepCache(".cache/iclsim")):
        train.fit_sweep(...)          # loads finished points, trains and stores the others
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import io
from pathlib import Path

import jax
import numpy as np

from iclsim._files import atomic_write
from iclsim.models import Frozen

__all__ = ["FORMAT", "fingerprint", "SweepCache", "current", "active", "persist_compilations"]

# bump when the numbers of a stored point change (2: one-draw initialisation and prompts; 3: flat Adam;
# 4: a draw's floats computed once)
FORMAT = 4
_ACTIVE: contextvars.ContextVar["SweepCache | None"] = contextvars.ContextVar("iclsim_sweep_cache", default=None)


def fingerprint(*objs) -> str:
    """A stable hash of settings: dataclasses field by field, arrays by dtype, shape and bytes,
    functions by module and name, containers element-wise (never by object identity)."""
    h = hashlib.sha256(f"iclsim-cache-{FORMAT}".encode())
    for obj in objs:
        _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(f"<{type(obj).__qualname__}".encode())
        for f in dataclasses.fields(obj):
            h.update(f.name.encode())
            _feed(h, getattr(obj, f.name))
    elif isinstance(obj, Frozen):
        _feed(h, obj.tree)
    elif isinstance(obj, dict):
        for k in sorted(obj):
            h.update(repr(k).encode())
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"[{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, (np.ndarray, jax.Array, np.generic)):
        arr = np.asarray(obj)
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    elif callable(obj) and hasattr(obj, "__qualname__"):
        h.update(f"{getattr(obj, '__module__', '')}.{obj.__qualname__}".encode())
    else:
        h.update(repr(obj).encode())
    h.update(b">")


@dataclasses.dataclass
class SweepCache:
    """A folder of trained sweep points. ``force`` retrains (and overwrites) every point;
    ``chunk`` is the most points trained per compiled call, so an interrupted sweep keeps all
    finished chunks. ``hits`` and ``trained`` count points loaded and trained."""

    directory: str | Path
    force: bool = False
    chunk: int = 32
    hits: int = 0
    trained: int = 0

    def __post_init__(self):
        self.directory = Path(self.directory)
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npz"

    def load(self, key: str, template):
        """(params, losses) stored under key, params in the structure of ``template``; or None."""
        path = self.path(key)
        if self.force or not path.exists():
            return None
        with np.load(path) as data:
            leaves = [data[f"p{i}"] for i in range(len(jax.tree_util.tree_leaves(template)))]
            losses = data["losses"]
        self.hits += 1
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves), losses

    def save(self, key: str, params, losses) -> None:
        leaves = {f"p{i}": np.asarray(a) for i, a in enumerate(jax.tree_util.tree_leaves(params))}
        buf = io.BytesIO()
        np.savez(buf, losses=np.asarray(losses), **leaves)
        atomic_write(self.path(key), buf.getvalue())
        self.trained += 1


def current() -> SweepCache | None:
    """The cache that ``train.fit_sweep`` uses when none is passed (set by ``active``)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def active(cache: SweepCache | None):
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def persist_compilations(directory: str | Path, min_compile_secs: float = 1.0):
    """Within the block, keep compiled XLA programs in ``directory`` (JAX's persistent compilation
    cache), so a later process that builds the same program loads it instead of compiling it. JAX keys an entry
    on the program's HLO, devices, backend and flags, so a stale entry is never used; programs that
    compile in under ``min_compile_secs`` are not stored. The previous settings are restored after."""
    from jax.experimental.compilation_cache import compilation_cache

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = [getattr(jax.config, name) for name in names]
    for name, value in zip(names, (str(path), float(min_compile_secs))):
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    try:
        yield path
    finally:
        for name, value in zip(names, before):
            jax.config.update(name, value)
        compilation_cache.reset_cache()
