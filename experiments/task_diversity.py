"""Pretraining task diversity (docs/theory.md §11): linear attention trained on a pool of M tasks
(``TaskPool``, fresh prompts from the pool at every step) against the Bayes predictor for the pool (dMMSE,
Raventos et al. 2023) and the Gaussian-prior posterior mean (ridge), as M grows.

On fresh tasks (the pool's prior N(0, I)) dMMSE tends to ridge as M grows; small pools make it predict a
pool task. The trained networks are set against both, and against their own class's optimum: the best
linear attention on the pool (``pretraining.fit_ridge`` on ``fit_prompts`` pool prompts, lambda -> 0: the
tau -> inf limit of docs/theory.md §12; exact error on fresh tasks) and, for M -> inf, the optimal one-step
PGD on Gaussian tasks (``theory.optimal_pgd``). A network passes its gate when its risk on the pool is
within 10% (+ 4 SE) of the class optimum's risk there; failures are counted and kept out of the claims.
All risks of one pool use one test key (paired prompts); the references' risks come from the Monte Carlo
referee in float64 with their SE."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import TaskPool, dmmse, evaluate, models, montecarlo, plotting, pretraining, quality, theory, train
from iclsim.runner import Experiment
from iclsim.sweeps import TEST_STREAM


def run(s, seed, context):
    progress = context.progress
    d, n, s2 = s.dim, s.n, s.noise_var
    seeds = [seed + k for k in range(s.seeds)]
    key = jax.random.fold_in(jax.random.PRNGKey(seed), TEST_STREAM)
    model = models.LinearAttention(d)
    config = train.TrainConfig(steps=s.steps, batch_size=s.batch, learning_rate=s.lr)
    pgd = float(theory.optimal_pgd(dmmse.gaussian_design(TaskPool(d, 1, noise_var=s2)), n).risk)
    pools = {M: TaskPool(d, M, noise_var=s2, pool_seed=seed) for M in s.pool_sizes}
    fresh = dmmse.gaussian_design(pools[s.pool_sizes[0]])  # the same N(0, I) tasks for every pool
    # the references on fresh tasks, one set of prompts for all: ridge (the same for every pool) and each dMMSE
    on_fresh = montecarlo.risks([dmmse.ridge_predict(fresh)] + [dmmse.dmmse_predict(pools[M]) for M in s.pool_sizes],
                                fresh, n, key, s.num_ref)
    rows = []
    for i, M in enumerate(s.pool_sizes):
        pool = pools[M]
        progress(f"  M = {M}: training {len(seeds)} networks, {s.steps} steps")
        fitted = train.fit_sweep(model, pool, [n], seeds, config, cache=context.cache)
        risk_pool, se_pool = evaluate.evaluate_sweep(model, fitted.params, pool, [n], key, s.num_test)
        risk_fresh, se_fresh = evaluate.evaluate_sweep(model, fitted.params, fresh, [n], key, s.num_test)
        with jax.enable_x64(True):
            gamma = pretraining.fit_ridge(pool.sample(jax.random.fold_in(key, M), s.fit_prompts, n, jnp.float64),
                                          s.fit_ridge)
            la = models.LinearAttention(d, dtype=jnp.float64)
            params = pretraining.attention_params(gamma, jnp.float64)
        # the pool references and the class optimum on one set of pool prompts
        dm_pool, ridge_pool, best_pool = montecarlo.risks(
            [dmmse.dmmse_predict(pool), dmmse.ridge_predict(pool), lambda p: la.apply(params, p)], pool, n, key,
            s.num_ref)
        refs = {}
        for name, dm, ridge in (("pool", dm_pool, ridge_pool), ("fresh", on_fresh[i + 1], on_fresh[0])):
            refs[f"dmmse_{name}"], refs[f"dmmse_{name}_se"] = dm
            refs[f"ridge_{name}"], refs[f"ridge_{name}_se"] = ridge
        best_fresh = float(pretraining.icl_error(gamma, n, s2 / d)) * d
        passed = quality.gate(risk_pool[0, 0], best_pool.mean, se=se_pool[0, 0])
        for k, sd in enumerate(seeds):
            rows.append({"M": M, "seed": sd, "risk_pool": float(risk_pool[0, 0, k]), "se_pool": float(se_pool[0, 0, k]),
                         "risk_fresh": float(risk_fresh[0, 0, k]), "se_fresh": float(se_fresh[0, 0, k]),
                         "passed": bool(passed[k]), "class_opt_pool": best_pool.mean, "class_opt_pool_se": best_pool.se,
                         "class_opt_fresh": best_fresh, "pgd_opt_fresh": pgd, **{k2: float(v) for k2, v in refs.items()}})
    return rows


def _passing(rows, M):
    return [r for r in rows if r["M"] == M and r["passed"]]


def summary(rows):
    out = {}
    for M in sorted({r["M"] for r in rows}):
        ok = _passing(rows, M)
        ref = next(r for r in rows if r["M"] == M)
        if len(ok) >= 2:
            iv = quality.seed_interval([r["risk_fresh"] for r in ok])
            gap = quality.seed_interval([(r["risk_pool"] - ref["class_opt_pool"]) / ref["class_opt_pool"] for r in ok])
            out[f"M={M}: trained fresh-task risk (95%)"] = [round(iv.low, 4), round(iv.high, 4)]
            out[f"M={M}: trained pool gap to class optimum (95%)"] = [round(gap.low, 4), round(gap.high, 4)]
        out[f"M={M}: dMMSE / ridge / class optimum on fresh tasks"] = [round(ref["dmmse_fresh"], 4),
                                                                       round(ref["ridge_fresh"], 4),
                                                                       round(ref["class_opt_fresh"], 4)]
        out[f"M={M}: dMMSE / ridge on the pool"] = [round(ref["dmmse_pool"], 4), round(ref["ridge_pool"], 4)]
    return out


def plot(rows, s):
    Ms = sorted({r["M"] for r in rows})
    first = [next(r for r in rows if r["M"] == M) for M in Ms]
    fig, axes = plotting.panels(2, width=5.2)
    for ax, where in zip(axes, ("fresh", "pool")):
        for name, style in (("dmmse", "s--"), ("ridge", "^--")):
            m = np.array([r[f"{name}_{where}"] for r in first])
            e = np.array([r[f"{name}_{where}_se"] for r in first])
            ax.errorbar(Ms, m, yerr=1.96 * e, fmt=style, ms=4, capsize=2,
                        label=f"{'dMMSE (Bayes on the pool)' if name == 'dmmse' else 'ridge (Bayes on N(0, I))'}")
        ax.plot(Ms, [r[f"class_opt_{where}"] for r in first], "k:", lw=1.5,
                label="best linear attention on the pool")
        if where == "fresh":
            ax.axhline(first[0]["pgd_opt_fresh"], color="grey", lw=1, ls="-.", label="optimal PGD, M = inf")
        ivs = [quality.seed_interval([r[f"risk_{where}"] for r in _passing(rows, M)])
               if len(_passing(rows, M)) >= 2 else None for M in Ms]
        xs = [M for M, iv in zip(Ms, ivs) if iv]
        mid = np.array([iv.mean for iv in ivs if iv])
        ax.errorbar(xs, mid, yerr=[mid - [iv.low for iv in ivs if iv], [iv.high for iv in ivs if iv] - mid], fmt="o-",
                    color="C3", capsize=3, label="trained linear attention (95% over passing seeds)")
        failed = [r for r in rows if not r["passed"]]
        if failed:
            ax.plot([r["M"] for r in failed], [r[f"risk_{where}"] for r in failed], "x", color="C3",
                    label=f"failed gate ({len(failed)})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("pool size M (tasks seen in pretraining)")
        ax.set_ylabel("test risk")
        ax.set_title(f"{'fresh tasks beta ~ N(0, I)' if where == 'fresh' else 'tasks from the pool'} "
                     f"(d = {s.dim}, n = {s.n}, s^2 = {s.noise_var:g})", fontsize=9)
        ax.legend(fontsize=6)
    return fig


@dataclasses.dataclass(frozen=True)
class Settings:
    """The pool design (d, n, label noise) and its sizes M; training of the networks (8 seeds share the pool);
    test prompts for the networks and the references; the closed-form class optimum (prompts, ridge)."""

    dim: int = 4
    n: int = 8
    noise_var: float = 0.25
    pool_sizes: tuple[int, ...] = (1, 4, 16, 64, 256, 1024)
    seeds: int = 8
    steps: int = 1500
    batch: int = 512
    lr: float = 0.01
    num_test: int = 20_000
    num_ref: int = 20_000
    fit_prompts: int = 20_000
    fit_ridge: float = 1e-3


SETTINGS = Settings()
QUICK = dataclasses.replace(SETTINGS, pool_sizes=(2, 64), seeds=2, steps=200, num_test=1_000, num_ref=1_000,
                            fit_prompts=2_000)

EXPERIMENT = Experiment(
    name="task_diversity",
    title="Raventos et al.: trained linear attention against dMMSE and ridge as the task pool grows",
    settings=SETTINGS, quick=QUICK, run=run, plot=plot, summary=summary)
