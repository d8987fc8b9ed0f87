"""Paper A, H3 vs linear attention (docs/theory.md §5): H3's convolution weights the samples (WPGD), which wins on
temporally heterogeneous prompts (drifting task, per-position noise) and ties on IID prompts."""

import jax
import numpy as np

from iclsim import Drift, models, plotting, sweeps, theory
from iclsim.runner import Experiment
from iclsim.sweeps import TEST_STREAM
from iclsim.train import TrainConfig


def designs_of(s):
    d, n, s2 = s["dim"], s["n"], s["noise_var"]
    flat = np.full(n, s2)
    rho = s["decay"] ** np.arange(n - 1, -1, -1)
    return {
        "drift": Drift(d, rho, None, flat, s2),
        "AR(1) drift": Drift.ar1(d, n, s["decay"], flat, s2),
        "noise ramp": Drift(d, np.ones(n), None, np.linspace(s["ramp"], 0.0, n), s2),
        "IID": Drift(d, np.ones(n), None, flat, s2),
    }


def run(s, seed, progress):
    test_key = jax.random.fold_in(jax.random.PRNGKey(seed), TEST_STREAM)  # apart from training's keys
    d, n, seeds = s["dim"], s["n"], [seed + k for k in range(s["seeds"])]
    h3 = TrainConfig(s["steps"], s["batch"], s["lr_h3"])
    zoo = {"H3 (free filter)": (models.H3(d, n), h3), "H3 (SSM filter)": (models.H3(d, n, filter="ssm"), h3),
           "linear attention": (models.LinearAttention(d), TrainConfig(s["steps"], s["batch"], s["lr_attention"]))}

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
                               test_key, s["num_test"], progress, optimum=optimum,
                               extra=extra)


def plot(rows, s):
    n = s["n"]
    labels = list(dict.fromkeys(r["design"] for r in rows))
    models_ = list(dict.fromkeys(r["model"] for r in rows))
    fig, (ax1, ax2) = plotting.panels(2, width=5.5)
    x = np.arange(len(labels))
    for k, m in enumerate(models_):
        stats = [[r["risk"] for r in rows if r["design"] == lab and r["model"] == m] for lab in labels]
        ax1.errorbar(x + 0.1 * (k - 1), [np.mean(v) for v in stats], yerr=[np.std(v) for v in stats], fmt="o-",
                     capsize=2, label=m)
    for key, style, label in [("L_H3", "k:", "WPGD optimum (H3 theory)"), ("L_ATT", "r:", "PGD optimum (attention theory)")]:
        ax1.plot(x, [next(r[key] for r in rows if r["design"] == lab) for lab in labels], style, lw=2, marker="_",
                 ms=20, label=label)
    ax1.set_xticks(x, labels)
    ax1.set_ylabel("test risk L")
    ax1.set_title(f"risk by design (d = {s['dim']}, n = {n})")
    ax1.legend(fontsize=7)
    pos = np.arange(1, n + 1)
    for lab, colour in zip(labels, plotting.plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        sub = [r for r in rows if r["design"] == lab and r["model"] == "H3 (free filter)"]
        learned = np.mean([[r[f"omega_{i}"] for i in pos] for r in sub], axis=0)
        ax2.plot(pos, learned, "-o", color=colour, ms=3, label=f"{lab}: H3 filter")
        ax2.plot(pos, [sub[0][f"omega_star_{i}"] for i in pos], ":", color=colour, lw=2)
    ax2.set_xlabel("context position i (query at n + 1)")
    ax2.set_ylabel("sample weight omega_i (mean |omega| = 1)")
    ax2.set_title("learned H3 filter (solid) vs omega* = K^-1 rho (dotted)")
    ax2.legend(fontsize=7)
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


EXPERIMENT = Experiment(
    name="h3_weighting", title="Paper A: H3's sample weighting wins on temporally heterogeneous prompts",
    settings={"dim": 5, "n": 8, "noise_var": 0.2, "decay": 0.8, "ramp": 3.0, "seeds": 3, "steps": 3000,
              "batch": 512, "lr_h3": 0.03, "lr_attention": 0.01, "num_test": 200_000},
    quick={"seeds": 1, "steps": 800, "lr_attention": 0.03, "num_test": 20_000},
    run=run, plot=plot, summary=summary)
