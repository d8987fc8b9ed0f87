"""Paper B's claims (i) (SVD pruning can improve ICL) and (iv) (its derivative-free search) in the linear
setting, against the operations that could explain a pruning gain, on two independent seed bases.

Networks: the shared recipe of ``_paper_b`` (L-layer GD-form linear transformers), two seed bases of 16
seeds each, each network gated against the best L-step GD (failures counted and left out). For every
passing network and test setting, with the network's own validation, test and null prompts (the shared
streams of ``_paper_b``), every option below is scored on validation and on test (paired: one seed's
options share their prompts), and each protocol picks on validation and is judged on test:

(a) paper B's protocol (its code, chen123CtrlS/EnhancingICL_SVDPruning): one fixed (layer, module "attn"),
    its clipping-rate grid {0, 0.1, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995} as kept ranks (d = 5: ranks 5 =
    unpruned, 4, 2, 1; ``pruning.rate_options``), the rate with the lowest validation risk (ties to the
    smaller rate), and its paired test change; beside it paper B's stability read per layer: the worst
    test change over the grid (its Figure 1: accuracy against clipping rate, the shallow layers' curves
    dropping at high rates, the deep layers' not);
(b) the joint (layer, kept rank) grid over every layer, chosen the same way;
(c) controls over the same number of options, chosen the same way: delete one layer's step (L options),
    scale one layer's update by a scalar (L x 3), truncate a random subspace of the same rank (L x 3),
    truncate the step matrix Gamma_l itself (product_svd, L x 3), and the oracle floor: the best L-step
    GD re-tuned for the test distribution (``theory.optimal_multistep_gd`` on the test design and n) as a
    GD-form network on the same prompts. Pruning helps only if it beats these (paired per seed).
(d) the null control: the same minimum over the unpruned network scored on as many independent
    validation sets as (b) has options: the winner's curse alone.

Verdict names in the summary: claim_i_* and claim_iv_* are "supported" where the change is negative
(pruning helped); X_minus_Y "supported" where X's change is below Y's (X beats Y); worst_change_layerL
"supported" where the worst rate of the layer's grid raises the test risk; stability_shallow_minus_deep_worst
"supported" where layer 1's worst change exceeds layer L's (paper B's "deep pruning is more stable").

Summaries per setting and seed base: medians with their exact order-statistic interval and coverage
(``quality.median_interval``; means beside them), the verdicts per base and across bases
(``quality.across_bases``), and for the joint search's choice a robust per-prompt summary
(``pruning.paired_prompt_change``: the change with squared errors winsorised at the 99.9% quantile, the
median per-prompt difference, and the share of the mean change the top 0.1% of prompts carry)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import plotting, pruning, quality, sweeps, theory
from iclsim.runner import Experiment

from . import _paper_b

FAMILIES = ("svd", "delete", "scale", "random", "product_svd")
CONTROLS = ("delete", "scale", "random", "product_svd")  # chosen on validation like the pruning
LABELS = {"svd": "SVD pruning (joint grid)", "delete": "delete a step", "scale": "scale a step",
          "random": "random subspace", "product_svd": "truncate Gamma_l", "oracle": "oracle (re-tuned GD)"}


def options(s):
    """The edits scored for every network: (family, Candidate) with the unpruned network first, in the order
    ties are broken in (mildest edit first: larger kept rank, scale nearer 1); the random subspaces get each
    seed's own ``value`` in ``_edited``."""
    d, L = s.dim, s.layers
    ranks = [k for _, k in pruning.rate_options((d, d), s.rates) if k is not None]
    opts = [("unpruned", pruning.Candidate(0, "attn", None))]
    for layer in range(L):
        opts += [("svd", pruning.Candidate(layer, "attn", k)) for k in ranks]
    opts += [("delete", pruning.Candidate(layer, "attn", None, "delete")) for layer in range(L)]
    for layer in range(L):
        opts += [("scale", pruning.Candidate(layer, "attn", None, "scale", v)) for v in s.scales]
    for family in ("random", "product_svd"):
        for layer in range(L):
            opts += [(family, pruning.Candidate(layer, "attn", k, family, 0 if family == "random" else None))
                     for k in ranks]
    return opts


def _edited(params, opts, seeds):
    """[seeds, options] edited networks: every edit but the random ones vmapped over seeds; each seed's random
    subspaces drawn from its own integer seed (seed * 1000 + 10 layer + rank)."""
    columns = []
    for family, c in opts:
        if family == "random":
            per_seed = [pruning.apply_candidate(jax.tree_util.tree_map(lambda a: a[i], params),
                                                c._replace(value=int(sd) * 1000 + 10 * c.layer + c.rank))
                        for i, sd in enumerate(seeds)]
            columns.append(jax.tree_util.tree_map(lambda *a: jnp.stack(a), *per_seed))
        else:
            columns.append(jax.vmap(lambda p, c=c: pruning.apply_candidate(p, c))(params))
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a, axis=1), *columns)


def run(s, seed, context):
    progress = context.progress
    d, L = s.dim, s.layers
    bases = _paper_b.seed_bases(seed, s.seeds)
    seeds = bases["A"] + bases["B"]
    base_of = {sd: b for b, sds in bases.items() for sd in sds}
    model, params, design = _paper_b.train_networks(s, seeds, context)
    steps = _paper_b.layer_steps(model, params)
    order = _paper_b.step_order(steps)
    opts = options(s)
    progress(f"  {len(opts)} options x {len(seeds)} networks")
    nets = _edited(params, opts, seeds)
    val_keys, test_keys, null_keys = (sweeps.stream_keys(seeds, k) for k in
                                      (_paper_b.VALIDATION_STREAM, _paper_b.TEST_STREAM, _paper_b.NULL_STREAM))
    joint = [0] + [j for j, (f, _) in enumerate(opts) if f == "svd"]
    rows, passed = [], None
    for setting, (test_design, test_n) in _paper_b.test_settings(s).items():
        progress(f"  {setting}: oracle, validation and test of every option")
        oracle = theory.optimal_multistep_gd(test_design, test_n, L, jax.random.PRNGKey(seed), s.num_reference)
        oracle_net = pruning.multistep_gd_params(d, oracle.step_sizes, model.dtype)
        with_oracle = jax.tree_util.tree_map(
            lambda a, o: jnp.concatenate([a, jnp.broadcast_to(o, (a.shape[0], 1) + o.shape)], axis=1),
            nets, oracle_net)
        val, _ = pruning.evaluate_networks(model, with_oracle, test_design, test_n, val_keys, s.num_val)
        test, test_se = pruning.evaluate_networks(model, with_oracle, test_design, test_n, test_keys, s.num_test)
        if passed is None:  # the gate: the matched test risk against the best L-step GD (the matched oracle)
            passed = quality.gate(test[:, 0], oracle.risk, se=np.hypot(test_se[:, 0], oracle.se))
        null = _null_gain(model, params, test_design, test_n, null_keys, len(joint), s.num_val, val[:, 0])
        chosen = pruning.select_on_validation(val[:, joint])
        for i, sd in enumerate(seeds):
            pick = joint[chosen[i]]
            robust = _robust(model, params, nets, i, pick, test_design, test_n, test_keys[i], s)
            common = {"setting": setting, "base": base_of[sd], "seed": sd, "passed": bool(passed[i]),
                      "reference": oracle.risk if setting == "matched" else None}
            rows.append({**common, "kind": "seed", "joint_choice": pick,
                         "null_gain": float(null[i]), "oracle_steps": " ".join(f"{g:.4f}" for g in oracle.step_sizes),
                         **{f"step{l + 1}": float(steps[i, l]) for l in range(L)},
                         **{f"step_order{l + 1}": int(order[i, l]) for l in range(L)},
                         **{f"robust_{k}": v for k, v in robust.items()}})
            for j, (family, c) in enumerate(opts + [("oracle", None)]):
                rows.append({**common, "kind": "option", "option": j, "family": family,
                             "layer": None if c is None or family == "unpruned" else c.layer + 1,
                             "rank": None if c is None else c.rank, "value": None if c is None or family != "scale"
                             else c.value, "val_risk": float(val[i, j]), "test_risk": float(test[i, j]),
                             "test_se": float(test_se[i, j]),
                             "test_change": float((test[i, j] - test[i, 0]) / test[i, 0])})
    return rows


def _null_gain(model, params, design, n, keys, copies, num, val_before):
    """Relative winner's curse per seed: (val_before - min over ``copies`` independent validation sets of the
    unpruned network's risk) / val_before, copy c keyed fold_in(seed's null key, c)."""
    seeds = keys.shape[0]
    fold = jax.vmap(jax.vmap(jax.random.fold_in, (None, 0)), (0, None))
    copy_keys = np.asarray(fold(jnp.asarray(keys), jnp.arange(copies))).reshape(seeds * copies, 2)
    repeated = jax.tree_util.tree_map(lambda a: jnp.repeat(jnp.asarray(a), copies, axis=0)[:, None], params)
    risk, _ = pruning.evaluate_networks(model, repeated, design, n, copy_keys, num)
    return (val_before - risk.reshape(seeds, copies).min(axis=1)) / val_before


def _robust(model, params, nets, i, pick, design, n, key, s):
    """The robust per-prompt summary of seed i's joint-search choice against its unpruned network (zeros
    where the search kept the unpruned network)."""
    if pick == 0:
        return {"mean_change": 0.0, "winsorised_change": 0.0, "median_difference": 0.0, "top_share": None}
    one = jax.tree_util.tree_map(lambda a: a[i], params)
    edit = jax.tree_util.tree_map(lambda a: a[i, pick], nets)
    rc = pruning.paired_prompt_change(model, one, edit, design, n, key, s.num_robust, s.quantile)
    return {"mean_change": rc.mean_change, "winsorised_change": rc.winsorised_change,
            "median_difference": rc.median_difference, "top_share": rc.top_share}


# ---- the protocols, from the rows ----

def _options_of(rows, setting, seed):
    return sorted((r for r in rows if r["kind"] == "option" and r["setting"] == setting and r["seed"] == seed),
                  key=lambda r: r["option"])


def choose(opts, family, layer=None):
    """The option a protocol picks on validation among the unpruned network and ``family``'s options (of
    ``layer`` only, where given): the first validation minimum (``pruning.select_on_validation``)."""
    pool = [opts[0]] + [r for r in opts if r["family"] == family and (layer is None or r.get("layer") == layer)]
    return pool[int(pruning.select_on_validation([[r["val_risk"] for r in pool]])[0])]


def per_seed(rows, setting, base):
    """Per passing seed of ``base``: the test change each protocol's validation choice makes."""
    seeds = sorted({r["seed"] for r in rows if r["kind"] == "seed" and r["setting"] == setting
                    and r["base"] == base and r["passed"]})
    layers = max(int(r["layer"]) for r in rows if r["kind"] == "option" and r.get("layer") not in (None, ""))
    out = []
    for sd in seeds:
        opts = _options_of(rows, setting, sd)
        seed_row = next(r for r in rows if r["kind"] == "seed" and r["setting"] == setting and r["seed"] == sd)
        rec = {"seed": sd, "joint": choose(opts, "svd")["test_change"],
               "joint_pruned": choose(opts, "svd")["option"] != 0,
               "oracle": next(r for r in opts if r["family"] == "oracle")["test_change"],
               "joint_layer": choose(opts, "svd").get("layer"), "seed_row": seed_row}
        rec.update({c: choose(opts, c)["test_change"] for c in CONTROLS})
        for layer in range(1, layers + 1):
            rec[f"paper_b_layer{layer}"] = choose(opts, "svd", layer)["test_change"]
            rec[f"paper_b_layer{layer}_pruned"] = choose(opts, "svd", layer)["option"] != 0
            for c in ("delete", "scale"):
                rec[f"{c}_layer{layer}"] = choose(opts, c, layer)["test_change"]
            # paper B's stability: the worst test change over the layer's clipping-rate grid
            rec[f"worst_layer{layer}"] = max(r["test_change"] for r in opts if r["family"] == "svd"
                                             and r["layer"] == layer)
        out.append(rec)
    return out


def _stat(values, supports_if_positive):
    """Median with its exact order-statistic interval and coverage, the mean beside it, and the verdict."""
    values = [float(v) for v in values]
    if len(values) < 2:
        return {"passing_seeds": len(values), "verdict": "not resolved: fewer than 2 passing seeds"}
    iv = quality.median_interval(values)
    return {"median": round(iv.median, 4), "interval": [quality.finite_or_none(iv.low), quality.finite_or_none(iv.high)],
            "coverage": round(iv.coverage, 4), "mean": round(float(np.mean(values)), 4), "passing_seeds": iv.count,
            "verdict": quality.median_verdict(values, supports_if_positive)}


def _across(per_base):
    verdicts = [per_base[b]["verdict"] for b in sorted(per_base)]
    return quality.across_bases(verdicts)


def claims(rows) -> dict:
    """Per setting: every verdict on base A, base B and across bases, with its numbers."""
    bases = sorted({r["base"] for r in rows if r["kind"] == "seed"})
    out = {}
    for setting in dict.fromkeys(r["setting"] for r in rows):
        recs = {b: per_seed(rows, setting, b) for b in bases}
        layers = sorted({int(r["layer"]) for r in rows if r["kind"] == "option" and r["family"] == "svd"})
        entry = {}

        def add(name, fn, supports_if_positive, pruned=None):
            per = {b: _stat([fn(r) for r in recs[b]], supports_if_positive) for b in bases}
            if pruned is not None:  # how many seeds' validation choice pruned at all (else the change is 0)
                for b in bases:
                    per[b]["pruned_seeds"] = int(sum(r[pruned] for r in recs[b]))
            entry[name] = {**per, "across_bases": _across(per)}

        # claim (i): the joint search's paired test change is negative
        add("claim_i_joint_search_change", lambda r: r["joint"], False, "joint_pruned")
        # the same choice's change on the robust prompts: squared errors winsorised at the quantile
        add("claim_i_joint_search_change_winsorised", lambda r: r["seed_row"]["robust_winsorised_change"], False)
        # ... and the median prompt's change (per-prompt paired difference, over the mean before)
        add("claim_i_joint_search_median_prompt_difference", lambda r: r["seed_row"]["robust_median_difference"], False)
        for c in CONTROLS + ("oracle",):
            add(f"joint_minus_{c}", lambda r, c=c: r["joint"] - r[c], False)
        best = {}
        for b in bases:  # the control whose median test change is lowest on this base (not the oracle)
            meds = {c: np.median([r[c] for r in recs[b]]) for c in CONTROLS} if recs[b] else {}
            best[b] = min(meds, key=meds.get) if meds else None
        per = {b: {**_stat([r["joint"] - r[best[b]] for r in recs[b]], False), "best_control": best[b]}
               for b in bases}
        entry["pruning_beats_best_control"] = {**per, "across_bases": _across(per)}
        # claim (iv): paper B's protocol on each fixed layer, and against the same layer's delete and scale
        for layer in layers:
            add(f"claim_iv_paper_b_layer{layer}", lambda r, l=layer: r[f"paper_b_layer{l}"], False,
                f"paper_b_layer{layer}_pruned")
            for c in ("delete", "scale"):
                add(f"paper_b_layer{layer}_minus_{c}", lambda r, l=layer, c=c: r[f"paper_b_layer{l}"] - r[f"{c}_layer{l}"],
                    False)
            add(f"worst_change_layer{layer}", lambda r, l=layer: r[f"worst_layer{l}"], True)
        if layers:  # paper B's stability: the deep layer's worst change below the shallow layer's
            add("stability_shallow_minus_deep_worst", lambda r: r[f"worst_layer{layers[0]}"] - r[f"worst_layer{layers[-1]}"],
                True)
        # (d) the winner's curse and the robust per-prompt summary of the joint choice
        for b in bases:
            seed_rows = [r["seed_row"] for r in recs[b]]
            entry.setdefault("null_and_robust", {})[b] = {
                "apparent_val_gain_median": _median([_apparent(rows, setting, r["seed"]) for r in recs[b]]),
                "null_val_gain_median": _median([r["null_gain"] for r in seed_rows]),
                                "robust_mean_change_median": _median([r["robust_mean_change"] for r in seed_rows]),
                "robust_winsorised_change_median": _median([r["robust_winsorised_change"] for r in seed_rows]),
                "robust_median_difference_median": _median([r["robust_median_difference"] for r in seed_rows]),
                "robust_top_share_median": _median([r["robust_top_share"] for r in seed_rows
                                                    if r.get("robust_top_share") not in (None, "")]),
                # the mechanism: the step rank (1 = shortest) of the layer the joint search pruned, counted
                "joint_pruned_step_rank_counts": {
                    str(k): sum(1 for r in recs[b] if r["joint_layer"] not in (None, "")
                                and int(r["seed_row"][f"step_order{int(r['joint_layer'])}"]) == k)
                    for k in range(1, len(layers) + 1)}}
        out[setting] = entry
    return out


def _apparent(rows, setting, seed):
    opts = _options_of(rows, setting, seed)
    pick = choose(opts, "svd")
    return (opts[0]["val_risk"] - pick["val_risk"]) / opts[0]["val_risk"]


def _median(values):
    return round(float(np.median(values)), 4) if len(values) else None


def _mechanism_colour(rec):
    """Colour of a joint-search point: the step rank of the layer it pruned (C0 = the shortest step), grey
    where it kept the unpruned network."""
    layer = rec["joint_layer"]
    if layer is None:
        return "0.55"
    return f"C{int(rec['seed_row'][f'step_order{int(layer)}']) - 1}"


def plot(rows, s):
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    bases = sorted({r["base"] for r in rows if r["kind"] == "seed"})
    fig, axes = plotting.plt.subplots(2, len(settings), figsize=(5.2 * len(settings), 8.4), squeeze=False,
                                      constrained_layout=True)
    columns = ["joint", *CONTROLS, "oracle"]
    labels = [LABELS["svd"], *(LABELS[c] for c in CONTROLS), LABELS["oracle"]]
    summary = claims(rows)
    for j, setting in enumerate(settings):
        ax = axes[0, j]
        for b_i, b in enumerate(bases):
            recs = per_seed(rows, setting, b)
            for k, col in enumerate(columns):
                vals = np.array([100 * r[col] for r in recs])
                x = k + (b_i - 0.5) * 0.36
                colour = [_mechanism_colour(r) if col == "joint" else "0.55" for r in recs]
                ax.scatter(x + np.linspace(-0.08, 0.08, max(len(vals), 1))[:len(vals)], vals, s=9, c=colour,
                           marker="o" if b_i == 0 else "^", zorder=2)
                if len(vals) >= 2:
                    iv = quality.median_interval(vals)
                    lo = iv.low if np.isfinite(iv.low) else vals.min()
                    hi = iv.high if np.isfinite(iv.high) else vals.max()
                    ax.errorbar(x + 0.13, iv.median, yerr=[[iv.median - lo], [hi - iv.median]], fmt="s", color="k",
                                ms=4, capsize=2, zorder=3)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(columns)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("paired test risk change of the validation choice (%)")
        v = summary[setting]["claim_i_joint_search_change"]
        ax.set_title(f"{setting}: claim (i) {v['across_bases']}\n(o base A, ^ base B; black: median, "
                     f"order-statistic interval)", fontsize=9)
        ax = axes[1, j]
        layers = range(1, s.layers + 1)
        for b_i, b in enumerate(bases):
            recs = per_seed(rows, setting, b)
            for k, layer in enumerate(layers):
                for m, (col, colour) in enumerate(((f"paper_b_layer{layer}", "C0"), (f"scale_layer{layer}", "C1"),
                                                   (f"delete_layer{layer}", "C2"))):
                    vals = np.array([100 * r[col] for r in recs])
                    x = k + (m - 1) * 0.25 + (b_i - 0.5) * 0.1
                    ax.scatter(np.full(len(vals), x), vals, s=7, color=colour, marker="o" if b_i == 0 else "^",
                               label=(["paper B's protocol (rate on validation)", "scale this layer",
                                       "delete this layer's step"][m] if k == 0 and b_i == 0 else None))
                    if len(vals):
                        ax.plot([x - 0.05, x + 0.05], [np.median(vals)] * 2, color="k", lw=1.5)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(layers)), [f"layer {layer}" for layer in layers])
        ax.set_ylabel("paired test risk change (%)")
        ax.set_title("paper B's protocol on one fixed layer\nvs that layer's controls (black: medians)", fontsize=9)
        ax.legend(fontsize=7)
    failed = {b: sum(1 for r in rows if r["kind"] == "seed" and r["setting"] == settings[0] and r["base"] == b
                     and not r["passed"]) for b in bases}
    fig.suptitle(f"Paper B's search against controls ({s.layers}-layer GD-form transformers, d = {s.dim}); "
                 f"gate failures: " + ", ".join(f"base {b} {failed[b]} of {s.seeds}" for b in bases)
                 + "; joint-search points coloured by the step rank of the pruned layer (C0 = shortest)",
                 fontsize=10)
    return fig


def summary(rows):
    seeds = {r["seed"]: (r["base"], r["passed"]) for r in rows if r["kind"] == "seed"}
    bases = sorted({b for b, _ in seeds.values()})
    return {"networks_passed": {b: sum(p for bb, p in seeds.values() if bb == b) for b in bases},
            "networks_failed": {b: sum(not p for bb, p in seeds.values() if bb == b) for b in bases},
            "reference_risk": next(round(r["reference"], 4) for r in rows if r["kind"] == "seed"
                                   and r["setting"] == "matched"),
            "claims": claims(rows)}


@dataclasses.dataclass(frozen=True)
class Settings(_paper_b.Study):
    """Paper B's shared recipe and test settings (``_paper_b.Study``), the search grid (``rates``, ``scales``),
    validation, test and robustness prompts, the robust quantile and the reference's prompts."""

    rates: tuple[float, ...] = tuple(pruning.DEFAULT_RATES)
    scales: tuple[float, ...] = (0.75, 0.5, 0.25)
    num_val: int = 2_000
    num_test: int = 10_000
    num_robust: int = 20_000
    quantile: float = 0.999
    num_reference: int = 100_000


SETTINGS = Settings()
QUICK = dataclasses.replace(SETTINGS, **_paper_b.QUICK, num_val=1_000, num_test=4_000, num_robust=4_000,
                            num_reference=20_000)

EXPERIMENT = Experiment(
    name="pruning_search", title="Paper B: SVD pruning and its search against controls, two seed bases",
    settings=SETTINGS, quick=QUICK,
    run=run, plot=plot, summary=summary)
