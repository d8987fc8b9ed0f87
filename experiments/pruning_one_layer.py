"""Paper B on one layer, where everything is exact: SVD-prune the trained attention (Wq, Wk, Wv) at each
clipping rate; the pruned model's risk is the closed-form risk of the whole pruned attention
(``theory.attention_risk`` of Q = Wq Wk^T and v = Wv[:, d+1], dotted), beside its Monte Carlo test risk
(solid). Truncating Wv moves weight into v[:d], which PGD's L(W) of the effective W (THEORY 6) leaves out.
Test labels noisier than training labels is where shrinking W can help."""

import jax

from iclsim import IID, models, plotting, pruning, studies, theory, train
from iclsim.runner import Experiment
from iclsim.train import TrainConfig


def run(s, seed, progress):
    d, n = s["dim"], s["n"]
    model = models.LinearAttention(d)
    train_design = IID(d, noise_var=s["noise_var"])
    seeds = [seed + k for k in range(s["seeds"])]
    progress(f"  training one-layer attention, seeds {seeds}")
    fitted = train.fit_sweep(model, train_design, [n], seeds, TrainConfig(s["steps"], s["batch"], s["lr"]))
    rows = []
    for k in range(s["seeds"]):
        params = jax.tree_util.tree_map(lambda a: a[0, 0, k], fitted.params)
        for label, design in [("matched", train_design), ("noisier test labels", IID(d, noise_var=s["test_noise_var"]))]:
            candidates = [(0, "attn", r) for r in s["rates"]]
            risk, se = pruning.evaluate_candidates(model, params, design, n, candidates,
                                                   jax.random.PRNGKey(95_000 + seed), s["num_test"])
            for i, (_, _, rate) in enumerate(candidates):
                pruned = pruning.prune(params, 0, "attn", rate)
                W, _ = studies.effective(model, pruned, n, n)
                rows.append({"design": label, "model": "attention", "seed": seed + k, "clipping_rate": rate,
                             "risk": float(risk[i]), "se": float(se[i]),
                             "theory": studies.exact_risk(model, pruned, design, n, n),
                             "pgd_risk_of_W": float(theory.pgd_risk(design, n, W))})
    return rows


def plot(rows, s):
    fig, axes = plotting.panels(1, width=6)
    ax = axes[0]
    rates = sorted({r["clipping_rate"] for r in rows})
    pos = {x: i for i, x in enumerate(rates)}
    plotting.curves(ax, [{**r, "position": pos[r["clipping_rate"]]} for r in rows], x="position", group=("design",),
                    theory_label="exact risk of the pruned attention")
    ax.set_xticks(range(len(rates)), [f"{x:g}" for x in rates], rotation=45)
    ax.set_xlabel("clipping rate xi")
    ax.set_ylabel("test risk L")
    ax.legend(fontsize=7)
    ax.set_title(f"Pruning one-layer attention (d = {s['dim']}, n = {s['n']})")
    return fig


def summary(rows):
    z = max(abs(r["risk"] - r["theory"]) / r["se"] for r in rows)
    best = min(rows, key=lambda r: r["theory"] - next(b["theory"] for b in rows if b["design"] == r["design"]
                                                     and b["seed"] == r["seed"] and b["clipping_rate"] == 0.0))
    return {"max_z_mc_vs_exact": round(z, 2), "best_pruning": f"{best['design']} xi={best['clipping_rate']}"}


EXPERIMENT = Experiment(
    name="pruning_one_layer", title="Paper B on one layer: exact vs empirical pruning curve",
    settings={"dim": 10, "n": 20, "noise_var": 0.1, "test_noise_var": 4.0, "seeds": 2, "steps": 2000, "batch": 512,
              "lr": 0.01, "num_test": 100_000, "rates": list(pruning.DEFAULT_RATES)},
    quick={"dim": 4, "n": 8, "seeds": 1, "steps": 600, "lr": 0.03, "num_test": 20_000},
    run=run, plot=plot, summary=summary)
