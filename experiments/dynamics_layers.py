"""Which GD step each layer of paper B's 4-layer GD-form linear transformer acquires, and when: the
course of training behind the depth result's dependence on the seed (issue 34, item 3).

The networks are paper B's recipe (``_paper_b.Recipe``: d = 5, n = 20, L = 4, noise 0.1, Adam, library
defaults), trained with the engine's records (``records.layer_step_sizes``: layer l's step
tr(Gamma_l) / d every ``record_every`` steps). On isotropic data the L layers implement L-step GD with
scalar steps, and its predictor is the polynomial prod_l (I - gamma_l S) in the steps: any permutation of the
steps of the best L-step GD (``theory.optimal_multistep_gd``) is equally good, so which layer takes which
step is left to the initialisation and the data stream. Per seed: the final steps against the optimal set
(sorted), each layer's rank among its network's steps, and its acquisition time (the first recorded step
at which its step is within ``tolerance`` of its final value; ``settled_at``: the first after which it
stays there). The GD form starts every layer at step ``init_step`` = 0.5 (``models.LinearTransformer``),
near the second-shortest best step for this recipe (0.52), so a layer that keeps a short step has it from the
start."""

import dataclasses

import numpy as np

from iclsim import IID, models, plotting, quality, records, theory, train
from iclsim.registry import Experiment
from iclsim.train import TrainConfig

from ._paper_b import Recipe


def acquisition(steps, path, final, tolerance):
    """(reached, settled): the first recorded step at which |path - final| <= tolerance * max(|final|, 0.05),
    and the first after which it stays so (Adam's noise keeps a long step wandering by about 10%)."""
    ok = np.abs(path - final) <= tolerance * max(abs(final), 0.05)
    bad = np.nonzero(~ok)[0]
    settled = float(steps[0]) if bad.size == 0 else float(steps[min(bad[-1] + 1, len(steps) - 1)])
    return float(steps[int(np.argmax(ok))]), settled


def run(s, seed, context):
    progress = context.progress
    d, n, L = s.dim, s.n, s.layers
    design = IID(d, noise_var=s.noise_var)
    model = models.LinearTransformer(d, L)
    seeds = [seed + k for k in range(s.seeds)]
    best = np.sort(np.asarray(theory.optimal_multistep_gd(design, n, L).step_sizes, np.float64))
    progress(f"  {len(seeds)} {L}-layer GD-form transformers, {s.steps} steps, recorded every {s.record_every}")
    fit = train.fit_sweep(model, design, [n], seeds, TrainConfig(
        steps=s.steps, record_every=s.record_every, record_prompts=s.record_prompts,
        summarize=records.layer_step_sizes(model)), cache=context.cache)
    steps = np.asarray(fit.record.steps)
    paths = np.asarray(fit.record.summaries[0, 0], np.float64)  # [seeds, R, L]
    loss = np.asarray(fit.record.loss[0, 0], np.float64)
    rows = []
    for k, sd in enumerate(seeds):
        final = paths[k, -1]
        rank = np.argsort(np.argsort(final)) + 1
        gap = float(np.max(np.abs(np.sort(final) - best)) / np.max(np.abs(best)))
        for layer in range(L):
            rows.append({"kind": "layer", "seed": sd, "layer": layer + 1, "final_step": float(final[layer]),
                         "rank": int(rank[layer]), "best_step_of_rank": float(best[rank[layer] - 1]),
                         **dict(zip(("acquired_at", "settled_at"),
                                    acquisition(steps, paths[k, :, layer], final[layer], s.tolerance))),
                         "set_gap": gap})
        for j, st in enumerate(steps):
            rows.append({"kind": "path", "seed": sd, "step": int(st), "loss": float(loss[k, j]),
                         **{f"layer{layer + 1}": float(paths[k, j, layer]) for layer in range(L)}})
    return rows


def plot(rows, s):
    L = s.layers
    fig, (ax1, ax2, ax3) = plotting.plt.subplots(1, 3, figsize=(15, 4.3), constrained_layout=True)
    seeds = sorted({r["seed"] for r in rows})
    for k, sd in enumerate(seeds):
        path = [r for r in rows if r["kind"] == "path" and r["seed"] == sd]
        for layer in range(1, L + 1):
            ax1.plot([r["step"] for r in path], [r[f"layer{layer}"] for r in path], color=f"C{layer - 1}", lw=0.8,
                     alpha=0.6, label=f"layer {layer}" if k == 0 else None)
    layers = [r for r in rows if r["kind"] == "layer"]
    for level in sorted({r["best_step_of_rank"] for r in layers}):
        ax1.axhline(level, color="k", ls=":", lw=0.7)
        ax2.axhline(level, color="k", ls=":", lw=0.7)
    ax1.plot([], [], "k:", label="best L-step GD steps (any order)")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("layer's GD step tr(Gamma_l) / d")
    ax1.set_title("each layer's step over training (one line per seed)", fontsize=9)
    ax1.legend(fontsize=7)
    for layer in range(1, L + 1):
        sub = [r for r in layers if r["layer"] == layer]
        x = layer + np.linspace(-0.2, 0.2, len(sub))
        ax2.plot(x, [r["final_step"] for r in sub], "o", color=f"C{layer - 1}", ms=4)
        ax3.plot(x, [r["acquired_at"] for r in sub], "o", color=f"C{layer - 1}", ms=4)
        longest = [r for r in sub if r["rank"] == L]
        ax3.plot(layer + np.linspace(-0.2, 0.2, len(sub))[[sub.index(r) for r in longest]],
                 [r["acquired_at"] for r in longest], "k*", ms=9, label="holds the longest step" if layer == 1 else None)
    for ax in (ax2, ax3):
        ax.set_xticks(range(1, L + 1))
        ax.set_xlabel("layer")
    ax2.set_ylabel("final step (one point per seed)")
    ax2.set_title("final steps against the best set", fontsize=9)
    ax3.set_ylabel(f"training step the layer first reaches its final step (within {s.tolerance:.0%})")
    ax3.set_title("when each layer acquires its step", fontsize=9)
    ax3.legend(fontsize=7)
    fig.suptitle(f"Paper B's {L}-layer GD-form transformers over training (d = {s.dim}, n = {s.n}, "
                 f"{len(seeds)} seeds)")
    return fig


def summary(rows):
    layers = [r for r in rows if r["kind"] == "layer"]
    L = max(r["layer"] for r in layers)
    seeds = sorted({r["seed"] for r in layers})
    out = {"best_steps_sorted": sorted({round(r["best_step_of_rank"], 4) for r in layers}),
           "max_set_gap": round(max(r["set_gap"] for r in layers), 4)}
    for layer in range(1, L + 1):
        sub = [r for r in layers if r["layer"] == layer]
        ranks = [r["rank"] for r in sub]
        out[f"layer{layer}"] = {"rank_counts": {str(q): ranks.count(q) for q in range(1, L + 1)},
                                "acquired_at_median": float(np.median([r["acquired_at"] for r in sub])),
                                "settled_at_median": float(np.median([r["settled_at"] for r in sub])),
                                "final_step_mean": round(float(np.mean([r["final_step"] for r in sub])), 4)}
    order = []
    for sd in seeds:  # the order in which the layers reach their final steps, per seed
        sub = sorted((r for r in layers if r["seed"] == sd), key=lambda r: (r["acquired_at"], r["layer"]))
        order.append("".join(str(r["layer"]) for r in sub))
    out["acquisition_order_per_seed"] = order
    longest_first = [min((r for r in layers if r["seed"] == sd), key=lambda r: r["acquired_at"])["rank"] == L
                     for sd in seeds]
    out["seeds_longest_step_acquired_first"] = int(sum(longest_first))
    if len(seeds) >= 2:
        iv = quality.seed_interval([r["set_gap"] for r in layers if r["layer"] == 1])
        out["set_gap_mean_ci95"] = [round(iv.mean, 4), round(iv.low, 4), round(iv.high, 4)]
    return out


@dataclasses.dataclass(frozen=True)
class Settings(Recipe):
    """Paper B's recipe (the same networks' recipe, recorded), 8 seeds."""

    seeds: int = 8
    record_every: int = 50
    record_prompts: int = 1024
    tolerance: float = 0.1

EXPERIMENT = Experiment(
    name="dynamics_layers", title="Paper B's 4-layer transformer: which step each layer acquires, and when",
    settings=Settings(), quick=dataclasses.replace(Settings(), layers=2, seeds=2, steps=300, record_every=30, record_prompts=256),
    run=run, plot=plot, summary=summary)
