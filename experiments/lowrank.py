"""Paper A, low-rank attention (docs/theory.md §3, Eckart-Young): the best rank-r one-layer attention keeps the
top-r eigendirections of Sx^{1/2} Sb Sx^{1/2}; its risk is L* + n sum_{i>r} l_i^2 / ((n+1) l_i + c).
Flat spectrum (Sb = I): linear in d - r; spiked spectrum: the first few ranks capture most of it."""

import dataclasses

import jax
import numpy as np

from iclsim import IID, models, plotting, sweeps, theory
from iclsim.runner import Experiment
from iclsim.sweeps import TEST_STREAM
from iclsim.train import TrainConfig


def spiked(d: int, spikes: int, ratio: float) -> np.ndarray:
    """Task covariance with ``spikes`` distinct large eigenvalues ratio, ratio/2, ... times the rest
    (distinct, so every top-r eigenspace r <= spikes is well defined), trace d."""
    lam = np.ones(d)
    lam[:spikes] = ratio / np.arange(1, spikes + 1)
    return np.diag(lam * d / lam.sum())


def subspace_overlap(W, W_ref, r: int) -> float:
    """||P_r(W) P_r(W_ref)||_F^2 / r for the top-r left singular subspaces (1 = same subspace)."""
    U = np.linalg.svd(np.asarray(W))[0][:, :r]
    V = np.linalg.svd(np.asarray(W_ref))[0][:, :r]
    return float(np.sum((U.T @ V) ** 2) / r)


def run(s, seed, context):
    progress = context.progress
    test_key = jax.random.fold_in(jax.random.PRNGKey(seed), TEST_STREAM)  # apart from training's keys
    d, n, seeds = s.dim, s.n, [seed + k for k in range(s.seeds)]
    designs = {"spiked": IID(d, cov_beta=spiked(d, s.spikes, s.spike_ratio)), "flat": IID(d)}
    zoo = {f"rank {r}": (models.LinearAttention(d, rank=r), TrainConfig(s.steps, s.batch, s.lr))
           for r in s.ranks}

    def rank_of(m):
        return min(m.rank, d)

    def extra(model, W, omega, design, n):
        r = rank_of(model)
        row = {"rank": r}
        if design is designs["spiked"] and r <= s.spikes:  # beyond the spikes the subspace is degenerate
            row["overlap"] = subspace_overlap(W, theory.lowrank_optimal_pgd(design, n, r), r)
        return row

    return sweeps.risk_curves(zoo, designs, [n], seeds, lambda des, n, m: theory.lowrank_optimal_risk(des, n, rank_of(m)),
                               test_key, s.num_test, progress,
                               optimum=lambda des, n, m: theory.Optimum(theory.lowrank_optimal_pgd(des, n, rank_of(m)),
                                                                       theory.lowrank_optimal_risk(des, n, rank_of(m))),
                               extra=extra, cache=context.cache)


def plot(rows, s):
    fig, (ax1, ax2), (g1, g2) = plotting.panels(2, gap=True)
    plotting.curves(ax1, rows, x="rank", group=("design",), theory_label="Eckart-Young optimum")
    plotting.gap(g1, rows, x="rank", group=("design",))
    ax1.set_ylabel("test risk L")
    ax1.set_title(f"risk vs rank r (n = {s.n})")
    plotting.legend(ax1)
    kept = [{**r, "overlap_theory": 1.0} for r in rows if "overlap" in r]
    plotting.curves(ax2, kept, x="rank", y="overlap", theory="overlap_theory", group=("design",),
                    theory_label="theory: top-r eigendirections")
    plotting.gap(g2, kept, x="rank", y="overlap", theory="overlap_theory", group=("design",))
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("subspace overlap with theory's W_r")
    ax2.set_title("kept eigendirections (r <= number of spikes)")
    plotting.legend(ax2)
    fig.suptitle(f"Low-rank linear attention vs the Eckart-Young optimum (d = {s.dim})")
    return fig


def summary(rows):
    gap, at = sweeps.worst(rows, "gap")
    flat = sorted({(r["rank"], r["theory"]) for r in rows if r["design"] == "flat"})
    slopes = np.diff([t for _, t in flat]) / np.diff([k for k, _ in flat])
    return {"worst_risk_gap": round(gap, 4), "worst_gap_at": f"{at['design']} {at['model']}",
            "worst_exact_gap": round(sweeps.worst_exact_gap(rows), 4),
            "min_overlap_spiked": round(min(r["overlap"] for r in rows if "overlap" in r), 4),
            "flat_theory_slope_spread": float(np.ptp(slopes)) if len(slopes) else 0.0}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The spiked task covariance (``spikes`` of ``spike_ratio``), the attention ``ranks``, training, test
    prompts per point."""

    dim: int = 8
    n: int = 20
    ranks: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    spikes: int = 2
    spike_ratio: float = 10.0
    seeds: int = 2
    steps: int = 2000
    batch: int = 512
    lr: float = 0.01
    num_test: int = 100_000


SETTINGS = Settings()
QUICK = dataclasses.replace(SETTINGS, dim=4, n=8, ranks=(1, 2, 4), spikes=1, seeds=1, steps=600, lr=0.03,
                            num_test=20_000)

EXPERIMENT = Experiment(
    name="lowrank", title="Paper A: low-rank attention keeps the top-r eigendirections",
    settings=SETTINGS, quick=QUICK,
    run=run, plot=plot, summary=summary)
