"""Beyond one process: a sweep split over two local jax.distributed processes (CPU, coordinator on
127.0.0.1, JAX's gloo collectives) gives every process the same parameters, losses and test risks as
the same sweep run by one process over the same number of devices.

Each process runs tests/_multiprocess_worker.py (one CPU device each); the one-process reference
runs the same script alone with two devices, so the seed-block layout (``train.seed_blocks``) and the
batch split (``train.batch_shards``) are the same and the numbers must agree to float rounding. Every
subprocess has a deadline and is killed at it: a lost peer can never hang the suite.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import iclsim

# two processes that each start JAX (make test's budget); the 1-vs-4-device layout tests stay in the default tier
pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("_multiprocess_worker.py")
ROOT = Path(iclsim.__file__).resolve().parent.parent  # the tree under test, passed on to the workers
DEADLINE_S = 300  # compilation of three programs per process on a busy 2-core machine; never reached when healthy
RTOL, ATOL = 1e-5, 1e-7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no output)"


@pytest.fixture(scope="module")  # make test's pytest-xdist workers take whole files: started once
def runs(tmp_path_factory):
    """Start the two cluster processes and the one-process reference at once; wait for all (killing
    every one still running at the deadline); return {name: (output prefix, log path, return code)}."""
    folder = tmp_path_factory.mktemp("multiprocess")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    port = _free_port()
    commands = {"process0": [1, port, 2, 0], "process1": [1, port, 2, 1], "reference": [2]}
    procs = {}
    try:
        for name, args in commands.items():
            log = (folder / f"{name}.log").open("w")
            procs[name] = (subprocess.Popen([sys.executable, str(WORKER), str(folder / name), *map(str, args)],
                                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder), log)
        codes, end = {}, time.monotonic() + DEADLINE_S
        for name, (proc, log) in procs.items():
            try:
                codes[name] = proc.wait(timeout=max(end - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                codes[name] = "killed at the deadline"
    finally:
        for proc, log in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return {name: (folder / name, folder / f"{name}.log", codes[name]) for name in commands}


def _load(runs, name, kind):
    prefix, log, code = runs[name]
    path = Path(f"{prefix}.{kind}.npz")
    if not path.exists():
        if kind == "evaluate" and "non-addressable" in log.read_text(errors="replace"):
            raise EvaluationNotGathered(_tail(log))
        raise AssertionError(f"{name} wrote no {kind} results (exit: {code}); its log ends:\n{_tail(log)}")
    return np.load(path)


class EvaluationNotGathered(AssertionError):
    """evaluate_sweep returned a global array that spans other processes' devices without gathering it."""


def _assert_same(got, ref, name):
    assert set(got.files) == set(ref.files)
    for key in ref.files:
        if key in ("process_count", "device_count"):
            continue
        np.testing.assert_allclose(got[key], ref[key], rtol=RTOL, atol=ATOL, err_msg=f"{name}: {key}")


def test_fit_sweep_over_two_processes_equals_one_process(runs):
    ref = _load(runs, "reference", "fit")
    assert int(ref["process_count"]) == 1 and int(ref["device_count"]) == 2
    for name in ("process0", "process1"):
        got = _load(runs, name, "fit")
        # each process saw a two-process cluster of two devices, one of them its own
        assert int(got["process_count"]) == 2 and int(got["device_count"]) == 2, name
        _assert_same(got, ref, name)
    assert not np.allclose(ref["losses"][0, 0, 0], ref["losses"][0, 0, 1])  # the seeds differ: no trivial match
    assert np.all(ref["losses"][..., -10:].mean(-1) < ref["losses"][..., :10].mean(-1))  # and they trained


def test_evaluate_sweep_over_two_processes_equals_one_process(runs):
    ref = _load(runs, "reference", "evaluate")
    for name in ("process0", "process1"):
        _assert_same(_load(runs, name, "evaluate"), ref, name)
    assert np.all(ref["se"] > 0) and np.all(ref["risk"] > 0)
