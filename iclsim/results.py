"""Results written as one set, and read back only when they are a run like this one.

A run's tidy CSV, PNG and JSON (settings, seed, versions, commit, wall time, summary) are written into a
pending folder beside the output, then moved in (an interrupt is held off while they move); the JSON
names the run and the sha256 of the CSV and PNG it belongs with (``write_set``). A pending folder left by
a killed run is completed (if all its files were written) or discarded by the next writer, so an output
folder never mixes two runs' files. One run at a time writes into a folder (``results_lock``); a quick run
refuses a folder holding full-fidelity results unless forced (``check_output``); ``read_results`` checks
that results another experiment reads come from a run like the reader (quick or not, seed, iclsim
version). Provenance: ``versions`` and ``git_state`` (whose "dirty" leaves out the output folder itself).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import socket
import stat
import subprocess
import threading
from pathlib import Path

from iclsim._files import atomic_write, check_writable_dir
from iclsim.configs import RunError
from iclsim.registry import _NAME

__all__ = ["LOCK_NAME", "rows_to_csv", "read_rows", "read_results", "versions", "git_state", "repo_state", "results_lock",
           "write_set", "check_output", "label", "format_number", "format_summary"]

LOCK_NAME = ".iclsim.lock"
_PENDING = ".iclsim-pending-"


def _inside(folder: Path, name: str) -> Path:
    """folder / name, refused (RunError) unless ``name`` is a plain file name that stays in ``folder``."""
    path = folder / name
    if not name or "/" in name or os.sep in name or name in (".", "..") or path.parent != folder:
        raise RunError(f"{name!r} would be written outside {folder}")
    return path


def rows_to_csv(rows: list[dict]) -> bytes:
    """Tidy rows as CSV bytes: one column per key met in any row (in order of appearance), "" where absent."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def read_rows(path: Path) -> list[dict]:
    """Rows of a results CSV, numbers and booleans (True / False, as the CSV writes them) parsed."""
    def parse(value):
        if value in ("True", "False"):
            return value == "True"
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
        return value
    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def read_results(out: Path, name: str, *, quick: bool, seed: int, reader: str = "this experiment") -> list[dict]:
    """Rows of experiment ``name``'s results in ``out``, after checking their provenance: the JSON
    beside the CSV must say the same fidelity (quick or not), seed and iclsim version as the reading
    run, no --set overrides, and the CSV must be the one that JSON names (its sha256). RunError otherwise."""
    import iclsim

    out = Path(out)
    csv_path, json_path = out / f"{name}.csv", out / f"{name}.json"
    rerun = f"run `iclsim run {name}{' --quick' if quick else ''} --seed {seed} --out {out}` first"
    if not csv_path.exists() or not json_path.exists():
        raise RunError(f"{reader} reads {name}'s results from {out}, which has no {name}.csv and {name}.json; {rerun}")
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"{json_path} is unreadable ({err}); {rerun}") from None
    problems = []
    if meta.get("quick") is not bool(quick):
        problems.append(f"they are {'quick' if meta.get('quick') else 'full-fidelity'} results, this run is "
                        f"{'quick' if quick else 'full-fidelity'}")
    if meta.get("seed") != seed:
        problems.append(f"they used seed {meta.get('seed')}, this run seed {seed}")
    if meta.get("overrides"):
        problems.append("they were made with --set overrides ("
                        + ", ".join(f"{k}={v}" for k, v in meta["overrides"].items())
                        + "), not the experiment's own settings")
    theirs = meta.get("versions", {}).get("iclsim")
    if theirs != iclsim.__version__:
        problems.append(f"they were made by iclsim {theirs}, this is {iclsim.__version__}")
    recorded = meta.get("files", {}).get("csv", {}).get("sha256")
    if recorded is not None and recorded != hashlib.sha256(csv_path.read_bytes()).hexdigest():
        problems.append(f"{name}.csv is not the CSV its JSON describes (written by another run)")
    if problems:
        raise RunError(f"{reader} cannot use {name}'s results in {out}: " + "; ".join(problems) + f"; {rerun}")
    return read_rows(csv_path)


def versions() -> dict:
    """Versions of Python, JAX, jaxlib, optax, numpy and iclsim, the JAX backend and its devices."""
    import jax
    import jaxlib
    import numpy
    import optax

    import iclsim
    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "optax": optax.__version__, "numpy": numpy.__version__, "iclsim": iclsim.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}


def git_state(out: Path | None = None) -> dict | None:
    """{"commit", "dirty"} of the checkout iclsim is imported from (None when it is not the root of a
    git work tree, e.g. installed). Dirty: tracked files differ from the commit, leaving out the output
    folder ``out`` where it lies inside the checkout (a run rewriting committed figures/ is not a run of
    modified code); untracked files do not count."""
    import iclsim

    return repo_state(Path(iclsim.__file__).resolve().parent.parent, out)


@functools.lru_cache(maxsize=32)
def repo_state(root: Path, out: Path | None = None) -> dict | None:
    """``git_state`` of the work tree whose root is ``root`` (None unless it is one), leaving ``out`` out."""
    root = Path(root).resolve()

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None
        spec = ["--", "."]
        if out is not None:
            with contextlib.suppress(ValueError):
                inside = Path(out).resolve().relative_to(root)
                if inside.parts:
                    spec.append(f":(exclude){inside.as_posix()}")
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no", *spec))}
    except (OSError, subprocess.SubprocessError):
        return None


# ---- one writer per output folder ----

_HELD: dict[Path, list] = {}  # resolved folder -> [thread id, depth, fd]
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def results_lock(out: Path):
    """Hold the output folder for this run: a lock file ``out/.iclsim.lock`` under an exclusive
    ``flock`` (released by the kernel if the process dies, so a dead run's lock is recovered), holding
    the pid and host for the message a second run gets (RunError). Re-entrant within a thread."""
    import fcntl

    folder = check_writable_dir(Path(out), "output folder").resolve()
    me = threading.get_ident()
    with _HELD_LOCK:
        held = _HELD.get(folder)
        if held is not None and held[0] == me:
            held[1] += 1
            fd = None
        elif held is not None:
            raise RunError(f"another run in this process is writing into {folder}; use another --out")
        else:
            fd = _acquire(folder, fcntl)
            _HELD[folder] = [me, 1, fd]
    try:
        yield folder
    finally:
        with _HELD_LOCK:
            held = _HELD[folder]
            held[1] -= 1
            if held[1] == 0:
                del _HELD[folder]
                with contextlib.suppress(OSError):
                    os.unlink(folder / LOCK_NAME)
                fcntl.flock(held[2], fcntl.LOCK_UN)
                os.close(held[2])


def _acquire(folder: Path, fcntl) -> int:
    path = folder / LOCK_NAME
    for _ in range(20):
        fd = _open_lock(path, folder)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            try:
                owner = path.read_text().split()
            except OSError:
                owner = []
            who = f"pid {owner[0]} on {owner[1]}" if len(owner) >= 2 else "another process"
            raise RunError(f"another iclsim run ({who}) is writing into {folder}; wait for it to finish or "
                           "choose another --out") from None
        try:  # the file we locked may have been removed by its previous holder: lock the current one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
                return fd
        except FileNotFoundError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    raise RunError(f"could not lock {folder} (its lock file keeps changing)")


def _open_lock(path: Path, folder: Path) -> int:
    """The lock file, never through a symlink (O_NOFOLLOW) and only a regular file owned by this user:
    a planted symlink or other file is refused (RunError), never truncated or written through."""
    planted = (f"{path} is not a lock file of iclsim (a symlink, or not a regular file of this user): remove it if "
               "no run is writing into the folder, or choose another --out")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EMLINK, errno.EISDIR, errno.ENXIO):
            raise RunError(planted) from None
        raise RunError(f"cannot open the lock file {path} ({err.strerror or err})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_nlink != 1:
        os.close(fd)
        raise RunError(planted)
    return fd


def _recover(folder: Path) -> None:
    """Complete the pending result sets that a killed run had fully written; discard the others
    (call while holding ``results_lock``)."""
    for pending in sorted(folder.glob(_PENDING + "*")):
        if pending.is_symlink() or not pending.is_dir():
            raise RunError(f"{pending} is not a pending result set of iclsim (a symlink or a file): remove it, or "
                           "choose another --out")
        ready = pending / "READY"
        if ready.is_file() and not ready.is_symlink():
            names = ready.read_text().split()
            bad = [n for n in names if not _NAME.fullmatch(n) or ".." in n]
            if bad:
                raise RunError(f"{ready} lists {bad[0]!r}, not a plain file name: a pending set may only move "
                               f"files into {folder}; remove {pending.name} and rerun")
            _move_in(pending, folder, names)
        else:
            shutil.rmtree(pending, ignore_errors=True)


_OLD = ".replaced"  # inside a pending folder: the files a commit replaces, kept until every move has succeeded


def _move_in(pending: Path, folder: Path, names: list[str]) -> None:
    """Move the set's files from ``pending`` into ``folder``. A move that fails (OSError: a folder in the
    way, no permission) puts every file back as it was and raises RunError: never a mixed set. A process
    killed here leaves READY, and the next run completes the moves (``_recover``)."""
    old = pending / _OLD
    moved: list[str] = []
    try:
        for name in names:
            src, dst = _inside(pending, name), _inside(folder, name)
            if not src.exists():
                continue
            if os.path.lexists(dst) and not dst.is_dir():
                old.mkdir(exist_ok=True)
                os.replace(dst, old / name)
            os.replace(src, dst)
            moved.append(name)
    except OSError as err:
        for name in reversed(moved):  # put the previous set back
            with contextlib.suppress(OSError):
                os.replace(folder / name, pending / name)
            if (old / name).exists():
                with contextlib.suppress(OSError):
                    os.replace(old / name, folder / name)
        for name in names:
            if name not in moved and (old / name).exists():
                with contextlib.suppress(OSError):
                    os.replace(old / name, folder / name)
        shutil.rmtree(pending, ignore_errors=True)
        raise RunError(f"could not move the results into {folder} ({err.strerror or err}: "
                       f"{getattr(err, 'filename', '') or ''}); the previous results there are unchanged") from None
    (pending / "READY").unlink(missing_ok=True)
    shutil.rmtree(pending, ignore_errors=True)


@contextlib.contextmanager
def _interrupts_held():
    """Hold SIGINT off until the block ends (main thread only), then raise KeyboardInterrupt. A process
    that ignores SIGINT (a background job, nohup) keeps ignoring it."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
    if caught:
        raise KeyboardInterrupt


def write_set(folder: Path, run_id: str, files: dict[str, bytes]) -> None:
    """Write ``files`` (name -> bytes, the JSON last) into a pending folder of ``folder``, then move them in
    as one set; first completes or discards the pending sets of killed runs. Call holding ``results_lock``."""
    _recover(folder)
    pending = _inside(folder, f"{_PENDING}{run_id}")
    pending.mkdir()
    try:
        for name, data in files.items():
            atomic_write(_inside(pending, name), data)
        atomic_write(pending / "READY", " ".join(files).encode())
    except BaseException:
        shutil.rmtree(pending, ignore_errors=True)
        raise
    with _interrupts_held():
        _move_in(pending, folder, list(files))


def check_output(out: Path, quick: bool, force: bool = False, overrides: bool = False) -> Path:
    """Before any training: ``out`` must be (or be creatable as) a writable folder, and a quick run or a
    run with --set ``overrides`` must not write into a folder holding full-fidelity, override-free results
    (committed figures) unless ``force``. RunError otherwise."""
    try:
        folder = check_writable_dir(Path(out), "output folder")
    except ValueError as err:
        raise RunError(str(err)) from None
    if (quick or overrides) and not force:
        for meta_path in sorted(folder.glob("*.json")):
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and meta.get("quick") is False and "experiment" in meta \
                    and not meta.get("overrides"):
                kind = "quick results go to results/quick" if quick else "results of runs with --set go to results/overrides"
                raise RunError(f"{folder} holds full-fidelity results ({meta_path.name}); {kind} by default: choose "
                               "another --out, or pass --force to write there")
    return folder


def label(quick: bool, applied: dict) -> str:
    """What a result set is: "full" (the experiment's own settings: a committed figure), "quick", or the
    overrides it was run with."""
    parts = ["quick"] if quick else []
    if applied:
        parts.append("overrides " + ", ".join(f"{k}={format_number(v)}" for k, v in applied.items()))
    return "; ".join(parts) or "full"


def format_number(x, digits: int = 4) -> str:
    """Numbers in ``digits`` significant digits (ints and strings as they are), lists element-wise."""
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(format_number(y, digits) for y in x) + "]"
    try:
        import numpy as np
        if isinstance(x, np.generic):
            return format_number(x.item(), digits)
    except ImportError:  # pragma: no cover
        pass
    return str(x)


# the longest list ``format_summary`` prints inline (an interval, a pair of counts)
_SHORT_LIST = 4


def format_summary(summary: dict, digits: int = 4) -> str:
    """A summary dict as one line, "key = value, ..." in ``digits`` significant digits: its numbers, strings
    and short lists (at most four numbers: an interval); the nested tables (dicts, longer lists),
    which would flood a terminal, are named at the end and left to the experiment's JSON."""
    shown, nested = [], []
    for k, v in summary.items():
        if isinstance(v, dict) or (isinstance(v, (list, tuple)) and (
                len(v) > _SHORT_LIST or any(isinstance(x, (dict, list, tuple)) for x in v))):
            nested.append(str(k))
        else:
            shown.append(f"{k} = {format_number(v, digits)}")
    if nested:
        shown.append(f"(in the JSON's summary: {', '.join(nested)})")
    return ", ".join(shown)



