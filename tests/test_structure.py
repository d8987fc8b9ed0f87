"""The contract of the code's shape (issue 31), checked cheaply from the source: no module above the size one
idea takes, the engine's door reads the protocols, no module imported by nobody, a docstring on every public
name."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import types
from pathlib import Path

import pytest

import iclsim

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450
# modules allowed above MAX_LINES while a branch splits them (issue 31); empty since `persist` split cache.py
# and runner.py. An entry that is no longer too long fails the test: remove it.
TOO_LONG_FOR_NOW: set[str] = set()
# public modules allowed to lack docstrings while a branch rewrites them (issue 31); empty since `persist` and
# `engine` landed. An entry is skipped by name: add one only with the branch that fills it in a comment.
UNDOCUMENTED_FOR_NOW: set[str] = set()
# run as a program, not imported: ``python -m iclsim``
ENTRY_POINTS = {"iclsim.__main__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _library_files() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / "iclsim").rglob("*.py"))}


def _imported(path: Path, name: str) -> set[str]:
    """The iclsim modules ``path`` (module ``name``) imports: ``import iclsim.a``, ``from iclsim.a import b``
    (b itself where it is a module), ``from iclsim import a``, and relative imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    modules = set(_library_files())
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("iclsim")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("iclsim"):
                continue
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
    return out & modules


def test_no_module_above_the_line_limit():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
               for folder in ("iclsim", "experiments") for p in sorted((ROOT / folder).rglob("*.py"))}
    offenders = {f: n for f, n in lengths.items() if n > MAX_LINES and f not in TOO_LONG_FOR_NOW}
    assert not offenders, f"modules above {MAX_LINES} lines (split them by idea): {offenders}"
    stale = {f for f in TOO_LONG_FOR_NOW if lengths.get(f, 0) <= MAX_LINES}
    assert not stale, f"allow-listed as too long but no longer are (remove them from TOO_LONG_FOR_NOW): {stale}"


def test_the_engine_door_reads_the_protocols():
    files = _library_files()
    for name in ("iclsim.train", "iclsim.evaluate", "iclsim.sweeps"):
        assert "iclsim.protocols" in _imported(files[name], name), f"{name} does not import iclsim.protocols"
    for name in ("iclsim.train", "iclsim.evaluate"):  # the door: one check of model and designs, named errors
        calls = [n for n in ast.walk(ast.parse(files[name].read_text())) if isinstance(n, ast.Attribute)
                 and n.attr == "check_sweep" and isinstance(n.value, ast.Name) and n.value.id == "protocols"]
        assert calls, f"{name} does not call protocols.check_sweep at its door"


def test_no_module_is_imported_by_nobody():
    files = _library_files()
    importers: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for target in _imported(path, name):
            if target != name:
                importers[target].add(name)
    public = {f"iclsim.{m}" for m in iclsim._SUBMODULES}
    orphans = sorted(m for m, by in importers.items()
                     if not by and m not in public and m not in ENTRY_POINTS and m != "iclsim")
    assert not orphans, f"modules no other module imports and iclsim._SUBMODULES does not list: {orphans}"
    listed_missing = sorted(m for m in public if m not in files)
    assert not listed_missing, f"iclsim._SUBMODULES lists modules that do not exist: {listed_missing}"


def _public_modules() -> list[str]:
    return [m for m in _library_files() if not any(part.startswith("_") for part in m.split("."))]


def _auto_doc(obj) -> bool:
    """The docstring Python writes for a class that has none: a NamedTuple's ``Name(a, b)`` or a dataclass's
    signature ``Name(a: int, ...)``."""
    doc = obj.__doc__ or ""
    if isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields"):
        fields = ", ".join(obj._fields)
        return doc in (f"{obj.__name__}({fields})", f"{obj.__name__}({fields},)")  # one field: "Name(a,)"
    if dataclasses.is_dataclass(obj):
        try:
            return doc == obj.__name__ + str(inspect.signature(obj)).replace(" -> None", "")
        except (TypeError, ValueError):
            return False
    return False


def _needs_doc(obj) -> bool:
    """Functions and classes carry a docstring; plain constants, type aliases and modules re-listed in
    ``__all__`` (documented where they are defined) are skipped by type."""
    if isinstance(obj, (types.ModuleType, types.GenericAlias, int, float, str, bytes, tuple, frozenset, dict)):
        return False
    return inspect.isclass(obj) or callable(obj)


@pytest.mark.parametrize("module", _public_modules())
def test_every_public_name_has_a_docstring(module):
    if module in UNDOCUMENTED_FOR_NOW:
        pytest.skip(f"{module}: docstrings filled on its own branch (see UNDOCUMENTED_FOR_NOW)")
    mod = importlib.import_module(module)
    assert mod.__doc__ and mod.__doc__.strip(), f"{module} has no module docstring"
    names = getattr(mod, "__all__", None)
    assert names is not None, f"{module} has no __all__"
    missing = [name for name in names if _needs_doc(getattr(mod, name))
               and (not (getattr(mod, name).__doc__ or "").strip() or _auto_doc(getattr(mod, name)))]
    assert not missing, f"{module}: public names without a docstring: {missing}"


def test_every_subpackage_ships_in_the_wheel():
    """pyproject lists the packages explicitly: a subpackage missing there imports in the checkout and is absent
    from the installed wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {_module_name(p) for p in (ROOT / "iclsim").rglob("__init__.py")}
    assert packages <= listed, f"subpackages not in pyproject's [tool.setuptools] packages: {sorted(packages - listed)}"


def test_no_experiment_rebinds_a_module_level_name():
    """An experiment module binds each module-level name once: a settings instance named like a constant
    it shadows (``SETTINGS`` the tuple of test settings, then ``SETTINGS = Settings()``) turned a loop
    over the tuple into a loop over the dataclass, which only a full or quick run found."""
    import ast
    offenders = {}
    for path in sorted((ROOT / "experiments").glob("*.py")):
        names = [target.id for node in ast.parse(path.read_text()).body if isinstance(node, (ast.Assign, ast.AnnAssign))
                 for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                 if isinstance(target, ast.Name)]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            offenders[path.name] = twice
    assert not offenders, f"module-level names bound twice: {offenders}"
