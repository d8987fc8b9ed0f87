"""Paper B's claim (ii), pruning deep layers is more stable than pruning shallow ones, on L-layer linear
transformers in the GD form (docs/theory.md §8) trained on every seed with the library's defaults.

Each network is gated against the best L-step GD (``theory.optimal_multistep_gd``); failures are counted
and left out of the claims. For every passing seed, each layer's attention (Wq, Wk) is SVD-truncated to
each kept rank, and the pruned network is scored on the same test prompts as the unpruned one (paired);
each seed has its own test prompts, so the intervals over seeds contain the variation of the prompt set.
The pre-registered contrast per setting is shallow minus deep: the relative risk change of pruning
layer 1, minus that of pruning layer L, averaged over the kept ranks below d; claim (ii) predicts it is
positive. Its t-interval over seeds and a sign test give the verdict. The per-layer term of paper B's
bound is taken as ||Gamma_l||_2, the composed preconditioner (invariant to the rescalings of Wq, Wk, w_v
that keep the function), and its rank correlation with the measured harm is reported."""

import jax
import numpy as np

from iclsim import IID, models, plotting, pruning, quality, sweeps, theory, train
from iclsim.runner import Experiment
from iclsim.train import TrainConfig

TEST_KEY = sweeps.TEST_STREAM - 1  # fold_in(PRNGKey(seed), TEST_KEY) for each network's seed: its test prompts


def settings_of(s):
    """The test settings: the trained network is scored on each (design, n)."""
    d = s["dim"]
    return {"matched": (IID(d, noise_var=s["noise_var"]), s["n"]),
            "noisier test labels": (IID(d, noise_var=s["test_noise_var"]), s["n"]),
            "shorter context": (IID(d, noise_var=s["noise_var"]), s["test_n"])}


def run(s, seed, progress):
    d, n, L = s["dim"], s["n"], s["layers"]
    seeds = [seed + k for k in range(s["seeds"])]
    model = models.LinearTransformer(d, L)
    design = IID(d, noise_var=s["noise_var"])
    progress(f"  training {len(seeds)} {L}-layer linear transformers (GD form), library defaults, {s['steps']} steps")
    fitted = train.fit_sweep(model, design, [n], seeds, TrainConfig(steps=s["steps"]))
    params = jax.tree_util.tree_map(lambda a: a[0, 0], fitted.params)  # [seeds, ...]
    ref = theory.optimal_multistep_gd(design, n, L, jax.random.PRNGKey(seed), s["num_reference"])
    candidates = [pruning.Candidate(0, "attn", None)] + [pruning.Candidate(l, "attn", k) for l in range(L)
                                                         for k in s["ranks"]]
    gammas = np.stack([np.asarray(model.preconditioners(jax.tree_util.tree_map(lambda a: a[i], params)))
                       for i in range(len(seeds))])  # [seeds, L, d, d]
    norms = np.linalg.norm(gammas, ord=2, axis=(2, 3))
    keys = sweeps.stream_keys(seeds, TEST_KEY)
    rows, passed = [], None
    for setting, (test_design, test_n) in settings_of(s).items():
        progress(f"  scoring {len(candidates)} pruned networks x {len(seeds)} seeds: {setting}")
        risk, se = pruning.evaluate_candidates(model, params, test_design, test_n, candidates, keys, s["num_test"])
        if passed is None:  # the gate: matched test risk against the best L-step GD
            passed = quality.gate(risk[:, 0], ref.risk, se=np.hypot(se[:, 0], ref.se))
        for i, sd in enumerate(seeds):
            for j, c in enumerate(candidates[1:], start=1):
                rows.append({"setting": setting, "seed": sd, "layer": c.layer + 1, "rank": c.rank,
                             "risk": float(risk[i, j]), "se": float(se[i, j]), "baseline": float(risk[i, 0]),
                             "delta": float(risk[i, j] - risk[i, 0]),
                             "relative_change": float((risk[i, j] - risk[i, 0]) / risk[i, 0]),
                             "gamma_norm": float(norms[i, c.layer]), "reference": ref.risk,
                             "matched_risk": None, "passed": bool(passed[i])})
    matched = {r["seed"]: r["baseline"] for r in rows if r["setting"] == "matched"}
    for r in rows:
        r["matched_risk"] = matched[r["seed"]]
    return rows


def contrasts(rows) -> dict:
    """Per setting: shallow-minus-deep contrast per passing seed (layer 1 against the deepest layer), its
    t-interval, the median with its order-statistic interval, a sign test and the verdict."""
    layers = max(r["layer"] for r in rows)
    out = {}
    for setting in dict.fromkeys(r["setting"] for r in rows):
        sub = [r for r in rows if r["setting"] == setting and r["passed"]]
        seeds = sorted({r["seed"] for r in sub})
        per_seed = []
        for sd in seeds:
            def harm(layer):
                return np.mean([r["relative_change"] for r in sub if r["seed"] == sd and r["layer"] == layer])
            per_seed.append(harm(1) - harm(layers))
        if len(per_seed) < 2:
            out[setting] = {"passing_seeds": len(per_seed), "verdict": "not resolved: fewer than 2 passing seeds"}
            continue
        iv = quality.seed_interval(per_seed)
        out[setting] = {"shallow_minus_deep": round(iv.mean, 4), "ci95": [round(iv.low, 4), round(iv.high, 4)],
                        **quality.median_summary(per_seed), "passing_seeds": iv.count,
                        "verdict": quality.verdict(iv, supports_if_positive=True),
                        "rank_correlation_gamma_norm_vs_harm": round(_spearman_by_seed(sub, seeds), 3)}
    return out


def _spearman_by_seed(sub, seeds) -> float:
    """Mean over seeds of Spearman's rho across layers between ||Gamma_l||_2 and the mean relative change."""
    rhos = []
    for sd in seeds:
        layers = sorted({r["layer"] for r in sub if r["seed"] == sd})
        g = [next(r["gamma_norm"] for r in sub if r["seed"] == sd and r["layer"] == l) for l in layers]
        h = [np.mean([r["relative_change"] for r in sub if r["seed"] == sd and r["layer"] == l]) for l in layers]
        rg, rh = np.argsort(np.argsort(g)), np.argsort(np.argsort(h))
        if np.std(rg) > 0 and np.std(rh) > 0:
            rhos.append(float(np.corrcoef(rg, rh)[0, 1]))
    return float(np.mean(rhos)) if rhos else float("nan")


def _interval(values) -> quality.Interval:
    """The t-interval over seeds; a lone seed is drawn as a point without bars."""
    if len(values) >= 2:
        return quality.seed_interval(values)
    v = float(values[0]) if values else float("nan")
    return quality.Interval(v, v, v, len(values))


def plot(rows, s):
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plotting.plt.subplots(2, len(settings), figsize=(4.6 * len(settings), 7.4), squeeze=False,
                                      constrained_layout=True)
    colours = plotting.plt.rcParams["axes.prop_cycle"].by_key()["color"]
    summary = contrasts(rows)
    for j, setting in enumerate(settings):
        ax = axes[0, j]
        sub = [r for r in rows if r["setting"] == setting and r["passed"]]
        for layer in range(1, s["layers"] + 1):
            ranks = sorted({r["rank"] for r in sub})
            ivs = [_interval([r["relative_change"] for r in sub if r["layer"] == layer and r["rank"] == k])
                   for k in ranks]
            mean = np.array([iv.mean for iv in ivs])
            err = np.array([[iv.mean - iv.low for iv in ivs], [iv.high - iv.mean for iv in ivs]])
            ax.errorbar(np.array(ranks) + 0.06 * (layer - (s["layers"] + 1) / 2), mean, yerr=err, marker="o", ms=4,
                        capsize=2, ls="-", color=colours[layer - 1], label=f"prune layer {layer}")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_xticks(sorted({r["rank"] for r in rows}))
        ax.set_xlabel(f"kept rank of Wq, Wk (of {s['dim']})")
        ax.set_ylabel("relative risk change (pruned - unpruned)")
        ax.set_title(setting, fontsize=10)
        ax.legend(fontsize=7)
        ax = axes[1, j]
        c = summary[setting]
        seeds = sorted({r["seed"] for r in sub})
        per_seed = [np.mean([r["relative_change"] for r in sub if r["seed"] == sd and r["layer"] == 1])
                    - np.mean([r["relative_change"] for r in sub if r["seed"] == sd and r["layer"] == s["layers"]])
                    for sd in seeds]
        ax.plot(range(len(per_seed)), per_seed, "o", color="C0", label="one seed")
        if "ci95" in c:
            ax.axhspan(*c["ci95"], color="C0", alpha=0.2, label="95% t-interval over seeds")
            ax.axhline(c["shallow_minus_deep"], color="C0")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_yscale("symlog", linthresh=0.01)
        ax.margins(y=0.08)  # symlog autoscaling put the extreme seeds on the frame
        ax.set_xticks(range(len(per_seed)), [str(sd) for sd in seeds])
        ax.set_xlabel("passing seed")
        ax.set_ylabel("shallow - deep (relative change)")
        ax.set_title(f"{c.get('verdict', '')}; sign test p = {c.get('sign_test_p', float('nan')):.3g}", fontsize=9)
        ax.legend(fontsize=7)
    failed = len({r["seed"] for r in rows if not r["passed"]})
    fig.suptitle(f"Pruning one layer of a {s['layers']}-layer linear transformer (d = {s['dim']}, n = {s['n']}); "
                 f"{failed} of {s['seeds']} networks failed the gate and are left out; bars: 95% intervals over seeds")
    return fig


def summary(rows):
    seeds = {r["seed"]: r["passed"] for r in rows}
    return {"networks_passed": sum(seeds.values()), "networks_failed": len(seeds) - sum(seeds.values()),
            "reference_risk": round(rows[0]["reference"], 4), "claim_ii": contrasts(rows)}


EXPERIMENT = Experiment(
    name="pruning_depth", title="Paper B: pruning deep vs shallow layers",
    settings={"dim": 5, "n": 20, "layers": 4, "noise_var": 0.1, "test_noise_var": 4.0, "test_n": 10, "seeds": 8,
              "steps": 4000, "ranks": [1, 2, 3, 4], "num_test": 100_000, "num_reference": 200_000},
    quick={"layers": 2, "seeds": 3, "steps": 500, "ranks": [1, 3], "num_test": 10_000, "num_reference": 20_000},
    run=run, plot=plot, summary=summary)
