"""One runner for every experiment: settings (default or quick, ``--set`` overrides typed by the
settings' fields, ``configs``), seed, progress display, and the results written as one set
(``results``: tidy CSV + JSON of settings, seed, versions, commit, wall time, summary, and the figure).

An experiment is a small declarative ``registry.Experiment`` in experiments/NAME.py (module attribute
``EXPERIMENT``): typed settings (a frozen dataclass), quick settings, and
``run(settings, seed, context) -> rows`` where ``context`` is a ``registry.RunContext(progress, cache,
out, quick)``: the runner hands the sweep cache to the experiment explicitly, and the experiment passes
``context.cache`` to every ``train.fit_sweep``. Every expected failure is a ``RunError`` with a one-line
message, raised before any training where it can be.

This module re-exports the names experiments and tests use from ``registry``, ``configs`` and
``results``, so ``from iclsim.runner import Experiment, read_results`` keeps working.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, NamedTuple

from iclsim._files import atomic_write, check_writable_dir  # noqa: F401  (runner.atomic_write stays public)
from iclsim.cache import SweepCache
from iclsim.configs import RunError, apply_overrides, as_dict, parse_setting
from iclsim.registry import EXPERIMENTS_DIR, PLUGIN_GROUP, Experiment, RunContext, check_name, discover
from iclsim.results import (LOCK_NAME, check_output, format_number, format_summary, git_state, label, read_results,
                            read_rows, results_lock, rows_to_csv, versions, write_set)

__all__ = ["PLUGIN_GROUP", "Experiment", "RunContext", "RunError", "Computed", "discover", "run_experiment", "compute",
           "commit", "rows_to_csv", "read_rows", "read_results", "versions", "git_state", "results_lock",
           "check_output", "parse_setting", "apply_overrides", "format_number", "format_summary", "EXPERIMENTS_DIR",
           "LOCK_NAME", "check_name", "label", "MAX_SEED"]

MAX_SEED = 2**62  # experiments add seed offsets; seeds are 64-bit signed integers


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
    """An experiment's results before they are written: the run's settings (a plain dict, with ``out`` and
    ``quick``, as the JSON records them) and overrides, its rows, summary (with the gate counts), the files'
    bytes (CSV, PNG), wall time and cache counts."""

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
    ``overrides`` (name -> value, or text parsed by the field's type, ``configs``) replace settings and are
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
    settings, applied = apply_overrides(exp.settings_for(quick), overrides or {})
    if cache is not None:
        try:
            cache.check()
        except ValueError as err:
            raise RunError(str(err)) from None
    progress(f"[{exp.name}] {exp.title} ({'quick' if quick else 'default'}, seed {seed}"
             + (f", {', '.join(f'{k}={v}' for k, v in applied.items())}" if applied else "") + ")")
    start = time.perf_counter()
    if cache is not None:
        cache.progress = _progress_printer(exp.name, progress, start)
    rows = exp.run(settings, seed, RunContext(progress, cache, Path(out), bool(quick)))
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
    recorded = {**as_dict(settings), "out": str(out), "quick": bool(quick)}
    return Computed(recorded, applied, rows, summary, files, wall, counts, versions())


def commit(exp: Experiment, out: Path, computed: Computed, quick: bool, seed: int,
           progress: Callable[[str], None] | None = None) -> dict:
    """Write a computed experiment into ``out`` as one set (the JSON names the run and the files'
    sha256) and return its JSON object; holds the folder's lock (re-entrant) while it writes."""
    progress = progress or _stderr
    check_name("experiment name", exp.name)
    with results_lock(Path(out)) as folder:
        run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        files = dict(computed.files)
        meta = {"experiment": exp.name, "title": exp.title, "run_id": run_id, "quick": quick, "seed": seed,
                "label": label(quick, computed.applied),
                "settings": computed.settings, "overrides": computed.applied, "wall_time_s": round(computed.wall, 2),
                "summary": computed.summary,
                "files": {kind: {"name": name, "sha256": hashlib.sha256(data).hexdigest()}
                          for kind, (name, data) in zip(("csv", "png"), files.items())},
                "versions": computed.environment or versions(), "git": git_state(folder), "command": " ".join(sys.argv)}
        if computed.cache is not None:
            meta["cache"] = computed.cache
        files[f"{exp.name}.json"] = (json.dumps(meta, indent=2, default=str) + "\n").encode()
        write_set(folder, run_id, files)
    progress(f"[{exp.name}] done in {computed.wall:.1f} s: {format_summary(computed.summary)}")
    return meta


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
