"""The installed package, not the checkout: a wheel built from this tree, installed into a fresh folder
and imported from another directory, lists and runs the shipped experiments (issue 21)."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(run, folder): run(args) executes ``python -S -m iclsim ARGS`` with only the wheel and this
    environment's dependencies on the path (-S: no .pth files, so not the editable install)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: setuptools writes build/ beside the sources it builds
    for part in ("iclsim", "experiments"):
        shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, source / part)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp),
                    str(source)], check=True, timeout=300, capture_output=True)
    wheel = next(tmp.glob("iclsim-*.whl"))
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, timeout=300, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])

    def run(*args, timeout=300):
        return subprocess.run([sys.executable, "-S", *args], cwd=tmp, env=env, capture_output=True, text=True,
                              timeout=timeout)

    return run, site, tmp


@pytest.mark.slow  # builds and installs the wheel (the slow tier's wheel tests share the fixture)
def test_wheel_ships_the_experiments_and_the_module_entry_point(installed):
    """Planted bugs caught: experiments left out of the wheel (list prints nothing), a runner that looks
    for them beside the source tree, a missing __main__."""
    run, site, _ = installed
    where = run("-c", "import iclsim, iclsim.runner as r; print(iclsim.__file__); print(r.EXPERIMENTS_DIR)")
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(site)) for line in where.stdout.split()), where.stdout
    listed = run("-m", "iclsim", "list")
    assert listed.returncode == 0, listed.stderr
    for name in ("fig2", "rag", "pruning_depth", "pruning_phase", "trajectory"):
        assert name in listed.stdout


@pytest.mark.slow
def test_wheel_runs_a_quick_experiment(installed):
    """The installed package trains, scores and writes a result set (slow: a quick experiment trains)."""
    run, _, tmp = installed
    done = run("-m", "iclsim", "run", "rag", "--quick", "--no-cache", "--out", str(tmp / "out"), timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p.suffix for p in (tmp / "out").iterdir()} >= {".csv", ".json", ".png"}
