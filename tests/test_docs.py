"""The docs tier: the site builds in strict mode with every public name and every experiment on a page
(needs the docs extra, ``pip install -e '.[docs]'``; without it those tests are skipped with that reason),
the generator refuses undocumented names, the README tour prints what the README says, and each
tutorial executes (slow tier)."""

import contextlib
import importlib.util
import io
import re
import subprocess
import sys
import types
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def load_hooks():
    spec = importlib.util.spec_from_file_location("iclsim_docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = load_hooks()


def inventory_names(path: Path) -> set[str]:
    """The object names of a Sphinx inventory (objects.inv, version 2: four header lines, then zlib)."""
    raw = path.read_bytes()
    body = zlib.decompress(raw.split(b"\n", 4)[4]).decode()
    return {line.split(" ", 1)[0] for line in body.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built in strict mode without executing the tutorials (ICLSIM_DOCS_EXECUTE=0)."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings", reason="the docs extra is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = {"PATH": "/usr/bin:/bin", "ICLSIM_DOCS_EXECUTE": "0", "NO_MKDOCS_2_WARNING": "1", "HOME": str(out)}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "WARNING" not in done.stderr, done.stderr[-3000:]
    return out


def test_site_builds_strict_with_every_public_name(site):
    names = inventory_names(site / "objects.inv")
    missing = []
    for module_name in hooks.public_modules():
        assert (site / "api" / f"{module_name}.html").exists(), module_name
        documented, _ = hooks.module_members(module_name)
        missing += [f"{module_name}.{n}" for n in documented if f"{module_name}.{n}" not in names]
    assert not missing, f"public names without an entry in the API reference: {missing}"
    for page in ("index", "install", "theory", "results", "changelog", "performance", "performance-history",
                 "howto/design", "howto/model", "howto/theorem", "howto/experiment", "howto/hosts"):
        assert (site / f"{page}.html").stat().st_size > 5_000, page
    # theory's notation table ties the symbols to the arguments
    assert re.search(r"<code>Sx</code></td>\s*<td><code>cov_x</code>", (site / "theory.html").read_text())


def test_gallery_lists_every_experiment(site):
    from iclsim import runner
    names = sorted(runner.discover(plugins=False))
    assert len(names) >= 15
    index = (site / "gallery" / "index.html").read_text()
    for name in names:
        page = site / "gallery" / f"{name}.html"
        assert page.exists(), name
        assert f'href="{name}.html"' in index, name
        if (ROOT / "figures" / f"{name}.png").exists():
            assert (site / "gallery" / f"{name}.png").read_bytes() == (ROOT / "figures" / f"{name}.png").read_bytes()
            assert f'src="{name}.png"' in page.read_text(), name


def test_tutorials_are_pages_in_the_build(site):
    stems = [p.stem for p in hooks.tutorials()]
    assert len(stems) == 4
    for stem in stems:
        text = re.sub(r"<[^>]+>", "", (site / "tutorials" / f"{stem}.html").read_text())
        assert "Not executed in this build" in text and "import jax" in text
        assert (site / "tutorials" / f"{stem}.ipynb").stat().st_size > 1_000


def test_generator_refuses_a_module_without_all_or_an_undocumented_name(monkeypatch):
    module = types.ModuleType("iclsim_docs_probe")

    def documented():
        """Has a docstring."""

    def bare():
        pass

    module.documented, module.bare = documented, bare
    monkeypatch.setitem(sys.modules, "iclsim_docs_probe", module)
    with pytest.raises(hooks.DocsError, match="has no __all__"):
        hooks.module_members("iclsim_docs_probe")
    module.__all__ = ["documented"]
    assert hooks.module_members("iclsim_docs_probe") == (["documented"], [])
    module.__all__ = ["documented", "bare"]
    with pytest.raises(hooks.DocsError, match="without a docstring: bare"):
        hooks.module_members("iclsim_docs_probe")


def test_generator_sees_a_placeholder_class_docstring_as_missing():
    from typing import NamedTuple

    class Point(NamedTuple):
        x: float

    class Written(NamedTuple):
        """A written docstring."""
        x: float

    assert hooks._own_docstring(Point, "Point") is None
    assert hooks._own_docstring(Written, "Written") == "A written docstring."


def tour_block() -> tuple[str, str]:
    """The README tour's code up to its printed line, and the numbers the README says it prints."""
    text = README.read_text()
    block = re.search(r"## API tour\n\n```python\n(.*?)```", text, flags=re.S).group(1)
    head = block.split("# a whole sweep")[0]
    claimed = re.search(r"# prints ([-\d. ]+):", head).group(1).split()
    return head, claimed


def test_readme_tour_prints_what_the_readme_says():
    code, claimed = tour_block()
    assert len(claimed) == 4
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md[tour]", "exec"), {"__name__": "tour"})
    printed = [f"{float(v):.4f}" for v in out.getvalue().split()]
    assert printed == claimed, f"the tour prints {printed}, README.md says {claimed}"


@pytest.mark.slow
@pytest.mark.parametrize("path", hooks.tutorials(), ids=lambda p: p.stem)
def test_tutorial_executes(path):
    pytest.importorskip("nbclient", reason="the docs extra is not installed: pip install -e '.[docs]'")
    nb, seconds = hooks.execute_tutorial(path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    for cell in code:  # every figure shown is in the notebook, so the page shows it inline
        if "plt.show()" in cell.source:
            assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source[:80]
    markdown, images = hooks.notebook_markdown(nb, path.stem, executed=True)
    assert len(images) == sum("plt.show()" in c.source for c in code)
    assert "Not executed" not in markdown
    print(f"{path.stem}: {seconds:.1f} s")


def test_howto_experiment_runs_under_the_runner_contract():
    """The how-to's minimal experiment is a valid Experiment whose run, at its quick settings, returns rows
    the plot and summary read (so the page's contract stays the runner's)."""
    import matplotlib
    matplotlib.use("Agg")
    from iclsim.registry import Experiment, RunContext
    text = (ROOT / "docs" / "howto" / "experiment.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    namespace = {"__name__": "howto_experiment"}
    exec(compile(code, "docs/howto/experiment.md", "exec"), namespace)
    exp = namespace["EXPERIMENT"]
    assert isinstance(exp, Experiment) and exp.name == "my_claim"
    settings = exp.quick
    messages = []
    rows = exp.run(settings, 0, RunContext(progress=messages.append, cache=None, out=ROOT / "figures", quick=True))
    assert messages, "run reports progress"
    assert len(rows) == len(settings.ns) * len(settings.noise_levels) * settings.seeds
    assert {"design", "model", "n", "seed", "risk", "theory"} <= set(rows[0])
    assert exp.summary(rows)["worst_risk_gap"] < 0.5
    assert exp.plot(rows, settings).axes
