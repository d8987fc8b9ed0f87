"""Paper A, LoRA (docs/theory.md §3): pretrain on cov_beta_old, freeze, adapt rank-r LoRA on cov_beta_new.
The shift here keeps the trace of cov_beta and moves two eigenvalues, so W*_new - W*_old has rank 2:
LoRA on PGD's W is lossless from r = 2, LoRA on attention's Wq, Wk (rank <= 2r) from r = 1."""

import dataclasses

import jax
import numpy as np

from iclsim import IID, models, plotting, sweeps, theory, train
from iclsim.runner import Experiment
from iclsim.sweeps import TEST_STREAM
from iclsim.train import TrainConfig


def shifted(d: int, a: float) -> np.ndarray:
    lam = np.ones(d)
    lam[0], lam[1] = 1 + a, 1 - a
    return np.diag(lam)


def run(s, seed, context):
    progress = context.progress
    test_key = jax.random.fold_in(jax.random.PRNGKey(seed), TEST_STREAM)  # apart from training's keys
    d, n, seeds = s.dim, s.n, [seed + k for k in range(s.seeds)]
    old, new = IID(d, noise_var=s.noise_var), IID(d, cov_beta=shifted(d, s.shift), noise_var=s.noise_var)
    pre = TrainConfig(s.pretrain_steps, s.batch, s.lr)
    zoo, W0 = {}, {}
    for name, base, targets, mult in [("attention", models.LinearAttention(d), ("Wq", "Wk"), 2),
                                      ("PGD", models.PGD(d), ("W",), 1)]:
        progress(f"  pretraining {name} on cov_beta_old")
        params = jax.tree_util.tree_map(lambda a: a[0, 0, 0], train.fit_sweep(base, old, [n], [seed], pre,
                                                                                    cache=context.cache).params)
        frozen = models.Frozen(params)
        for r in s.ranks:
            model = models.LoRA(base, frozen, r, targets)
            zoo[f"{name} LoRA r={r}"] = (model, TrainConfig(s.steps, s.batch, s.lr_lora))
            W0[model] = (np.asarray(base.effective_pgd(params, n).W, np.float64), min(mult * r, d), name, r)

    def theory_risk(des, n, m):
        w0, rank, _, _ = W0[m]
        return theory.lora_optimal_risk(des, n, w0, rank)

    rows = sweeps.risk_curves(zoo, {"new": new}, [n], seeds, theory_risk, test_key,
                               s.num_test, progress,
                               optimum=lambda des, n, m: theory.Optimum(theory.lora_optimal_pgd(des, n, *W0[m][:2]),
                                                                       theory_risk(des, n, m)),
                               extra=lambda m, W, o, des, n: {"family": W0[m][2], "rank": W0[m][3],
                                                              "W_rank": W0[m][1]},
                               cache=context.cache)
    L_new = float(theory.optimal_pgd(new, n).risk)
    for r in rows:
        model = next(m for m in W0 if W0[m][2] == r["family"])
        r["no_adaptation"] = float(theory.pgd_risk(new, n, W0[model][0]))
        r["retrained"] = L_new
    return rows


def plot(rows, s):
    fig, axes, gaps = plotting.panels(1, width=6, gap=True)
    ax = axes[0]
    plotting.curves(ax, rows, x="rank", group=("family",), theory_label="LoRA optimum")
    plotting.gap(gaps[0], rows, x="rank", group=("family",))
    colours = plotting.colour_map(dict.fromkeys(r["family"] for r in rows))
    for family, colour in colours.items():
        fam = [r for r in rows if r["family"] == family]
        ax.axhline(fam[0]["no_adaptation"], color=colour, ls=plotting.LINESTYLES["reference"], lw=1,
                   label=f"{family} before adaptation")
    ax.axhline(rows[0]["retrained"], color="k", ls=plotting.LINESTYLES["approximation"], lw=1,
               label="full retraining L*_new")
    ax.set_ylabel("test risk L on cov_beta_new")
    gaps[0].set_xlabel("LoRA rank r")
    plotting.legend(ax)
    ax.set_title(f"LoRA adaptation to a rank-2 task-covariance shift (d = {s.dim}, n = {s.n})")
    return fig


def summary(rows):
    gap, at = sweeps.worst(rows, "gap")
    return {"worst_risk_gap": round(gap, 4), "worst_gap_at": at["model"],
            "worst_exact_gap": round(sweeps.worst_exact_gap(rows), 4)}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The pretraining design and its ``shift``, the LoRA ``ranks``, both trainings, test prompts per point."""

    dim: int = 6
    n: int = 20
    ranks: tuple[int, ...] = (1, 2, 3)
    shift: float = 0.8
    noise_var: float = 0.1
    seeds: int = 2
    pretrain_steps: int = 2000
    steps: int = 1500
    batch: int = 512
    lr: float = 0.01
    lr_lora: float = 0.01
    num_test: int = 100_000


SETTINGS = Settings()
QUICK = dataclasses.replace(SETTINGS, dim=4, n=8, ranks=(1, 2), seeds=1, pretrain_steps=800, steps=600, lr=0.03,
                            lr_lora=0.03, num_test=20_000)

EXPERIMENT = Experiment(
    name="lora", title="Paper A: LoRA adapts to a shifted task covariance",
    settings=SETTINGS, quick=QUICK,
    run=run, plot=plot, summary=summary)
