"""Paper B's depth and search studies on networks whose singular directions mean something (issue 30).

On isotropic data the GD-form layer's step matrix Gamma_l = -w_l Wq_l Wk_l^T is near a multiple of the
identity, so the SVDs of its factors pick directions that mean nothing (their kept subspaces at rank 1-2
barely overlap, and pruning a layer to rank 1-2 deletes its GD step). Here features and tasks have
power-law covariances in one shared orthonormal basis V (drawn once from ``basis_seed``, so that alignment
with the coordinate axes cannot come from the initialisation): Sx = V diag(k^-a) V^T, Sb = V diag(k^-b) V^T,
each normalised to trace d (``power_law_covariance``). The L = 4 GD-form transformers of paper B's recipe
(``_paper_b.RECIPE``) are trained on it, on two independent seed bases, beside the same networks on the
recipe's isotropic data (the comparison; the cache shares those with the other paper-B studies).

The quality gate. No closed form gives the best L-step matrix-preconditioned GD on anisotropic data. Flipping
the sign of any eigen-coordinate leaves the data law unchanged, so the risk is invariant under
Gamma_l -> D Gamma_l D for every sign matrix D, and a unique optimum would be diagonal in V. The reference is
therefore the best L-step GD with preconditioners diagonal in the data's eigenbasis, Gamma_l = V diag(g_l) V^T
(``eigenbasis_multistep_gd``: minimised on Gram draws, its risk re-estimated on fresh draws): an achievable
risk, so a network that learnt the task is within 10% of it; a network that finds a better non-diagonal
preconditioner passes too (the gate is one-sided). The one-step PGD optimum (``theory.optimal_pgd``, exact),
which every L-layer network can represent (its other layers at Gamma = 0), is reported beside it as the
upper bound a trained network must beat. Isotropic networks are gated against the best L-step GD
(``theory.optimal_multistep_gd``) as in pruning_depth.

Measured, per passing network and layer: how Gamma_l sits in the data's eigenbasis (the share of its
anisotropic part that is diagonal in V, ``diagonal_fraction``; the overlap of its top-k singular subspace
with the top-k, bottom-k and best-matching k eigenvectors, ``subspace_overlap``, ``best_eigen_overlap``), the
overlap of the factors' kept subspaces at ranks 1-2 (Wq's against Wk's) and the share of tr Gamma_l that
the factor truncation keeps. Then, on each test setting (matched, noisier test labels, shorter context; the
shifted designs keep the covariances) and on each network's own paired test prompts (``_paper_b`` streams):
the relative risk change of SVD-truncating each layer's factors to each kept rank, beside the controls on the
same prompts (truncating Gamma_l itself, "product_svd"; a random subspace of the same rank, "random";
deleting the layer's step, "delete"; the layer scaled by the scalar that validation prompts choose,
"scale"). Claim (ii), pruning deep layers is more stable: the shallow-minus-deep contrast per seed (layer 1
minus layer L, mean over kept ranks 1..d-1), summarised by its median with the exact order-statistic
interval (``quality.median_interval``), a verdict per base and across bases (``quality.across_bases``).
Claim (i), pruning helps: the joint (layer, rank) search (``pruning.search``: validation choice, paired test
change, null control) per base and across bases, beside the same search over the trivial operations
(delete, scale), and the per-seed difference between the two.

The factorisation Gamma_l = -w_l Wq_l Wk_l^T has a gauge freedom (Wq A, Wk A^-T give the same layer for any
invertible A), so the factors' singular directions are set by training, not by the layer's function: even
where Gamma_l's own singular directions are the data's eigenvectors, the factor SVD keeps subspaces of Wq
and Wk that need not match (measured here as factor_overlap_rank1/2 and trace_kept_rank1/2).

The form="full" transformer (von Oswald et al.) is not included: with the library's TrainConfig it did not
train reliably within this study's compute (measured on isotropic data, d = 5, n = 20, L = 4, 16 seeds,
1000 steps, gate 1.10 x the best 4-step GD: Adam lr 1e-2 (the default) passed 6 of 16, 4 seeds diverged
(loss up to 1e10-1e32 times its running minimum); lr 3e-3 with global-norm clipping at 1.0 passed 2 of 16,
no divergence but loss spikes (a step's loss above 3 x the median of the previous 100) in 13 of 16; and it
trains on tokens, far costlier than the GD form's Gram-matrix training, so 32 networks at the recipe's 4000
steps do not fit this study's budget).
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import numpy as np
from typing import Literal

from iclsim import IID, plotting, pruning, quality, sweeps, theory
from iclsim.anisotropic import (eigenbasis, eigenbasis_multistep_gd, layer_geometry, power_law_covariance,
                                random_best_overlap)

from iclsim.runner import Experiment

from ._paper_b import (NULL_STREAM, QUICK, TEST_STREAM, VALIDATION_STREAM, Study,
                       layer_steps, seed_bases, step_order, train_networks)

DESIGNS = ("anisotropic", "isotropic")
SETTINGS = ("matched", "noisier test labels", "shorter context")
CONTROLS = ("product_svd", "random", "delete", "scale")
GEOMETRY_RANKS = (1, 2)  # the kept ranks whose subspaces the issue measured (0.003 and 0.024 on isotropic data)


def designs_of(s, name: str) -> tuple[IID, dict, np.ndarray]:
    """(training design, {setting: (test design, n)}, eigenbasis V) of design ``name``: the anisotropic one
    (power-law Sx, Sb in the basis of ``basis_seed``) or the recipe's isotropic one (V is then the same
    random basis, a reference frame with no meaning: its overlaps are the chance level)."""
    d = s.dim
    V = eigenbasis(d, s.basis_seed)
    if name == "anisotropic":
        cov = {"cov_x": power_law_covariance(d, s.x_power, V), "cov_beta": power_law_covariance(d, s.beta_power, V)}
    elif name == "isotropic":
        cov = {}
    else:
        raise ValueError(f"design must be one of {DESIGNS}, got {name!r}")
    train_design = IID(d, noise_var=s.noise_var, **cov)
    tests = {"matched": (train_design, s.n),
             "noisier test labels": (IID(d, noise_var=s.test_noise_var, **cov), s.n),
             "shorter context": (train_design, s.test_n)}
    return train_design, tests, V


# ---- the study ----

def candidates_of(s) -> list[pruning.Candidate]:
    """The unpruned network first, then per layer: the factor truncation (paper B's "svd") and the
    controls "product_svd" and "random" at each kept rank, "product_svd" at rank d (must equal the unpruned
    network), "delete", and "scale" at each value of the validation grid."""
    d, L = s.dim, s.layers
    out = [pruning.Candidate(0, "attn", None)]
    for l in range(L):
        for k in s.ranks:
            out += [pruning.Candidate(l, "attn", k), pruning.Candidate(l, "attn", k, "product_svd"),
                    pruning.Candidate(l, "attn", k, "random", 1000 + 10 * l + k)]
        out += [pruning.Candidate(l, "attn", d, "product_svd"), pruning.Candidate(l, "attn", None, "delete")]
        out += [pruning.Candidate(l, "attn", None, "scale", float(v)) for v in s.scales]
    return out


def _reference(s, name, design, V, key, progress):
    """(reference risk, its se, the one-step PGD optimum's risk) of design ``name``."""
    one_step = float(theory.optimal_pgd(design, s.n).risk)
    if name == "isotropic":
        ref = theory.optimal_multistep_gd(design, s.n, s.layers, key, s.num_eval)
        return float(ref.risk), float(ref.se), one_step
    progress(f"  reference: best {s.layers}-step GD preconditioned in the eigenbasis ({s.num_reference} draws, "
             f"scored on {s.num_eval})")
    _, risk, se = eigenbasis_multistep_gd(design, V, s.n, s.layers, key, s.num_reference, s.num_eval)
    return risk, se, one_step


def run(s, seed, context):
    progress = context.progress
    d, L = s.dim, s.layers
    bases = seed_bases(seed, s.seeds)
    seeds = bases["A"] + bases["B"]
    base_of = {sd: b for b, ss in bases.items() for sd in ss}
    cands = candidates_of(s)
    svd = [0] + [j for j, c in enumerate(cands) if c.op == "svd" and c.rank is not None]
    scale_idx = {l: [0] + [j for j, c in enumerate(cands) if c.layer == l and c.op in ("delete", "scale")]
                 for l in range(L)}
    trivial = sorted({j for l in range(L) for j in scale_idx[l]})
    keys = {name: sweeps.stream_keys(seeds, stream) for name, stream in
            (("val", VALIDATION_STREAM), ("test", TEST_STREAM), ("null", NULL_STREAM))}
    rows = []
    for name in s.designs:
        design, tests, V = designs_of(s, name)
        model, params, _ = train_networks(s, seeds, context, design=design)
        ref, ref_se, one_step = _reference(s, name, design, V, jax.random.PRNGKey(seed), progress)
        steps = layer_steps(model, params)
        order = step_order(steps)
        networks = pruning.candidate_networks(params, cands)  # [seeds, candidates]: built once, scored per setting
        passed = None
        for setting in s.settings:
            test_design, test_n = tests[setting]
            progress(f"  {name}: {len(cands)} candidates x {len(seeds)} seeds on {setting}")
            test, test_se = pruning.evaluate_networks(model, networks, test_design, test_n, keys["test"], s.num_test)
            val, _ = pruning.evaluate_networks(model, pruning.select_networks(networks, trivial), test_design, test_n,
                                               keys["val"], s.num_val)
            val_of = {j: val[:, i] for i, j in enumerate(trivial)}
            found = pruning.search(model, params, test_design, test_n, [cands[j] for j in svd], keys["val"],
                                   keys["test"], s.num_val, s.num_test, null_key=keys["null"],
                                   networks=pruning.select_networks(networks, svd))
            if passed is None:  # the gate, on the matched setting (listed first)
                passed = quality.gate(test[:, 0], ref, se=np.hypot(test_se[:, 0], ref_se))
            for i, sd in enumerate(seeds):
                common = {"design": name, "setting": setting, "base": base_of[sd], "seed": sd,
                          "passed": bool(passed[i]), "baseline": float(test[i, 0])}
                for j, c in enumerate(cands[1:], start=1):
                    if c.op == "scale":
                        continue
                    rows.append({**common, "kind": "prune", "op": c.op, "layer": c.layer + 1,
                                 "rank": c.rank if c.rank is not None else 0, "step": float(steps[i, c.layer]),
                                 "step_order": int(order[i, c.layer]), "risk": float(test[i, j]),
                                 "se": float(test_se[i, j]),
                                 "relative_change": float((test[i, j] - test[i, 0]) / test[i, 0])})
                for l in range(L):  # the "scale" control: the scalar (1 = as trained, 0 = deleted) validation picks
                    js = scale_idx[l]
                    pick = js[int(np.argmin([val_of[j][i] for j in js]))]
                    value = 1.0 if pick == 0 else (cands[pick].value if cands[pick].op == "scale" else 0.0)
                    rows.append({**common, "kind": "prune", "op": "scale", "layer": l + 1, "rank": 0,
                                 "value": float(value), "step": float(steps[i, l]), "step_order": int(order[i, l]),
                                 "risk": float(test[i, pick]), "se": float(test_se[i, pick]),
                                 "relative_change": float((test[i, pick] - test[i, 0]) / test[i, 0])})
                chosen = found.candidates[found.chosen[i]]
                pick = trivial[int(np.argmin([val_of[j][i] for j in trivial]))]  # the same search over delete / scale
                rows.append({**common, "kind": "search", "layer": chosen.layer + 1 if chosen.rank is not None else 0,
                             "rank": chosen.rank if chosen.rank is not None else d,
                             "test_change": float((found.test_after[i] - found.test_before[i]) / found.test_before[i]),
                             "apparent_gain": float(found.val_before[i] - found.val_after[i]),
                             "null_gain": float(found.null_gain[i]),
                             "control_layer": cands[pick].layer + 1 if pick else 0,
                             "control_value": float(1.0 if pick == 0 else cands[pick].value or 0.0),
                             "control_change": float((test[i, pick] - test[i, 0]) / test[i, 0])})
        for i, sd in enumerate(seeds):
            for l in range(L):
                attn = {k: np.asarray(v[i]) for k, v in params["layers"][l]["attn"].items()}
                rows.append({"design": name, "setting": "", "base": base_of[sd], "seed": sd, "passed": bool(passed[i]),
                             "kind": "layer", "layer": l + 1, "step_order": int(order[i, l]),
                             "reference": ref, "reference_se": ref_se, "one_step_pgd": one_step,
                             "matched_risk": next(r["baseline"] for r in rows if r["seed"] == sd and r["design"] == name
                                                  and r["setting"] == "matched"),
                             **layer_geometry(attn, V, GEOMETRY_RANKS)})
    return rows


# ---- summaries: medians with exact coverage, per base and across bases ----

def _sub(rows, **match):
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def _harms(rows, design, setting, op) -> dict:
    """{(seed, layer): mean relative change over the kept ranks 1..d-1 of (op, layer)} (delete and scale: their
    one value), every seed and layer of (design, setting) from one pass over the rows."""
    d, vals = _dim(rows), collections.defaultdict(list)
    for r in rows:
        if (r.get("kind") == "prune" and r.get("design") == design and r.get("setting") == setting
                and r.get("op") == op and (op in ("delete", "scale") or 0 < r["rank"] < d)):
            vals[r["seed"], r["layer"]].append(r["relative_change"])
    return {key: float(np.mean(v)) for key, v in vals.items()}


def _dim(rows) -> int:
    return max(r["rank"] for r in rows if r.get("kind") == "prune" and r["op"] == "product_svd")


def _layers(rows) -> int:
    return max(r["layer"] for r in rows if r.get("kind") == "layer")


def contrasts(rows, design, setting, op="svd") -> dict:
    """Per base: the shallow-minus-deep contrast of ``op`` per passing seed (layer 1 minus layer L)."""
    L, harm = _layers(rows), _harms(rows, design, setting, op)
    out = {}
    for base in sorted({r["base"] for r in rows}):
        seeds = sorted({r["seed"] for r in _sub(rows, kind="layer", design=design, base=base, passed=True)})
        out[base] = [harm.get((sd, 1), np.nan) - harm.get((sd, L), np.nan) for sd in seeds]
    return out


def geometry(rows, design) -> dict:
    """Medians over passing networks and layers of the geometry columns, with the chance levels."""
    sub = _sub(rows, kind="layer", design=design, passed=True)
    if not sub:
        return {"networks": 0}
    d = _dim(rows)
    cols = ["anisotropy", "diagonal_fraction"] + [f"{p}{k}{q}" for k in GEOMETRY_RANKS for p, q in
                                                  (("gamma_top", "_overlap_top"), ("gamma_top", "_overlap_bottom"),
                                                   ("gamma_top", "_overlap_best"), ("factor_overlap_rank", ""),
                                                   ("trace_kept_rank", ""))]
    out = {c: round(float(np.median([r[c] for r in sub])), 4) for c in cols}
    out["chance"] = {"diagonal_fraction": round(1 / (d + 1), 4),
                     **{f"overlap_rank{k}": round(k / d, 4) for k in GEOMETRY_RANKS},
                     **{f"best_overlap_rank{k}": round(random_best_overlap(d, k), 4) for k in GEOMETRY_RANKS}}
    return out


def summarise(rows) -> dict:
    designs = list(dict.fromkeys(r["design"] for r in rows))
    out = {"networks": {}, "geometry": {}, "claim_ii_shallow_minus_deep": {}, "claim_i_search": {}}
    for design in designs:
        nets = _sub(rows, kind="layer", design=design, layer=1)
        out["networks"][design] = {
            **{base: {"passed": sum(r["passed"] for r in nets if r["base"] == base),
                      "failed": sum(not r["passed"] for r in nets if r["base"] == base)}
               for base in sorted({r["base"] for r in nets})},
            "reference_risk": round(nets[0]["reference"], 4), "reference_se": round(nets[0]["reference_se"], 5),
            "one_step_pgd_risk": round(nets[0]["one_step_pgd"], 4),
            # the mechanism the isotropic harm follows (issue 30): which step layer 1 holds
            "layer1_holds_smallest_step": sum(r["step_order"] == 1 for r in nets if r["passed"]),
            "median_matched_risk_over_reference": round(float(np.median([r["matched_risk"] / r["reference"]
                                                                         for r in nets if r["passed"]] or [np.nan])), 4)}
        out["geometry"][design] = geometry(rows, design)
        settings = list(dict.fromkeys(r["setting"] for r in _sub(rows, kind="search", design=design)))
        out["claim_ii_shallow_minus_deep"][design] = {
            setting: {op: quality.verdicts_by_base(contrasts(rows, design, setting, op), True)
                      for op in ("svd",) + CONTROLS} for setting in settings}
        out["claim_i_search"][design] = {}
        for setting in settings:
            ok = _sub(rows, kind="search", design=design, setting=setting, passed=True)
            bases = sorted({r["base"] for r in rows})
            per = {b: [r["test_change"] for r in ok if r["base"] == b] for b in bases}
            ctrl = {b: [r["control_change"] for r in ok if r["base"] == b] for b in bases}
            diff = {b: [r["test_change"] - r["control_change"] for r in ok if r["base"] == b] for b in bases}
            out["claim_i_search"][design][setting] = {
                "svd_search_test_change": quality.verdicts_by_base(per, False),
                "control_search_test_change": quality.verdicts_by_base(ctrl, False),
                "svd_minus_control": quality.verdicts_by_base(diff, False),
                "pruned_seeds": sum(r["layer"] > 0 for r in ok),
                "mean_apparent_gain": round(float(np.mean([r["apparent_gain"] for r in ok])), 5) if ok else None,
                "mean_null_gain": round(float(np.mean([r["null_gain"] for r in ok])), 5) if ok else None}
    return out


def summary(rows):
    nets = _sub(rows, kind="layer", layer=1)
    return {"networks_passed": sum(r["passed"] for r in nets), "networks_failed": sum(not r["passed"] for r in nets),
            **summarise(rows)}


# ---- the figure ----

OP_STYLE = {"svd": ("C0", "o", "factor SVD"), "product_svd": ("C1", "s", "Gamma SVD"),
            "random": ("C2", "^", "random subsp."), "delete": ("C5", "x", "delete step"),
            "scale": ("C4", "D", "best scalar")}


def plot(rows, s):
    designs = list(dict.fromkeys(r["design"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in _sub(rows, kind="search")))
    L, d = _layers(rows), _dim(rows)
    ncol = 3 + len(settings)
    fig, axes = plotting.plt.subplots(len(designs), ncol, figsize=(4.2 * ncol, 4.0 * len(designs)), squeeze=False,
                                      constrained_layout=True)
    summ = summarise(rows)
    fails = []
    for i, design in enumerate(designs):
        nets = summ["networks"][design]
        fails.append(f"{design}: " + ", ".join(f"{nets[b]['failed']} of {nets[b]['passed'] + nets[b]['failed']} "
                                              f"failed the gate (base {b})" for b in sorted(nets) if len(b) == 1))
        lay = _sub(rows, kind="layer", design=design, passed=True)
        # geometry: where the step matrices sit in the eigenbasis, against chance
        ax = axes[i, 0]
        cols = [("diagonal_fraction", 1 / (d + 1), "Gamma diag.\nin eigenbasis"),
                ("gamma_top1_overlap_bottom", 1 / d, "Gamma top-1\nvs lowest-var."),
                ("gamma_top1_overlap_best", random_best_overlap(d, 1), "Gamma top-1\nvs best eigvec"),
                ("factor_overlap_rank1", 1 / d, "Wq vs Wk\nkept, rank 1"),
                ("factor_overlap_rank2", 2 / d, "Wq vs Wk\nkept, rank 2"),
                ("trace_kept_rank1", None, "tr kept /\ntr, rank 1"), ("trace_kept_rank2", None, "tr kept /\ntr, rank 2")]
        for x, (c, chance, _) in enumerate(cols):
            for layer in range(1, L + 1):
                v = [r[c] for r in lay if r["layer"] == layer]
                ax.plot(x + 0.12 * (layer - (L + 1) / 2) + np.zeros(len(v)), v, ".", ms=3, color=f"C{layer - 1}",
                        label=f"layer {layer}" if x == 0 else None)
            if chance is not None:
                ax.plot([x - 0.35, x + 0.35], [chance, chance], "k--", lw=1, label="chance" if x == 0 else None)
        ax.set_xticks(range(len(cols)), [c[2] for c in cols], fontsize=6)
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("overlap / fraction (one point per network)")
        ax.set_title(f"{design}: Gamma_l and its factors in the eigenbasis", fontsize=8)
        ax.legend(fontsize=6, ncol=2)
        # harm against kept rank, matched setting: median over seeds per layer; factor SVD and its controls
        ax = axes[i, 1]
        ranks = sorted({r["rank"] for r in _sub(rows, kind="prune", op="svd", design=design)})
        for layer in range(1, L + 1):
            for op, ls in (("svd", "-"), ("product_svd", ":"), ("random", "--")):
                med = [np.median([r["relative_change"] for r in _sub(rows, kind="prune", design=design,
                                                                     setting=settings[0], op=op, layer=layer, rank=k)
                                  if r["passed"]] or [np.nan]) for k in ranks]
                ax.plot(ranks, np.maximum(med, 1e-4), ls, marker=OP_STYLE[op][1], ms=3, color=f"C{layer - 1}")
            delete = np.median([r["relative_change"] for r in _sub(rows, kind="prune", design=design,
                                                                   setting=settings[0], op="delete", layer=layer)
                                if r["passed"]] or [np.nan])
            ax.axhline(max(delete, 1e-4), color=f"C{layer - 1}", lw=0.6, alpha=0.6)
        handles = [plotting.plt.Line2D([], [], color=f"C{layer - 1}", label=f"layer {layer}") for layer in range(1, L + 1)]
        handles += [plotting.plt.Line2D([], [], color="k", ls=ls, marker=OP_STYLE[op][1], ms=3, label=OP_STYLE[op][2])
                    for op, ls in (("svd", "-"), ("product_svd", ":"), ("random", "--"))]
        handles += [plotting.plt.Line2D([], [], color="k", lw=0.6, label="delete the step")]
        ax.legend(handles=handles, fontsize=6)
        ax.set_yscale("log")
        ax.set_xticks(ranks)
        ax.set_xlabel(f"kept rank (of {d})")
        ax.set_ylabel(f"median relative risk change, {settings[0]}")
        ax.set_title(f"{design}: harm of pruning one layer\n(median over passing seeds; floor 1e-4)", fontsize=8)
        # the shallow-minus-deep contrast per seed, per base, beside the controls; factor-SVD points coloured by
        # the mechanism (red: layer 1 holds the network's smallest step)
        smallest = {base: [r["step_order"] == 1 for r in sorted(_sub(lay, layer=1, base=base), key=lambda r: r["seed"])]
                    for base in sorted({r["base"] for r in lay})}
        for j, setting in enumerate(settings):
            ax = axes[i, 2 + j]
            block = summ["claim_ii_shallow_minus_deep"][design][setting]
            for x, op in enumerate(("svd",) + CONTROLS):
                per = contrasts(rows, design, setting, op)
                for b, (base, values) in enumerate(sorted(per.items())):
                    _points(ax, x + (b - 0.5) * 0.36, values, OP_STYLE[op], b, block[op][base],
                            smallest[base] if op == "svd" else None)
            ax.axhline(0, color="k", lw=0.8)
            ax.set_xticks(range(1 + len(CONTROLS)), [f"{OP_STYLE[op][2]}\n{_short(block[op]['across_bases'])}"
                                                     for op in ("svd",) + CONTROLS], fontsize=6)
            ax.set_ylabel(f"layer 1 - layer {L} harm (relative change)")
            ax.set_title(f"{design}, {setting}: shallow - deep (A filled, B open;\nmedian, order-stat. interval; "
                         "red: layer 1 holds the smallest step)", fontsize=7)
        # claim (i): the search's test change, beside the same search over delete / scale
        ax = axes[i, -1]
        for x, setting in enumerate(settings):
            block = summ["claim_i_search"][design][setting]
            for k, (col, key, style) in enumerate((("test_change", "svd_search_test_change", OP_STYLE["svd"]),
                                                   ("control_change", "control_search_test_change", OP_STYLE["scale"]))):
                for b, base in enumerate(sorted({r["base"] for r in rows})):
                    values = [100 * r[col] for r in _sub(rows, kind="search", design=design, setting=setting, base=base,
                                                         passed=True)]
                    blk = {**block[key][base]}
                    if "median" in blk:
                        blk["median"] = 100 * blk["median"]
                        blk["median_interval"] = [None if v is None else 100 * v for v in blk["median_interval"]]
                    _points(ax, x + (k - 0.5) * 0.4 + (b - 0.5) * 0.18, values, style, b, blk)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(settings)), [f"{st}\nSVD: {_short(summ['claim_i_search'][design][st]['svd_search_test_change']['across_bases'])}"
                                             for st in settings], fontsize=6)
        ax.set_ylabel("test risk change of the validation choice (%)")
        ax.set_title(f"{design}: search over (layer, rank) (blue)\nvs over delete / scale (purple)", fontsize=8)
    fig.suptitle(f"Paper B on {L}-layer GD-form transformers (d = {d}), anisotropic vs isotropic data; "
                 + "; ".join(fails), fontsize=10)
    return fig


def _short(verdict: str) -> str:
    return verdict.replace("not resolved at this sample size", "not resolved").replace(" across seed bases", "")


def _points(ax, x, values, style, filled_or_open, block, mechanism=None):
    """Per-seed points at x (base A filled, base B open) with the median and its order-statistic interval;
    ``mechanism`` (one flag per seed) draws the flagged seeds in red."""
    colour, marker, _ = style
    xs = x + np.linspace(-0.06, 0.06, max(len(values), 1))[:len(values)]
    flags = np.zeros(len(values), bool) if mechanism is None else np.asarray(mechanism, bool)
    for flag in (False, True):
        c = "red" if flag else colour
        ax.plot(xs[flags == flag], np.asarray(values)[flags == flag], marker, ms=3, ls="none", color=c,
                mfc="none" if filled_or_open else c)
    if "median" in block:
        lo, hi = (np.nan if v is None else v for v in block["median_interval"])
        err = [[block["median"] - lo], [hi - block["median"]]] if np.isfinite(lo) and np.isfinite(hi) else None
        ax.errorbar(x, block["median"], yerr=err, fmt="_", ms=12, color="k", capsize=3)


@dataclasses.dataclass(frozen=True)
class Settings(Study):
    """Paper B's shared recipe and test settings (``_paper_b.Study``), the training ``designs`` and test
    ``settings`` studied, the anisotropic spectra (``x_power``, ``beta_power``) and basis, the search grid
    (``ranks``, ``scales``), validation and test prompts, the reference's and the evaluation's prompts."""

    designs: tuple[Literal["anisotropic", "isotropic"], ...] = DESIGNS
    settings: tuple[Literal["matched", "noisier test labels", "shorter context"], ...] = SETTINGS
    x_power: float = 1.0
    beta_power: float = 1.0
    basis_seed: int = 0
    ranks: tuple[int, ...] = (1, 2, 3, 4)
    scales: tuple[float, ...] = (0.5, 0.75, 1.25, 1.5)
    num_val: int = 2_000
    num_test: int = 6_000
    num_reference: int = 20_000
    num_eval: int = 100_000


DEFAULT = Settings()
QUICK_SETTINGS = dataclasses.replace(DEFAULT, **QUICK, ranks=(1, 2), scales=(0.5, 1.5), num_val=2_000, num_test=4_000,
                                     num_reference=10_000, num_eval=50_000)

EXPERIMENT = Experiment(
    name="pruning_anisotropic", title="Paper B: depth and search where the SVD basis is the data's",
    settings=DEFAULT, quick=QUICK_SETTINGS,
    run=run, plot=plot, summary=summary)
