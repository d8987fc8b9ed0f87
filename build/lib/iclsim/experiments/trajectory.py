"""Paper B's implicit GD trajectory, measured on networks trained to predict: for L = 1..4, L-layer linear
transformers (GD form, library defaults, one per seed) against the best L-step GD (step sizes tuned,
``theory.optimal_multistep_gd``; for isotropic data the same predictor class as the L preconditioners),
with 95% intervals over seeds. Every network is gated at 10% above its reference."""

import jax
import numpy as np

from iclsim import IID, evaluate, models, plotting, quality, sweeps, theory, train
from iclsim.runner import Experiment
from iclsim.train import TrainConfig

TEST_KEY = sweeps.TEST_STREAM - 2  # fold_in(PRNGKey(seed), TEST_KEY): test prompts shared by all depths


def run(s, seed, progress):
    d, n = s["dim"], s["n"]
    design = IID(d, noise_var=s["noise_var"])
    seeds = [seed + k for k in range(s["seeds"])]
    key = jax.random.fold_in(jax.random.PRNGKey(seed), TEST_KEY)
    rows = []
    for L in range(1, s["layers"] + 1):
        model = models.LinearTransformer(d, L)
        progress(f"  depth {L}: training {len(seeds)} networks, {s['steps']} steps")
        fitted = train.fit_sweep(model, design, [n], seeds, TrainConfig(steps=s["steps"]))
        risk, se = evaluate.evaluate_sweep(model, fitted.params, design, [n], key, s["num_test"])
        ref = theory.optimal_multistep_gd(design, n, L, jax.random.fold_in(jax.random.PRNGKey(seed), sweeps.TEST_STREAM - 10 - L),
                                          s["num_reference"])
        passed = quality.gate(risk[0, 0], ref.risk, se=np.hypot(se[0, 0], ref.se))
        for k, sd in enumerate(seeds):
            rows.append({"layers": L, "seed": sd, "risk": float(risk[0, 0, k]), "se": float(se[0, 0, k]),
                         "reference": ref.risk, "reference_se": ref.se, "ratio": float(risk[0, 0, k]) / ref.risk,
                         "step_sizes": " ".join(f"{g:.4f}" for g in ref.step_sizes), "passed": bool(passed[k])})
    L1 = float(theory.optimal_pgd(design, n).risk)
    for r in rows:
        r["one_step_optimum"] = L1
    return rows


def plot(rows, s):
    fig, (ax1, ax2) = plotting.plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    depths = sorted({r["layers"] for r in rows})
    for ax, y, label in [(ax1, "risk", "test risk"), (ax2, "ratio", "trained / best L-step GD")]:
        for L in depths:
            sub = [r for r in rows if r["layers"] == L]
            ok = [r[y] for r in sub if r["passed"]]
            bad = [r[y] for r in sub if not r["passed"]]
            jitter = np.linspace(-0.12, 0.12, max(len(sub), 1))
            ax.plot(L + jitter[:len(ok)], ok, "o", color="C0", ms=4, alpha=0.6,
                    label="one network (passed gate)" if L == depths[0] else None)
            if bad:
                ax.plot(L + jitter[:len(bad)], bad, "x", color="C3", ms=6, label="failed gate" if L == depths[0] else None)
            if len(ok) >= 2:
                iv = quality.seed_interval(ok)
                ax.errorbar(L + 0.25, iv.mean, yerr=[[iv.mean - iv.low], [iv.high - iv.mean]], fmt="s", color="C0",
                            capsize=3, label="mean, 95% interval over seeds" if L == depths[0] else None)
        ax.set_xticks(depths)
        ax.set_xlabel("layers L / GD steps")
        ax.set_ylabel(label)
    refs = [next(r for r in rows if r["layers"] == L) for L in depths]
    ax1.errorbar(depths, [r["reference"] for r in refs], yerr=[2 * r["reference_se"] for r in refs], fmt=":",
                 color="k", label="best L-step GD (+-2 MC SE)")
    ax1.axhline(rows[0]["one_step_optimum"], color="gray", ls="--", lw=1, label="optimal one-step PGD (exact)")
    ax1.set_yscale("log")
    ax2.axhline(1.0, color="k", ls=":")
    ax2.axhline(1.0 + quality.GATE_TOLERANCE, color="C3", ls="--", lw=1, label="gate")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
    fig.suptitle(f"L-layer linear transformers vs L-step GD (d = {s['dim']}, n = {s['n']}, noise {s['noise_var']})")
    return fig


def summary(rows):
    out = {"networks_passed": sum(r["passed"] for r in rows), "networks_failed": sum(not r["passed"] for r in rows)}
    for L in sorted({r["layers"] for r in rows}):
        sub = [r["ratio"] for r in rows if r["layers"] == L and r["passed"]]
        ref = next(r for r in rows if r["layers"] == L)
        iv = quality.seed_interval(sub) if len(sub) >= 2 else None
        out[f"L{L}"] = {"reference": round(ref["reference"], 4),
                        "trained_over_reference": [round(iv.low, 4), round(iv.high, 4)] if iv else None,
                        "worst": round(max(r["ratio"] for r in rows if r["layers"] == L), 4)}
    return out


EXPERIMENT = Experiment(
    name="trajectory", title="Paper B: L-layer transformers vs L-step GD",
    settings={"dim": 5, "n": 20, "layers": 4, "noise_var": 0.1, "seeds": 8, "steps": 4000, "num_test": 100_000,
              "num_reference": 200_000},
    quick={"layers": 2, "seeds": 3, "steps": 500, "num_test": 10_000, "num_reference": 20_000},
    run=run, plot=plot, summary=summary)
