"""Paper B: SVD pruning of every layer x module x clipping rate of a trained multi-layer linear
transformer, in four settings. Is pruning deep layers more stable than pruning shallow ones?

Stability measure (per layer and module): the largest clipping rate xi on the grid such that every
rate up to xi raises the test risk by at most ``harm`` (relative, mean over seeds)."""

import jax
import numpy as np

from iclsim import plotting, pruning
from iclsim.runner import Experiment

from ._pruning import pruning_setup


def run(s, seed, progress):
    seeds = [seed + k for k in range(s["seeds"])]
    model, settings = pruning_setup(s, seeds, progress)
    modules = ["attn", "mlp"] if s["mlp"] else ["attn"]
    candidates = [(l, m, r) for l in range(s["layers"]) for m in modules for r in s["rates"]]
    rows = []
    for setting, (params_list, design, n) in settings.items():
        progress(f"  {setting}: {len(candidates)} pruned models x {len(seeds)} seeds")
        for k, params in enumerate(params_list):
            risk, se = pruning.evaluate_candidates(model, params, design, n, candidates,
                                                   jax.random.PRNGKey(60_000 + seed), s["num_test"])
            base = {(l, m): risk[i] for i, (l, m, r) in enumerate(candidates) if r == 0.0}
            for i, (l, m, r) in enumerate(candidates):
                rows.append({"setting": setting, "seed": seeds[k], "layer": l, "module": m, "clipping_rate": r,
                             "risk": float(risk[i]), "se": float(se[i]), "baseline": float(base[(l, m)]),
                             "delta": float(risk[i] - base[(l, m)]),
                             "relative_change": float((risk[i] - base[(l, m)]) / base[(l, m)])})
    return rows


def stability(rows, harm: float) -> dict:
    """{(setting, module, layer): largest rate with no harm beyond ``harm`` at any rate up to it}."""
    out = {}
    keys = {(r["setting"], r["module"], r["layer"]) for r in rows}
    for key in sorted(keys):
        by_rate = {}
        for r in rows:
            if (r["setting"], r["module"], r["layer"]) == key:
                by_rate.setdefault(r["clipping_rate"], []).append(r["relative_change"])
        stable = 0.0
        for rate in sorted(by_rate):
            if np.mean(by_rate[rate]) > harm:
                break
            stable = rate
        out[key] = stable
    return out


def plot(rows, s):
    modules = sorted({r["module"] for r in rows})
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    rates = sorted({r["clipping_rate"] for r in rows})
    fig, axes = plotting.plt.subplots(len(modules) + 1, len(settings), figsize=(4.2 * len(settings), 3.2 * (len(modules) + 1)),
                                      squeeze=False)
    for j, setting in enumerate(settings):
        for i, module in enumerate(modules):
            grid = np.array([[np.mean([r["relative_change"] for r in rows if r["setting"] == setting and r["module"] == module
                                       and r["layer"] == l and r["clipping_rate"] == xi]) for xi in rates]
                             for l in range(s["layers"])])
            ax = axes[i, j]
            im = ax.imshow(np.clip(grid, -0.5, 0.5), cmap="RdBu_r", vmin=-0.5, vmax=0.5, aspect="auto")
            ax.set_xticks(range(len(rates)), [f"{x:g}" for x in rates], rotation=60, fontsize=7)
            ax.set_yticks(range(s["layers"]))
            ax.set_ylabel("layer (0 = shallow)")
            ax.set_title(f"{setting}: {module}", fontsize=9)
        ax = axes[-1, j]
        for layer, colour in [(0, "C0"), (s["layers"] - 1, "C3")]:
            sub = [r for r in rows if r["setting"] == setting and r["module"] == "attn" and r["layer"] == layer]
            stats = plotting.seed_stats(sub, "clipping_rate", "risk", ("layer",))[(layer,)]
            xs = np.arange(len(stats[0]))
            ax.plot(xs, stats[1], "-o", color=colour, ms=3, label=f"attn layer {layer}")
            ax.fill_between(xs, stats[1] - stats[2], stats[1] + stats[2], color=colour, alpha=0.25)
        ax.axhline(np.mean([r["baseline"] for r in rows if r["setting"] == setting]), color="k", ls=":", label="unpruned")
        ax.set_xticks(range(len(rates)), [f"{x:g}" for x in rates], rotation=60, fontsize=7)
        ax.set_xlabel("clipping rate")
        ax.set_ylabel("test risk")
        ax.legend(fontsize=7)
    fig.colorbar(im, ax=axes[:-1].ravel().tolist(), label="relative risk change (clipped to +-0.5)")
    fig.suptitle(f"SVD pruning of a {s['layers']}-layer linear transformer (d = {s['dim']}, n = {s['n']}); "
                 "mean over seeds, bands +- sd")
    return fig


def summary(rows):
    stab = stability(rows, EXPERIMENT.settings["harm"])
    out = {}
    for (setting, module, layer), rate in stab.items():
        out[f"{setting}/{module}/layer{layer}"] = rate
    best = min(rows, key=lambda r: r["relative_change"])
    out["largest_improvement"] = f"{best['relative_change']:.4f} at {best['setting']} {best['module']} layer {best['layer']} xi={best['clipping_rate']}"
    return out


EXPERIMENT = Experiment(
    name="pruning_depth", title="Paper B: pruning deep vs shallow layers",
    settings={"dim": 5, "n": 20, "layers": 4, "mlp": True, "noise_var": 0.1, "test_noise_var": 1.0, "test_n": 10,
              "num_tasks": 8, "seeds": 2, "steps": 3000, "batch": 256, "lr": 3e-3, "num_test": 20_000,
              "rates": list(pruning.DEFAULT_RATES), "harm": 0.02},
    quick={"layers": 2, "seeds": 1, "steps": 300, "num_test": 4_000, "rates": [0.0, 0.5, 0.9]},
    run=run, plot=plot, summary=summary)
