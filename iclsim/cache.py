"""Resumable sweeps: every trained sweep point (model, design, n, seed, training settings) is
stored on disk under a hash of everything that can change its numbers, so a sweep re-run after an
interruption trains only the points that are missing. Files are written atomically (temporary file,
then rename) and carry an HMAC under a key private to the user (``secret``), so an entry damaged or
forged by anyone without that key is refused; a corrupt, forged or non-finite entry is reported,
deleted and retrained. A cache folder owned by another user or writable by others is refused.
``persist_compilations`` keeps the compiled XLA programs on disk too, so a later run loads them.

    train.fit_sweep(..., cache=cache.SweepCache(".cache/iclsim"))   # loads finished points, trains the others

What the key covers (``fingerprint``): the code that runs, as it is in memory (never the source file on
disk, which may have been edited since the import): the bytecode, constants and names of every function
involved (the model's and design's classes and their methods, the loss function, an optimizer given as a
function, the training engine itself) and, recursively, what they reach (module-level helpers and
constants, helpers reached through a module attribute such as ``userlib.scale``, closure values,
defaults); the iclsim, JAX, jaxlib, optax, numpy and Python versions (``importlib.metadata``); the JAX
backend, device count, numeric flags, XLA_FLAGS and the XLA compiler options the engine applies; and
every field of the settings (arrays by dtype, shape and bytes). What cannot be hashed safely is refused
with ``UncacheableError`` saying how to make it cacheable, never guessed: a closure or global over an
array, an optax GradientTransformation passed as an object, an object whose state cannot be read field
by field. Libraries (JAX, numpy, optax, the standard library) are hashed by name, their versions being
in the key.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import errno
import functools
import hashlib
import hmac
import importlib.metadata
import io
import os
import secrets
import stat
import sys
import types
import warnings
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from iclsim import _validate as check
from iclsim._files import atomic_write, check_writable_dir

__all__ = ["FORMAT", "SweepCache", "UncacheableError", "CacheWarning", "fingerprint", "environment", "current",
           "active", "persist_compilations", "secret", "secret_path", "check_folder"]

# bump when the numbers of a stored point change (2: one-draw initialisation and prompts; 3: flat Adam;
# 4: a draw's floats computed once; 5: keys cover sources, package and versions; entries carry a checksum;
# 6: keys hash the code that ran (bytecode), entries carry an HMAC under the user's secret)
FORMAT = 6
_ACTIVE: contextvars.ContextVar["SweepCache | None"] = contextvars.ContextVar("iclsim_sweep_cache", default=None)

# packages whose objects are hashed by qualified name: their versions are in the key (iclsim is not one:
# its code is hashed as it runs, like the user's)
_LIBRARIES = frozenset({"jax", "jaxlib", "numpy", "optax", "chex", "ml_dtypes", "scipy", "matplotlib",
                        "builtins"}) | frozenset(sys.stdlib_module_names)
_VERSIONED = ("iclsim", "jax", "jaxlib", "optax", "numpy")
_HOW = ("to make it cacheable, define it as a module-level function or class (hashed by its code), "
        "pass arrays as fields of a dataclass model or design (hashed by value), or run without a cache "
        "(cache=None, or --no-cache on the command line)")


class UncacheableError(TypeError):
    """A setting of a sweep point that the cache cannot hash safely (so it cannot tell a stale entry)."""


class CacheWarning(UserWarning):
    """A cache entry was unreadable, failed its authentication or held non-finite numbers: deleted, retrained."""


def fingerprint(*objs) -> str:
    """A stable hash of the settings of a sweep point and of the environment (``environment``):
    dataclasses by their class's code and field by field, arrays by dtype, shape and bytes,
    functions by their code objects (bytecode, constants, names), defaults, closure values and the
    module-level names they use (following module attributes), containers element-wise, never by
    object identity. Raises ``UncacheableError`` for what cannot be hashed safely (the message says
    how to make it cacheable)."""
    h = hashlib.sha256(f"iclsim-cache-{FORMAT}".encode())
    h.update(repr(sorted(environment().items())).encode())
    h.update(repr(_runtime()).encode())
    for i, obj in enumerate(objs):
        _feed(h, obj, f"setting {i}", set())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def environment() -> dict:
    """What, besides the settings and the code, can move a trained point's numbers (once per process):
    the versions of iclsim and its numerical dependencies, read with ``importlib.metadata`` (the iclsim
    package root is not imported), and Python's."""
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = getattr(sys.modules.get(name), "__version__", None)
    return {**found, "python": "%d.%d" % sys.version_info[:2]}


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


def _refuse(path: str, what: str):
    raise UncacheableError(f"cannot cache this sweep: {path} is {what}; {_HOW}")


def _is_frozen(obj) -> bool:
    """models.Frozen (checked by name: the cache does not import the models)."""
    return type(obj).__name__ == "Frozen" and type(obj).__module__ == "iclsim.models"


def _feed(h, obj, path: str, seen: set):
    import optax

    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, np.generic)):
        h.update(f"{type(obj).__name__}:{obj!r}".encode())
    elif type(obj) is object:  # a bare object() (a "not given" sentinel) has no state: all are alike
        h.update(b"sentinel")
    elif isinstance(obj, optax.GradientTransformation):  # a NamedTuple of closures: check before tuples
        _refuse(path, "an optax GradientTransformation object (its closures cannot be hashed); pass a module-level "
                      "function of the schedule instead, e.g. def sgd(schedule): return optax.sgd(schedule)")
    elif _is_frozen(obj):
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
        if type(obj) not in (list, tuple) and not _is_library(type(obj)):  # a NamedTuple: its class's code too
            _feed_class(h, type(obj), path, seen)
        for i, item in enumerate(obj):
            _feed(h, item, f"{path}[{i}]", seen)
    elif isinstance(obj, (set, frozenset)):
        h.update(f"set[{len(obj)}".encode())
        for item in sorted(obj, key=repr):
            _feed(h, item, f"{path}{{{item!r}}}", seen)
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
        h.update(f"module:{obj.__name__}".encode())  # what the code reads from it is hashed by _feed_globals
    elif isinstance(obj, (staticmethod, classmethod)):
        _feed(h, obj.__func__, path, seen)
    elif isinstance(obj, property):
        for part in (obj.fget, obj.fset, obj.fdel):
            _feed(h, part, path, seen)
    elif callable(obj) and callable(getattr(obj, "__wrapped__", None)) and not _is_library(obj):
        _feed(h, obj.__wrapped__, path, seen)  # jax.jit, functools.wraps, lru_cache: the function inside
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
    if isinstance(obj, types.ModuleType):
        module = obj.__name__
    elif isinstance(obj, (types.FunctionType, type)):
        module = getattr(obj, "__module__", None) or ""
    else:
        module = getattr(obj, "__module__", None) or getattr(type(obj), "__module__", "") or ""
    return isinstance(module, str) and module.split(".")[0] in _LIBRARIES


def _code_digest(code: types.CodeType) -> bytes:
    """What a code object executes: its bytecode, names, argument layout, flags and constants (nested
    code objects recursively; sets sorted, their order varying with string hashing). Not its file name
    or line numbers, which move no number."""
    h = hashlib.sha256()
    for part in (code.co_code, code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars,
                 (code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags)):
        h.update(repr(part).encode() if not isinstance(part, bytes) else part)
        h.update(b"|")
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            h.update(b"code:" + _code_digest(const))
        elif isinstance(const, frozenset):
            h.update(f"frozenset:{sorted(map(repr, const))}".encode())
        else:
            h.update(f"{type(const).__name__}:{const!r}".encode())
        h.update(b"|")
    return h.digest()


def _feed_class(h, cls, path: str, seen: set):
    """A class by what its instances run: for it and each non-library base, every attribute defined in
    the class body (methods by code, with what they reach; class-level constants by value)."""
    import inspect

    h.update(f"class:{cls.__module__}.{cls.__qualname__}".encode())
    if _is_library(cls) or cls in seen:
        return
    seen.add(cls)
    for klass in inspect.getmro(cls):
        if klass is object or _is_library(klass):
            continue
        h.update(f"base:{klass.__qualname__}".encode())
        for name, attr in sorted(vars(klass).items()):
            if name in _CLASS_SKIP or (name.startswith("__") and name.endswith("__")
                                       and not isinstance(attr, (types.FunctionType, staticmethod, classmethod,
                                                                 property))):
                continue
            h.update(f"attr:{name}".encode())
            _feed(h, attr, f"{path} ({klass.__qualname__}.{name})", seen)


# class attributes that describe, not compute (dataclass fields are hashed on the instance)
_CLASS_SKIP = frozenset({"__doc__", "__module__", "__dict__", "__weakref__", "__annotations__", "__dataclass_fields__",
                         "__dataclass_params__", "__match_args__", "__slots__", "__orig_bases__", "__parameters__",
                         "_fields", "_field_defaults", "__firstlineno__", "__static_attributes__"})


def _feed_function(h, fn, path: str, seen: set):
    h.update(f"function:{fn.__module__}.{fn.__qualname__}".encode())
    if _is_library(fn) or fn in seen:
        return
    seen.add(fn)
    h.update(_code_digest(fn.__code__))
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


def _names(code) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _feed_globals(h, fn, path: str, seen: set):
    """The module-level names the function's code uses (helpers, constants, classes), by value; through a
    module that is not a library (``userlib.scale()``, ``layout.plan``), the attributes the code names."""
    names = _names(fn.__code__)
    scope = fn.__globals__
    for name in sorted(names):
        if name not in scope:
            continue
        _feed_global(h, name, scope[name], names, f"{path} (global {name!r})", seen)


def _feed_global(h, name, value, names, path, seen):
    if isinstance(value, types.ModuleType):
        h.update(f"global:{name}=module:{value.__name__}".encode())
        if _is_library(value):
            return
        for attr in sorted(names):  # the attribute names the code uses, where this module has them
            if attr in vars(value) and (value.__name__, attr) not in seen:
                seen.add((value.__name__, attr))
                _feed_global(h, f"{name}.{attr}", vars(value)[attr], names, f"{path}.{attr}", seen)
        return
    if isinstance(value, (np.ndarray, jax.Array)):
        _refuse(path, f"a function that reads the module-level array {name!r}")
    if isinstance(value, contextvars.ContextVar) or type(value).__module__ == "_thread":
        h.update(f"global:{name}=state".encode())  # run-time state (a context variable, a lock): no number
        return
    h.update(f"global:{name}".encode())  # by content, or refused: never left out of the key
    _feed(h, value, path, seen)


# ---- entries authenticated with a key private to the user ----

def secret_path() -> Path:
    """Where the user's cache secret lives: $XDG_CONFIG_HOME/iclsim/cache-secret (default ~/.config)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "iclsim" / "cache-secret"


def secret() -> bytes:
    """The user's cache secret (32 random bytes, created on first use with mode 0600 in a 0700 folder):
    entries are authenticated with an HMAC under it, so a file written by anyone who cannot read it is
    refused. ValueError (with advice) where the file is a symlink, not this user's, or readable by others."""
    return _secret_at(str(secret_path()))


@functools.lru_cache(maxsize=8)
def _secret_at(where: str) -> bytes:
    path = Path(where)
    advice = "remove it (a new one is made; entries stored under the old one are retrained) or set XDG_CONFIG_HOME"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, secrets.token_bytes(32))
        finally:
            os.close(fd)
    except FileExistsError:
        pass
    except OSError as err:
        raise ValueError(f"cannot create the cache secret {path} ({err.strerror or err}); make its folder "
                         "writable, set XDG_CONFIG_HOME, or run without a cache (--no-cache)") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ValueError(f"the cache secret {path} is a symlink; {advice}") from None
        raise ValueError(f"cannot read the cache secret {path} ({err.strerror or err}); {advice}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise ValueError(f"the cache secret {path} must be a regular file of this user with mode 0600 (it has "
                             f"owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}); {advice}")
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    if len(data) < 32:
        raise ValueError(f"the cache secret {path} is shorter than 32 bytes; {advice}")
    return data


def check_folder(directory: Path) -> None:
    """A cache folder must be this user's and not writable by others (anyone who can write there can plant
    entries, or delete them): ValueError with advice otherwise."""
    info = os.stat(directory)
    if info.st_uid != os.getuid():
        raise ValueError(f"cache folder {str(directory)!r} belongs to another user (uid {info.st_uid}): use a folder "
                         "of your own (--cache DIR), or run without a cache (--no-cache)")
    if info.st_mode & 0o002:
        raise ValueError(f"cache folder {str(directory)!r} is writable by other users (mode "
                         f"{stat.S_IMODE(info.st_mode):04o}): `chmod o-w {directory}`, or use a folder of your own "
                         "(--cache DIR)")


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
        """Create the folder and check that it can be written, is this user's and is not writable by others,
        and that the user's secret can be read (before any training): ValueError otherwise."""
        check_writable_dir(self.directory, "cache folder")
        check_folder(self.directory)
        secret()
        self._checked = True

    _checked = False

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npz"

    def load(self, key: str, template):
        """(params, losses) stored under key, params in the structure of ``template``; or None
        (missing, forced, or corrupt: then warned about and deleted)."""
        if not self._checked:
            self.check()
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
        if not hmac.compare_digest(str(arrays["checksum"]), _checksum(key, [arrays[n] for n in names])):
            raise _Corrupt("damaged or not written by this user's iclsim (authentication failed)")
        leaves = [arrays[f"p{i}"] for i in range(len(specs))]
        for leaf, spec in zip(leaves, specs):
            if tuple(leaf.shape) != tuple(spec.shape):
                raise _Corrupt(f"not an entry of this model (a parameter of shape {leaf.shape}, expected {spec.shape})")
        if not all(np.all(np.isfinite(a)) for a in [arrays["losses"], *leaves] if np.issubdtype(a.dtype, np.inexact)):
            raise _Corrupt("non-finite (NaN or inf in its parameters or losses)")
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves), arrays["losses"]

    def save(self, key: str, params, losses) -> None:
        if not self._checked:
            self.check()
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
    """HMAC-sha256 under the user's ``secret`` of the entry's key and arrays (dtype, shape, bytes): a file
    damaged, moved, or written by anyone without the secret is detected."""
    h = hmac.new(secret(), key.encode(), hashlib.sha256)
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
    compile in under ``min_compile_secs`` are not stored (JAX's own default threshold would skip a single fit's
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
