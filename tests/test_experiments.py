"""Experiments through the one runner, in their quick versions, checked against theory (paper A's
fig2, alignment and LoRA here; fig1 and its sources in test_quick_fig1.py, paper B in
test_quick_paper_b.py and test_quick_pruning.py), and the command line's runs."""

import json
import os
import sys

import numpy as np
import pytest

from iclsim import cli, runner
from tests.quick import check_correlated, exact_gaps, run_quick
from tests.tolerance import TRAINED_EXACT_GAP, TRAINED_RISK_GAP, TRAINED_W_REL, report


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
    assert gaps.max() < TRAINED_RISK_GAP and exact.max() < TRAINED_EXACT_GAP and w_rel.max() < TRAINED_W_REL


def test_alignment_quick(tmp_path):
    check_correlated("alignment", run_quick("alignment", tmp_path)[1])


@pytest.mark.slow  # a whole quick study (make test's budget); its library is unit-tested in the default tier
def test_lora_quick(tmp_path):
    """LoRA lands on lora_optimal_risk (exact gap < 1%); the rank-2 shift is removed by attention's
    factor LoRA at r = 1 (rank 2r) and by PGD's LoRA at r = 2, not at r = 1."""
    rows = run_quick("lora", tmp_path)[1]
    exact = exact_gaps(rows)
    report(f"lora quick: worst exact gap {exact.max():.4f}")
    assert exact.max() < TRAINED_EXACT_GAP
    by = {(r["family"], r["rank"]): r for r in rows}
    L_new = rows[0]["retrained"]
    # lossless up to the pretrained model's own small full-rank error (W0 is trained, not W*_old)
    assert by[("attention", 1)]["theory"] == pytest.approx(L_new, rel=1e-3)
    assert by[("PGD", 2)]["theory"] == pytest.approx(L_new, rel=1e-3)
    assert by[("PGD", 1)]["theory"] > L_new * 1.005
    assert by[("attention", 1)]["exact_risk"] < by[("attention", 1)]["no_adaptation"]


def test_cli_list_and_unknown(capsys):
    assert cli.main(["list"]) == 0
    assert "fig2" in capsys.readouterr().out
    assert cli.main(["run", "nope"]) == 2


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "r.csv"
    runner.atomic_write(target, b"old\n")

    def broken_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", broken_replace)  # the module atomic_write uses
    with pytest.raises(KeyboardInterrupt):
        runner.atomic_write(target, b"new\n")
    assert target.read_bytes() == b"old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]


TINY = """
import jax
from iclsim import IID, models, plotting, sweeps, theory
from iclsim.runner import Experiment
from iclsim.train import TrainConfig
import dataclasses

@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int = 100

def run(s, seed, context):
    zoo = {"PGD": (models.PGD(2), TrainConfig(s.steps, 64, 0.02, warmup_steps=10))}
    return sweeps.risk_curves(zoo, {"iid": IID(2, noise_var=0.1)}, [2, 4], [seed, seed + 1],
                               lambda d, n, m: theory.optimal_pgd(d, n).risk, jax.random.PRNGKey(1), 2000,
                               context.progress, cache=context.cache)

def plot(rows, s):
    fig, axes = plotting.panels(1)
    axes[0].plot([r["n"] for r in rows], [r["risk"] for r in rows])
    return fig

EXPERIMENT = Experiment(name="tiny", title="tiny", settings=Settings(), run=run, plot=plot,
                        summary=lambda rows: {"rows": len(rows)})
"""


def test_cli_resumes_from_the_cache_and_force_retrains(tmp_path):
    """A second `iclsim run` with the same cache trains nothing and writes the same results;
    --force retrains every point; other settings are other points."""
    (tmp_path / "exps").mkdir()
    (tmp_path / "exps" / "tiny.py").write_text(TINY)
    out = tmp_path / "out"
    args = ["--experiments", str(tmp_path / "exps"), "run", "tiny", "--out", str(out), "--cache", str(tmp_path / "c")]
    cache_of = lambda: json.loads((out / "tiny.json").read_text())["cache"]  # noqa: E731
    assert cli.main(args) == 0
    assert (cache_of()["points_loaded"], cache_of()["points_trained"]) == (0, 4)
    csv = (out / "tiny.csv").read_text()
    assert cli.main(args) == 0
    assert (cache_of()["points_loaded"], cache_of()["points_trained"]) == (4, 0)
    assert (out / "tiny.csv").read_text() == csv
    assert cli.main(args + ["--force"]) == 0
    assert (cache_of()["points_loaded"], cache_of()["points_trained"]) == (0, 4)
    assert cli.main(args + ["--seed", "1"]) == 0  # seeds 1, 2: seed 1 is stored, seed 2 is new
    assert (cache_of()["points_loaded"], cache_of()["points_trained"]) == (2, 2)
    assert cli.main(args + ["--no-cache"]) == 0
    assert "cache" not in json.loads((out / "tiny.json").read_text())


def test_cli_exposes_one_cpu_device_per_core_unless_told(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    cli.use_all_cpu_cores()
    assert os.environ["XLA_FLAGS"] == ("--xla_cpu_enable_fast_math=false "
                                       f"--xla_force_host_platform_device_count={os.cpu_count()}")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
    cli.use_all_cpu_cores()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3"


PAPER_B = ("trajectory", "pruning_depth", "pruning_depth_step", "pruning_search", "pruning_bound", "pruning_anisotropic")


def test_paper_b_studies_share_one_recipe():
    """Issue 31: the studies that read paper B's trained networks take the recipe from one place
    (experiments/_paper_b.py's Recipe), so the cache shares their networks: every recipe field is equal
    across the studies, in the default and in the quick settings, and the shifted test settings are the
    Study's. Planted bugs caught: a study copying the recipe with another step count or depth (the cache
    would train a second set of networks), a quick override dropped from one study."""
    import dataclasses

    from tests.quick import EXPERIMENTS

    paper_b = sys.modules["iclsim_experiments._paper_b"]
    recipe = [f.name for f in dataclasses.fields(paper_b.Recipe) if f.name != "seeds"]
    for fidelity in ("settings", "quick"):
        values = {name: {k: getattr(getattr(EXPERIMENTS[name], fidelity), k) for k in recipe} for name in PAPER_B}
        assert all(isinstance(getattr(EXPERIMENTS[name], fidelity), paper_b.Recipe) for name in PAPER_B)
        assert len({tuple(v.items()) for v in values.values()}) == 1, values
        shifted = [getattr(EXPERIMENTS[name], fidelity) for name in PAPER_B if name != "trajectory"]
        assert all(isinstance(s, paper_b.Study) for s in shifted)
        assert len({(s.test_noise_var, s.test_n, s.seeds) for s in shifted}) == 1
    assert EXPERIMENTS["pruning_depth"].quick.layers == 2 and EXPERIMENTS["pruning_depth"].settings.steps == 4000
    # trajectory trains its shallower networks L x steps_per_layer steps, its deepest ones with the recipe's
    trajectory = sys.modules["iclsim_experiments.trajectory"]
    s = EXPERIMENTS["trajectory"].settings
    assert [trajectory.depth_steps(s, L) for L in range(1, 5)] == [1000, 2000, 3000, 4000]
