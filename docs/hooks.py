"""The site's generated pages (a mkdocs hook, named in mkdocs.yml): the API reference, the results
gallery, the executed tutorials and the changelog, made at build time from the repository so that
they cannot drift from it.

- API reference: one page per public module of iclsim (every module or package found under
  ``iclsim/`` whose dotted name has no part starting with ``_``), listing exactly the names of the
  module's ``__all__``. A module without ``__all__``, or a public function or class without its own
  docstring, fails the build (``DocsError``), so a module another branch adds appears without edits.
- Results gallery: one page per experiment that ``runner.discover`` finds in ``experiments/``: the
  claim (its module docstring), the committed figure and summary (``figures/NAME.png`` and
  ``NAME.json``) and its settings.
- Tutorials: each ``docs/tutorials/*.py`` (jupytext percent format) becomes a page and a notebook.
  They are executed (nbclient, one kernel per tutorial) unless ``ICLSIM_DOCS_EXECUTE=0``, the fast
  build the test tier uses; the outputs and figures are shown inline.
- Changelog: ``CHANGELOG.md`` of the repository root.

``python docs/hooks.py TUTORIAL.py`` executes one tutorial and prints its run time.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "docs" / "tutorials"
FIGURES = ROOT / "figures"
EXECUTE_ENV = "ICLSIM_DOCS_EXECUTE"
# public names that had no docstring when the site was set up (2026-12-06), in files another branch was
# changing; each is rendered without one. Remove an entry once its docstring lands: a name not listed here
# fails the build.
UNDOCUMENTED_DEBTS: set[str] = set()  # every public name has a docstring (tests/test_structure.py too)


class DocsError(RuntimeError):
    """A page cannot be generated: a module without ``__all__``, a public name without a docstring, a
    tutorial that fails to run."""


# --------------------------------------------------------------------------------------------- API


def public_modules() -> list[str]:
    """Dotted names of iclsim's public modules and packages, sorted; ``iclsim.experiments`` (the
    gallery documents it) and any name with a part starting with ``_`` left out."""
    import iclsim
    names = ["iclsim"]
    for info in pkgutil.walk_packages(iclsim.__path__, "iclsim."):
        parts = info.name.split(".")
        if any(p.startswith("_") for p in parts) or parts[1] == "experiments":
            continue
        names.append(info.name)
    return sorted(names)


def _own_docstring(obj, name: str) -> str | None:
    """The docstring written for obj, or None: a class's own ``__doc__`` (not inherited) that is not the
    signature dataclasses and NamedTuple write when there is none."""
    if isinstance(obj, type):
        doc = vars(obj).get("__doc__")
        if doc and doc.startswith(f"{obj.__name__}("):
            return None  # dataclass / NamedTuple placeholder
        return doc
    return getattr(obj, "__doc__", None)


def module_members(module_name: str) -> tuple[list[str], list[str]]:
    """(names, submodules) of a module's ``__all__``: the documented objects and the modules it
    re-exports (linked, each has its own page). DocsError without ``__all__`` or where a function or
    class in it has no docstring of its own."""
    import inspect
    module = importlib.import_module(module_name)
    if not hasattr(module, "__all__"):
        raise DocsError(f"{module_name} has no __all__: the API reference lists a module's __all__")
    names, submodules, undocumented = [], [], []
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.ismodule(obj):
            submodules.append(obj.__name__)
            continue
        names.append(name)
        if ((inspect.isclass(obj) or inspect.isfunction(obj)) and not (_own_docstring(obj, name) or "").strip()
                and f"{module_name}.{name}" not in UNDOCUMENTED_DEBTS):
            undocumented.append(name)
    if undocumented:
        raise DocsError(f"{module_name}: public names without a docstring: {', '.join(undocumented)}")
    return names, submodules


def api_page(module_name: str) -> str:
    """The Markdown of one module's reference page: the module docstring, then each name of ``__all__``
    rendered by mkdocstrings from its docstring and signature."""
    names, submodules = module_members(module_name)
    lines = [f"# `{module_name}`", "", f"::: {module_name}", "    options:", "      show_root_heading: false",
             "      show_root_toc_entry: false", "      members:"]
    lines += [f"        - {n}" for n in names] or ["        []"]
    if submodules:
        lines += ["", "Modules re-exported here: " + ", ".join(f"[`{m}`]({m}.md)" if m.startswith("iclsim") else f"`{m}`"
                                                           for m in submodules) + "."]
    return "\n".join(lines) + "\n"


def api_index(modules: list[str]) -> str:
    lines = ["# API reference", "",
             "Every public name of iclsim: one page per module, listing the module's `__all__` with each name's "
             "docstring and signature. Generated at build time from the code (`docs/hooks.py`); the build fails on "
             "a module without `__all__` or a public function or class without a docstring.", "",
             "| module | what it is |", "|---|---|"]
    for m in modules:
        doc = (importlib.import_module(m).__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        lines.append(f"| [`{m}`]({m}.md) | {doc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- results


def experiments() -> dict:
    """{name: (Experiment, module)} for every experiment of ``experiments/`` (plugins left out)."""
    from iclsim import runner
    found = runner.discover(plugins=False)
    modules = {m.EXPERIMENT.name: m for k, m in list(sys.modules.items())
               if k.startswith("iclsim_experiments.") and hasattr(m, "EXPERIMENT")}
    return {name: (exp, modules[name]) for name, exp in sorted(found.items())}


def _value(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return "`" + text.replace("|", "/") + "`"


def result_page(name: str, exp, module) -> str:
    """One experiment's gallery page: the claim it tests (its module docstring), the committed figure,
    summary and run record from ``figures/NAME.json``, and its settings (full and quick)."""
    lines = [f"# {name}: {exp.title}", "", "## The claim it tests", "", (module.__doc__ or "").strip(), ""]
    record_path = FIGURES / f"{name}.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        lines += ["## The committed result", ""]
        if (FIGURES / f"{name}.png").exists():
            lines += [f"![{exp.title}]({name}.png)", ""]
        lines += ["| summary | value |", "|---|---|"]
        lines += [f"| {k} | {_value(v)} |" for k, v in record.get("summary", {}).items()]
        commit = record.get("git", {}).get("commit", "?")[:7]
        lines += ["", f"Run `{record.get('run_id', '?')}` at commit `{commit}` "
                  f"({'quick' if record.get('quick') else 'full'} settings, {record.get('wall_time_s', '?')} s, "
                  f"`{record.get('command', '')}`); the data is `figures/{name}.csv`.", ""]
        settings = record.get("settings", {})
    else:
        lines += ["## The committed result", "",
                  f"No committed result in `figures/` yet: `iclsim run {name}` writes it.", ""]
        settings = dataclasses.asdict(exp.settings)
    # the quick column shows the fields the quick settings change (a dataclasses.replace of the default)
    default, quick = dataclasses.asdict(exp.settings), dataclasses.asdict(exp.quick)
    changed = {k: v for k, v in quick.items() if default.get(k) != v}
    lines += ["## Settings", "", "| setting | value | quick |", "|---|---|---|"]
    lines += [f"| {k} | {_value(v)} | {_value(changed[k]) if k in changed else ''} |"
              for k, v in settings.items()]
    lines += ["", f"Run it: `iclsim run {name}` (`--quick` for the quick column, `--set KEY=VALUE` to change one)."]
    anchor = results_anchor(name)
    if anchor:
        lines += ["", f"The numbers are discussed in [the results](../results.md#{anchor})."]
    if exp.after:
        lines += [f"It reads the results of {', '.join(f'[{a}]({a}.md)' for a in exp.after)}."]
    return "\n".join(lines) + "\n"


def results_anchor(name: str) -> str | None:
    """The anchor of the docs/results.md section whose heading names the experiment before its colon."""
    from markdown.extensions.toc import slugify
    for line in (ROOT / "docs" / "results.md").read_text().splitlines():
        if line.startswith("### ") and name in re.findall(r"[A-Za-z0-9_]+", line[4:].split(":")[0]):
            return slugify(line[4:].strip(), "-")
    return None


def results_index(found: dict) -> str:
    lines = ["# Results gallery", "",
             "One page per experiment in `experiments/`, generated from the committed `figures/NAME.json` and "
             "`figures/NAME.png` (`docs/hooks.py`), so it shows what `iclsim run all` wrote last. "
             "The discussion of every number is in [the results](../results.md).", "",
             "| experiment | what it shows |", "|---|---|"]
    lines += [f"| [{name}]({name}.md) | {exp.title} |" for name, (exp, _) in found.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------- tutorials


def tutorials() -> list[Path]:
    return sorted(TUTORIALS.glob("*.py"))


def read_tutorial(path: Path):
    import jupytext
    return jupytext.read(path)


def execute_tutorial(path: Path, timeout: int = 600):
    """The tutorial's notebook executed in a fresh kernel (in a temporary working folder), and the
    seconds it took. DocsError naming the tutorial and the failing cell where it raises."""
    import nbclient
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    nb = read_tutorial(path)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cwd, tempfile.TemporaryDirectory() as kernels:
        # a kernel of this interpreter (the one with iclsim installed), whatever kernels the user has set up
        spec = Path(kernels) / "iclsim-docs"
        spec.mkdir()
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "iclsim docs", "language": "python"}))
        km = KernelManager(kernel_name="iclsim-docs", kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernels]))
        client = nbclient.NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": cwd}})
        try:
            client.execute()
        except nbclient.exceptions.CellExecutionError as err:
            raise DocsError(f"tutorial {path.name} failed: {err}") from err
    return nb, time.perf_counter() - start


def notebook_markdown(nb, stem: str, executed: bool) -> tuple[str, dict[str, bytes]]:
    """(Markdown of the notebook, {file name: PNG bytes}) with code in fenced blocks, text outputs as
    text blocks and figures as images beside the page."""
    parts, images = [], {}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            parts.append(cell.source)
            continue
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        parts.append(f"```python\n{cell.source}\n```")
        for j, out in enumerate(cell.get("outputs", [])):
            if out.output_type == "stream":
                parts.append(f"```text\n{out.text.rstrip()}\n```")
            elif out.output_type in ("execute_result", "display_data"):
                data = out.get("data", {})
                if "image/png" in data:
                    fname = f"{stem}_{i}_{j}.png"
                    images[fname] = base64.b64decode(data["image/png"])
                    parts.append(f"![output of cell {i}]({fname})")
                elif "text/plain" in data:
                    parts.append(f"```text\n{data['text/plain'].rstrip()}\n```")
            elif out.output_type == "error":
                raise DocsError(f"tutorial {stem}: cell {i} raised {out.ename}: {out.evalue}")
    note = ("" if executed else
            f'!!! note "Not executed in this build"\n    Built with `{EXECUTE_ENV}=0`: the code without its '
            "outputs. `make docs` executes every tutorial.\n")
    download = f"Download: [the notebook]({stem}.ipynb) (stored as the jupytext file `docs/tutorials/{stem}.py`).\n"
    body = "\n\n".join(parts)
    title, _, rest = body.partition("\n")
    return f"{title}\n\n{note}\n{download}\n{rest}\n", images


def tutorial_index(paths: list[Path], times: dict) -> str:
    lines = ["# Tutorials", "",
             "Notebooks stored as text (`docs/tutorials/*.py`, jupytext percent format) and executed when the site "
             "is built; each runs in under a minute at its quick settings. Open one with "
             "`jupytext --to notebook docs/tutorials/NAME.py` or download the executed notebook from its page.", ""]
    for p in paths:
        title = read_tutorial(p).cells[0].source.split("\n")[0].lstrip("# ")
        timing = f" (executed in {times[p.stem]:.0f} s in this build)" if p.stem in times else ""
        lines.append(f"1. [{title}]({p.stem}.md){timing}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- the hook


def _executing() -> bool:
    return os.environ.get(EXECUTE_ENV, "1") != "0"


def on_config(config):
    """Fill the generated nav sections: each is a list of its index page then one page per item."""
    sections = {
        "Tutorials": ["tutorials/index.md"] + [f"tutorials/{p.stem}.md" for p in tutorials()],
        "Results": ["results.md", "gallery/index.md"] + [f"gallery/{n}.md" for n in _experiment_names()],
        "API reference": ["api/index.md"] + [f"api/{m}.md" for m in public_modules()],
    }
    for entry in config["nav"]:
        if isinstance(entry, dict):
            (title, value), = entry.items()
            if title in sections:
                entry[title] = sections[title]
    return config


def _experiment_names() -> list[str]:
    return list(experiments())


def on_files(files, config):
    """Add the generated pages and their images to the site's files."""
    from mkdocs.structure.files import File

    def add(uri: str, content):
        files.append(File.generated(config, uri, content=content))

    add("changelog.md", (ROOT / "CHANGELOG.md").read_text())
    modules = public_modules()
    add("api/index.md", api_index(modules))
    for m in modules:
        add(f"api/{m}.md", api_page(m))
    found = experiments()
    add("gallery/index.md", results_index(found))
    for name, (exp, module) in found.items():
        add(f"gallery/{name}.md", result_page(name, exp, module))
        if (FIGURES / f"{name}.png").exists():
            add(f"gallery/{name}.png", (FIGURES / f"{name}.png").read_bytes())
    import jupytext
    times = {}
    for path in tutorials():
        if _executing():
            nb, times[path.stem] = execute_tutorial(path)
            print(f"docs: tutorial {path.name} executed in {times[path.stem]:.1f} s", file=sys.stderr)
        else:
            nb = read_tutorial(path)
        page, images = notebook_markdown(nb, path.stem, _executing())
        add(f"tutorials/{path.stem}.md", page)
        add(f"tutorials/{path.stem}.ipynb", jupytext.writes(nb, fmt="ipynb"))
        for fname, data in images.items():
            add(f"tutorials/{fname}", data)
    add("tutorials/index.md", tutorial_index(tutorials(), times))
    return files


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        _, seconds = execute_tutorial(Path(arg))
        print(f"{arg}: {seconds:.1f} s")
