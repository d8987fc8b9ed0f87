"""Paper A's correlated designs (docs/theory.md §4) as an experiment, shared by rag.py and
alignment.py: trained linear attention vs the exact optimum, and the effective sample-size gain.
The settings both use are here; each experiment file passes them explicitly."""

import dataclasses
from typing import Callable

import jax

from iclsim import models, plotting, theory
from iclsim.runner import Experiment
from iclsim.sweeps import TEST_STREAM
from iclsim.sweeps import risk_curves, worst
from iclsim.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class Settings:
    """The correlation strengths ``alphas``, context lengths ``ns``, training and test prompts per point
    (shared by rag.py and alignment.py)."""

    dim: int = 10
    alphas: tuple[float, ...] = (0.0, 0.1, 0.2, 0.4)
    ns: tuple[int, ...] = (1, 2, 5, 10, 20, 40)
    noise_var: float = 0.0
    seeds: int = 2
    steps: int = 2000
    batch: int = 512
    lr: float = 0.01
    num_test: int = 100_000


SETTINGS = Settings()
QUICK = dataclasses.replace(SETTINGS, dim=4, alphas=(0.0, 0.4), ns=(2, 8), seeds=1, steps=600, lr=0.03,
                            num_test=20_000)


def correlated_experiment(name: str, title: str, make_design: Callable, settings: Settings, quick: Settings,
                          approximation: Callable | None = None, approximation_label: str = "") -> Experiment:
    """Paper A's correlated designs (docs/theory.md §4) as an experiment: trained linear attention vs the exact
    optimum (dotted) and an optional approximation (dashed), risk vs n per alpha, and the effective
    sample-size gain n_eff / n, n_eff inverting the isotropic IID formula."""
    def run(s, seed, context):
        progress = context.progress
        test_key = jax.random.fold_in(jax.random.PRNGKey(seed), TEST_STREAM)  # apart from training's keys
        d, seeds = s.dim, [seed + k for k in range(s.seeds)]
        designs = {f"alpha={a:g}": make_design(d, a, s.noise_var) for a in s.alphas}
        zoo = {"linear attention": (models.LinearAttention(d), TrainConfig(s.steps, s.batch, s.lr))}
        rows = risk_curves(zoo, designs, s.ns, seeds, lambda des, n, m: theory.optimal_pgd(des, n).risk,
                           test_key, s.num_test, progress,
                           optimum=lambda des, n, m: theory.optimal_pgd(des, n), cache=context.cache)
        for r in rows:
            design = designs[r["design"]]
            r["n_eff_ratio"] = float(theory.iid_effective_n(d, s.noise_var, r["risk"])) / r["n"]
            r["n_eff_ratio_theory"] = float(theory.iid_effective_n(d, s.noise_var, r["theory"])) / r["n"]
            if approximation is not None:
                r["approximation"] = float(approximation(design, r["n"]))
        return rows

    def plot(rows, s):
        fig, (ax1, ax2), (g1, g2) = plotting.panels(2, gap=True)
        plotting.curves(ax1, rows, group=("design",), theory_label="exact optimum")
        plotting.gap(g1, rows, group=("design",))
        colours = plotting.colour_map(dict.fromkeys(r["design"] for r in rows))
        if approximation is not None:
            for g, (xs, mean, _) in plotting.seed_stats(rows, "n", "approximation", ("design",)).items():
                ax1.plot(xs, mean, color=colours[g[0]], ls=plotting.LINESTYLES["approximation"], lw=1)
            ax1.plot([], [], color="gray", ls=plotting.LINESTYLES["approximation"], label=f"{approximation_label} (dashed)")
        ax1.set_ylabel("test risk L")
        plotting.legend(ax1)
        ax1.set_title("risk vs n, trained linear attention")
        plotting.curves(ax2, rows, y="n_eff_ratio", theory="n_eff_ratio_theory", group=("design",),
                        theory_label="exact optimum")
        plotting.gap(g2, rows, y="n_eff_ratio", theory="n_eff_ratio_theory", group=("design",))
        if approximation is not None:
            for g, (xs, mean, _) in plotting.seed_stats(rows, "n", "approximation", ("design",)).items():
                ax2.plot(xs, theory.iid_effective_n(s.dim, s.noise_var, mean) / xs, color=colours[g[0]],
                         ls=plotting.LINESTYLES["approximation"], lw=1)
        ax2.set_ylabel("effective sample size / n")
        ax2.set_title("effective sample-size gain")
        plotting.legend(ax2)
        fig.suptitle(f"{title} (d = {s.dim}, noise variance {s.noise_var})")
        return fig

    def summary(rows):
        gap, at = worst(rows, "gap")
        w, _ = worst(rows, "w_rel")
        return {"worst_risk_gap": round(gap, 4), "worst_gap_at": f"{at['design']} n={at['n']}",
                "worst_w_rel": round(w, 4)}

    return Experiment(
        name=name, title=title,
        settings=settings, quick=quick,
        run=run, plot=plot, summary=summary)
