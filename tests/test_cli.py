"""The command line speaks in one line (issue 20, findings 8 and 12; issue 21, runner items): expected
failures print one clear line and exit non-zero, an interrupt says what was saved, ``python -m iclsim``
works, ``--set`` overrides are typed and recorded, progress counts points and a final table prints the
headline numbers in fixed significant digits. Fake experiments that train nothing keep it fast."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iclsim import cli, results, runner

ROOT = Path(__file__).resolve().parent.parent

FAKE = '''
import dataclasses
import matplotlib.pyplot as plt
import numpy as np
from iclsim.runner import Experiment

@dataclasses.dataclass(frozen=True)
class Settings:
    scale: float = 1.5
    points: int = 3
    ns: tuple[int, ...] = (2, 4)
    widths: tuple[float, ...] = (0.5, 1.0)
    label: str = "a"
    log: bool = False
    interrupt_after: int = 0
    table: dict = dataclasses.field(default_factory=lambda: {"a": 1})

def run(s, seed, context):
    store = context.cache
    if store is not None:  # a sweep of s.points points: all missing, then each trained and stored
        keys = [store.key("fake", s.scale, seed, k) for k in range(s.points)]
        found = [store.load(k, {"w": np.zeros(2)}) for k in keys]
        for k, f in zip(keys, found):
            if f is None:
                store.save(k, {"w": np.ones(2)}, np.ones(3))
            if s.interrupt_after and store.trained == s.interrupt_after:
                raise KeyboardInterrupt
    return [{"k": k, "value": s.scale * k} for k in range(s.points)]

def plot(rows, s):
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([r["k"] for r in rows], [r["value"] for r in rows])
    return fig

EXPERIMENT = Experiment(name="fake", title="a fake experiment",
                        settings=Settings(),
                        run=run, plot=plot,
                        summary=lambda rows: {"points": len(rows), "eps": 4.440892098500626e-16,
                                              "risk": 2.0 / 3.0})
'''


@pytest.fixture
def exps(tmp_path):
    folder = tmp_path / "exps"
    folder.mkdir()
    (folder / "fake.py").write_text(FAKE)
    return folder


def call(capsys, *args):
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["run"], "the following arguments are required: names"),
    (["run", "fake", "--seed", "x"], "invalid int value"),
    (["run", "fake", "--seed", "-1"], "--seed must be an integer in [0, "),
    (["run", "nope"], "unknown experiment(s): nope; known: "),
    (["frobnicate"], "invalid choice"),
    (["run", "fake", "--set", "scale"], "--set takes KEY=VALUE"),
    (["run", "fake", "--set", "nope=1"], "no setting 'nope' in fake"),
])
def test_usage_errors_are_one_line(capsys, exps, tmp_path, args, expected):
    """Finding 12: bad arguments print one line (not argparse's usage block) and exit 2."""
    code, out, err = call(capsys, "--experiments", str(exps), *args, "--out", str(tmp_path / "o")) \
        if args[0] == "run" else call(capsys, "--experiments", str(exps), *args)
    assert code == 2
    assert expected in one_line(err)


def test_missing_experiments_folder_is_an_error(capsys, tmp_path):
    """Finding 12: `--experiments /nonexistent list` printed nothing and exited 0."""
    code, out, err = call(capsys, "--experiments", str(tmp_path / "nonexistent"), "list")
    assert code != 0 and out == ""
    assert "does not exist" in one_line(err)


@pytest.mark.parametrize("setting, text, message", [
    ("points", "1.5", "points must be an integer"),
    ("scale", "nan", "scale must be a finite number"),
    ("scale", "abc", "scale must be a finite number"),
    ("ns", "2,4.5", "ns must be a list of integers"),
    ("log", "maybe", "log must be true or false"),
    ("table", "x", "cannot be set from the command line"),
])
def test_set_values_are_type_checked_before_any_run(capsys, exps, tmp_path, setting, text, message):
    """Issue 21: --set values are checked against the type of the default, one line, before anything runs."""
    out = tmp_path / "o"
    code, _, err = call(capsys, "--experiments", str(exps), "run", "fake", "--out", str(out), "--no-cache",
                        "--set", f"{setting}={text}")
    assert code == 1 and message in one_line(err)
    assert not out.exists() or not list(out.glob("fake.*"))


def test_set_overrides_are_applied_and_recorded(capsys, exps, tmp_path):
    out = tmp_path / "o"
    code, stdout, err = call(capsys, "--experiments", str(exps), "run", "fake", "--out", str(out), "--no-cache",
                             "--set", "points=5", "--set", "widths=0.1, 0.2,0.3", "--set", "log=yes",
                             "--set", "ns=[3, 6]", "--set", "label=b")
    assert code == 0, err
    meta = json.loads((out / "fake.json").read_text())
    assert meta["overrides"] == {"points": 5, "widths": [0.1, 0.2, 0.3], "log": True, "ns": [3, 6], "label": "b"}
    assert meta["settings"]["points"] == 5 and len(runner.read_rows(out / "fake.csv")) == 5


def test_progress_and_final_table(capsys, exps, tmp_path):
    """Issue 21: "trained k of N points, elapsed, time left" per experiment; a final table of headline
    numbers in 4 significant digits (no raw 4.440892098500626e-16)."""
    code, stdout, err = call(capsys, "--experiments", str(exps), "run", "fake", "--out", str(tmp_path / "o"),
                             "--cache", str(tmp_path / "c"))
    assert code == 0, err
    assert "[fake] trained 3 of 3 points, elapsed" in err and "s left" in err
    assert "4.440892098500626e-16" not in stdout + err
    row = [line for line in stdout.splitlines() if line.startswith("fake")]
    assert len(row) == 1 and "eps = 4.441e-16" in row[0] and "risk = 0.6667" in row[0] and "points = 3" in row[0]


def test_json_records_the_commit(capsys, exps, tmp_path):
    """Issue 21: the JSON records the git commit (and dirtiness) of the checkout iclsim runs from."""
    code, _, err = call(capsys, "--experiments", str(exps), "run", "fake", "--out", str(tmp_path / "o"), "--no-cache")
    assert code == 0, err
    meta = json.loads((tmp_path / "o" / "fake.json").read_text())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if not head:
        pytest.fail("the test suite runs from a git checkout")
    assert meta["git"]["commit"] == head and isinstance(meta["git"]["dirty"], bool)


def test_interrupt_says_what_was_saved_and_resumes(capsys, exps, tmp_path):
    """Finding 12: SIGINT printed a 1460-line traceback. Now one line: how many points were saved and that a
    rerun resumes; the rerun loads them, and the interrupted run wrote no results."""
    out, store = tmp_path / "o", tmp_path / "c"
    args = ["--experiments", str(exps), "run", "fake", "--out", str(out), "--cache", str(store)]
    code, _, err = call(capsys, *args, "--set", "interrupt_after=2")
    assert code == 130
    line = one_line(err.split("points, elapsed")[-1].split("\n", 1)[-1])
    assert "interrupted in experiment fake" in line and "2 trained points" in line and "rerun" in line
    assert not list(out.glob("fake.*"))
    code, _, err = call(capsys, *args)
    assert code == 0, err
    assert json.loads((out / "fake.json").read_text())["cache"]["points_loaded"] == 2


def test_unusable_output_or_cache_fails_in_one_line_before_running(capsys, exps, tmp_path):
    """Finding 8: --out naming an existing file failed after the training with a raw traceback."""
    (tmp_path / "file").write_text("x")
    for args in (["--out", str(tmp_path / "file")], ["--out", str(tmp_path / "o"), "--cache", str(tmp_path / "file")]):
        code, _, err = call(capsys, "--experiments", str(exps), "run", "fake", *args)
        assert code == 1 and "existing file" in one_line(err)


def test_quick_default_output_is_results_quick(capsys, exps, tmp_path, monkeypatch):
    """Finding 10: --quick wrote into figures/ by default; now into results/quick."""
    monkeypatch.chdir(tmp_path)
    code, _, err = call(capsys, "--experiments", str(exps), "run", "fake", "--quick", "--no-cache")
    assert code == 0, err
    assert (tmp_path / "results" / "quick" / "fake.json").exists() and not (tmp_path / "figures").exists()


def test_python_dash_m_iclsim(exps):
    """Issue 21: `python -m iclsim` is the command line."""
    done = subprocess.run([sys.executable, "-m", "iclsim", "--experiments", str(exps), "list"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fake             a fake experiment" in done.stdout.splitlines()


READER = '''
import dataclasses
import matplotlib.pyplot as plt
import os
from iclsim import runner
from iclsim.runner import Experiment

@dataclasses.dataclass(frozen=True)
class Settings:
    pass

def run(s, seed, context):
    source = runner.read_results(context.out, "fake", quick=context.quick, seed=seed)
    return [{"k": r["k"], "double": 2 * r["value"], "pid": os.getpid()} for r in source]

def plot(rows, s):
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([r["k"] for r in rows], [r["double"] for r in rows])
    return fig

EXPERIMENT = Experiment(name="reader", title="reads fake's results", settings=Settings(), run=run, plot=plot,
                        summary=lambda rows: {"rows": len(rows)}, after=("fake",))
'''


def test_jobs_run_experiments_in_workers_after_what_they_read(exps, tmp_path, capsys):
    """--jobs 3: each experiment is computed in a worker process and written by the command's process, an
    experiment starts only after those it reads are written, and the files equal a sequential run's.
    Planted bugs caught: a reader started before its source is written (it would find no fake.csv), a
    worker writing into the folder itself (two writers), results that depend on the job count."""
    (exps / "reader.py").write_text(READER)
    (exps / "other.py").write_text(FAKE.replace('name="fake"', 'name="other"'))
    parallel, sequential = tmp_path / "parallel", tmp_path / "sequential"
    parallel.mkdir()  # the reader's last set says it is the longest: offered first, it must still wait for fake
    (parallel / "reader.json").write_text(json.dumps({"wall_time_s": 1e6, "quick": True}))
    plain = (exps / "fake.py").read_text()
    (exps / "fake.py").write_text(plain.replace("def run(s, seed, context):\n",  # a reader started early finds nothing
                                                "def run(s, seed, context):\n    __import__('time').sleep(1)\n", 1))
    for out, jobs in ((parallel, "3"), (sequential, "1")):  # 3: the reader would start at once if it could
        code, _, err = call(capsys, "--experiments", str(exps), "run", "fake", "other", "reader", "--quick",
                            "--no-cache", "--jobs", jobs, "--out", str(out))
        assert code == 0, err
        (exps / "fake.py").write_text(plain)
    for name in ("fake", "other"):
        assert (parallel / f"{name}.csv").read_bytes() == (sequential / f"{name}.csv").read_bytes()
    rows = runner.read_rows(parallel / "reader.csv")
    assert [r["double"] for r in rows] == [2 * r["value"] for r in runner.read_rows(parallel / "fake.csv")]
    assert rows[0]["pid"] != os.getpid()  # computed in a worker
    assert runner.read_rows(sequential / "reader.csv")[0]["pid"] == os.getpid()
    meta = json.loads((parallel / "reader.json").read_text())
    assert meta["experiment"] == "reader" and meta["quick"] and meta["files"]["csv"]["name"] == "reader.csv"
    assert sorted(p.name for p in parallel.iterdir() if p.name.startswith(".")) == []  # no pending sets, no lock


def test_jobs_without_out_write_to_the_default_folder(exps, tmp_path, capsys, monkeypatch):
    """--jobs without --out: the workers are handed the resolved default folder (results/quick under
    --quick). Planted bug caught: the workers given None (the run stopped with nothing written)."""
    (exps / "other.py").write_text(FAKE.replace('name="fake"', 'name="other"'))  # two: the parallel path
    monkeypatch.chdir(tmp_path)
    code, _, err = call(capsys, "--experiments", str(exps), "run", "fake", "other", "--quick", "--no-cache", "--jobs", "2")
    assert code == 0, err
    written = tmp_path / "results" / "quick"
    for name in ("fake", "other"):
        assert [r["value"] for r in runner.read_rows(written / f"{name}.csv")] != []
        assert json.loads((written / f"{name}.json").read_text())["experiment"] == name


@pytest.mark.slow  # two worker processes
def test_jobs_failure_in_a_worker_is_one_line(exps, tmp_path, capsys):
    (exps / "broken.py").write_text(FAKE.replace('name="fake"', 'name="broken"').replace(
        "def run(s, seed, context):", "def run(s, seed, context):\n    raise FloatingPointError('diverged here')"))
    code, _, err = call(capsys, "--experiments", str(exps), "run", "fake", "broken", "--quick", "--no-cache",
                        "--jobs", "2", "--out", str(tmp_path / "o"))
    # one line for the failure, no traceback; the fake experiment's own "done" line may come first (a race)
    errors = [line for line in err.strip().splitlines() if not line.startswith("[fake] done")]
    assert code == 1 and len(errors) == 1 and "diverged here" in errors[0] and "Traceback" not in err, err
    code, _, err = call(capsys, "--experiments", str(exps), "run", "fake", "--jobs", "0", "--out", str(tmp_path / "o"))
    assert code == 2 and "--jobs must be >= 1" in err


def test_experiments_folder_after_the_command_adds_to_the_shipped_ones(exps, tmp_path, capsys):
    """Issue 35: `--experiments DIR` is accepted after the command too, and adds DIR's experiments to the
    shipped ones instead of hiding them; a shipped name wins a clash, and a warning names both files.
    Planted bugs caught: the option refused after `run`/`list`, the shipped experiments hidden, the user's
    file silently replacing a shipped experiment."""
    code, out, err = call(capsys, "list", "--experiments", str(exps))
    assert code == 0, err
    names = [line.split()[0] for line in out.splitlines()]
    assert "fake" in names and {"fig2", "trajectory", "pruning_depth"} <= set(names)
    (exps / "fig2.py").write_text(FAKE.replace('name="fake"', 'name="fig2"'))
    code, out, err = call(capsys, "list", "--experiments", str(exps))
    assert code == 0 and "clashes" in err and str(exps / "fig2.py") in err and "kept" in err, err
    assert any(line.startswith("fig2") and "Paper A Fig. 2" in line for line in out.splitlines())
    code, _, err = call(capsys, "run", "fake", "--experiments", str(exps), "--out", str(tmp_path / "o"), "--no-cache")
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "fake.json").read_text())["experiment"] == "fake"


def test_set_is_typed_by_the_settings_field(exps, tmp_path, capsys):
    """Issue 31: `--set` is parsed by the field's declared type: a choice names its allowed values, a tuple of
    choices checks each item, and the JSON records the settings as a plain dict. Planted bugs caught: a value
    outside a Literal accepted, a tuple recorded as a string."""
    from typing import Literal

    from iclsim import configs

    with pytest.raises(runner.RunError, match=r"mode must be one of 'fast', 'slow'"):
        configs.parse_setting("mode", "medium", Literal["fast", "slow"])
    with pytest.raises(runner.RunError, match=r"designs must be a list of values among 'a', 'b'"):
        configs.parse_setting("designs", "a,c", tuple[Literal["a", "b"], ...])
    assert configs.parse_setting("designs", "b, a", tuple[Literal["a", "b"], ...]) == ("b", "a")
    assert configs.parse_setting("x", "3", float) == 3.0 and isinstance(configs.parse_setting("x", "3", float), float)
    code, _, err = call(capsys, "--experiments", str(exps), "run", "fake", "--out", str(tmp_path / "o"), "--no-cache",
                        "--set", "ns=3,6")
    assert code == 0, err
    meta = json.loads((tmp_path / "o" / "fake.json").read_text())
    assert meta["settings"]["ns"] == [3, 6] and meta["overrides"] == {"ns": [3, 6]} and meta["settings"]["points"] == 3


def test_headline_line_names_nested_tables_instead_of_printing_them():
    """A paper-B summary holds tables (per design, setting, base): printed whole, one experiment's line ran to
    tens of kilobytes. The line keeps numbers, strings and short intervals, and names the tables. Planted bugs
    caught: a table printed inline, an interval dropped, the names of the tables lost."""
    summary = {"networks_passed": 12, "verdict": "supported", "gap (95%)": [-0.3575, 0.1100123],
               "networks": {"anisotropic": {"A": {"passed": 3}}}, "per_seed": list(range(10)),
               "pairs": [[1, 2], [3, 4]]}
    line = results.format_summary(summary)
    assert line == ("networks_passed = 12, verdict = supported, gap (95%) = [-0.3575, 0.11], "
                    "(in the JSON's summary: networks, per_seed, pairs)")
    assert results.format_summary({"risk": 0.123456}) == "risk = 0.1235"


def test_jobs_offer_the_longest_experiments_first(tmp_path):
    """--jobs schedules by the wall times of the folder's last sets of the same fidelity: longest first,
    unknown (no set, another fidelity, content that is not a wall time, a link, a FIFO) before them, ties in the
    given order; no content can crash or block the schedule."""
    from iclsim.cli import _longest_first

    for name, wall, quick in (("short", 5, False), ("long", 500, False), ("mid", 50, False), ("other_fidelity", 1, True),
                              ("tie", 50, False), ("loaded", 3, False)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"wall_time_s": wall, "quick": quick}))
    (tmp_path / "garbled.json").write_text("{not json")
    (tmp_path / "nested.json").write_text("[" * 100_000)
    (tmp_path / "huge.json").write_text('{"wall_time_s": 1' + "0" * 400 + ', "quick": false}')
    (tmp_path / "text.json").write_text('{"wall_time_s": "500", "quick": false}')
    (tmp_path / "linked.json").symlink_to(tmp_path / "long.json")
    os.mkfifo(tmp_path / "fifo.json")
    odd = ["garbled", "nested", "huge", "text", "linked", "fifo"]
    order = ["short", "mid", "fresh", "long", "other_fidelity", "tie", "loaded", *odd]
    assert _longest_first(order, tmp_path, False) == ["fresh", "other_fidelity", *odd, "long", "mid", "tie", "short",
                                                      "loaded"]
    assert _longest_first(order, tmp_path, True)[-1] == "other_fidelity"
