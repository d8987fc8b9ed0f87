"""Shared machinery of the experiments: train a sweep of models, score them on fresh prompts, and
set each beside its closed-form prediction as tidy rows (one row per model)."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import evaluate, theory, train
from iclsim._precision import float64
from iclsim.designs import IID
from iclsim.models import LinearAttention, LoRA, normalise_omega


@float64
def effective(model, params, n: int, n_max: int):
    """(W, omega or None) a trained model implements on prompts of n active pairs padded to n_max,
    in theory's convention (omega over the n active positions)."""
    eff = model.effective_pgd(params, n_max)
    if not isinstance(eff, tuple):
        return jnp.asarray(eff, jnp.float64), None
    W, omega = eff  # re-normalise omega over the n active positions (padded ones are untrained)
    return normalise_omega(jnp.asarray(W, jnp.float64), jnp.asarray(omega, jnp.float64)[n_max - n:])


@float64
def exact_risk(model, params, design, n: int, n_max: int, W=None, omega=None):
    """Closed-form risk of a trained model on prompts of n active pairs in n_max slots, or None where
    there is none. One-layer attention (and LoRA of it) on IID with scalar noise: the whole attention,
    ``theory.attention_risk`` of Q = Wq Wk^T n / n_max (S sums the n active pairs over n_max) and
    v = Wv[:, d+1]; otherwise L(W) of the effective (W, omega) (``effective``, or as given)."""
    base, p = (model.base, model.merged(params)) if isinstance(model, LoRA) else (model, params)
    if isinstance(base, LinearAttention) and isinstance(design, IID) and np.ndim(design.noise_var) == 0:
        p = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), p)
        return float(theory.attention_risk(design, n, p["Wq"] @ p["Wk"].T * (n / n_max), p["Wv"][:, -1]))
    if W is None:
        W, omega = effective(model, params, n, n_max)
    try:
        return float(theory.pgd_risk(design, n, W, omega))
    except TypeError:  # no closed form for general W on this design
        return None


@float64
def risk_curves(models: Mapping[str, tuple], designs: Mapping[str, object], ns: Sequence[int], seeds: Sequence[int],
                theory_risk: Callable, key, num_test: int, progress=print,
                optimum: Callable | None = None, extra: Callable | None = None) -> list[dict]:
    """Train every model on every design at every n and seed (one compiled program per model),
    score on ``num_test`` fresh prompts, and compare with theory.

    models: name -> (model, TrainConfig); designs: label -> design (same structure, stacked);
    theory_risk(design, n, model) -> L; optimum(design, n, model) -> (W*, ...) for the effective-W
    comparison (only for models with ``effective_pgd``); extra(model, W, omega, design, n) -> dict
    of more columns. Each row: design, model, n, seed, risk, se, theory, gap (relative), and where
    available exact_risk (closed-form risk of the trained model, ``exact_risk``) and w_rel
    (relative Frobenius distance to W*).
    """
    labels, design_list = list(designs), list(designs.values())
    n_max = max(ns)
    rows = []
    for name, (model, config) in models.items():
        progress(f"  training {name}: {len(design_list)} designs x {len(ns)} n x {len(seeds)} seeds, "
                 f"{config.steps} steps")
        fitted = train.fit_sweep(model, design_list, ns, seeds, config)
        risk, se = evaluate.evaluate_sweep(model, fitted.params, design_list, ns, key, num_test)
        for i, (label, design) in enumerate(zip(labels, design_list)):
            for j, n in enumerate(ns):
                L = float(theory_risk(design, n, model))
                for k, seed in enumerate(seeds):
                    row = {"design": label, "model": name, "n": n, "seed": seed, "risk": float(risk[i, j, k]),
                           "se": float(se[i, j, k]), "theory": L, "gap": (float(risk[i, j, k]) - L) / L,
                           "final_loss": float(np.mean(fitted.losses[i, j, k, -100:]))}
                    if hasattr(model, "effective_pgd"):
                        p = jax.tree_util.tree_map(lambda a: a[i, j, k], fitted.params)
                        W, omega = effective(model, p, n, n_max)
                        if optimum is not None:
                            W_star = optimum(design, n, model)[0]
                            row["w_rel"] = float(jnp.linalg.norm(W - W_star) / jnp.linalg.norm(W_star))
                        exact = exact_risk(model, p, design, n, n_max, W, omega)
                        if exact is not None:
                            row["exact_risk"] = exact
                        if extra is not None:
                            row.update(extra(model, W, omega, design, n))
                    rows.append(row)
    return rows


def worst(rows: list[dict], column: str) -> tuple[float, dict]:
    """The row with the largest |column| and that value."""
    best = max((r for r in rows if column in r), key=lambda r: abs(r[column]))
    return abs(best[column]), best


def worst_exact_gap(rows: list[dict]) -> float:
    """Largest |exact_risk - theory| / theory: the closed-form risk of the trained models against theory's."""
    return max(abs(r["exact_risk"] - r["theory"]) / r["theory"] for r in rows if "exact_risk" in r)


def correlated_experiment(name: str, title: str, make_design: Callable, approximation: Callable | None = None,
                          approximation_label: str = ""):
    """Paper A's correlated designs (THEORY 4) as an experiment: trained linear attention vs the exact
    optimum (dotted) and an optional approximation (dashed), risk vs n per alpha, and the effective
    sample-size gain n_eff / n, n_eff inverting the isotropic IID formula."""
    from iclsim import models, plotting
    from iclsim.runner import Experiment
    from iclsim.train import TrainConfig

    def run(s, seed, progress):
        d, seeds = s["dim"], [seed + k for k in range(s["seeds"])]
        designs = {f"alpha={a:g}": make_design(d, a, s["noise_var"]) for a in s["alphas"]}
        zoo = {"linear attention": (models.LinearAttention(d), TrainConfig(s["steps"], s["batch"], s["lr"]))}
        rows = risk_curves(zoo, designs, s["ns"], seeds, lambda des, n, m: theory.optimal_pgd(des, n)[1],
                           jax.random.PRNGKey(20_000 + seed), s["num_test"], progress,
                           optimum=lambda des, n, m: theory.optimal_pgd(des, n))
        for r in rows:
            design = designs[r["design"]]
            r["n_eff_ratio"] = float(theory.iid_effective_n(d, s["noise_var"], r["risk"])) / r["n"]
            r["n_eff_ratio_theory"] = float(theory.iid_effective_n(d, s["noise_var"], r["theory"])) / r["n"]
            if approximation is not None:
                r["approximation"] = float(approximation(design, r["n"]))
        return rows

    def plot(rows, s):
        fig, (ax1, ax2) = plotting.panels(2)
        plotting.curves(ax1, rows, group=("design",))
        if approximation is not None:
            for g, (xs, mean, _) in plotting.seed_stats(rows, "n", "approximation", ("design",)).items():
                ax1.plot(xs, mean, color="gray", ls=plotting.LINESTYLES["approximation"], lw=1)
            ax1.plot([], [], color="gray", ls="--", label=approximation_label)
        ax1.set_ylabel("test risk L")
        ax1.legend(fontsize=7)
        ax1.set_title("risk vs n (solid: trained linear attention, dotted: exact)")
        plotting.curves(ax2, rows, y="n_eff_ratio", theory="n_eff_ratio_theory", group=("design",))
        if approximation is not None:
            for g, (xs, mean, _) in plotting.seed_stats(rows, "n", "approximation", ("design",)).items():
                ax2.plot(xs, theory.iid_effective_n(s["dim"], s["noise_var"], mean) / xs, color="gray",
                         ls=plotting.LINESTYLES["approximation"], lw=1)
        ax2.set_ylabel("effective sample size / n")
        ax2.set_title("effective sample-size gain")
        ax2.legend(fontsize=7)
        fig.suptitle(f"{title} (d = {s['dim']}, noise variance {s['noise_var']})")
        return fig

    def summary(rows):
        gap, at = worst(rows, "gap")
        w, _ = worst(rows, "w_rel")
        return {"worst_risk_gap": round(gap, 4), "worst_gap_at": f"{at['design']} n={at['n']}",
                "worst_w_rel": round(w, 4)}

    return Experiment(
        name=name, title=title,
        settings={"dim": 10, "alphas": [0.0, 0.1, 0.2, 0.4], "ns": [1, 2, 5, 10, 20, 40], "noise_var": 0.0,
                  "seeds": 2, "steps": 2000, "batch": 512, "lr": 0.01, "num_test": 100_000},
        quick={"dim": 4, "alphas": [0.0, 0.4], "ns": [2, 8], "seeds": 1, "steps": 600, "lr": 0.03,
               "num_test": 20_000},
        run=run, plot=plot, summary=summary)


PRUNING_SETTINGS = ("matched", "noisier test labels", "other context length", "finite task pool")


def pruning_setup(s: dict, seeds, progress=print):
    """Paper B's four settings (THEORY 6) on a trained L-layer linear transformer: returns the model and,
    per setting, (trained params per seed, test design, test n). The first three share the model
    trained on IID prompts; the fourth is trained on a finite pool of tasks and tested on fresh tasks."""
    from iclsim import IID, TaskPool, models
    from iclsim.train import TrainConfig

    d, n = s["dim"], s["n"]
    model = models.LinearTransformer(d, s["layers"], mlp=s["mlp"])
    cfg = TrainConfig(s["steps"], s["batch"], s["lr"])
    base = IID(d, noise_var=s["noise_var"])
    trained = {}
    for name, design in [("iid", base), ("pool", TaskPool(d, s["num_tasks"], s["noise_var"]))]:
        progress(f"  training a {s['layers']}-layer linear transformer on {name} prompts ({len(seeds)} seeds)")
        fitted = train.fit_sweep(model, design, [n], seeds, cfg)
        trained[name] = [jax.tree_util.tree_map(lambda a: a[0, 0, k], fitted.params) for k in range(len(seeds))]
    settings = {
        "matched": (trained["iid"], base, n),
        "noisier test labels": (trained["iid"], IID(d, noise_var=s["test_noise_var"]), n),
        "other context length": (trained["iid"], base, s["test_n"]),
        "finite task pool": (trained["pool"], base, n),
    }
    return model, settings
