"""Paper B on one layer, where everything is exact: SVD-truncate the trained attention (Wq, Wk, Wv) to each
kept rank; the pruned model's risk is the closed-form risk of the whole pruned attention
(``theory.attention_risk`` of Q = Wq Wk^T and v = Wv[:, d+1]) beside its Monte Carlo test risk on the
seed's own test prompts (the unpruned and pruned networks of a seed share them), for test labels as noisy
as in training, noisier but below the threshold of docs/theory.md §6.1 (n + d + 1 + 2 s_train^2), and above
it, where truncation helps.

Reported per kept rank: the seed mean of the relative risk change with its 95% interval over seeds (never
the best seed), and the risk of predicting 0 (``theory.predict_zero_risk``, tr(Sx Sb) + s_test^2): for an
isotropic W, dropping directions helps exactly when the unpruned model is worse than that level
(``predict_zero_risk``'s docstring), which the trained, nearly isotropic attention is checked against."""

import dataclasses

import jax
import numpy as np

from iclsim import IID, bridge, models, plotting, pruning, quality, sweeps, theory, train
from iclsim.runner import Experiment
from iclsim.train import TrainConfig

TEST_KEY = sweeps.TEST_STREAM - 6  # fold_in(PRNGKey(seed), TEST_KEY): each seed's test prompts


def run(s, seed, context):
    progress = context.progress
    d, n = s.dim, s.n
    model = models.LinearAttention(d)
    train_design = IID(d, noise_var=s.noise_var)
    seeds = [seed + k for k in range(s.seeds)]
    progress(f"  training {len(seeds)} one-layer attentions")
    fitted = train.fit_sweep(model, train_design, [n], seeds, TrainConfig(s.steps, s.batch, s.lr),
                             cache=context.cache)
    params = jax.tree_util.tree_map(lambda a: a[0, 0], fitted.params)
    L_star = float(theory.optimal_pgd(train_design, n).risk)
    threshold = float(theory.noise_threshold(train_design, n)[0])
    candidates = [pruning.Candidate(0, "attn", None)] + [pruning.Candidate(0, "attn", k) for k in s.ranks]
    keys = sweeps.stream_keys(seeds, TEST_KEY)
    rows, passed = [], None
    for label, noise in [("matched", s.noise_var), ("noisier, below threshold", s.test_noise_var),
                         ("noisier, above threshold", s.high_noise_var)]:
        design = IID(d, noise_var=noise)
        zero = theory.predict_zero_risk(design)
        risk, se = pruning.evaluate_candidates(model, params, design, n, candidates, keys, s.num_test)
        if passed is None:
            passed = quality.gate(risk[:, 0], L_star, se=se[:, 0])
        for i, sd in enumerate(seeds):
            p = jax.tree_util.tree_map(lambda a: a[i], params)
            exact = [bridge.exact_risk(model, p if c.rank is None else pruning.prune(p, 0, "attn", rank=c.rank),
                                       design, n, n) for c in candidates]
            for j, c in enumerate(candidates):
                rows.append({"design": f"{label} (s^2 = {noise:g})", "model": "attention", "seed": sd,
                             "rank": d + 1 if c.rank is None else c.rank, "risk": float(risk[i, j]),
                             "se": float(se[i, j]), "theory": exact[j], "unpruned_theory": exact[0],
                             "unpruned_risk": float(risk[i, 0]),
                             "exact_change": (exact[j] - exact[0]) / exact[0],
                             "mc_change": float((risk[i, j] - risk[i, 0]) / risk[i, 0]),
                             "predict_zero": zero, "threshold": threshold, "passed": bool(passed[i])})
    return rows


def _designs(rows):
    return list(dict.fromkeys(r["design"] for r in rows))


def _interval(values) -> quality.Interval:
    """The t-interval over seeds; a lone seed is a point without bars."""
    if len(values) >= 2:
        return quality.seed_interval(values)
    v = float(values[0])
    return quality.Interval(v, v, v, 1)


def _bars(intervals):
    """Error bars [[below], [above]] of intervals around their means."""
    return [[iv.mean - iv.low for iv in intervals], [iv.high - iv.mean for iv in intervals]]


def plot(rows, s):
    designs = _designs(rows)
    ok = [r for r in rows if r["passed"]]
    ranks = sorted({r["rank"] for r in rows})
    fig, axes = plotting.plt.subplots(1, 1 + len(designs), figsize=(4.4 * (1 + len(designs)), 4.2),
                                      constrained_layout=True)
    ax = axes[0]
    for k, design in enumerate(designs):
        colour = f"C{k}"
        sub = [r for r in ok if r["design"] == design]
        mc = [_interval([r["risk"] for r in sub if r["rank"] == q]) for q in ranks]
        ax.errorbar(ranks, [iv.mean for iv in mc], yerr=_bars(mc),
                    fmt="o-", color=colour, ms=4, capsize=3, label=f"{design}: Monte Carlo, 95% interval over seeds")
        ax.plot(ranks, [np.mean([r["theory"] for r in sub if r["rank"] == q]) for q in ranks], ":", color=colour, lw=2,
                label="exact risk of the pruned attention (seed mean)" if k == 0 else None)
        ax.axhline(sub[0]["predict_zero"], color=colour, ls="-.", lw=1,
                   label="predicting 0: tr(Sx Sb) + s^2" if k == 0 else None)
        cax = axes[1 + k]
        for sd in sorted({r["seed"] for r in sub}):
            mine = sorted((r for r in sub if r["seed"] == sd), key=lambda r: r["rank"])
            cax.plot([r["rank"] for r in mine], [100 * r["exact_change"] for r in mine], "-", color=colour, lw=0.6,
                     alpha=0.4, label="one seed (exact)" if sd == sub[0]["seed"] else None)
        ex = [_interval([100 * r["exact_change"] for r in sub if r["rank"] == q]) for q in ranks]
        cax.errorbar(ranks, [iv.mean for iv in ex], yerr=_bars(ex),
                     fmt="s", color=colour, ms=4, capsize=3, label="seed mean, 95% interval")
        zero_change = [100 * (r["predict_zero"] - r["unpruned_theory"]) / r["unpruned_theory"]
                       for r in sub if r["rank"] == ranks[-1]]
        cax.axhline(np.mean(zero_change), color=colour, ls="-.", lw=1, label="predicting 0 (seed mean)")
        cax.axhline(0.0, color="k", ls=":", lw=1)
        cax.set_xticks(ranks)
        cax.set_xlabel(f"kept rank (of {s.dim + 1})")
        cax.set_ylabel("exact risk change vs unpruned, %")
        cax.set_title(design, fontsize=9)
        cax.legend(fontsize=6)
    ax.set_xticks(ranks)
    ax.set_yscale("log")
    ax.set_xlabel(f"kept rank of Wq, Wk, Wv (of {s.dim + 1})")
    ax.set_ylabel("test risk L (each seed's own prompts)")
    ax.legend(fontsize=6, loc="center", bbox_to_anchor=(0.5, 0.7))  # in the gap between the noisiest curve and the rest
    failed = len({r["seed"] for r in rows if not r["passed"]})
    ax.set_title(f"Pruning one-layer attention (d = {s.dim}, n = {s.n}; threshold "
                 f"{rows[0]['threshold']:.1f}); {failed} failed the gate", fontsize=9)
    return fig


def summary(rows):
    ok = [r for r in rows if r["passed"]]
    z = max(abs(r["risk"] - r["theory"]) / r["se"] for r in ok)
    out = {"networks_passed": len({r["seed"] for r in ok}),
           "networks_failed": len({r["seed"] for r in rows if not r["passed"]}), "max_z_mc_vs_exact": round(z, 2)}
    for design in _designs(rows):
        sub = [r for r in ok if r["design"] == design]
        seeds = sorted({r["seed"] for r in sub})
        ranks = sorted({r["rank"] for r in sub}, reverse=True)[1:]  # pruned ranks only
        unpruned = {sd: next(r["unpruned_theory"] for r in sub if r["seed"] == sd) for sd in seeds}
        zero = sub[0]["predict_zero"]
        helps = {sd: min(r["exact_change"] for r in sub if r["seed"] == sd and r["rank"] in ranks) < 0 for sd in seeds}
        per_rank = {}
        for q in ranks:
            ex = _interval([r["exact_change"] for r in sub if r["rank"] == q])
            mc = _interval([r["mc_change"] for r in sub if r["rank"] == q])
            per_rank[f"rank {q}"] = {"exact_change_mean": round(ex.mean, 5),
                                     "exact_ci95": [round(ex.low, 5), round(ex.high, 5)],
                                     "mc_change_mean": round(mc.mean, 5), "mc_ci95": [round(mc.low, 5), round(mc.high, 5)]}
        best = min(ranks, key=lambda q: per_rank[f"rank {q}"]["exact_change_mean"])
        un = _interval(list(unpruned.values()))
        out[design] = {"predict_zero_risk": round(zero, 4), "unpruned_exact_mean": round(un.mean, 4),
                       "unpruned_exact_ci95": [round(un.low, 4), round(un.high, 4)],
                       "seeds_worse_than_predicting_zero": sum(unpruned[sd] > zero for sd in seeds),
                       "seeds_where_truncation_helps": sum(helps.values()),
                       "isotropic_equivalence_holds_on_seeds": sum(helps[sd] == (unpruned[sd] > zero) for sd in seeds),
                       "seeds": len(seeds), "best_rank_by_seed_mean": best,
                       "best_rank_exact_change": per_rank[f"rank {best}"], "per_rank": per_rank}
    return out


@dataclasses.dataclass(frozen=True)
class Settings:
    """One-layer linear attention trained at ``noise_var`` and scored at the test noise levels, pruned to
    ``ranks``."""

    dim: int = 10
    n: int = 20
    noise_var: float = 0.1
    test_noise_var: float = 4.0
    high_noise_var: float = 60.0
    seeds: int = 8
    steps: int = 2000
    batch: int = 512
    lr: float = 0.01
    num_test: int = 100_000
    ranks: tuple[int, ...] = (9, 7, 5, 3, 1)


SETTINGS = Settings()
QUICK = dataclasses.replace(SETTINGS, dim=4, n=8, seeds=3, steps=600, lr=0.03, num_test=20_000, ranks=(3, 1),
                            high_noise_var=40.0)

EXPERIMENT = Experiment(
    name="pruning_one_layer", title="Paper B on one layer: exact vs empirical pruning curve",
    settings=SETTINGS, quick=QUICK,
    run=run, plot=plot, summary=summary)
