"""Paper B's claim (ii), depth against step: is pruning a shallow layer more harmful *because it is shallow*,
or because of the GD step it holds? (docs/theory.md §8; issue 30)

In the GD form a layer is a step w <- w + Gamma_l (b - S w), and SVD truncation of (Wq, Wk) to rank 1-2 all but
deletes it (``pruning_depth``'s mechanism). So the layers of each trained L-layer network (the shared recipe,
the same networks as ``pruning_depth`` via the cache, both seed bases, gated) are permuted over all L! orders
(``depth.permute_layers``), and in every order the layer at each position is SVD-pruned to each kept rank (rank 1
by default: at ranks 1 and 2 the pruning harm correlates 0.97-1.00 with deleting the step, ``pruning_depth``, and
rank 1 alone keeps the full run near 90 s) and scored against the same order unpruned, on the seed's own test
prompts (paired). The reference is the best
L-step GD (``theory.optimal_multistep_gd``, steps of the training design) as a GD-form network
(``depth.gd_network``): its Gamma_l = gamma_l I has no preferred singular directions, so its layers are
pruned to a random subspace of the kept rank shared by Wq and Wk (seeded by the prompt set's seed; by
isotropy every fixed subspace gives the same risk distribution); its unpruned risk is the same in every order
(the factors I - gamma_l S commute).
Per seed, the harms (relative risk change, averaged over the orders and kept ranks) form a table H[position,
step rank] (step rank: the pruned layer's step among the network's steps, 1 = shortest), decomposed into
balanced main effects (``depth.decompose``): the depth effect a_1 - a_L (same steps, position 1 minus L:
claim (ii) as stated, positive if it holds) and the step effect b_1 - b_L (same positions, shortest minus
longest step). The trained order's shallow-minus-deep contrast H[1, r(layer 1)] - H[L, r(layer L)] is exactly
the depth effect + the step part b_r(1) - b_r(L) + an interaction part, which says what drives it."""

import itertools
import math

import dataclasses

import jax
import numpy as np

from iclsim import depth, plotting, pruning, quality, sweeps, theory
from iclsim.runner import Experiment

from . import _paper_b
from .pruning_depth import _by_base, _plain_ticks, _point_colours, _short

TEST_SETTINGS = ("matched", "shorter context")
PARTS = ("depth_effect", "step_effect", "trained_order_contrast", "contrast_depth_part", "contrast_step_part",
         "contrast_interaction_part")


def _pruned_orders(params, L, ranks, op="svd", value=None):
    """[unpruned, then (position, rank) pruned] for every order of the layers, flattened: L! (1 + L |ranks|).
    Each layer is pruned once per rank (on the host) and placed at every position."""
    params = jax.tree_util.tree_map(np.asarray, params)
    pruned = {(l, k): jax.tree_util.tree_map(np.asarray, pruning.apply_candidate(
        params, pruning.Candidate(l, "attn", k, op, value))["layers"][l]) for l in range(L) for k in ranks}
    out = []
    for order in itertools.permutations(range(L)):
        layers = [params["layers"][i] for i in order]
        out.append({**params, "layers": layers})
        out += [{**params, "layers": layers[:p] + [pruned[order[p], k]] + layers[p + 1:]}
                for p in range(L) for k in ranks]
    return out


def run(s, seed, context):
    progress = context.progress
    d, n, L, ranks = s.dim, s.n, s.layers, list(s.ranks)
    bases = _paper_b.seed_bases(seed, s.seeds)
    seeds = bases["A"] + bases["B"]
    base_of = {sd: b for b, group in bases.items() for sd in group}
    model, params, design = _paper_b.train_networks(s, seeds, context)
    ref = theory.optimal_multistep_gd(design, n, L, jax.random.PRNGKey(seed), s.num_reference)
    gd_steps = np.sort(np.asarray(ref.step_sizes, np.float64))
    steps = _paper_b.layer_steps(model, params)
    order_of = _paper_b.step_order(steps)
    orders = list(itertools.permutations(range(L)))
    gd_seeds = bases["A"][:s.reference_sets] + bases["B"][:s.reference_sets]
    per_seed = [jax.tree_util.tree_map(lambda a: a[i], params) for i in range(len(seeds))]
    networks = [_pruned_orders(p, L, ranks) for p in per_seed]
    networks += [_pruned_orders(depth.gd_network(gd_steps, d), L, ranks, "random", sd) for sd in gd_seeds]
    keys = sweeps.stream_keys(seeds + gd_seeds, _paper_b.TEST_STREAM)
    block = 1 + L * len(ranks)
    rows, passed = [], None
    for setting in TEST_SETTINGS:
        test_design, test_n = _paper_b.test_settings(s)[setting]
        progress(f"  {setting}: {len(networks[0])} networks ({len(orders)} orders) x {len(networks)} prompt sets, "
                 f"{s.num_test} prompts each")
        risk, se = depth.evaluate_networks(model, networks, test_design, test_n, keys, s.num_test)
        if passed is None:  # the gate: the trained order on matched prompts against the best L-step GD
            passed = quality.gate(risk[:len(seeds), 0], ref.risk, se=np.hypot(se[:len(seeds), 0], ref.se))
        for i, sd in enumerate(seeds + gd_seeds):
            trained = i < len(seeds)
            held, ok = (order_of[i], bool(passed[i])) if trained else (np.arange(1, L + 1), True)
            step = steps[i] if trained else gd_steps
            for o, order in enumerate(orders):
                base = risk[i, o * block]
                for p in range(L):
                    for m, k in enumerate(ranks):
                        j = o * block + 1 + p * len(ranks) + m
                        rows.append({"setting": setting, "kind": "trained" if trained else "best GD",
                                     "base": base_of[sd],
                                     "seed": sd, "passed": ok, "order": "".join(str(x + 1) for x in order),
                                     "position": p + 1, "layer": order[p] + 1, "step": float(step[order[p]]),
                                     "step_order": int(held[order[p]]), "layer1_step_order": int(held[0]),
                                     "rank": k, "risk": float(risk[i, j]), "se": float(se[i, j]),
                                     "baseline": float(base), "relative_change": float((risk[i, j] - base) / base),
                                     "reference": ref.risk, "reference_steps": " ".join(f"{g:.4f}" for g in gd_steps)})
    return rows


def tables(rows, setting, kind) -> dict:
    """(base, seed) -> (H [L, L] position x step rank harms, averaged over orders and kept ranks; the step ranks
    (1-based) of the layers the trained order puts first and last) for the passing networks of ``kind``."""
    sub = [r for r in rows if r["setting"] == setting and r["kind"] == kind and r["passed"]]
    L = max((r["position"] for r in sub), default=0)
    out = {}
    for key in sorted({(r["base"], r["seed"]) for r in sub}):
        mine = [r for r in sub if (r["base"], r["seed"]) == key]
        total, count = np.zeros((L, L)), np.zeros((L, L))
        for r in mine:
            total[r["position"] - 1, r["step_order"] - 1] += r["relative_change"]
            count[r["position"] - 1, r["step_order"] - 1] += 1
        first = next(r["step_order"] for r in mine if r["layer"] == 1)
        last = next(r["step_order"] for r in mine if r["layer"] == L)
        out[key] = (total / count, first, last)
    return out


def parts(rows, setting, kind) -> dict:
    """(base, seed) -> {depth_effect, step_effect, trained_order_contrast and its depth, step and interaction
    parts (they sum to it)}: ``depth.decompose`` of each seed's table."""
    out = {}
    for key, (H, first, last) in tables(rows, setting, kind).items():
        dec = depth.decompose(H)
        dp, sp, ip = dec.contrast(first - 1, last - 1)
        out[key] = {"depth_effect": dec.depth_effect, "step_effect": dec.step_effect,
                    "trained_order_contrast": float(H[0, first - 1] - H[-1, last - 1]),
                    "contrast_depth_part": dp, "contrast_step_part": sp, "contrast_interaction_part": ip}
    return out


def summary(rows):
    nets = {(r["base"], r["seed"]): r["passed"] for r in rows if r["kind"] == "trained"}
    out = {"networks_passed": sum(nets.values()), "networks_failed": len(nets) - sum(nets.values()),
           "failed_by_base": {b: sum(1 for (bb, _), ok in nets.items() if bb == b and not ok) for b in ("A", "B")},
           "reference_steps": rows[0]["reference_steps"]}
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    for setting in settings:
        tr, gd = parts(rows, setting, "trained"), parts(rows, setting, "best GD")
        entry = {}
        for name in PARTS:
            entry[name] = _by_base(rows, setting,
                                   lambda b, name=name: [v[name] for (bb, _), v in tr.items() if bb == b])
        entry["best_GD_reference"] = {name: _by_base(rows, setting, lambda b, name=name: [v[name] for (bb, _), v in
                                                                                       gd.items() if bb == b])
                                      for name in ("depth_effect", "step_effect")}
        # the GD reference's unpruned risk over the orders: equal up to float32 rounding (the steps commute)
        base = {}
        for r in rows:
            if r["setting"] == setting and r["kind"] == "best GD":
                base.setdefault(r["seed"], set()).add(r["baseline"])
        entry["best_GD_unpruned_spread_over_orders"] = max((max(v) - min(v)) / min(v) for v in base.values())
        med = {name: {b: entry[name][b].get("median") for b in ("A", "B")} for name in PARTS}
        entry["claim_ii_as_stated"] = {b: entry["depth_effect"][f"verdict_{b}"] for b in ("A", "B")}
        entry["claim_ii_verdict_across"] = entry["depth_effect"]["verdict_across"]
        entry["what_drives_it"] = (
            "trained-order contrast (median) = depth part + step part + interaction: " + "; ".join(
                f"base {b}: {med['trained_order_contrast'][b]:+.3f} ~ {med['contrast_depth_part'][b]:+.3f} "
                f"+ {med['contrast_step_part'][b]:+.3f} + {med['contrast_interaction_part'][b]:+.3f}"
                for b in ("A", "B") if med["trained_order_contrast"][b] is not None)
            + "; step effect (shortest minus longest step, same positions): "
            + ", ".join(f"{b} {med['step_effect'][b]:+.3f}" for b in ("A", "B") if med["step_effect"][b] is not None))
        out[setting] = entry
    return out


def plot(rows, s):
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    L = s.layers
    fig, axes = plotting.plt.subplots(2, len(settings), figsize=(6.0 * len(settings), 9.5), squeeze=False,
                                      constrained_layout=True)
    cmap = plotting.plt.get_cmap("viridis")
    summ = summary(rows)
    for j, setting in enumerate(settings):
        ax = axes[0, j]
        for kind, ls, marker in (("trained", "-", "o"), ("best GD", "--", "x")):
            tabs = tables(rows, setting, kind)
            if not tabs:
                continue
            H = np.stack([t[0] for t in tabs.values()])  # [seeds, position, step]
            for r in range(L):
                ivs = [quality.median_interval(1 + H[:, p, r]) for p in range(L)]
                med = np.array([iv.median for iv in ivs])
                err = np.array([[iv.median - iv.low for iv in ivs], [iv.high - iv.median for iv in ivs]])
                ax.errorbar(np.arange(1, L + 1) + (0.04 * (r - L / 2) if kind == "trained" else 0.0), med,
                            yerr=np.where(np.isfinite(err), err, 0.0), color=cmap(r / max(L - 1, 1)), ls=ls,
                            marker=marker, ms=4, capsize=2,
                            label=f"{kind}: step {r + 1} of {L}" + (" (shortest)" if r == 0 else ""))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        _plain_ticks(ax.yaxis)
        ax.set_xticks(range(1, L + 1))
        ax.set_xlabel("position the pruned layer is placed at (all orders)")
        ax.set_ylabel(f"risk / unpruned risk (log), SVD rank {', '.join(map(str, s.ranks))} mean")
        ax.set_title(f"{setting}: median over passing seeds (trained, solid) and prompt sets (best GD, dashed)",
                     fontsize=8)
        ax.legend(fontsize=6, ncol=2)
        ax = axes[1, j]
        tr = parts(rows, setting, "trained")
        gd = parts(rows, setting, "best GD")
        held = {(r["base"], r["seed"]): r["layer1_step_order"] for r in rows if r["kind"] == "trained"}
        names = ("depth_effect", "step_effect", "trained_order_contrast", "contrast_step_part")
        for m, name in enumerate(names):
            for b, dx, marker in (("A", -0.18, "o"), ("B", 0.18, "s")):
                keys = [k for k in tr if k[0] == b]
                vals = [tr[k][name] for k in keys]
                x = m + dx + np.linspace(-0.09, 0.09, max(len(vals), 1))[:len(vals)]
                ax.scatter(x, vals, c=_point_colours([held[k] for k in keys], L), marker=marker, s=16,
                           edgecolors="none")
                if vals:
                    iv = quality.median_interval(vals)
                    lo = iv.low if np.isfinite(iv.low) else iv.median
                    hi = iv.high if np.isfinite(iv.high) else iv.median
                    ax.plot([m + dx - 0.13, m + dx + 0.13], [iv.median] * 2, color="k", lw=1.5)
                    ax.plot([m + dx] * 2, [lo, hi], color="k", lw=0.8)
            if name in ("depth_effect", "step_effect") and gd:
                ax.plot(m, np.median([v[name] for v in gd.values()]), marker="*", color="C3", ms=12, ls="none",
                        label="best GD (median over prompt sets)" if m == 0 else None)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(names)), ["depth effect\n(pos 1 - pos L)", "step effect\n(shortest - longest)",
                                          "trained order\nshallow - deep", "its step part"], fontsize=8)
        ax.set_ylabel("relative risk change, per seed")
        e = summ[setting]["depth_effect"]
        ax.set_title(f"claim (ii) as stated (depth effect): A {_short(e['verdict_A'])}, B {_short(e['verdict_B'])}: "
                     f"{_short(e['verdict_across'])}\no: base A, s: base B; colour: step rank layer 1 holds "
                     "(dark: shortest)", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"Depth against step: the layers of {L}-layer GD-form transformers permuted over all "
                 f"{math.factorial(L)} "
                 f"orders and each position pruned\n(trained: SVD of Wq, Wk; best GD: a random subspace shared by Wq, "
                 f"Wk, as gamma I has no singular directions); {summ['networks_failed']} networks failed the gate "
                 f"(A {summ['failed_by_base']['A']}, B {summ['failed_by_base']['B']}) and are left out")
    return fig


@dataclasses.dataclass(frozen=True)
class Settings(_paper_b.Study):
    """Paper B's shared recipe and test settings (``_paper_b.Study``), the pruned ``ranks``, test prompts,
    the reference's prompt sets and prompts per set."""

    ranks: tuple[int, ...] = (1,)
    num_test: int = 6_000
    reference_sets: int = 6
    num_reference: int = 200_000


SETTINGS = Settings()
QUICK = dataclasses.replace(SETTINGS, **_paper_b.QUICK, num_test=4_000, reference_sets=2, num_reference=20_000)

EXPERIMENT = Experiment(
    name="pruning_depth_step", title="Paper B (ii): depth against step (all layer orders pruned)",
    settings=SETTINGS, quick=QUICK,
    run=run, plot=plot, summary=summary)
