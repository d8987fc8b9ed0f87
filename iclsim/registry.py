"""The experiment record and where experiments are found.

An experiment is a small declarative ``Experiment`` in a module's ``EXPERIMENT`` attribute: its typed
settings (a frozen dataclass instance, ``configs``), its quick settings (``dataclasses.replace`` of
them), and three functions built from library pieces:

    run(settings, seed, context) -> rows      context: a RunContext(progress, cache, out, quick)
    plot(rows, settings) -> matplotlib Figure
    summary(rows) -> dict of headline numbers

``RunContext`` is everything the runner hands an experiment besides its settings and seed: ``progress``
(a callable taking one line), ``cache`` (a ``cache.SweepCache`` or None: the experiment passes it to
every ``train.fit_sweep``, explicitly), ``out`` (the output folder, where results an experiment reads
with ``results.read_results`` live) and ``quick``.

``discover`` finds the experiments shipped with iclsim (experiments/), those in extra folders
(``iclsim run --experiments DIR``, added to the shipped ones; a shipped name wins a clash, which is
reported) and those other installed packages register under the entry-point group ``iclsim.experiments``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import re
import sys
import types
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from iclsim.configs import RunError, check_settings

__all__ = ["PLUGIN_GROUP", "EXPERIMENTS_DIR", "Experiment", "RunContext", "RunError", "check_name", "discover"]


def _shipped_experiments() -> Path:
    """The experiments that ship with iclsim: the installed package ``iclsim.experiments`` (pyproject maps
    it to the repository's experiments/ folder), or that folder beside a source tree never installed."""
    spec = importlib.util.find_spec("iclsim.experiments")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "experiments"


EXPERIMENTS_DIR = _shipped_experiments()
PLUGIN_GROUP = "iclsim.experiments"  # entry points of other packages: an Experiment, or a module holding EXPERIMENT


class RunContext(NamedTuple):
    """What the runner hands ``Experiment.run`` besides settings and seed: ``progress(line)``, the sweep
    ``cache`` (a ``cache.SweepCache`` or None; pass it to every ``train.fit_sweep`` / ``sweeps.risk_curves``),
    the output folder ``out`` (results of ``after`` experiments are read from it) and ``quick``."""

    progress: Callable[[str], None]
    cache: Any = None
    out: Path | None = None
    quick: bool = False


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One experiment: ``name`` (a plain file-name part: its results are NAME.csv/.png/.json), ``title``,
    ``settings`` (a frozen dataclass instance), ``run(settings, seed, context) -> rows`` (``RunContext``),
    ``plot(rows, settings) -> Figure``, ``summary(rows) -> dict``, ``quick`` (the quick settings, an
    instance of the same class; default: ``settings``) and ``after`` (experiments whose results this one
    reads: run them first)."""

    name: str
    title: str
    settings: Any
    run: Callable[[Any, int, RunContext], list[dict]]
    plot: Callable[[list[dict], Any], Any]
    summary: Callable[[list[dict]], dict]
    quick: Any = None
    after: tuple[str, ...] = ()

    def __post_init__(self):
        check_name("experiment name", self.name)
        check_settings(f"experiment {self.name!r}", self.settings, self.quick)
        if self.quick is None:
            object.__setattr__(self, "quick", self.settings)

    def settings_for(self, quick: bool):
        """The settings of a run: ``quick`` or the default ones."""
        return self.quick if quick else self.settings


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_name(what: str, name) -> str:
    """A file-name part that stays inside its folder: letters, digits, ``_``, ``-`` and ``.`` (not first),
    no path separator, no ``..``; RunError otherwise (an experiment named ``../x`` would write outside --out)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise RunError(f"{what} {name!r} is not a plain name: use letters, digits, '_', '-' and '.' (not first), "
                       "with no path separator and no '..'")
    return name


def discover(directory: Path = EXPERIMENTS_DIR, plugins: bool = True,
             on_broken: Callable[[str], None] | None = None, extra: Sequence[Path] = ()) -> dict[str, Experiment]:
    """All experiments defined in ``directory`` (one module per figure or study; default: the shipped
    ones), then in each folder of ``extra`` (added, never hiding them: a name already found is a clash,
    reported and skipped, so the first folder's experiment is kept) and, with ``plugins``, those other
    installed packages register under ``PLUGIN_GROUP``. RunError if a folder does not exist. Modules of
    ``directory`` are registered as ``iclsim_experiments.NAME`` (so the sweep cache can hash the code of
    classes defined there), those of an extra folder under a package named after its path. A file or
    plugin that fails to load, or a clash, is a RunError naming it; with ``on_broken`` it is reported
    there (one line) and skipped, so one broken plugin does not disable the other experiments."""
    found: dict[str, Experiment] = {}
    where: dict[str, str] = {}
    folders = [Path(directory)] + [Path(f) for f in extra]
    for f in folders:
        if not f.is_dir():
            raise RunError(f"experiments folder {str(f)!r} does not exist or is not a folder")
    seen = set()
    for i, folder in enumerate(folders):
        if folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        package = "iclsim_experiments" if i == 0 else \
            "iclsim_experiments_" + hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
        for path, exp in _load_folder(folder, package, on_broken):
            _add(found, where, exp, str(path), on_broken)
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
            _add(found, where, exp, f"entry point {entry.value}", on_broken)
    return found


def _load_folder(folder: Path, package: str, on_broken):
    """(path, Experiment) of each module of ``folder`` (files starting with ``_`` are helpers), imported
    as ``package.NAME`` so an experiment imports its siblings (``from ._x import y``)."""
    module = types.ModuleType(package)
    module.__path__ = [str(folder)]
    sys.modules[package] = module
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        name = f"{package}.{path.stem}"
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[name] = loaded
            spec.loader.exec_module(loaded)
        except Exception as err:  # a syntax error, a failed import, a bad Experiment
            sys.modules.pop(name, None)
            _broken(on_broken, f"experiment file {path} failed to load: {_one_line(err)}")
            continue
        if isinstance(getattr(loaded, "EXPERIMENT", None), Experiment):
            yield path, loaded.EXPERIMENT


def _add(found: dict, where: dict, exp: Experiment, source: str, on_broken) -> None:
    if exp.name in found:
        _broken(on_broken, f"experiment {exp.name!r} of {source} clashes with the one of {where[exp.name]}, which is "
                           "kept: rename it")
        return
    found[exp.name], where[exp.name] = exp, source


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def _broken(on_broken, message: str) -> None:
    if on_broken is None:
        raise RunError(message)
    on_broken(message)
