"""Command line: ``iclsim list`` and
``iclsim run NAME|all [--quick] [--out DIR] [--seed S] [--set KEY=VALUE ...] [--cache DIR | --no-cache]
[--jobs N] [--force]``. Also ``python -m iclsim``. ``--experiments DIR`` (before or after the command,
repeatable) adds the experiments of DIR to the shipped ones; a shipped name wins a clash (a warning names
both files).

Expected failures (bad arguments, unknown experiment, missing experiments folder, unusable output
or cache folder, a folder in use, an interrupt) print one line and exit non-zero (2 for usage, 1 for
a failed run, 130 for an interrupt); ``--traceback`` shows the full traceback instead."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from iclsim import runner
from iclsim.cache import SweepCache, persist_compilations
from iclsim.compiler import quick_compilation, set_xla_flag, use_all_cpu_cores


class _UsageError(Exception):
    """A bad command line: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise _UsageError(f"{message} (see iclsim --help)")

__all__ = ["use_all_cpu_cores", "quick_compilation", "main"]


def _order(experiments: dict, names: list[str]) -> list[str]:
    """The requested names, each after those of its ``after`` experiments that are also requested."""
    ordered: list[str] = []

    def visit(name):
        if name in ordered:
            return
        for dep in experiments[name].after:
            if dep in names:
                visit(dep)
        ordered.append(name)

    for name in names:
        visit(name)
    return ordered


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="iclsim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    experiments = dict(type=Path, action="append", metavar="DIR",
                       help="a folder of more experiments, added to the shipped ones (repeatable; a shipped name wins "
                            "a clash, with a warning)")
    parser.add_argument("--experiments", default=[], **experiments)
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks of failures")
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="list the experiments")
    run = sub.add_parser("run", help="run experiments and write results and figures")
    for command in (listing, run):  # also after the command: iclsim run all --experiments DIR
        command.add_argument("--experiments", dest="more_experiments", default=[], **experiments)
    run.add_argument("names", nargs="+", help="experiment names, or 'all'")
    run.add_argument("--quick", action="store_true", help="each experiment's small settings: a smoke run of its whole pipeline (times: docs/performance.md §5)")
    run.add_argument("--out", type=Path, default=None,
                     help="output folder (default: figures, or results/quick with --quick)")
    run.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a setting (typed by its field: int, float, bool, str, a choice, a list as "
                          "1,2,4); repeatable; recorded in the JSON")
    run.add_argument("--cache", type=Path, default=Path(".iclsim-cache"),
                     help="folder of trained sweep points and compiled programs (in xla/), reused by later runs "
                          "(default: .iclsim-cache)")
    run.add_argument("--no-cache", action="store_true", help="neither read nor write the cache (trained points or programs)")
    run.add_argument("--jobs", type=int, default=None, metavar="N",
                     help="experiments run at once, each in a worker process with every CPU device (the numbers "
                          "are a sequential run's), the longest first by the output folder's last wall times; a "
                          "point two workers need is trained once, the other waits for it (default: one per core "
                          "with --quick, else 1)")
    run.add_argument("--force", action="store_true",
                     help="retrain every point and overwrite the cache (compiled programs are still reused); "
                          "let a quick run write into a folder of full-fidelity results")
    return parser


class _Session:
    """What a run has done so far, for the interrupt message."""

    def __init__(self):
        self.caches: list[SweepCache] = []
        self.current: str | None = None
        self.out: Path | None = None
        self.cache_dir: Path | None = None


def main(argv=None) -> int:
    """The ``iclsim`` command: parse ``argv`` (default sys.argv[1:]), run, and return the exit status (0 ok,
    1 a failed run, 2 a usage error, 130 an interrupt)."""
    use_all_cpu_cores()
    session = _Session()
    argv = sys.argv[1:] if argv is None else list(argv)
    traceback = "--traceback" in argv
    try:
        return _main(argv, session)
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except _UsageError as err:
        print(f"iclsim: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if traceback:
            raise
        print(f"iclsim: interrupted{_where(session)}: {_saved(session)}", file=sys.stderr)
        return 130
    except runner.RunError as err:
        if traceback:
            raise
        print(f"iclsim: error{_where(session)}: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # anything else (a failed training, a bad setting found deep in JAX): one line
        if traceback:
            raise
        message = " ".join(str(err).split("-" * 20)[0].split())  # without JAX's note on filtered frames
        print(f"iclsim: error{_where(session)}: {type(err).__name__}: {message} "
              "(rerun with --traceback for details)", file=sys.stderr)
        return 1


def _where(session: _Session) -> str:
    return f" in experiment {session.current}" if session.current else ""


def _saved(session: _Session) -> str:
    if session.current is None:
        return "nothing was run"
    kept = f"results already in {session.out} are unchanged"
    if session.cache_dir is None:
        return f"nothing was saved (--no-cache), {kept}; a rerun starts {session.current} over"
    trained = sum(c.trained for c in session.caches)
    return (f"{trained} trained point{'s' if trained != 1 else ''} of this run saved in {session.cache_dir}, {kept}; "
            "rerun the same command to resume")


def _main(argv: list[str], session: _Session) -> int:
    args = _parser().parse_args(argv)
    broken: list[str] = []

    def warn(message):  # a broken experiment file or plugin: said once, the others still run
        broken.append(message)
        print(f"iclsim: warning: {message}", file=sys.stderr)

    args.experiments = [*args.experiments, *args.more_experiments]
    experiments = runner.discover(runner.EXPERIMENTS_DIR, on_broken=warn, extra=args.experiments)
    if args.command == "list":
        for name, exp in experiments.items():
            print(f"{name:16s} {exp.title}")
        return 0
    names = list(experiments) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in experiments]
    if unknown:
        raise _UsageError(f"unknown experiment(s): {', '.join(unknown)}; known: {', '.join(experiments)}"
                          + (f" ({len(broken)} failed to load, see the warnings above)" if broken else ""))
    if not 0 <= args.seed <= runner.MAX_SEED:
        raise _UsageError(f"--seed must be an integer in [0, {runner.MAX_SEED}], got {args.seed}")
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise _UsageError(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value
    for key in overrides:
        if key in ("out", "quick"):
            raise _UsageError(f"--set {key}=...: use --{key} instead")
        if not any(key in _fields(experiments[n].settings) for n in names):
            known = sorted({k for n in names for k in _fields(experiments[n].settings)})
            raise _UsageError(f"--set {key}=...: no setting {key!r} in {', '.join(names)}; settings: {', '.join(known)}")
    if args.quick:
        quick_compilation()
    # everything that can fail before training, for every experiment: settings, output folder, cache folder
    applied = False
    for name in names:
        exp = experiments[name]
        applied |= bool(runner.apply_overrides(exp.settings_for(args.quick), overrides)[1])
    # committed figures come only from full runs with the experiments' own settings: quick runs and runs with
    # --set go elsewhere by default (and a folder of committed results refuses them unless --force)
    default = "results/quick" if args.quick else "results/overrides" if applied else "figures"
    out = args.out = args.out if args.out is not None else Path(default)
    session.out = out
    folder = runner.check_output(out, args.quick, args.force, overrides=applied)
    if not args.no_cache:
        try:
            SweepCache(args.cache).check()
        except ValueError as err:
            raise runner.RunError(str(err)) from None
        session.cache_dir = args.cache
    jobs = (min(os.cpu_count() or 1, len(names)) if args.quick else 1) if args.jobs is None else args.jobs
    if jobs < 1:
        raise _UsageError(f"--jobs must be >= 1, got {jobs}")
    results = []
    if jobs > 1 and len(names) > 1:
        with runner.results_lock(folder):
            results = _run_parallel(experiments, names, args, overrides, jobs, session)
        session.current = None
        _table(results)
        return _all_failed(results)
    with runner.results_lock(folder), (contextlib.nullcontext() if args.no_cache
                                       else persist_compilations(args.cache / "xla")):
        for name in _order(experiments, names):
            session.current = name
            cache = None if args.no_cache else SweepCache(args.cache, force=args.force)
            if cache is not None:
                session.caches.append(cache)
            start = time.perf_counter()
            meta = runner.run_experiment(experiments[name], out, args.quick, args.seed, cache=cache,
                                         overrides=overrides, force=args.force)
            results.append((name, time.perf_counter() - start, meta["summary"]))
        session.current = None
    _table(results)
    return _all_failed(results)


def _fields(settings) -> list[str]:
    return [f.name for f in dataclasses.fields(settings)]


def _all_failed(results) -> int:
    """1 (with a line) where an experiment's networks all failed their quality gate: its numbers describe
    no trained network, whatever its table says; else 0."""
    failed = [(name, summary["networks_failed"]) for name, _, summary in results
              if summary.get("networks_passed") == 0 and summary.get("networks_failed", 0) > 0]
    for name, count in failed:
        print(f"iclsim: error in experiment {name}: every network ({count}) failed its quality gate; its results "
              "are written for inspection, not use (too few steps, or a changed setting?)", file=sys.stderr)
    return 1 if failed else 0


def _run_parallel(experiments, names, args, overrides, jobs, session) -> list:
    """``jobs`` experiments at once, each computed in a spawned worker process (``runner.compute``) with
    as many CPU devices as this process has (so each worker compiles the programs a sequential run would; the
    numbers do not depend on the layout either way: tests/test_trust_round2.py); this process writes
    each result set as it arrives (``runner.commit``, under the folder's lock), and starts an experiment
    once those it reads are written. A worker exits when this process dies (even by kill -9)."""
    import concurrent.futures as futures
    import multiprocessing

    order = _order(experiments, names)
    order = _longest_first(order, args.out, args.quick)
    devices = _device_count()
    cache_dir = None if args.no_cache else str(args.cache)
    pool = futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_worker_init, initargs=(devices, os.getpid()))
    running, written, results = {}, set(), []
    try:
        while len(written) < len(order):
            for name in order:
                if len(running) >= jobs:
                    break
                if name in written or name in running.values():
                    continue
                if all(dep in written for dep in experiments[name].after if dep in names):
                    running[pool.submit(_compute_in_worker, name, [str(f) for f in args.experiments], args.out, args.quick,
                                        args.seed, overrides, cache_dir, args.force)] = name
            finished, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                session.current = name
                computed = future.result()  # a worker's failure is raised here, as in a sequential run
                meta = runner.commit(experiments[name], args.out, computed, args.quick, args.seed)
                results.append((name, computed.wall, meta["summary"]))
                written.add(name)
            session.current = next(iter(running.values()), None)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def _longest_first(order: list[str], out, quick: bool) -> list[str]:
    """The order in which --jobs offers experiments to free workers (each still waits for what it reads):
    longest first by the wall time of its last set in ``out`` (``_last_wall``; unknown ones first, ties in
    ``order``), so the longest does not start last and leave one worker running alone at the end."""
    last = {name: _last_wall(out, name, quick) for name in order}
    return sorted(order, key=lambda name: -last[name])


def _last_wall(out, name: str, quick: bool) -> float:
    """The wall time recorded in OUT/NAME.json by the last run of the same fidelity, or inf (first) where there
    is none or it cannot be read as one: a scheduling hint only, never a number of a result. In a --jobs run a
    set whose points another worker trained records its wait too, so its time is its time in such a run. The
    file is read only if it is a regular file (not through a link, a FIFO or a device) of at most 1 MB."""
    import stat as stat_

    try:
        fd = os.open(Path(out) / f"{name}.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return math.inf
    try:
        info = os.fstat(fd)
        if not stat_.S_ISREG(info.st_mode) or info.st_size > 1 << 20:
            return math.inf
        meta = json.loads(os.read(fd, info.st_size + 1))
        wall = meta["wall_time_s"]
        if (isinstance(wall, bool) or not isinstance(wall, (int, float)) or not math.isfinite(wall) or wall < 0
                or meta.get("quick") is not bool(quick)):
            return math.inf
        return float(wall)
    except Exception:  # any content: a hint that cannot be read is no hint
        return math.inf
    finally:
        os.close(fd)


def _device_count() -> int:
    found = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(found.group(1)) if found else 1


def _worker_init(devices: int, parent: int | None = None) -> None:
    """In a worker, before JAX starts its backend: the parent's CPU device count; and a watchdog that ends
    the worker once its parent is gone (a parent killed with SIGKILL cannot stop its workers itself)."""
    set_xla_flag("xla_force_host_platform_device_count", devices, replace=True)
    if parent is not None:
        import threading

        def watch():
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="iclsim-parent-watchdog", daemon=True).start()


def _compute_in_worker(name, extra_dirs, out, quick, seed, overrides, cache_dir, force):
    experiments = runner.discover(runner.EXPERIMENTS_DIR, extra=[Path(f) for f in extra_dirs])
    cache = None if cache_dir is None else SweepCache(Path(cache_dir), force=force)
    with contextlib.nullcontext() if cache_dir is None else persist_compilations(Path(cache_dir) / "xla"):
        return runner.compute(experiments[name], out, quick, seed, None, cache, overrides)


def _table(results) -> None:
    """The headline numbers of each experiment, 4 significant digits."""
    if not results:
        return
    width = max(len(name) for name, _, _ in results)
    print(f"{'experiment':{width}s}  {'time':>7s}  headline numbers")
    for name, wall, summary in results:
        print(f"{name:{width}s}  {wall:6.1f}s  {runner.format_summary(summary)}")


if __name__ == "__main__":
    sys.exit(main())
