"""Resumable sweeps: every trained sweep point (model, design, n, seed, training settings) is
stored on disk under a hash of everything that can change its numbers, so a sweep re-run after an
interruption trains only the points that are missing. Files are written atomically (temporary file,
then rename) and carry a checksum; a corrupt or non-finite entry is reported, deleted and retrained.
``persist_compilations`` keeps the compiled XLA programs on disk too, so a later run loads them.

    with cache.active(cache.SweepCache(".cache/iclsim")):
        train.fit_sweep(...)          # loads finished points, trains and stores the others

What the key covers (``fingerprint``): the source of every function and class involved (the model's
and design's classes, the loss function, an optimizer given as a function, and what they reference:
module-level helpers and constants, closure values, defaults), a hash of the whole iclsim package
source, the iclsim, JAX, jaxlib, optax, numpy and Python versions, the JAX backend, device count,
numeric flags and XLA_FLAGS, and every field of the settings (arrays by dtype, shape and bytes). What cannot be
hashed safely is refused with ``UncacheableError`` saying how to make it cacheable, never guessed:
a lambda sharing its source statement with another lambda, a closure or global over an array, a
function or class without source (defined interactively), an optax GradientTransformation passed as
an object, an object whose state cannot be read field by field.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import functools
import hashlib
import io
import os
import re
import sys
import tokenize
import types
import warnings
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from iclsim import _validate as check
from iclsim._files import atomic_write, check_writable_dir
from iclsim.models import Frozen

__all__ = ["FORMAT", "SweepCache", "UncacheableError", "CacheWarning", "fingerprint", "environment", "current",
           "active", "persist_compilations"]

# bump when the numbers of a stored point change (2: one-draw initialisation and prompts; 3: flat Adam;
# 4: a draw's floats computed once; 5: keys cover sources, package and versions; entries carry a checksum)
FORMAT = 5
_ACTIVE: contextvars.ContextVar["SweepCache | None"] = contextvars.ContextVar("iclsim_sweep_cache", default=None)

# packages whose objects are hashed by qualified name: their versions (or iclsim's source hash) are in the key
_LIBRARIES = frozenset({"iclsim", "jax", "jaxlib", "numpy", "optax", "chex", "ml_dtypes", "scipy", "matplotlib",
                        "builtins"}) | frozenset(sys.stdlib_module_names)
_HOW = ("to make it cacheable, define it as a module-level function or class in a file (hashed by its source), "
        "pass arrays as fields of a dataclass model or design (hashed by value), or run without a cache "
        "(cache=None, or --no-cache on the command line)")


class UncacheableError(TypeError):
    """A setting of a sweep point that the cache cannot hash safely (so it cannot tell a stale entry)."""


class CacheWarning(UserWarning):
    """A cache entry was unreadable, failed its checksum or held non-finite numbers: deleted, retrained."""


def fingerprint(*objs) -> str:
    """A stable hash of the settings of a sweep point and of the environment (``environment``):
    dataclasses by their class's source and field by field, arrays by dtype, shape and bytes,
    functions by their source, defaults, closure values and the module-level names they use,
    containers element-wise, never by object identity. Raises ``UncacheableError`` for what cannot be
    hashed safely (the message says how to make it cacheable)."""
    h = hashlib.sha256(f"iclsim-cache-{FORMAT}".encode())
    h.update(repr(sorted(environment().items())).encode())
    h.update(repr(_runtime()).encode())
    for i, obj in enumerate(objs):
        _feed(h, obj, f"setting {i}", set())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def environment() -> dict:
    """What, besides the settings, can move a trained point's numbers (computed once per process):
    the versions of iclsim and its numerical dependencies and a hash of the iclsim package source."""
    import jaxlib
    import optax

    import iclsim
    return {"iclsim": iclsim.__version__, "iclsim_source": package_source_hash(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "optax": optax.__version__, "numpy": np.__version__,
            "python": "%d.%d" % sys.version_info[:2]}


def _runtime() -> tuple:
    """Backend, device count and numeric flags (read at each key: they are fixed once JAX starts, but not
    at import, where reading them would start the backends before the command line sets XLA_FLAGS)."""
    return (jax.default_backend(), jax.device_count(), bool(jax.config.jax_enable_x64),
            str(jax.config.jax_default_matmul_precision), bool(jax.config.jax_threefry_partitionable),
            _xla_flags())


def _xla_flags() -> str:
    """XLA_FLAGS as this process started JAX with them, sorted (code generation flags such as
    --xla_cpu_use_fusion_emitters, which ``iclsim run --quick`` sets, may move numbers at float level)."""
    return " ".join(sorted(os.environ.get("XLA_FLAGS", "").split()))


@functools.lru_cache(maxsize=None)
def package_source_hash() -> str:
    """sha256 over the relative path and bytes of every .py file of the iclsim package (once per process)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _refuse(path: str, what: str):
    raise UncacheableError(f"cannot cache this sweep: {path} is {what}; {_HOW}")


def _feed(h, obj, path: str, seen: set):
    import optax

    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, np.generic)):
        h.update(f"{type(obj).__name__}:{obj!r}".encode())
    elif isinstance(obj, optax.GradientTransformation):  # a NamedTuple of closures: check before tuples
        _refuse(path, "an optax GradientTransformation object (its closures cannot be hashed); pass a module-level "
                      "function of the schedule instead, e.g. def sgd(schedule): return optax.sgd(schedule)")
    elif isinstance(obj, Frozen):
        h.update(b"Frozen")
        _feed(h, obj.tree, path, seen)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        _feed_class(h, type(obj), path, seen)
        for f in dataclasses.fields(obj):
            h.update(f.name.encode())
            _feed(h, getattr(obj, f.name), f"{path}.{f.name}", seen)
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed(h, obj[k], f"{path}[{k!r}]", seen)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__qualname__}[{len(obj)}".encode())
        for i, item in enumerate(obj):
            _feed(h, item, f"{path}[{i}]", seen)
    elif isinstance(obj, jax.core.Tracer):
        _refuse(path, "a traced value (fingerprint is not usable inside jit)")
    elif isinstance(obj, (np.ndarray, jax.Array)):
        arr = np.asarray(obj)
        if arr.dtype == object:
            _refuse(path, "an array of Python objects")
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    elif isinstance(obj, np.dtype) or isinstance(getattr(obj, "dtype", None), np.dtype) and isinstance(obj, type):
        h.update(f"dtype:{np.dtype(getattr(obj, 'dtype', obj))}".encode())
    elif isinstance(obj, enum.Enum):
        _feed_class(h, type(obj), path, seen)
        h.update(obj.name.encode())
    elif isinstance(obj, type):
        _feed_class(h, obj, path, seen)
    elif isinstance(obj, functools.partial):
        h.update(b"partial")
        _feed(h, obj.func, f"{path}.func", seen)
        _feed(h, obj.args, f"{path}.args", seen)
        _feed(h, obj.keywords, f"{path}.keywords", seen)
    elif isinstance(obj, types.MethodType):
        _feed(h, obj.__self__, f"{path}.__self__", seen)
        _feed(h, obj.__func__, path, seen)
    elif isinstance(obj, types.FunctionType):
        _feed_function(h, obj, path, seen)
    elif isinstance(obj, types.ModuleType):
        h.update(f"module:{obj.__name__}:{getattr(obj, '__version__', '')}".encode())
    elif callable(obj) and callable(getattr(obj, "__wrapped__", None)) and not _is_library(obj):
        _feed(h, obj.__wrapped__, path, seen)  # jax.jit, functools.wraps: the function inside
    elif callable(obj) and _is_library(obj):  # builtins, ufuncs, jax primitives: versions are in the key
        h.update(f"lib:{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}".encode())
    elif _is_library(obj) and " at 0x" not in repr(obj):  # library constants (typing.Any, ...)
        h.update(f"lib:{type(obj).__module__}:{obj!r}".encode())
    else:
        _refuse(path, f"a {type(obj).__qualname__} object, which has no stable content to hash (only its identity)")
    h.update(b">")


def _is_library(obj) -> bool:
    """Whether obj comes from a library hashed by name and version (functions and classes by their own
    module; a function without a module, say made by exec, is user code)."""
    if isinstance(obj, (types.FunctionType, type)):
        module = getattr(obj, "__module__", None) or ""
    else:
        module = getattr(obj, "__module__", None) or getattr(type(obj), "__module__", "") or ""
    return module.split(".")[0] in _LIBRARIES


def _source(obj, path: str) -> str:
    import inspect

    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        kind = "class" if isinstance(obj, type) else "function"
        _refuse(path, f"the {kind} {getattr(obj, '__qualname__', obj)!r}, whose source cannot be read (defined "
                      "interactively or generated)")


@functools.lru_cache(maxsize=4096)
def _class_digest(cls) -> tuple[str, tuple]:
    """(sha256 of the class's source and its user base classes' sources, its methods' code objects)."""
    import inspect

    h = hashlib.sha256()
    codes = []
    for klass in inspect.getmro(cls):
        if klass is object or _is_library(klass):
            continue
        h.update(_source(klass, f"class {cls.__qualname__}").encode())
        for attr in vars(klass).values():
            fn = attr.fget if isinstance(attr, property) else getattr(attr, "__func__", attr)
            if isinstance(fn, types.FunctionType):
                codes.append(fn)
    return h.hexdigest(), tuple(codes)


def _feed_class(h, cls, path: str, seen: set):
    h.update(f"class:{cls.__module__}.{cls.__qualname__}".encode())
    if _is_library(cls) or cls in seen:
        return
    seen.add(cls)
    digest, methods = _class_digest(cls)
    h.update(digest.encode())
    for fn in methods:  # what the methods use at module level (helpers, constants)
        _feed_globals(h, fn, f"{path} ({cls.__qualname__}.{fn.__name__})", seen)


def _feed_function(h, fn, path: str, seen: set):
    h.update(f"function:{fn.__module__}.{fn.__qualname__}".encode())
    if _is_library(fn) or fn in seen:
        return
    seen.add(fn)
    source = _SOURCES.get(fn.__code__) or _SOURCES.setdefault(fn.__code__, _source(fn, path))
    if fn.__name__ == "<lambda>":
        lambdas = _count_lambdas(source)
        if lambdas != 1:
            _refuse(path, f"a lambda written in one statement with {lambdas - 1} other lambda(s) (its source is "
                          "ambiguous)")
    h.update(source.encode())
    _feed(h, fn.__defaults__, f"{path} (defaults)", seen)
    _feed(h, fn.__kwdefaults__, f"{path} (keyword defaults)", seen)
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell (a name assigned later)
            continue
        if isinstance(value, (np.ndarray, jax.Array)):
            _refuse(path, f"a closure over the array {name!r}")
        _feed(h, value, f"{path} (closure value {name!r})", seen)
    _feed_globals(h, fn, path, seen)


_SOURCES: dict = {}  # code object -> its source (read once per process)


def _count_lambdas(source: str) -> int:
    """Lambdas in a statement's source (the keyword as a token; as a word where the excerpt does not
    tokenize, counting any in strings or comments too: refusing more, never less)."""
    try:
        return sum(tok.type == tokenize.NAME and tok.string == "lambda"
                   for tok in tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return len(re.findall(r"\blambda\b", source))


def _names(code) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _feed_globals(h, fn, path: str, seen: set):
    """The module-level names the function's code uses (helpers, constants, classes), by value."""
    scope = fn.__globals__
    for name in sorted(_names(fn.__code__)):
        if name not in scope:
            continue
        value = scope[name]
        if isinstance(value, types.ModuleType):
            continue  # a module: its functions are hashed where the code names them
        if isinstance(value, (np.ndarray, jax.Array)):
            _refuse(path, f"a function that reads the module-level array {name!r}")
        h.update(f"global:{name}".encode())  # by content, or refused: never left out of the key
        _feed(h, value, f"{path} (global {name!r})", seen)


@dataclasses.dataclass
class SweepCache:
    """A folder of trained sweep points. ``force`` retrains (and overwrites) every point;
    ``chunk`` is the most points trained per compiled call, so an interrupted sweep keeps all
    finished chunks. ``hits``, ``trained`` and ``missing`` count points loaded, trained and found
    missing (to train); ``progress(trained, missing)`` is called after each point is stored.
    A corrupt entry (unreadable, wrong checksum, wrong shapes) or one holding non-finite numbers is
    named in a ``CacheWarning``, deleted and retrained; ``corrupt`` counts them."""

    directory: str | Path
    force: bool = False
    chunk: int = 32
    hits: int = 0
    trained: int = 0
    missing: int = 0
    corrupt: int = 0
    progress: Callable[[int, int], None] | None = None

    def __post_init__(self):
        if not isinstance(self.directory, (str, Path)):
            raise TypeError(f"directory must be a str or Path, got {type(self.directory).__name__}")
        self.directory = Path(self.directory)
        self.chunk = check.positive_int("chunk", self.chunk)

    def check(self) -> None:
        """Create the folder and check that it can be written (before any training): ValueError otherwise."""
        check_writable_dir(self.directory, "cache folder")

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npz"

    def load(self, key: str, template):
        """(params, losses) stored under key, params in the structure of ``template``; or None
        (missing, forced, or corrupt: then warned about and deleted)."""
        path = self.path(key)
        if self.force or not path.exists():
            self.missing += 1
            return None
        try:
            entry = self._read(path, key, template)
        except _Corrupt as err:
            warnings.warn(f"cache entry {path} is {err}: deleted, the point is retrained", CacheWarning, stacklevel=3)
            path.unlink(missing_ok=True)
            self.corrupt += 1
            self.missing += 1
            return None
        self.hits += 1
        return entry

    def _read(self, path: Path, key: str, template):
        specs = jax.tree_util.tree_leaves(template)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except Exception as err:  # BadZipFile, truncated file, bad header, ...
            raise _Corrupt(f"unreadable ({type(err).__name__}: {err})") from None
        names = ["losses"] + [f"p{i}" for i in range(len(specs))]
        if set(arrays) != set(names) | {"checksum"}:
            raise _Corrupt(f"not an entry of this model (arrays {sorted(arrays)})")
        if str(arrays["checksum"]) != _checksum(key, [arrays[n] for n in names]):
            raise _Corrupt("damaged (checksum mismatch)")
        leaves = [arrays[f"p{i}"] for i in range(len(specs))]
        for leaf, spec in zip(leaves, specs):
            if tuple(leaf.shape) != tuple(spec.shape):
                raise _Corrupt(f"not an entry of this model (a parameter of shape {leaf.shape}, expected {spec.shape})")
        if not all(np.all(np.isfinite(a)) for a in [arrays["losses"], *leaves] if np.issubdtype(a.dtype, np.inexact)):
            raise _Corrupt("non-finite (NaN or inf in its parameters or losses)")
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves), arrays["losses"]

    def save(self, key: str, params, losses) -> None:
        leaves = [np.asarray(a) for a in jax.tree_util.tree_leaves(params)]
        losses = np.asarray(losses)
        if not all(np.all(np.isfinite(a)) for a in [losses, *leaves] if np.issubdtype(a.dtype, np.inexact)):
            raise FloatingPointError(f"refusing to store a non-finite point under {self.path(key)}")
        buf = io.BytesIO()
        np.savez(buf, losses=losses, checksum=np.array(_checksum(key, [losses, *leaves])),
                 **{f"p{i}": a for i, a in enumerate(leaves)})
        atomic_write(self.path(key), buf.getvalue())
        self.trained += 1
        if self.progress is not None:
            self.progress(self.trained, self.missing)


class _Corrupt(Exception):
    pass


def _checksum(key: str, arrays) -> str:
    """sha256 of the entry's key and arrays (dtype, shape, bytes): a file damaged or moved is detected."""
    h = hashlib.sha256(key.encode())
    for a in arrays:
        a = np.asarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


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
def persist_compilations(directory: str | Path, min_compile_secs: float = 0.1):
    """Within the block, keep compiled XLA programs in ``directory`` (JAX's persistent compilation
    cache), so a later process that builds the same program loads it instead of compiling it. JAX keys an entry
    on the program's HLO, devices, backend and flags, so a stale entry is never used; programs that
    compile in under ``min_compile_secs`` are not stored (JAX's own default, 1 s, would skip a single fit's
    training program, which compiles in well under a second and loads in a tenth of that: docs/performance.md
    §2.6). The previous settings are restored after."""
    from jax.experimental.compilation_cache import compilation_cache

    if not (np.isfinite(min_compile_secs) and min_compile_secs >= 0):
        raise ValueError(f"min_compile_secs must be a finite number >= 0, got {min_compile_secs!r}")
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
