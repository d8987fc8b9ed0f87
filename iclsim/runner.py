"""One runner for every experiment: settings (default or --quick), seed, progress display,
results written atomically (tidy CSV + JSON of settings, seed, versions, wall time, summary)
and the figure.

An experiment is a small declarative ``Experiment`` in experiments/NAME.py (module attribute
``EXPERIMENT``): its settings, its quick overrides, a ``run(settings, seed, progress) -> rows``
built from library pieces, a ``plot(rows, settings) -> Figure`` and a ``summary(rows) -> dict``.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import json
import os
import platform
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

from iclsim._files import atomic_write  # noqa: F401  (runner.atomic_write stays public)
from iclsim.cache import SweepCache
from iclsim.cache import active as active_cache

__all__ = ["EXPERIMENTS_DIR", "Experiment", "discover", "rows_to_csv", "read_rows", "versions", "run_experiment"]

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


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


def discover(directory: Path = EXPERIMENTS_DIR) -> dict[str, Experiment]:
    """All experiments defined in ``directory`` (one module per figure or study)."""
    found = {}
    package = types.ModuleType("iclsim_experiments")  # so an experiment imports its siblings: from ._x import y
    package.__path__ = [str(directory)]
    sys.modules["iclsim_experiments"] = package
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"iclsim_experiments.{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if isinstance(getattr(module, "EXPERIMENT", None), Experiment):
            found[module.EXPERIMENT.name] = module.EXPERIMENT
    return found


def rows_to_csv(rows: list[dict]) -> bytes:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def read_rows(path: Path) -> list[dict]:
    """Rows of a results CSV, numbers parsed."""
    def parse(value):
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
        return value
    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def versions() -> dict:
    import jax
    import jaxlib
    import numpy
    import optax

    import iclsim
    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "optax": optax.__version__, "numpy": numpy.__version__, "iclsim": iclsim.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}


def run_experiment(exp: Experiment, out: Path, quick: bool = False, seed: int = 0,
                   progress: Callable[[str], None] | None = None, cache: SweepCache | None = None) -> dict:
    """Run one experiment and write out/NAME.csv, out/NAME.json and out/NAME.png atomically.
    With a ``cache`` every trained sweep point is stored and reused (resumable runs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    settings = {**exp.settings, **(exp.quick if quick else {}), "out": str(out)}
    progress(f"[{exp.name}] {exp.title} ({'quick' if quick else 'default'}, seed {seed})")
    start = time.perf_counter()
    with active_cache(cache):
        rows = exp.run(settings, seed, progress)
    wall = time.perf_counter() - start
    summary = exp.summary(rows)
    out = Path(out)
    atomic_write(out / f"{exp.name}.csv", rows_to_csv(rows))
    fig = exp.plot(rows, settings)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(out / f"{exp.name}.png", buf.getvalue())
    meta = {"experiment": exp.name, "title": exp.title, "quick": quick, "seed": seed, "settings": settings,
            "wall_time_s": round(wall, 2), "summary": summary, "versions": versions(),
            "command": " ".join(sys.argv)}
    if cache is not None:
        meta["cache"] = {"directory": str(cache.directory), "points_loaded": cache.hits, "points_trained": cache.trained}
    atomic_write(out / f"{exp.name}.json", (json.dumps(meta, indent=2, default=str) + "\n").encode())
    progress(f"[{exp.name}] done in {wall:.1f} s: " + ", ".join(f"{k} = {v}" for k, v in summary.items()))
    return meta
