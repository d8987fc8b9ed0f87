"""Paper B's claim (iii): its mutual-information generalisation bound over the implicit GD trajectory explains
which pruning hurts. Tested on the shared paper-B networks (experiments/_paper_b.py: GD-form L-layer linear
transformers, two independent seed bases), each gated against the best L-step GD; failures are counted and
left out.

For every passing network, every pruned network (each layer's Wq, Wk SVD-truncated to each kept rank below d;
the controls "delete", the layer's step removed, and "product_svd", its step matrix Gamma_l truncated itself)
is scored on the seed's own test prompts (paired with the unpruned network), and paper B's bound
(``bound.trajectory_bound``, docs/theory.md §6.2: Theorem 2, its Lemma 6 form, and Example 1's factor-norm
form) is computed on the same test setting. Per seed, Spearman's rank correlation across the pruned networks
between the bound and the measured relative risk change says whether the bound orders the harm; the claim
predicts a positive correlation. Per base: the median over seeds with its exact order-statistic interval
(``quality.median_interval``); 'supported' / 'contradicted' only where both bases agree
(``quality.across_bases``). The stand-in used before, sum_l ||Gamma_l||_2 of the pruned network, is reported the
same way."""

import dataclasses

import jax
import numpy as np

from iclsim import bound, plotting, pruning, quality, sweeps, theory
from iclsim.runner import Experiment

from ._paper_b import QUICK as _QUICK
from ._paper_b import (Study, TEST_STREAM, layer_steps, seed_bases, step_order,
                       test_settings, train_networks)

# fold_in(PRNGKey(network seed), BOUND_STREAM): the contexts the bound's expectation is taken over (each seed its
# own; every pruned network of a seed on the same contexts, so the bound's differences are paired)
BOUND_STREAM = sweeps.TEST_STREAM - 37
MEASURES = {"bound": "Theorem 2", "lemma_bound": "Lemma 6\n(g~ = 0)", "factor_bound": "Example 1\nfactor norms",
            "gamma_norm_sum": "stand-in\nsum ||Gamma_l||_2"}


def candidates(L: int, ranks) -> list:
    """The unpruned network first, then per layer: paper B's SVD truncation of Wq, Wk to each kept rank, the
    step-matrix truncation (product_svd) to each kept rank, and the deleted step."""
    out = [pruning.Candidate(0, "attn", None)]
    for l in range(L):
        out += [pruning.Candidate(l, "attn", k) for k in ranks]
        out += [pruning.Candidate(l, "attn", k, "product_svd") for k in ranks]
        out.append(pruning.Candidate(l, "attn", None, "delete"))
    return out


def run(s, seed, context):
    progress = context.progress
    d, n, L, ranks = s.dim, s.n, s.layers, list(s.ranks)
    if not all(isinstance(k, int) and 1 <= k < d for k in ranks):
        raise ValueError(f"ranks must be integers in [1, {d - 1}] (below the full rank d = {d}), got {ranks}")
    bases = seed_bases(seed, s.seeds)
    seeds = bases["A"] + bases["B"]
    base_of = {sd: b for b, group in bases.items() for sd in group}
    model, params, design = train_networks(s, seeds, context)
    ref = theory.optimal_multistep_gd(design, n, L, jax.random.PRNGKey(seed), s.num_reference)
    order = step_order(layer_steps(model, params))
    cands = candidates(L, ranks)
    networks = pruning.candidate_networks(params, cands)  # [seeds, cands]: built once, scored per setting
    stacked = jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[2:]), networks)
    gammas = np.asarray(jax.vmap(model.preconditioners)(stacked), np.float64)  # [seeds * cands, L, d, d]
    stand_in = np.linalg.norm(gammas, ord=2, axis=(2, 3)).sum(axis=1).reshape(len(seeds), len(cands))
    test_keys = sweeps.stream_keys(seeds, TEST_STREAM)
    bound_keys = np.repeat(sweeps.stream_keys(seeds, BOUND_STREAM), len(cands), axis=0)
    rows, passed = [], None
    for setting, (test_design, test_n) in test_settings(s).items():
        progress(f"  {setting}: {len(cands)} networks x {len(seeds)} seeds on {s.num_test} test prompts each")
        risk, se = pruning.evaluate_networks(model, networks, test_design, test_n, test_keys, s.num_test)
        if passed is None:  # the gate: matched test risk of the unpruned network against the best L-step GD
            passed = quality.gate(risk[:, 0], ref.risk, se=np.hypot(se[:, 0], ref.se))
        progress(f"  {setting}: paper B's bound of every network over {s.num_contexts} contexts per seed")
        b = bound.trajectory_bound(model, stacked, test_design, test_n, bound_keys, s.num_contexts)
        shape = (len(seeds), len(cands))
        values = {"bound": b.bound.reshape(shape), "lemma_bound": b.lemma_bound.reshape(shape),
                  "factor_bound": b.factor_bound.reshape(shape), "gamma_norm_sum": stand_in}
        terms = b.terms.reshape(shape + (L,))
        support = b.support.reshape(shape + (L,))
        for i, sd in enumerate(seeds):
            base = float(risk[i, 0])
            for j, c in enumerate(cands):
                row = {"setting": setting, "base": base_of[sd], "seed": sd, "passed": bool(passed[i]),
                       "op": "none" if c.unpruned else c.op, "layer": None if c.unpruned else c.layer + 1,
                       "rank": c.rank, "risk": float(risk[i, j]), "se": float(se[i, j]), "baseline": base,
                       "relative_change": float((risk[i, j] - base) / base),
                       "step_order": None if c.unpruned else int(order[i, c.layer]), "reference": ref.risk}
                for name, v in values.items():
                    row[name] = float(v[i, j])
                    row[name + "_change"] = float(v[i, j] - v[i, 0])
                row.update({f"term_{l + 1}": float(terms[i, j, l]) for l in range(L)})
                row.update({f"support_{l + 1}": int(support[i, j, l]) for l in range(L)})
                rows.append(row)
    return rows


def _ranks(x) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), 0-based."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson correlation of the average ranks); nan if either is constant."""
    rx, ry = _ranks(x), _ranks(y)
    if np.std(rx) == 0 or np.std(ry) == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def per_seed_correlations(rows, setting, base, measure, ops=None) -> dict[int, float]:
    """Seed -> Spearman's rho across that seed's pruned networks between ``measure`` and the measured relative
    risk change (passing seeds of ``base`` only; ``ops`` restricts the pruned networks)."""
    out = {}
    sub = [r for r in rows if r["setting"] == setting and r["base"] == base and r["passed"] and r["op"] != "none"
           and (ops is None or r["op"] in ops)]
    for sd in sorted({r["seed"] for r in sub}):
        mine = [r for r in sub if r["seed"] == sd]
        rho = spearman([r[measure] for r in mine], [r["relative_change"] for r in mine])
        if np.isfinite(rho):
            out[sd] = rho
    return out


def _base_summary(values) -> dict:
    if not values:
        return {"passing_seeds": 0, "verdict": "not resolved: no passing seed"}
    iv = quality.median_interval(values)
    return {"median": round(iv.median, 4), "median_interval": [quality.finite_or_none(iv.low),
                                                               quality.finite_or_none(iv.high)],
            "median_coverage": round(iv.coverage, 4), "passing_seeds": iv.count,
            "verdict": quality.median_verdict(values, supports_if_positive=True)}


def claim_iii(rows, ops=None) -> dict:
    """Per setting and measure: the median Spearman's rho over seeds with its order-statistic interval and the
    verdict on each base, and the verdict across bases."""
    out = {}
    for setting in dict.fromkeys(r["setting"] for r in rows):
        out[setting] = {}
        for measure in MEASURES:
            per_base = {b: _base_summary(list(per_seed_correlations(rows, setting, b, measure, ops).values()))
                        for b in ("A", "B")}
            out[setting][measure] = {**{f"base_{b}": v for b, v in per_base.items()},
                                     "across_bases": quality.across_bases([v["verdict"] for v in per_base.values()])}
    return out


def plot(rows, s):
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plotting.plt.subplots(2, len(settings), figsize=(4.8 * len(settings), 8.2), squeeze=False,
                                      constrained_layout=True)
    colours = {"svd": "C0", "product_svd": "C2", "delete": "C3"}
    labels = {"svd": "SVD of Wq, Wk (paper B)", "product_svd": "SVD of Gamma_l (control)",
              "delete": "layer's step deleted (control)"}
    for j, setting in enumerate(settings):
        ax = axes[0, j]
        sub = [r for r in rows if r["setting"] == setting and r["passed"] and r["op"] != "none"]
        for op, colour in colours.items():
            pts = [r for r in sub if r["op"] == op]
            ax.plot([r["bound_change"] for r in pts], [r["relative_change"] for r in pts], "o", ms=2.5,
                    alpha=0.5, color=colour, label=labels[op])
        ax.axhline(0, color="k", lw=0.8)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel("change in paper B's bound (Theorem 2, R = 1)")
        ax.set_ylabel("measured relative risk change (pruned - unpruned)")
        ax.set_title(f"{setting}: one point per pruned network and seed", fontsize=9)
        ax.legend(fontsize=7)
        ax = axes[1, j]
        for m, (measure, name) in enumerate(MEASURES.items()):
            for b, offset, marker in (("A", -0.15, "o"), ("B", 0.15, "s")):
                rho = list(per_seed_correlations(rows, setting, b, measure).values())
                if not rho:
                    continue
                x = m + offset
                ax.plot(np.full(len(rho), x) + np.linspace(-0.05, 0.05, len(rho)), rho, marker, ms=3, alpha=0.5,
                        color=f"C{m}")
                iv = quality.median_interval(rho)
                low = iv.low if np.isfinite(iv.low) else min(rho)
                high = iv.high if np.isfinite(iv.high) else max(rho)
                ax.errorbar([x], [iv.median], yerr=[[iv.median - low], [high - iv.median]], fmt="_", ms=14,
                            capsize=4, color="k")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylim(-1.05, 1.05)
        ax.set_xticks(range(len(MEASURES)), list(MEASURES.values()), fontsize=7)
        ax.set_ylabel("Spearman's rho per seed (measure vs harm)")
        coverage = quality.median_interval(np.zeros(max(1, s.seeds))).coverage
        ax.set_title("per-seed rho (left A, right B); black: median, order-statistic interval "
                     + (f"(coverage {coverage:.3f})" if coverage < 1 else "(too few seeds: [min, max])"), fontsize=8)
    seeds = {r["seed"]: r["passed"] for r in rows}
    failed = len(seeds) - sum(seeds.values())
    fig.suptitle(f"Does paper B's trajectory bound order the harm of pruning? {s.layers}-layer GD-form "
                 f"transformers (d = {s.dim}, n = {s.n}), 2 bases x {s.seeds} seeds; "
                 f"{failed} of {len(seeds)} networks failed the gate and are left out", fontsize=10)
    return fig


def summary(rows):
    seeds = {r["seed"]: r["passed"] for r in rows}
    per_setting = {}
    for setting in dict.fromkeys(r["setting"] for r in rows):
        sub = [r for r in rows if r["setting"] == setting and r["passed"]]
        per_setting[setting] = {op: {"median_bound_change": round(float(np.median([r["bound_change"] for r in sub
                                                                                    if r["op"] == op])), 4),
                                     "median_relative_change": round(float(np.median(
                                         [r["relative_change"] for r in sub if r["op"] == op])), 4)}
                                for op in ("svd", "product_svd", "delete") if any(r["op"] == op for r in sub)}
    return {"networks_passed": sum(seeds.values()), "networks_failed": len(seeds) - sum(seeds.values()),
            "reference_risk": round(rows[0]["reference"], 4), "claim_iii": claim_iii(rows),
            "claim_iii_svd_only": claim_iii(rows, ops=("svd",)), "by_operation": per_setting}


@dataclasses.dataclass(frozen=True)
class Settings(Study):
    """Paper B's shared recipe and test settings (``_paper_b.Study``), the pruned ``ranks``, test prompts,
    the contexts the bound is averaged over and the reference's prompts."""

    ranks: tuple[int, ...] = (1, 2, 3, 4)
    num_test: int = 20_000
    num_contexts: int = 256
    num_reference: int = 200_000


SETTINGS = Settings()
QUICK = dataclasses.replace(SETTINGS, **_QUICK, num_test=8_000, num_contexts=128, num_reference=20_000)

EXPERIMENT = Experiment(
    name="pruning_bound", title="Paper B: does the trajectory bound order the harm of pruning?",
    settings=SETTINGS, quick=QUICK,
    run=run, plot=plot, summary=summary)
