"""Trust, round two (issue 32): nothing written outside --out, no stale or forged cache entry served, no
confident wrong number. Each test names the finding of issue 32 whose planted bug it catches (the bug
that was found on the code before this round)."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclsim import IID, cache, models, runner, theory, train
from tests.test_trust import _fake, _module, assert_one_set

ROOT = Path(__file__).resolve().parent.parent
QUIET = dict(progress=lambda m: None)


# ---- finding 1: writes outside the output folder ----

def test_a_planted_lock_symlink_is_refused_and_its_target_untouched(tmp_path):
    """Finding 1: a symlink planted as out/.iclsim.lock was followed, its target truncated and overwritten
    with 'pid host'. Now the lock is opened with O_NOFOLLOW and a symlink is refused by name."""
    out, target = tmp_path / "out", tmp_path / "precious.txt"
    out.mkdir()
    target.write_text("keep me\n")
    (out / runner.LOCK_NAME).symlink_to(target)
    seen = []
    with pytest.raises(runner.RunError, match="not a lock file of iclsim"):
        runner.run_experiment(_fake(seen=seen), out, seed=0, **QUIET)
    assert target.read_text() == "keep me\n" and seen == []
    assert not (out / "fake.csv").exists()


def test_a_pending_set_listing_outside_names_is_refused(tmp_path):
    """Finding 1: a planted .iclsim-pending-*/READY listing '../x' made the next run move files outside
    --out. Now such a list is refused (RunError naming the entry) and nothing moves."""
    out = tmp_path / "out"
    pending = out / (runner._PENDING + "planted")
    pending.mkdir(parents=True)
    (out / "escaped.txt").write_text("inside")
    (pending / "READY").write_text("../escaped.txt")
    with pytest.raises(runner.RunError, match="not a plain file name"):
        runner.run_experiment(_fake(), out, seed=0, **QUIET)
    assert not (tmp_path / "escaped.txt").exists()
    (pending / "READY").write_text(str(tmp_path / "abs.txt"))
    (pending / "abs.txt").write_text("x")
    with pytest.raises(runner.RunError, match="not a plain file name"):
        runner.run_experiment(_fake(), out, seed=0, **QUIET)
    assert not (tmp_path / "abs.txt").exists()


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", "/abs", ".hidden", "x..y", ""])
def test_experiment_names_that_leave_the_folder_are_refused(tmp_path, name):
    """Finding 1: an experiment named '../../escaped' wrote its files outside --out. Now Experiment refuses
    names with a path separator or '..' (RunError), before any run."""
    with pytest.raises(runner.RunError, match="not a plain name"):
        _fake(name=name)


# ---- finding 10: a failed move mid-commit ----

def test_a_failed_move_leaves_the_previous_set_and_a_clear_error(tmp_path):
    """Finding 10: a move that failed mid-commit (here a folder in the way of fake.png) left the new CSV
    beside the old JSON, a mixed set, with a raw OSError. Now the moves are undone: the previous set
    stays whole and a RunError says the previous results are unchanged."""
    runner.run_experiment(_fake(), tmp_path, seed=0, **QUIET)
    (tmp_path / "fake.json").rename(tmp_path / "keep.json")
    (tmp_path / "fake.png").rename(tmp_path / "keep.png")
    (tmp_path / "fake.png").mkdir()
    (tmp_path / "fake.png" / "blocker").write_text("x")
    with pytest.raises(runner.RunError, match="could not move the results.*previous results there are unchanged"):
        runner.run_experiment(_fake(), tmp_path, seed=1, **QUIET)
    (tmp_path / "fake.png" / "blocker").unlink()
    (tmp_path / "fake.png").rmdir()
    (tmp_path / "keep.json").rename(tmp_path / "fake.json")
    (tmp_path / "keep.png").rename(tmp_path / "fake.png")
    assert assert_one_set(tmp_path)["seed"] == 0
