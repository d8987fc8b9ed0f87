"""Paper B's derivative-free algorithm: for each setting, evaluate every (layer, module, clipping rate)
on validation prompts, keep the best (ties to the smaller rate), and report test risk before -> after
on other prompts, in the format of paper B's tables."""

import jax
import numpy as np

from iclsim import plotting, pruning
from iclsim.runner import Experiment

from ._pruning import pruning_setup


def run(s, seed, progress):
    seeds = [seed + k for k in range(s["seeds"])]
    model, settings = pruning_setup(s, seeds, progress)
    modules = ["attn", "mlp"] if s["mlp"] else ["attn"]
    rows = []
    for setting, (params_list, design, n) in settings.items():
        for k, params in enumerate(params_list):
            res = pruning.search(model, params, design, n, range(s["layers"]), modules, s["rates"],
                                 jax.random.PRNGKey(70_000 + seed), jax.random.PRNGKey(80_000 + seed),
                                 s["num_val"], s["num_test"])
            rows.append({"setting": setting, "seed": seeds[k], "layer": res.best["layer"], "module": res.best["module"],
                         "clipping_rate": res.best["clipping_rate"], "val_before": res.val_before,
                         "val_after": res.val_after, "test_before": res.test_before[0], "test_before_se": res.test_before[1],
                         "test_after": res.test_after[0], "test_after_se": res.test_after[1],
                         "test_change": (res.test_after[0] - res.test_before[0]) / res.test_before[0]})
    return rows


def plot(rows, s):
    fig, axes = plotting.panels(1, width=11, height=0.5 + 0.35 * len(rows))
    ax = axes[0]
    ax.axis("off")
    header = ["setting", "seed", "layer", "module", "xi", "val before -> after", "test before -> after (+- SE)", "change"]
    cells = [[r["setting"], r["seed"], r["layer"], r["module"], f"{r['clipping_rate']:g}",
              f"{r['val_before']:.3f} -> {r['val_after']:.3f}",
              f"{r['test_before']:.3f}+-{r['test_before_se']:.3f} -> {r['test_after']:.3f}+-{r['test_after_se']:.3f}",
              f"{100 * r['test_change']:+.1f}%"] for r in rows]
    table = ax.table(cellText=cells, colLabels=header, loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.3)
    ax.set_title(f"Derivative-free clipping-rate search ({s['layers']}-layer linear transformer, d = {s['dim']})")
    return fig


def summary(rows):
    return {r["setting"] + f"/seed{r['seed']}": f"{r['module']} L{r['layer']} xi={r['clipping_rate']:g}: "
            f"{r['test_before']:.3f} -> {r['test_after']:.3f}" for r in rows}


EXPERIMENT = Experiment(
    name="pruning_search", title="Paper B: derivative-free clipping-rate search",
    settings={"dim": 5, "n": 20, "layers": 4, "mlp": True, "noise_var": 0.1, "test_noise_var": 1.0, "test_n": 10,
              "num_tasks": 8, "seeds": 2, "steps": 3000, "batch": 256, "lr": 3e-3, "num_val": 5_000,
              "num_test": 50_000, "rates": list(pruning.DEFAULT_RATES)},
    quick={"layers": 2, "seeds": 1, "steps": 300, "num_val": 2_000, "num_test": 4_000, "rates": [0.0, 0.5, 0.9]},
    run=run, plot=plot, summary=summary)
