"""Resumable sweeps: every trained sweep point (model, design, n, seed, training settings) is
stored on disk under its key (``fingerprint.fingerprint``: a hash of everything that can change its
numbers, compiler options included), so a sweep re-run after an interruption trains only the points
that are missing. Files are written atomically (temporary file, then rename) and carry an HMAC under a
key private to the user (``secret``), so an entry damaged or forged by anyone without that key is
refused; a corrupt, forged or non-finite entry is reported, deleted and retrained. A cache folder owned
by another user or writable by others is refused. ``persist_compilations`` keeps the compiled XLA
programs on disk too, so a later run loads them.

The cache sits above the engine: it is an explicit argument, never ambient state.

    train.fit_sweep(..., cache=cache.SweepCache(".cache/iclsim"))   # loads finished points, trains the others

The runner hands an experiment its cache in the run context (``registry.RunContext.cache``); the
experiment passes it to every ``fit_sweep``. This module imports neither the iclsim package root nor
the models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import hmac
import io
import os
import secrets
import stat
import warnings
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from iclsim import _validate as check
from iclsim._files import atomic_write, check_writable_dir
from iclsim.fingerprint import KEY_FORMAT, UncacheableError, environment, fingerprint

__all__ = ["FORMAT", "SweepCache", "UncacheableError", "CacheWarning", "fingerprint", "environment",
           "persist_compilations", "secret", "secret_path", "check_folder"]

# the recipe of an entry's key and layout: bumped in ``fingerprint.KEY_FORMAT`` when stored numbers change
FORMAT = KEY_FORMAT


class CacheWarning(UserWarning):
    """A cache entry was unreadable, failed its authentication or held non-finite numbers: deleted, retrained."""


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

    def key(self, *settings) -> str:
        """The key of a sweep point whose numbers are fixed by ``settings`` (``fingerprint.fingerprint``)."""
        return fingerprint(*settings)

    def path(self, key: str) -> Path:
        """Where the entry of ``key`` lives: DIRECTORY/ab/KEY.npz (ab: the key's first two characters)."""
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

    @contextlib.contextmanager
    def claim(self, keys):
        """Hold the points of ``keys`` for training: an exclusive ``flock`` on DIRECTORY/ab/KEY.claim for each,
        taken in sorted order (so two processes claiming overlapping sets cannot deadlock) and released by the
        kernel if the process dies. A second process that needs the same points (two experiments of one
        ``iclsim run --jobs`` training the same recipe networks) waits here, then finds them stored
        (``load_after_claim``) instead of training them again. Files are opened without following links and
        only as regular files of this user (a planted claim file is refused, never written through). With
        ``force`` nothing is claimed (every process retrains anyway); where the file system has no ``flock``
        (ENOSYS, EOPNOTSUPP, ENOLCK) a ``CacheWarning`` says so and the points are trained unclaimed. Not
        re-entrant: a process must not claim a key it holds."""
        import fcntl

        if not self._checked:
            self.check()
        held = []
        try:
            for key in [] if self.force else sorted(set(keys)):
                path = self.path(key).with_suffix(".claim")
                path.parent.mkdir(parents=True, exist_ok=True)
                planted = f"{path} is not a claim file of this user's iclsim cache (a link, or not a regular file of this user): remove it"
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
                except OSError as err:
                    if err.errno in (errno.ELOOP, errno.EMLINK, errno.EISDIR, errno.ENXIO):
                        raise ValueError(planted) from None
                    raise
                held.append(fd)
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                    raise ValueError(planted)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError as err:
                    if err.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
                        raise
                    warnings.warn(f"the cache folder {self.directory} does not support flock ({err.strerror}): its "
                                  "points are trained without a claim, so two processes may train the same ones",
                                  CacheWarning, stacklevel=3)
                    break
            yield
        finally:
            for fd in held:  # closing releases the lock; the empty files stay (removing them would race)
                os.close(fd)

    def load_after_claim(self, key: str, template):
        """``load`` for a point already counted missing, once its claim is held: the entry another process
        stored while this one waited, counted as loaded (not missing); None (still missing, or ``force``)."""
        if self.force or not self.path(key).exists():
            return None
        self.missing -= 1
        entry = self.load(key, template)
        if entry is None:  # corrupt: load counted it missing again and deleted it
            return None
        return entry

    def save(self, key: str, params, losses) -> None:
        """Store a trained point's (params, losses) under ``key`` atomically, with its HMAC; refuses
        (FloatingPointError) non-finite numbers; counts it in ``trained`` and calls ``progress``."""
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


@contextlib.contextmanager
def persist_compilations(directory: str | Path, min_compile_secs: float = 0.1):
    """Within the block, keep compiled XLA programs in ``directory`` (JAX's persistent compilation
    cache), so a later process that builds the same program loads it instead of compiling it. JAX keys an entry
    on the program's HLO, devices, backend and flags, so a stale entry is never used; programs that
    compile in under ``min_compile_secs`` are not stored (JAX's own default threshold would skip a single fit's
    training program, whose load docs/performance.md §2.6 compares with its compile). The previous settings are restored after."""
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
