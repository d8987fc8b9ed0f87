"""Gating is weighting (Li et al. 2025, docs/theory.md §10): gated linear attention (scalar and vector gates),
linear attention and H3 trained on multitask prompts, each beside its optimum (GLA: the best weights its gates
reach, the monotone cone; H3: the optimal WPGD, its free filter weights every position; linear attention:
uniform weights), and GLA's learned data-dependent segment weights against the optimal ones."""

import dataclasses

import jax
import numpy as np

from iclsim import evaluate, gating, models, plotting, quality, train
from iclsim.gla import GLA
from iclsim.multitask import Multitask
from iclsim.registry import Experiment
from iclsim.sweeps import TEST_STREAM, stream_keys
from iclsim.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class Settings:
    task_dim: int = 4
    per_task: int = 4
    ordered: tuple[float, ...] = (0.2, 0.5, 1.0)  # relevance of each segment's task to the query's task
    unordered: tuple[float, ...] = (0.9, 0.2, 0.6)
    noise_var: float = 0.1
    seeds: int = 8
    steps: int = 1000
    batch: int = 128
    lr_gla: float = 0.03
    lr_h3: float = 0.03
    lr_attention: float = 0.01
    num_test: int = 10_000


def designs_of(s):
    d, m, s2 = s.task_dim, s.per_task, s.noise_var
    return {"ordered relevance": Multitask(d, s.ordered, m, noise_var=s2),
            "unordered relevance": Multitask(d, s.unordered, m, noise_var=s2)}


def theory_of(design, name):
    if name.startswith("GLA"):
        return gating.gla_optimum(design)
    if name.startswith("H3"):
        return gating.optimal_wpgd(design)
    return gating.linear_attention_optimum(design)


def learned_weights(model, params, design, key, count=2000):
    """GLA's effective segment weights averaged over test prompts (vector gates: over the data channels),
    normalised to mean |omega| = 1 over the data positions, as the theory's."""
    p = design.sample(key, count, design.fixed_n, model.dtype)
    omega = np.asarray(model.effective_wpgd(params, p).omega, np.float64)
    if omega.ndim == 3:
        omega = omega[..., :design.task_dim].mean(axis=-1)
    seg = design.positions()
    w = np.array([omega[:, seg == k].mean() for k in range(design.tasks)])
    return w / np.mean(np.abs(w[seg[seg >= 0]]))


def run(s, seed, context):
    progress = context.progress
    test_key = jax.random.fold_in(jax.random.PRNGKey(seed), TEST_STREAM)
    designs = designs_of(s)
    labels, design_list = list(designs), list(designs.values())
    n, dim = design_list[0].fixed_n, design_list[0].dim
    seeds = [seed + k for k in range(s.seeds)]
    gla_cfg = TrainConfig(s.steps, s.batch, s.lr_gla)
    zoo = {"GLA (scalar gate)": (GLA(dim, "scalar"), gla_cfg), "GLA (vector gate)": (GLA(dim, "vector"), gla_cfg),
           "H3 (free filter)": (models.H3(dim, n), TrainConfig(s.steps, s.batch, s.lr_h3)),
           "linear attention": (models.LinearAttention(dim), TrainConfig(s.steps, s.batch, s.lr_attention))}
    rows = []
    for name, (model, config) in zoo.items():
        progress(f"  training {name}: {len(labels)} designs x {len(seeds)} seeds, {config.steps} steps")
        fitted = train.fit_sweep(model, design_list, [n], seeds, config, cache=context.cache)
        # each seed its own test prompts (the interval over seeds holds the test set's variation); within a seed
        # every model sees the same prompts, so the GLA-vs-attention differences are paired
        risk, se = evaluate.evaluate_sweep(model, fitted.params, design_list, [n], stream_keys(seeds), s.num_test)
        for i, (label, design) in enumerate(zip(labels, design_list)):
            opt = theory_of(design, name)
            gap = gating.gating_gap(design)
            for k, sd in enumerate(seeds):
                r, e = float(risk[i, 0, k]), float(se[i, 0, k])
                row = {"design": label, "model": name, "n": n, "seed": sd, "risk": r, "se": e,
                       "theory": float(opt.risk), "gap": (r - float(opt.risk)) / float(opt.risk),
                       "passed": bool(quality.gate(r, float(opt.risk), se=e)), "L_WPGD": gap.wpgd, "L_GLA": gap.gla,
                       "L_LA": gap.linear_attention}
                if isinstance(model, GLA):
                    p = jax.tree_util.tree_map(lambda a: a[i, 0, k], fitted.params)
                    w = learned_weights(model, p, design, jax.random.fold_in(test_key, 1 + i))
                    row.update({f"w_{j + 1}": float(w[j]) for j in range(design.tasks)})
                    row.update({f"w_star_{j + 1}": float(opt.weights[j]) for j in range(design.tasks)})
                    row["weight_gap"] = float(np.max(np.abs(w - opt.weights)) / np.max(np.abs(opt.weights)))
                rows.append(row)
    return rows


def plot(rows, s):
    fig, (ax1, ax2), (gax, gax2) = plotting.panels(2, width=5.5, gap=True)
    plotting.curves(ax1, rows, x="design", group=("model",), theory_label="optimum each model can reach")
    plotting.gap(gax, rows, x="design", group=("model",))
    ax1.set_ylabel("test risk L")
    ax1.set_title(f"multitask prompts (d = {s['task_dim']}, {s['per_task']} per task)")
    plotting.legend(ax1)
    colours = plotting.colour_map(list(dict.fromkeys(r["design"] for r in rows)))
    for lab, colour in colours.items():
        sub = [r for r in rows if r["design"] == lab and r["model"] == "GLA (scalar gate)"]
        K = sum(1 for key in sub[0] if key.startswith("w_star_"))
        pos = np.arange(1, K + 1)
        learned = np.array([[r[f"w_{j}"] for j in pos] for r in sub])
        star = np.array([sub[0][f"w_star_{j}"] for j in pos])
        ax2.errorbar(pos, learned.mean(axis=0), yerr=learned.std(axis=0), marker="o", ms=3, capsize=2, color=colour,
                     label=lab)
        ax2.plot(pos, star, ":", color=colour, lw=2)
        gax2.plot(pos, learned.mean(axis=0) - star, "-o", ms=3, color=colour)
    ax2.plot([], [], "k:", lw=2, label="GLA optimum (dotted)")
    plotting.integer_ticks(ax2)
    ax2.set_ylabel("segment weight (mean |omega| = 1)")
    ax2.set_title("scalar GLA's learned weights (± sd over seeds)")
    ax2.legend(fontsize=7)
    gax2.axhline(0.0, color="k", ls=":", lw=1)
    gax2.set_ylabel("w - w*", fontsize=8)
    gax2.set_xlabel("segment k (query after segment K)")
    return fig


def summary(rows):
    out = {"passed": sum(r["passed"] for r in rows), "failed": sum(not r["passed"] for r in rows)}
    ok = [r for r in rows if r["passed"]]
    for design in dict.fromkeys(r["design"] for r in rows):
        t = next(r for r in rows if r["design"] == design)
        key = design.split()[0]
        out[f"{key}_theory_gap_LA_minus_GLA"] = round(t["L_LA"] - t["L_GLA"], 4)
        out[f"{key}_theory_gap_GLA_minus_WPGD"] = round(t["L_GLA"] - t["L_WPGD"], 4)
        for model in dict.fromkeys(r["model"] for r in rows):
            gaps = [r["gap"] for r in ok if r["design"] == design and r["model"] == model]
            if len(gaps) >= 2:
                iv = quality.seed_interval(gaps)
                out[f"{key}|{model}|gap"] = [round(iv.mean, 4), round(iv.low, 4), round(iv.high, 4)]
        la = {r["seed"]: r["risk"] for r in rows if r["design"] == design and r["model"] == "linear attention"}
        diff = [la[r["seed"]] - r["risk"] for r in rows if r["design"] == design and r["model"] == "GLA (scalar gate)"]
        if len(diff) >= 2:
            iv = quality.seed_interval(diff)
            out[f"{key}_trained_gap_LA_minus_GLA"] = [round(iv.mean, 4), round(iv.low, 4), round(iv.high, 4)]
            out[f"{key}_theory_gap_in_interval"] = bool(iv.low <= t["L_LA"] - t["L_GLA"] <= iv.high)
    wg = [r["weight_gap"] for r in ok if "weight_gap" in r]
    out["worst_weight_gap"] = round(max(wg), 4) if wg else None
    return out


EXPERIMENT = Experiment(
    name="gla", title="Gating is weighting: GLA vs linear attention vs H3 on multitask prompts",
    settings=Settings(), quick=dataclasses.replace(Settings(), seeds=2, steps=100, num_test=2000),
    run=run, plot=plot, summary=summary)
