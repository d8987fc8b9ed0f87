"""Paper B on one layer, where everything is exact: SVD-truncate the trained attention (Wq, Wk, Wv) to each
kept rank; the pruned model's risk is the closed-form risk of the whole pruned attention
(``theory.attention_risk`` of Q = Wq Wk^T and v = Wv[:, d+1], dotted) beside its Monte Carlo test risk
(solid), for test labels as noisy as in training, noisier but below the threshold of docs/theory.md §6.1
(n + d + 1 + 2 s_train^2), and above it, where truncation helps."""

import jax
import numpy as np

from iclsim import IID, bridge, models, plotting, pruning, quality, sweeps, theory, train
from iclsim.runner import Experiment
from iclsim.train import TrainConfig

TEST_KEY = sweeps.TEST_STREAM - 6  # fold_in(PRNGKey(seed), TEST_KEY): the test prompts


def run(s, seed, progress):
    d, n = s["dim"], s["n"]
    model = models.LinearAttention(d)
    train_design = IID(d, noise_var=s["noise_var"])
    seeds = [seed + k for k in range(s["seeds"])]
    progress(f"  training {len(seeds)} one-layer attentions")
    fitted = train.fit_sweep(model, train_design, [n], seeds, TrainConfig(s["steps"], s["batch"], s["lr"]))
    params = jax.tree_util.tree_map(lambda a: a[0, 0], fitted.params)
    L_star = float(theory.optimal_pgd(train_design, n).risk)
    threshold = float(theory.noise_threshold(train_design, n)[0])
    candidates = [pruning.Candidate(0, "attn", None)] + [pruning.Candidate(0, "attn", k) for k in s["ranks"]]
    key = jax.random.fold_in(jax.random.PRNGKey(seed), TEST_KEY)
    rows, passed = [], None
    for label, noise in [("matched", s["noise_var"]), ("noisier, below threshold", s["test_noise_var"]),
                         ("noisier, above threshold", s["high_noise_var"])]:
        design = IID(d, noise_var=noise)
        risk, se = pruning.evaluate_candidates(model, params, design, n, candidates, key, s["num_test"])
        if passed is None:
            passed = quality.gate(risk[:, 0], L_star, se=se[:, 0])
        for i, sd in enumerate(seeds):
            p = jax.tree_util.tree_map(lambda a: a[i], params)
            for j, c in enumerate(candidates):
                pruned = p if c.rank is None else pruning.prune(p, 0, "attn", rank=c.rank)
                rows.append({"design": f"{label} (s^2 = {noise:g})", "model": "attention", "seed": sd,
                             "rank": d + 1 if c.rank is None else c.rank, "risk": float(risk[i, j]),
                             "se": float(se[i, j]), "theory": bridge.exact_risk(model, pruned, design, n, n),
                             "unpruned_theory": None, "threshold": threshold, "passed": bool(passed[i])})
    for r in rows:
        r["unpruned_theory"] = next(b["theory"] for b in rows if b["design"] == r["design"] and b["seed"] == r["seed"]
                                    and b["rank"] == d + 1)
    return rows


def plot(rows, s):
    fig, axes = plotting.panels(1, width=6.4, height=4.2)
    ax = axes[0]
    plotting.curves(ax, [r for r in rows if r["passed"]], x="rank", group=("design",),
                    theory_label="exact risk of the pruned attention")
    ax.set_xticks(sorted({r["rank"] for r in rows}))
    ax.set_yscale("log")
    ax.set_xlabel(f"kept rank of Wq, Wk, Wv (of {s['dim'] + 1})")
    ax.set_ylabel("test risk L (bars: spread over seeds)")
    ax.legend(fontsize=7)
    failed = len({r["seed"] for r in rows if not r["passed"]})
    ax.set_title(f"Pruning one-layer attention (d = {s['dim']}, n = {s['n']}; threshold "
                 f"{rows[0]['threshold']:.1f}); {failed} failed the gate", fontsize=9)
    return fig


def summary(rows):
    ok = [r for r in rows if r["passed"]]
    z = max(abs(r["risk"] - r["theory"]) / r["se"] for r in ok)
    out = {"networks_passed": len({r["seed"] for r in ok}),
           "networks_failed": len({r["seed"] for r in rows if not r["passed"]}), "max_z_mc_vs_exact": round(z, 2)}
    for design in dict.fromkeys(r["design"] for r in rows):
        sub = [r for r in ok if r["design"] == design]
        best = min(sub, key=lambda r: r["theory"] - r["unpruned_theory"])
        out[f"best_rank: {design}"] = {"rank": best["rank"], "exact_change": round(
            (best["theory"] - best["unpruned_theory"]) / best["unpruned_theory"], 4)}
    return out


EXPERIMENT = Experiment(
    name="pruning_one_layer", title="Paper B on one layer: exact vs empirical pruning curve",
    settings={"dim": 10, "n": 20, "noise_var": 0.1, "test_noise_var": 4.0, "high_noise_var": 60.0, "seeds": 8,
              "steps": 2000, "batch": 512, "lr": 0.01, "num_test": 100_000, "ranks": [9, 7, 5, 3, 1]},
    quick={"dim": 4, "n": 8, "seeds": 3, "steps": 600, "lr": 0.03, "num_test": 20_000, "ranks": [3, 1],
           "high_noise_var": 40.0},
    run=run, plot=plot, summary=summary)
