"""One runner for every experiment: settings (default, --quick, --set overrides), seed, progress
display, and the results (tidy CSV + JSON of settings, seed, versions, commit, wall time, summary,
and the figure) written as one set.

An experiment is a small declarative ``Experiment`` in experiments/NAME.py (module attribute
``EXPERIMENT``): its settings, its quick overrides, a ``run(settings, seed, progress) -> rows``
built from library pieces, a ``plot(rows, settings) -> Figure`` and a ``summary(rows) -> dict``.

Results as a set: a run writes its CSV, PNG and JSON into a pending folder beside the output, then
moves them in (an interrupt is held off while they move); the JSON names the run and the sha256 of
the CSV and PNG it belongs with. A pending folder left by a killed run is completed (if all its
files were written) or discarded by the next run, so an output folder never mixes two runs' files.
One run at a time writes into a folder (``results_lock``); a quick run refuses a folder holding
full-fidelity results unless forced; ``read_results`` checks that results another experiment reads
come from a run like this one (quick or not, seed, iclsim version). Every expected failure is a
``RunError`` with a one-line message, raised before any training where it can be.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
import types
from pathlib import Path
from typing import Any, Callable, NamedTuple

from iclsim._files import atomic_write, check_writable_dir  # noqa: F401  (runner.atomic_write stays public)
from iclsim.cache import SweepCache
from iclsim.cache import active as active_cache

__all__ = ["PLUGIN_GROUP", "Experiment", "RunError", "Computed", "discover", "run_experiment", "compute", "commit", "rows_to_csv", "read_rows", "read_results",
           "versions", "git_state", "results_lock", "check_output", "parse_setting", "apply_overrides",
           "format_number", "format_summary", "EXPERIMENTS_DIR", "LOCK_NAME", "check_name", "label",
           "MAX_SEED"]

def _shipped_experiments() -> Path:
    """The experiments that ship with iclsim: the installed package ``iclsim.experiments`` (pyproject maps
    it to the repository's experiments/ folder), or that folder beside a source tree never installed."""
    spec = importlib.util.find_spec("iclsim.experiments")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "experiments"


EXPERIMENTS_DIR = _shipped_experiments()
PLUGIN_GROUP = "iclsim.experiments"  # entry points of other packages: an Experiment, or a module holding EXPERIMENT
LOCK_NAME = ".iclsim.lock"
MAX_SEED = 2**62  # experiments add seed offsets; seeds are 64-bit signed integers
_PENDING = ".iclsim-pending-"


class RunError(Exception):
    """An expected failure of a run (bad setting, unusable output folder, folder in use, results of
    another kind): its message is one line for the user."""


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    settings: dict
    run: Callable[[dict, int, Callable[[str], None]], list[dict]]
    plot: Callable[[list[dict], dict], Any]
    summary: Callable[[list[dict]], dict]
    quick: dict = dataclasses.field(default_factory=dict)
    after: tuple[str, ...] = ()  # experiments whose results this one reads (run them first)

    def __post_init__(self):
        check_name("experiment name", self.name)


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_name(what: str, name) -> str:
    """A file-name part that stays inside its folder: letters, digits, ``_``, ``-`` and ``.`` (not first),
    no path separator, no ``..``; RunError otherwise (an experiment named ``../x`` would write outside --out)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise RunError(f"{what} {name!r} is not a plain name: use letters, digits, '_', '-' and '.' (not first), "
                       "with no path separator and no '..'")
    return name


def _inside(folder: Path, name: str) -> Path:
    """folder / name, refused (RunError) unless ``name`` is a plain file name that stays in ``folder``."""
    path = folder / name
    if not name or "/" in name or os.sep in name or name in (".", "..") or path.parent != folder:
        raise RunError(f"{name!r} would be written outside {folder}")
    return path


def discover(directory: Path = EXPERIMENTS_DIR, plugins: bool = True,
             on_broken: Callable[[str], None] | None = None) -> dict[str, Experiment]:
    """All experiments defined in ``directory`` (one module per figure or study; default: the shipped
    ones) and, with ``plugins``, those other installed packages register under the entry-point group
    ``iclsim.experiments`` (``PLUGIN_GROUP``); RunError if the folder does not exist. Each module is registered as ``iclsim_experiments.NAME`` (so the sweep
    cache can hash the code of classes defined there). A file or plugin that fails to load is a RunError
    naming it; with ``on_broken`` it is reported there (one line) and skipped, so one broken plugin does
    not disable the other experiments."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RunError(f"experiments folder {str(directory)!r} does not exist or is not a folder")
    found = {}
    package = types.ModuleType("iclsim_experiments")  # so an experiment imports its siblings: from ._x import y
    package.__path__ = [str(directory)]
    sys.modules["iclsim_experiments"] = package
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_"):
            continue
        name = f"iclsim_experiments.{path.stem}"
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        except Exception as err:  # a syntax error, a failed import, a bad Experiment
            sys.modules.pop(name, None)
            _broken(on_broken, f"experiment file {path} failed to load: {_one_line(err)}")
            continue
        if isinstance(getattr(module, "EXPERIMENT", None), Experiment):
            found[module.EXPERIMENT.name] = module.EXPERIMENT
    if plugins:
        for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
            try:
                obj = entry.load()
            except Exception as err:
                _broken(on_broken, f"plugin {entry.name!r} ({entry.value}) of group {PLUGIN_GROUP!r} failed to load: "
                                   f"{_one_line(err)}")
                continue
            exp = obj if isinstance(obj, Experiment) else getattr(obj, "EXPERIMENT", None)
            if not isinstance(exp, Experiment):
                _broken(on_broken, f"entry point {entry.name!r} of group {PLUGIN_GROUP!r} ({entry.value}) is neither an "
                                   "Experiment nor a module with an EXPERIMENT")
                continue
            if exp.name in found:
                _broken(on_broken, f"experiment {exp.name!r} of entry point {entry.value} clashes with one already found")
                continue
            found[exp.name] = exp
    return found


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def _broken(on_broken, message: str) -> None:
    if on_broken is None:
        raise RunError(message)
    on_broken(message)


def rows_to_csv(rows: list[dict]) -> bytes:
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
    import jax
    import jaxlib
    import numpy
    import optax

    import iclsim
    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "optax": optax.__version__, "numpy": numpy.__version__, "iclsim": iclsim.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}


@functools.lru_cache(maxsize=None)
def git_state() -> dict | None:
    """{"commit", "dirty"} of the checkout iclsim is imported from (None when it is not the root of a
    git work tree, e.g. installed). Dirty: tracked files differ from the commit (untracked files, such
    as results, do not count)."""
    import iclsim

    root = Path(iclsim.__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
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


def _commit(folder: Path, run_id: str, files: dict[str, bytes]) -> None:
    """Write ``files`` (name -> bytes, the JSON last) into a pending folder, then move them in."""
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


# ---- settings from the command line ----

def parse_setting(key: str, text: str, default):
    """``text`` read as a value of the type of ``default``: bool (true/false/1/0/yes/no), int (no
    fractional part), float (finite), str, or a list/tuple of numbers ("1,2,4" or "[1, 2, 4]"; ints if
    the default's are). RunError naming the setting and the accepted form otherwise."""
    def fail(kind):
        raise RunError(f"--set {key}={text}: {key} must be {kind} (its default is {default!r})")

    def number(s, integer):
        s = s.strip()
        if integer:
            if not re.fullmatch(r"[+-]?\d+", s):
                fail("an integer" if not isinstance(default, (list, tuple)) else "a list of integers, e.g. 1,2,4")
            return int(s)
        try:
            x = float(s)
        except ValueError:
            fail("a finite number" if not isinstance(default, (list, tuple)) else "a list of numbers, e.g. 0.1,0.5")
        if not math.isfinite(x):
            fail("a finite number")
        return x

    if isinstance(default, bool):
        words = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
                 "off": False}
        if text.strip().lower() not in words:
            fail("true or false")
        return words[text.strip().lower()]
    if isinstance(default, int):
        return number(text, True)
    if isinstance(default, float):
        return number(text, False)
    if isinstance(default, str):
        return text
    if isinstance(default, (list, tuple)) and default and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in default):
        body = text.strip()
        if body.startswith("[") and body.endswith("]"):
            body = body[1:-1]
        parts = [p for p in body.split(",") if p.strip()]
        if not parts:
            fail("a non-empty list of numbers, e.g. 1,2,4")
        integer = all(isinstance(x, int) for x in default)
        return type(default)(number(p, integer) for p in parts)
    raise RunError(f"--set {key}={text}: {key} cannot be set from the command line (its default {default!r} is "
                   "not a number, bool, string or list of numbers)")


def apply_overrides(exp: Experiment, settings: dict, overrides: dict[str, str]) -> dict:
    """The overrides (name -> text) that apply to ``exp``, parsed against its (quick) settings."""
    parsed = {}
    for key, text in overrides.items():
        if key in settings and key not in ("out", "quick"):
            parsed[key] = parse_setting(key, text, settings[key]) if isinstance(text, str) else text
    return parsed


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


def format_summary(summary: dict, digits: int = 4) -> str:
    return ", ".join(f"{k} = {format_number(v, digits)}" for k, v in summary.items())


def _progress_printer(name: str, progress: Callable[[str], None], start: float, every_s: float = 2.0):
    """cache.progress: "trained k of N points, elapsed, time left" at most every ``every_s``, and at N."""
    last = [-math.inf]

    def report(trained: int, missing: int):
        now = time.perf_counter()
        if trained < missing and now - last[0] < every_s:
            return
        last[0] = now
        elapsed = now - start
        left = elapsed / trained * (missing - trained) if trained else float("nan")
        progress(f"[{name}] trained {trained} of {missing} points, elapsed {elapsed:.0f} s, "
                 f"about {left:.0f} s left")

    return report


class Computed(NamedTuple):
    """An experiment's results before they are written: the run's settings and overrides, its rows,
    summary (with the gate counts), the files' bytes (CSV, PNG), wall time and cache counts."""

    settings: dict
    applied: dict
    rows: list
    summary: dict
    files: dict
    wall: float
    cache: dict | None
    environment: dict | None = None  # versions and devices of the process that computed it (``versions``)


def run_experiment(exp: Experiment, out: Path, quick: bool = False, seed: int = 0,
                   progress: Callable[[str], None] | None = None, cache: SweepCache | None = None,
                   overrides: dict | None = None, force: bool = False) -> dict:
    """Run one experiment and write out/NAME.csv, out/NAME.png and out/NAME.json as one set.
    ``overrides`` (name -> value, or text parsed against the default's type) replace settings and are
    recorded in the JSON. With a ``cache`` every trained sweep point is stored and reused (resumable
    runs). The output folder and the cache folder are checked, and the folder locked, before any
    training; a quick run refuses a folder of full-fidelity results unless ``force``."""
    progress = progress or _stderr
    folder = check_output(out, quick, force, overrides=bool(overrides))
    with results_lock(folder):
        computed = compute(exp, out, quick, seed, progress, cache, overrides)
        return commit(exp, folder, computed, quick, seed, progress)


def compute(exp: Experiment, out: Path, quick: bool = False, seed: int = 0,
            progress: Callable[[str], None] | None = None, cache: SweepCache | None = None,
            overrides: dict | None = None) -> Computed:
    """Run one experiment and render its files without writing anything (``commit`` writes them): what
    a worker process of ``iclsim run --jobs`` does. ``out`` is where results it reads (``after``) live."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise RunError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    progress = progress or _stderr
    settings = {**exp.settings, **(exp.quick if quick else {})}
    applied = apply_overrides(exp, settings, overrides or {})
    settings.update(applied)
    if cache is not None:
        try:
            cache.check()
        except ValueError as err:
            raise RunError(str(err)) from None
    settings.update(out=str(out), quick=bool(quick))
    progress(f"[{exp.name}] {exp.title} ({'quick' if quick else 'default'}, seed {seed}"
             + (f", {', '.join(f'{k}={v}' for k, v in applied.items())}" if applied else "") + ")")
    start = time.perf_counter()
    if cache is not None:
        cache.progress = _progress_printer(exp.name, progress, start)
    with active_cache(cache):
        rows = exp.run(settings, seed, progress)
    wall = time.perf_counter() - start
    summary = exp.summary(rows)
    if "networks_passed" not in summary and any("passed" in r for r in rows):  # one row per network
        gate = [r["passed"] for r in rows if "passed" in r]
        summary = {"networks_passed": sum(map(bool, gate)), "networks_failed": len(gate) - sum(map(bool, gate)),
                   **summary}
    fig = exp.plot(rows, settings)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    files = {f"{exp.name}.csv": rows_to_csv(rows), f"{exp.name}.png": buf.getvalue()}
    counts = None if cache is None else {"directory": str(cache.directory), "points_loaded": cache.hits,
                                         "points_trained": cache.trained, "corrupt_entries_replaced": cache.corrupt}
    return Computed(settings, applied, rows, summary, files, wall, counts, versions())


def commit(exp: Experiment, out: Path, computed: Computed, quick: bool, seed: int,
           progress: Callable[[str], None] | None = None) -> dict:
    """Write a computed experiment into ``out`` as one set (the JSON names the run and the files'
    sha256) and return its JSON object; holds the folder's lock (re-entrant) while it writes."""
    progress = progress or _stderr
    check_name("experiment name", exp.name)
    with results_lock(Path(out)) as folder:
        _recover(folder)
        run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        files = dict(computed.files)
        meta = {"experiment": exp.name, "title": exp.title, "run_id": run_id, "quick": quick, "seed": seed,
                "label": label(quick, computed.applied),
                "settings": computed.settings, "overrides": computed.applied, "wall_time_s": round(computed.wall, 2),
                "summary": computed.summary,
                "files": {kind: {"name": name, "sha256": hashlib.sha256(data).hexdigest()}
                          for kind, (name, data) in zip(("csv", "png"), files.items())},
                "versions": computed.environment or versions(), "git": git_state(), "command": " ".join(sys.argv)}
        if computed.cache is not None:
            meta["cache"] = computed.cache
        files[f"{exp.name}.json"] = (json.dumps(meta, indent=2, default=str) + "\n").encode()
        _commit(folder, run_id, files)
    progress(f"[{exp.name}] done in {computed.wall:.1f} s: {format_summary(computed.summary)}")
    return meta


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
