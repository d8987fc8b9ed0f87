"""Paper B's claim (ii), "pruning deep layers is more stable than pruning shallow ones", on L-layer linear
transformers in the GD form (docs/theory.md §8), against controls and with its mechanism measured, on two
independent seed bases.

The networks are the shared recipe (``_paper_b.RECIPE``), trained on every seed of both bases and gated
against the best L-step GD (``theory.optimal_multistep_gd`` on the training design); failures are counted and
shown, never averaged in. For every passing seed, test setting and layer l, on the seed's own test prompts
(all operations of a seed on the same prompts: paired):
- "svd": paper B's operation, Wq and Wk SVD-truncated to kept rank k = 1..d-1;
- controls: "delete" (the layer's update removed, w_v -> 0: its GD step deleted), "scale" (the update times the
  best scalar c*, chosen on validation prompts; exact: the risk is a parabola in c, ``depth.best_scale``),
  "random" (Wq, Wk projected on a random k-dim subspace, seeded by the network's seed), "product_svd" (the
  step matrix Gamma_l truncated to rank k itself), and the oracle, the best L-step GD re-tuned for the test
  distribution, run as a GD-form network (``depth.gd_network``) on the same prompts.
Mechanism: what each layer holds (its step tr(Gamma_l)/d and that step's rank in the network, 1 = shortest),
the overlap of the kept subspaces of Wq and Wk (``depth.kept_overlap``; random subspaces: k/d), the share of
tr(Gamma_l) that truncation keeps (``depth.kept_trace_ratio``), and the correlation over (seed, layer) of the
pruning harm with the harm of deleting the layer's step.
The contrast per seed is shallow minus deep: the relative risk change of operating on layer 1 minus that on
layer L (svd, random, product_svd: averaged over k = 1..d-1); claim (ii) predicts it is positive. Its median
with the exact order-statistic interval (``quality.median_interval``) gives a verdict per base, and one across
bases only where both agree (``quality.across_bases``); the same contrast is reported for every control."""

import dataclasses

import jax
import numpy as np

from iclsim import depth, plotting, pruning, quality, sweeps, theory
from iclsim.runner import Experiment

from . import _paper_b

OPS = ("svd", "product_svd", "random", "delete", "scale")  # per-layer operations; the oracle acts on the whole net
RANKED = ("svd", "product_svd", "random")


def _candidates(L, ranks, seed):
    """The test candidates of one network (the random subspace seeded by the network's seed): unpruned first,
    then every ranked operation, then delete and doubled update per layer (the parabola of ``best_scale``)."""
    out = [pruning.Candidate(0, "attn", None)]
    for op in RANKED:
        out += [pruning.Candidate(l, "attn", k, op, seed if op == "random" else None) for l in range(L) for k in ranks]
    out += [pruning.Candidate(l, "attn", None, "delete") for l in range(L)]
    out += [pruning.Candidate(l, "attn", None, "scale", 2.0) for l in range(L)]
    return out


def run(s, seed, context):
    progress = context.progress
    d, n, L, ranks = s.dim, s.n, s.layers, list(s.ranks)
    if not all(1 <= k < d for k in ranks):
        raise ValueError(f"ranks must lie in [1, {d - 1}] (below the full rank d = {d}), got {ranks}")
    bases = _paper_b.seed_bases(seed, s.seeds)
    seeds = bases["A"] + bases["B"]
    base_of = {sd: b for b, group in bases.items() for sd in group}
    model, params, design = _paper_b.train_networks(s, seeds, context)
    ref = theory.optimal_multistep_gd(design, n, L, jax.random.PRNGKey(seed), s.num_reference)
    steps = _paper_b.layer_steps(model, params)
    order = _paper_b.step_order(steps)
    per_seed = [jax.tree_util.tree_map(lambda a: a[i], params) for i in range(len(seeds))]
    attn = [[p["layers"][l]["attn"] for l in range(L)] for p in per_seed]
    overlap = {(i, l, k): depth.kept_overlap(attn[i][l]["Wq"], attn[i][l]["Wk"], k)
               for i in range(len(seeds)) for l in range(L) for k in ranks}
    trace = {(i, l, k): depth.kept_trace_ratio(attn[i][l]["Wq"], attn[i][l]["Wk"], k)
             for i in range(len(seeds)) for l in range(L) for k in ranks}
    val_keys = sweeps.stream_keys(seeds, _paper_b.VALIDATION_STREAM)
    test_keys = sweeps.stream_keys(seeds, _paper_b.TEST_STREAM)
    val_cands = ([pruning.Candidate(0, "attn", None)] + [pruning.Candidate(l, "attn", None, "delete") for l in range(L)]
                 + [pruning.Candidate(l, "attn", None, "scale", 2.0) for l in range(L)])
    rows, passed = [], None
    for setting, (test_design, test_n) in _paper_b.test_settings(s).items():
        oracle = ref if setting == "matched" else theory.optimal_multistep_gd(
            test_design, test_n, L, jax.random.PRNGKey(seed), s.num_reference)
        progress(f"  {setting}: the best scalar per layer on {s.num_val} validation prompts per seed")
        val, _ = pruning.evaluate_candidates(model, params, test_design, test_n, val_cands, val_keys, s.num_val)
        c_best = depth.best_scale(val[:, 1:1 + L], val[:, :1], val[:, 1 + L:]).best  # [seeds, L]
        cands = [_candidates(L, ranks, sd) for sd in seeds]
        networks = [[pruning.apply_candidate(p, c) for c in cs] + [depth.gd_network(oracle.step_sizes, d)]
                    for p, cs in zip(per_seed, cands)]
        progress(f"  {setting}: {len(networks[0])} networks x {len(seeds)} seeds on {s.num_test} test prompts each")
        risk, se = depth.evaluate_networks(model, networks, test_design, test_n, test_keys, s.num_test)
        if passed is None:  # the gate: matched test risk of the unpruned network against the best L-step GD
            passed = quality.gate(risk[:, 0], ref.risk, se=np.hypot(se[:, 0], ref.se))
        index = {(c.op, c.layer, c.rank): j for j, c in enumerate(cands[0]) if not c.unpruned}
        delete = np.stack([risk[:, index[("delete", l, None)]] for l in range(L)], axis=1)
        doubled = np.stack([risk[:, index[("scale", l, None)]] for l in range(L)], axis=1)
        scaled = depth.best_scale(delete, risk[:, :1], doubled).risk(c_best)  # exact on the test prompts
        for i, sd in enumerate(seeds):
            base = risk[i, 0]
            common = {"setting": setting, "base": base_of[sd], "seed": sd, "passed": bool(passed[i]),
                      "baseline": float(base), "baseline_se": float(se[i, 0]),
                      "layer1_step_order": int(order[i, 0])}

            def row(op, layer, rank, value, r, r_se, **extra):
                return {**common, "op": op, "layer": layer, "rank": rank, "value": value, "risk": float(r),
                        "se": r_se, "relative_change": float((r - base) / base), **extra}

            for l in range(L):
                held = {"step": float(steps[i, l]), "step_order": int(order[i, l]),
                        "delete_change": float((delete[i, l] - base) / base)}
                for op in RANKED:
                    for k in ranks:
                        j = index[(op, l, k)]
                        extra = {"overlap": overlap[i, l, k], "trace_ratio": trace[i, l, k]} if op == "svd" else {}
                        rows.append(row(op, l + 1, k, sd if op == "random" else None, risk[i, j], float(se[i, j]),
                                        **held, **extra))
                rows.append(row("delete", l + 1, None, 0.0, delete[i, l], float(se[i, index[("delete", l, None)]]),
                                **held))
                rows.append(row("scale", l + 1, None, float(c_best[i, l]), scaled[i, l], None, **held))
            rows.append(row("oracle", 0, None, None, risk[i, -1], float(se[i, -1]),
                            oracle_steps=" ".join(f"{g:.4f}" for g in oracle.step_sizes)))
    for r in rows:
        r["reference"] = ref.risk
    return rows


def _passing(rows, setting, base):
    return [r for r in rows if r["setting"] == setting and r["base"] == base and r["passed"]]


def per_seed_contrast(rows, setting, base, op) -> dict[int, float]:
    """Seed -> shallow minus deep: the mean relative change of ``op`` on layer 1 minus that on the deepest
    layer (averaged over the kept ranks for the ranked operations)."""
    sub = [r for r in _passing(rows, setting, base) if r["op"] == op]
    if not sub:
        return {}
    deepest = max(r["layer"] for r in sub)
    out = {}
    for sd in sorted({r["seed"] for r in sub}):
        mine = [r for r in sub if r["seed"] == sd]
        out[sd] = float(np.mean([r["relative_change"] for r in mine if r["layer"] == 1])
                        - np.mean([r["relative_change"] for r in mine if r["layer"] == deepest]))
    return out


def _median(values, supports_if_positive=True) -> dict:
    """Median, its exact order-statistic interval and coverage, and the verdict of per-seed values."""
    values = list(values)
    if len(values) < 1:
        return {"passing_seeds": 0, "verdict": "not resolved: no passing seed"}
    iv = quality.median_interval(values)
    return {"median": round(iv.median, 4),
            "interval": [quality.finite_or_none(iv.low), quality.finite_or_none(iv.high)],
            "coverage": round(iv.coverage, 4), "passing_seeds": iv.count,
            "sign_test_p": round(quality.sign_test(values), 4),
            "verdict": quality.median_verdict(values, supports_if_positive)}


def _by_base(rows, setting, values_of, supports_if_positive=True) -> dict:
    """{"A": ..., "B": ..., "verdict_A", "verdict_B", "verdict_across"} for per-seed values of each base."""
    out = {b: _median(values_of(b), supports_if_positive) for b in ("A", "B")}
    out.update({f"verdict_{b}": out[b]["verdict"] for b in ("A", "B")})
    out["verdict_across"] = quality.across_bases([out["A"]["verdict"], out["B"]["verdict"]])
    return out


def _median_or_none(values):
    return round(float(np.median(values)), 4) if values else None


def _correlation(x, y) -> float | None:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 3 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return round(float(np.corrcoef(x, y)[0, 1]), 3)


def summary(rows):
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    nets = {(r["base"], r["seed"]): r["passed"] for r in rows}
    out = {"networks_passed": sum(nets.values()), "networks_failed": len(nets) - sum(nets.values()),
           "failed_by_base": {b: sum(1 for (bb, _), ok in nets.items() if bb == b and not ok) for b in ("A", "B")},
           "reference_risk": round(rows[0]["reference"], 4)}
    out["claim_ii"] = {st: _by_base(rows, st, lambda b, st=st: per_seed_contrast(rows, st, b, "svd").values())
                       for st in settings}
    out["controls"] = {st: {op: _by_base(rows, st, lambda b, st=st, op=op: per_seed_contrast(rows, st, b, op).values())
                            for op in OPS if op != "svd"} for st in settings}
    # the relative change of every operation per layer and kept rank: [median base A, median base B]
    out["per_layer_median_A_B"] = {
        st: {op: {f"layer {l}": {("all" if k is None else f"rank {k}"): [
            _median_or_none([r["relative_change"] for r in _passing(rows, st, b)
                             if r["op"] == op and r["layer"] == l and r.get("rank") == k]) for b in ("A", "B")]
            for k in sorted({r.get("rank") for r in rows if r["op"] == op}, key=lambda k: -1 if k is None else k)}
            for l in sorted({r["layer"] for r in rows if r["op"] == op})} for op in OPS} for st in settings}
    # the oracle against the unpruned network (negative: re-tuned steps do better)
    out["oracle_relative_change"] = {
        st: {b: _median([r["relative_change"] for r in _passing(rows, st, b) if r["op"] == "oracle"])
             for b in ("A", "B")} for st in settings}
    mech = {}
    svd = [r for r in rows if r["op"] == "svd" and r["passed"] and r["setting"] == settings[0]]
    for k in sorted({r["rank"] for r in svd}):
        mine = [r for r in svd if r["rank"] == k]
        mech[f"rank{k}"] = {"overlap_median": round(float(np.median([r["overlap"] for r in mine])), 4),
                            "overlap_random_subspaces": round(k / (max(r["rank"] for r in svd) + 1), 4),
                            "trace_ratio_median": round(float(np.median([r["trace_ratio"] for r in mine])), 4)}
    mech["correlation_svd_vs_delete"] = {
        st: {f"rank{k}": {b: _correlation(*zip(*[(r["relative_change"], r["delete_change"])
                                                  for r in _passing(rows, st, b)
                                                  if r["op"] == "svd" and r["rank"] == k]))
                          for b in ("A", "B")} for k in (1, 2) if any(r["rank"] == k for r in svd)}
        for st in settings}
    layer1 = {}
    for b in ("A", "B"):
        held = {r["seed"]: r["layer1_step_order"] for r in _passing(rows, settings[0], b)}
        layer1[b] = {f"step {o}": sum(1 for v in held.values() if v == o) for o in sorted(set(held.values()))}
    mech["layer1_holds_step_rank_count"] = layer1
    out["mechanism"] = mech
    return out


def _short(verdict: str) -> str:
    return verdict.replace(" at this sample size", "").replace("unstable across seed bases", "unstable across bases")


def _plain_ticks(axis):
    """Log axis ticks as plain numbers (1.5, 2, 3), not 2 x 10^0; over more than a factor 10, majors at 1, 2, 5
    times powers of 10 and unlabelled minors (call after the data are drawn: it reads the axis limits)."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    low, high = axis.get_view_interval()
    wide = high / max(low, 1e-300) > 10
    if wide:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    for setter, labelled in ((axis.set_major_formatter, True), (axis.set_minor_formatter, not wide)):
        if labelled:
            fmt = ScalarFormatter()
            fmt.set_scientific(False)
            setter(fmt)
        else:
            setter(NullFormatter())


def _point_colours(orders, L):
    cmap = plotting.plt.get_cmap("viridis")
    return [cmap((o - 1) / max(L - 1, 1)) for o in orders]


def plot(rows, s):
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    L, d = s.layers, s.dim
    fig, axes = plotting.plt.subplots(3, len(settings), figsize=(5.2 * len(settings), 12.5), squeeze=False,
                                      constrained_layout=True)
    styles = {"svd": ("C0", "o", "-"), "product_svd": ("C1", "s", "--"), "random": ("C2", "^", ":"),
              "delete": ("C3", "x", "-."), "scale": ("C4", "d", "-.")}
    cmap = plotting.plt.get_cmap("viridis")
    summ = summary(rows)
    for j, st in enumerate(settings):
        ok = [r for r in rows if r["setting"] == st and r["passed"]]
        # row 1: risk ratio (operated / unpruned) per layer, median over seeds of both bases with its interval
        ax = axes[0, j]
        layers = np.arange(1, L + 1)
        for m, op in enumerate(OPS):
            colour, marker, ls = styles[op]
            ivs = [quality.median_interval([1 + np.mean([r["relative_change"] for r in ok
                                                         if r["op"] == op and r["layer"] == l and r["seed"] == sd
                                                         and (r.get("rank") in (1, None))])
                                            for sd in sorted({r["seed"] for r in ok})]) for l in layers]
            med = np.array([iv.median for iv in ivs])
            err = np.array([[iv.median - iv.low for iv in ivs], [iv.high - iv.median for iv in ivs]])
            err = np.where(np.isfinite(err), err, 0.0)
            ax.errorbar(layers + 0.07 * (m - 2), med, yerr=err, color=colour, marker=marker, ls=ls, capsize=2, ms=5,
                        label=f"{op}{' (rank 1)' if op in RANKED else ''}")
        orc = quality.median_interval([1 + r["relative_change"] for r in ok if r["op"] == "oracle"])
        ax.axhspan(orc.low if np.isfinite(orc.low) else orc.median, orc.high if np.isfinite(orc.high) else orc.median,
                   color="C5", alpha=0.25)
        ax.axhline(orc.median, color="C5", lw=1.2, label="oracle: best GD re-tuned for this test")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        _plain_ticks(ax.yaxis)
        ax.set_xticks(layers)
        ax.set_xlabel("operated layer")
        ax.set_ylabel("risk / unpruned risk (log)")
        ax.set_title(f"{st}: median over passing seeds of both bases", fontsize=9)
        ax.legend(fontsize=7)
        # row 2: per-seed shallow - deep contrast of svd and each control, coloured by the step layer 1 holds
        ax = axes[1, j]
        for m, op in enumerate(OPS):
            for b, dx, marker in (("A", -0.17, "o"), ("B", 0.17, "s")):
                vals = per_seed_contrast(rows, st, b, op)
                held = {r["seed"]: r["layer1_step_order"] for r in ok}
                x = m + dx + np.linspace(-0.08, 0.08, max(len(vals), 1))[:len(vals)]
                ax.scatter(x, list(vals.values()), c=_point_colours([held[sd] for sd in vals], L), marker=marker, s=16,
                           edgecolors="none")
                if vals:
                    iv = quality.median_interval(list(vals.values()))
                    lo = iv.low if np.isfinite(iv.low) else iv.median
                    hi = iv.high if np.isfinite(iv.high) else iv.median
                    ax.plot([m + dx - 0.12, m + dx + 0.12], [iv.median] * 2, color="k", lw=1.5)
                    ax.plot([m + dx] * 2, [lo, hi], color="k", lw=0.8)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(OPS)), [f"{op}" for op in OPS], fontsize=8)
        ax.set_ylabel("shallow - deep relative change, per seed")
        c = summ["claim_ii"][st]
        ax.set_title(f"svd: A {_short(c['verdict_A'])}, B {_short(c['verdict_B'])}: {_short(c['verdict_across'])}\n"
                     "o: base A, s: base B; bars: median, order-statistic interval", fontsize=8)
        # row 3: mechanism: pruning harm (rank 1) against the harm of deleting the layer's step
        ax = axes[2, j]
        pts = [r for r in ok if r["op"] == "svd" and r["rank"] == 1]
        ax.scatter([1 + r["delete_change"] for r in pts], [1 + r["relative_change"] for r in pts],
                   c=_point_colours([r["step_order"] for r in pts], L), s=14, edgecolors="none")
        lim = [min([1 + r["delete_change"] for r in pts] + [1 + r["relative_change"] for r in pts] + [1.0]),
               max([1 + r["delete_change"] for r in pts] + [1 + r["relative_change"] for r in pts] + [1.0])]
        ax.plot(lim, lim, color="k", lw=0.8, ls="--", label="pruning = deleting the step")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_ticks(ax.xaxis)
        _plain_ticks(ax.yaxis)
        ax.set_xlabel("risk ratio: delete the layer's step")
        ax.set_ylabel("risk ratio: SVD rank 1 of (Wq, Wk)")
        ax.set_title("colour: rank of the layer's step in its network (dark: shortest)", fontsize=8)
        ax.legend(fontsize=7)
    sm = plotting.plt.cm.ScalarMappable(cmap=cmap, norm=plotting.plt.Normalize(1, L))
    fig.colorbar(sm, ax=axes[1:, -1], label="step rank held (1 = shortest)", ticks=range(1, L + 1))
    fig.suptitle(f"Pruning one layer of a {L}-layer GD-form transformer (d = {d}, n = {s.n}), two seed bases x "
                 f"{s.seeds} seeds; {summ['networks_failed']} networks failed the gate "
                 f"(A {summ['failed_by_base']['A']}, "
                 f"B {summ['failed_by_base']['B']}) and are left out")
    return fig


@dataclasses.dataclass(frozen=True)
class Settings(_paper_b.Study):
    """Paper B's shared recipe and test settings (``_paper_b.Study``), the pruned ``ranks``, validation and
    test prompts, the reference's prompts."""

    ranks: tuple[int, ...] = (1, 2, 3, 4)
    num_val: int = 10_000
    num_test: int = 20_000
    num_reference: int = 200_000


SETTINGS = Settings()
QUICK = dataclasses.replace(SETTINGS, **_paper_b.QUICK, num_val=2_000, num_test=5_000, num_reference=20_000)

EXPERIMENT = Experiment(
    name="pruning_depth", title="Paper B (ii): pruning deep vs shallow layers, with controls and mechanism",
    settings=SETTINGS, quick=QUICK,
    run=run, plot=plot, summary=summary)
