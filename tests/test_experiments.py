"""Experiments through the one runner, in their quick versions, checked against theory."""

import json

import numpy as np
import pytest

from iclsim import cli, runner
from tests.tolerance import report

EXPERIMENTS = runner.discover()


def run_quick(name, tmp_path):
    meta = runner.run_experiment(EXPERIMENTS[name], tmp_path, quick=True, seed=0, progress=lambda m: None)
    rows = runner.read_rows(tmp_path / f"{name}.csv")
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert saved["seed"] == 0 and saved["quick"] and "jax" in saved["versions"] and saved["wall_time_s"] > 0
    return meta, rows


def test_fig2_quick_lands_on_theory(tmp_path):
    """Quick fig2 (d = 4, n <= 8, 600 steps, 20k test prompts): every trained model within 6% of the
    optimal PGD risk on fresh prompts (Monte Carlo SE about 1%), its effective W within 1% of the
    optimum in exact risk and within 12% relative Frobenius distance of W*."""
    meta, rows = run_quick("fig2", tmp_path)
    gaps = np.array([abs(r["gap"]) for r in rows])
    exact = np.array([abs(r["exact_risk"] - r["theory"]) / r["theory"] for r in rows])
    w_rel = np.array([r["w_rel"] for r in rows])
    report(f"fig2 quick: worst risk gap {gaps.max():.4f}, worst exact gap {exact.max():.4f}, worst W rel {w_rel.max():.4f}")
    assert {r["model"] for r in rows} == {"linear attention", "H3"}
    assert len({r["panel"] for r in rows}) == 3
    assert gaps.max() < 0.06 and exact.max() < 0.01 and w_rel.max() < 0.12


def test_cli_list_and_unknown(capsys):
    assert cli.main(["list"]) == 0
    assert "fig2" in capsys.readouterr().out
    assert cli.main(["run", "nope"]) == 2


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "r.csv"
    runner.atomic_write(target, b"old\n")

    def broken_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.os, "replace", broken_replace)
    with pytest.raises(KeyboardInterrupt):
        runner.atomic_write(target, b"new\n")
    assert target.read_bytes() == b"old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]
