"""Content fingerprints: a stable hash of everything that can change a trained sweep point's numbers,
the key under which ``cache.SweepCache`` stores it.

What a key covers (``fingerprint``): the code that runs, as it is in memory (never the source file on
disk, which may have been edited since the import): the bytecode, constants and names of every function
involved (the model's and design's classes and their methods, the loss function, an optimizer given as a
function, the training engine itself) and, recursively, what they reach (module-level helpers and
constants, helpers reached through a module attribute such as ``userlib.scale``, closure values,
defaults); the iclsim, JAX, jaxlib, optax, numpy and Python versions (``environment``, read with
``importlib.metadata``: the iclsim package root is not imported); the JAX backend, device count and
numeric flags (``runtime``); every XLA compiler option the engine applies and XLA_FLAGS
(``compiler.key``); and every field of the settings (arrays by dtype, shape and bytes). What cannot be
hashed safely is refused with ``UncacheableError`` saying how to make it cacheable, never guessed: a
closure or global over an array, an optax GradientTransformation passed as an object, an object whose
state cannot be read field by field. Libraries (JAX, numpy, optax, the standard library) are hashed by
name, their versions being in the key.

This module imports neither the models nor the engine: it hashes what it is given.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import importlib.metadata
import sys
import types

import jax
import numpy as np

from iclsim import compiler

__all__ = ["KEY_FORMAT", "UncacheableError", "fingerprint", "environment", "runtime"]

# bump when the numbers of a stored point change (2: one-draw initialisation and prompts; 3: flat Adam;
# 4: a draw's floats computed once; 5: keys cover sources, package and versions; entries carry a checksum;
# 6: keys hash the code that ran (bytecode), entries carry an HMAC under the user's secret; 7: keys cover
# every compiler option the engine applies, ``compiler.key``)
KEY_FORMAT = 7

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


def fingerprint(*objs) -> str:
    """A stable hash (sha256 hex) of the settings of a sweep point and of what else can move its numbers
    (``environment``, ``runtime``, ``compiler.key``):
    dataclasses by their class's code and field by field, arrays by dtype, shape and bytes,
    functions by their code objects (bytecode, constants, names), defaults, closure values and the
    module-level names they use (following module attributes), containers element-wise, never by
    object identity. Raises ``UncacheableError`` for what cannot be hashed safely (the message says
    how to make it cacheable)."""
    h = hashlib.sha256(f"iclsim-cache-{KEY_FORMAT}".encode())
    h.update(repr(sorted(environment().items())).encode())
    h.update(repr(runtime()).encode())
    h.update(repr(compiler.key()).encode())
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


def runtime() -> tuple:
    """Backend, device count and numeric flags (read at each key: they are fixed once JAX starts, but not
    at import, where reading them would start the backends before the command line sets XLA_FLAGS)."""
    return (jax.default_backend(), jax.device_count(), bool(jax.config.jax_enable_x64),
            str(jax.config.jax_default_matmul_precision), bool(jax.config.jax_threefry_partitionable))


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
    if type(value).__module__ == "_thread":
        h.update(f"global:{name}=state".encode())  # run-time state (a lock): no number
        return
    h.update(f"global:{name}".encode())  # by content, or refused: never left out of the key
    _feed(h, value, path, seen)
