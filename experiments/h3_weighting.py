"""Paper A, H3 vs linear attention (docs/theory.md §5): H3's convolution weights the samples (WPGD), which wins on
temporally heterogeneous prompts (drifting task, per-position noise) and ties on IID prompts."""

import dataclasses

import jax
import numpy as np

from iclsim import Drift, models, plotting, sweeps, theory
from iclsim.runner import Experiment
from iclsim.sweeps import TEST_STREAM
from iclsim.train import TrainConfig


def designs_of(s):
    d, n, s2 = s.dim, s.n, s.noise_var
    flat = np.full(n, s2)
    rho = s.decay ** np.arange(n - 1, -1, -1)
    return {
        "drift": Drift(d, rho, None, flat, s2),
        "AR(1) drift": Drift.ar1(d, n, s.decay, flat, s2),
        "noise ramp": Drift(d, np.ones(n), None, np.linspace(s.ramp, 0.0, n), s2),
        "IID": Drift(d, np.ones(n), None, flat, s2),
    }


def run(s, seed, context):
    progress = context.progress
    test_key = jax.random.fold_in(jax.random.PRNGKey(seed), TEST_STREAM)  # apart from training's keys
    d, n, seeds = s.dim, s.n, [seed + k for k in range(s.seeds)]
    h3 = TrainConfig(s.steps, s.batch, s.lr_h3)
    zoo = {"H3 (free filter)": (models.H3(d, n), h3), "H3 (SSM filter)": (models.H3(d, n, filter="ssm"), h3),
           "linear attention": (models.LinearAttention(d), TrainConfig(s.steps, s.batch, s.lr_attention))}

    def optimum(des, n, m):
        """(W*, omega*, L*): WPGD for H3, uniform weights (PGD) for attention."""
        if isinstance(m, models.H3):
            return theory.optimal_wpgd(des, n)
        W, L = theory.optimal_pgd(des, n)
        return theory.WeightedOptimum(W, np.ones(n), L)

    def extra(m, W, omega, des, n):
        target = np.asarray(optimum(des, n, m).omega)
        out = {"L_H3": float(theory.optimal_wpgd(des, n).risk), "L_ATT": float(theory.optimal_pgd(des, n).risk)}
        if omega is not None:
            out.update({f"omega_{i + 1}": float(omega[i]) for i in range(n)})
            out.update({f"omega_star_{i + 1}": float(target[i]) for i in range(n)})
            out["filter_gap"] = float(np.max(np.abs(np.asarray(omega) - target)) / np.max(np.abs(target)))
        return out

    return sweeps.risk_curves(zoo, designs_of(s), [n], seeds, lambda des, n, m: optimum(des, n, m)[2],
                               test_key, s.num_test, progress, optimum=optimum,
                               extra=extra, cache=context.cache)


def plot(rows, s):
    n = s.n
    labels = list(dict.fromkeys(r["design"] for r in rows))
    fig, (ax1, ax2), (gax, gax2) = plotting.panels(2, width=5.5, gap=True)
    plotting.curves(ax1, rows, x="design", group=("model",), theory_label="optimum (WPGD for H3, PGD for attention)")
    plotting.gap(gax, rows, x="design", group=("model",))
    ax1.set_ylabel("test risk L")
    ax1.set_title(f"risk by design (d = {s.dim}, n = {n})")
    plotting.legend(ax1)
    pos = np.arange(1, n + 1)
    colours = plotting.colour_map(labels)
    for lab in labels:
        sub = [r for r in rows if r["design"] == lab and r["model"] == "H3 (free filter)"]
        if not sub:
            continue
        learned = np.array([[r[f"omega_{i}"] for i in pos] for r in sub])
        ax2.errorbar(pos, learned.mean(axis=0), yerr=learned.std(axis=0) if len(sub) > 1 else None, ls="-",
                     marker="o", ms=3, capsize=2, color=colours[lab], label=lab)
        star = np.array([sub[0][f"omega_star_{i}"] for i in pos])
        ax2.plot(pos, star, ":", color=colours[lab], lw=2)
        gax2.plot(pos, learned.mean(axis=0) - star, "-o", ms=3, color=colours[lab])
    ax2.plot([], [], "k:", lw=2, label="omega* = K^-1 rho (dotted)")
    plotting.integer_ticks(ax2)
    ax2.set_ylabel("sample weight omega_i (mean |omega| = 1)")
    ax2.set_title("learned H3 filter (solid) vs theory (dotted)")
    ax2.legend(fontsize=7, title="error bars: ± sd over seeds" if len({r["seed"] for r in rows}) > 1 else None,
               title_fontsize=7)
    gax2.axhline(0.0, color="k", ls=":", lw=1)
    gax2.set_ylabel("omega - omega*", fontsize=8)
    gax2.set_xlabel("context position i (query at n + 1)")
    gax2.grid(alpha=0.3)
    return fig


def summary(rows):
    def mean_risk(design, model):
        return float(np.mean([r["risk"] for r in rows if r["design"] == design and r["model"] == model]))

    out = {"worst_risk_gap": round(sweeps.worst(rows, "gap")[0], 4),
           "worst_filter_gap": round(sweeps.worst(rows, "filter_gap")[0], 4)}
    for design in ("drift", "IID"):
        t = next(r for r in rows if r["design"] == design)
        margin = mean_risk(design, "linear attention") - mean_risk(design, "H3 (free filter)")
        out[f"{design}_margin_empirical"] = round(margin, 4)
        out[f"{design}_margin_theory"] = round(t["L_ATT"] - t["L_H3"], 4)
    return out


@dataclasses.dataclass(frozen=True)
class Settings:
    """The temporally heterogeneous design (``decay``, ``ramp``), training of H3 and linear attention, test
    prompts per point."""

    dim: int = 5
    n: int = 8
    noise_var: float = 0.2
    decay: float = 0.8
    ramp: float = 3.0
    seeds: int = 3
    steps: int = 2000
    batch: int = 512
    lr_h3: float = 0.03
    lr_attention: float = 0.01
    num_test: int = 200_000


SETTINGS = Settings()
QUICK = dataclasses.replace(SETTINGS, seeds=1, steps=800, lr_attention=0.03, num_test=20_000)

EXPERIMENT = Experiment(
    name="h3_weighting", title="Paper A: H3's sample weighting wins on temporally heterogeneous prompts",
    settings=SETTINGS, quick=QUICK,
    run=run, plot=plot, summary=summary)
