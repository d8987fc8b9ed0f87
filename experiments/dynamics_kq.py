"""Zhang, Singh, Latham & Saxe (ICML 2025): the loss of multi-head linear attention over training time, merged
against separate key-query (``iclsim.multihead``), trained by plain SGD (constant step, fresh prompts each
step, so time t = learning rate x step follows gradient flow), 8 seeds per run, with the theory of
``iclsim.dynamics`` overlaid (docs/theory.md, "Training dynamics"):

- merged KQ, aligned start on a white design: the closed-form logistic, one abrupt drop;
- separate KQ (rank one per head), aligned start: the scalar ODEs, one drop per principal component, at
  two init scales (drop times ~ 1 / (2 lam_i c_i u0): ordered by the eigenvalues, twice as late at u0 / 2),
  and on a second, steeper spectrum at the same u0 (c_i = lam_i here, so the later drops come later as
  1 / lam_i^2: the drops' dependence on the covariance's eigenvalues; ``summary``'s drop_ratio_by_spectrum);
- both with the authors' random start: the exact population gradient flow from each seed's own initial
  parameters (RK4), one head of rank one stopping at PCR with one component.

The curves are the engine's records (``TrainConfig.record_every``): the loss on each seed's fixed evaluation
set of ``record_prompts`` prompts every ``record_every`` steps; drop times are read from them. Plateau levels
are read from each step's loss on its fresh batch (an unbiased Monte Carlo estimate of the population loss
at that step's parameters) averaged over a window of ``window`` steps, its SE from the spread in the window
(a fixed evaluation set would carry the same error at every step). Plateau levels (the loss in the middle of
each plateau the theory predicts, the last at the end of the run) are compared with the closed-form PCR
risks L_k (``dynamics.pcr_risks``) in units of their Monte Carlo SE; drop times (the loss crossing the
midpoint between two plateau levels, ``dynamics.drop_times``) as a ratio to the theory's.
SGD is gradient flow's Euler scheme: in the merged model's exponential phase s grows by 1 + 4 b eta per step
against exp(4 b eta), so its drops come a few per cent late (about 4 b eta / log(1 + 4 b eta) - 1 of the
growth time); the separate model grows polynomially and is barely affected.
"""

import dataclasses

import jax
import numpy as np

from iclsim import IID, evaluate, models, plotting, quality, theory, train
from iclsim import dynamics as dy
from iclsim import multihead as mh
from iclsim.rng import Stream, seed_keys, stream_keys
from iclsim.registry import Experiment

RUNS = {  # name: (model kind, heads, start, init_scale, design, steps)
    "merged, 1 head, aligned": ("merged", 1, "aligned", 1e-3, "white", 300),
    "merged, 4 heads, aligned": ("merged", 4, "aligned", 1e-3, "white", 300),
    "merged, 4 heads, random": ("merged", 4, "random", 1e-2, "aniso", 600),
    "separate, 3 heads, aligned u0=0.1": ("separate", 3, "aligned", 0.1, "aniso", 1200),
    "separate, 3 heads, aligned u0=0.05": ("separate", 3, "aligned", 0.05, "aniso", 2200),
    "separate, 3 heads, aligned u0=0.1, steeper": ("separate", 3, "aligned", 0.1, "steeper", 2000),
    "separate, 1 head, random": ("separate", 1, "random", 0.5, "aniso", 1000),
    "separate, 3 heads, random": ("separate", 3, "random", 0.5, "aniso", 2200),
}


def designs(s):
    lam, steep = np.asarray(s.eigenvalues, np.float64), np.asarray(s.eigenvalues_steeper, np.float64)
    return {"aniso": IID(len(lam), cov_x=np.diag(lam), noise_var=s.noise_var),
            "white": IID(len(lam), cov_x=np.mean(lam) * np.eye(len(lam)), noise_var=s.noise_var),
            "steeper": IID(len(steep), cov_x=np.diag(steep), noise_var=s.noise_var)}


def build(kind, heads, start, scale, d):
    cls = mh.MergedAttention if kind == "merged" else mh.SeparateAttention
    return cls(d, heads=heads, init_scale=scale, start=start)


def effective_w(model, n):
    """A ``TrainConfig.summarize``: params -> the PGD matrix W the heads implement (``effective_pgd``), recorded
    so that a plateau's level can be read without Monte Carlo error (``theory.pgd_risk``)."""
    return lambda params: model.effective_pgd(params, n)[0]


def record_summary(model, n):
    """The ``TrainConfig.summarize`` of every run: the PGD matrix W (``effective_w``) and the parameters
    themselves, whose average over the last plateau is ``tail_average``'s network."""
    w = effective_w(model, n)
    return lambda params: {"W": w(params), "params": params}


def tail_average(records, mask):
    """Each seed's parameters averaged over its records where ``mask`` [seeds, R] is True (Polyak-Ruppert
    averaging of the SGD iterates on the last plateau): ``records`` has leaves [seeds, R, ...]; a seed with
    no record in its window gets its last record (the caller counts it apart). At a fixed point of gradient
    flow, SGD at a constant step size fluctuates around the minimiser with an excess loss of order the learning
    rate; the average over a window much longer than the fluctuations' correlation time sits at the minimiser,
    so its risk reads the level gradient flow reaches (docs/theory.md §13.3)."""
    m = np.asarray(mask, np.float64)
    m[m.sum(axis=1) == 0, -1] = 1.0
    weights = m / m.sum(axis=1, keepdims=True)
    return jax.tree_util.tree_map(
        lambda a: np.einsum("sr,sr...->s...", weights, np.asarray(a, np.float64)).astype(np.asarray(a).dtype), records)


def pgd_part(model, params, n):
    """The PGD predictor each network implements, as ``models.PGD`` parameters (its W is n times theory's):
    the network minus its terms outside the PGD form (x^T KQ[:d, :d] X^T X v[:d] / n and
    x^T KQ[:d, d] y^T y v[d] / n, zero on the subspace KQ[:d, d] = 0, v[:d] = 0 that gradient flow from the
    aligned start never leaves)."""
    W = jax.vmap(lambda p: model.effective_pgd(p, n)[0])(params)
    return models.PGD(model.dim, dtype=model.dtype), {"W": n * W}


def initial_params(model, seeds, steps):
    """Each seed's initial parameters as ``train.fit_sweep`` draws them (its first key of steps + 1), one compiled
    program."""
    return jax.jit(jax.vmap(lambda k: model.init(jax.random.split(k, steps + 1)[0])))(seed_keys(seeds))


def theory_curve(model, kind, start, design, n, params0, t_end, s):
    """[seeds or 1, T] theory loss on a grid of ``s.records`` + 1 times in [0, t_end] (``params0``: each seed's
    initial parameters, read from a random start only)."""
    if start == "aligned" and kind == "merged":
        times = np.linspace(0.0, t_end, s.records + 1)
        return times, dy.merged_time_course(design, n, times, model.heads, model.init_scale).loss[None]
    if start == "aligned":
        tc = dy.separate_kq_flow(design, n, t_end, model.heads, model.init_scale, s.records, s.dt)
        return tc.times, tc.loss[None]
    tc = dy.population_flow(model, design, n, params0, t_end, s.records, s.dt)
    return tc.times, tc.loss


def run(s, seed, context):
    if isinstance(s.tail_fraction, bool) or not 0 < s.tail_fraction <= 1:
        raise ValueError(f"tail_fraction must be a number in (0, 1] (the share of the run the last plateau's "
                         f"average may use), got {s.tail_fraction!r}")
    progress = context.progress
    n, lr, w = s.n, s.learning_rate, s.window
    seeds = [seed + k for k in range(s.seeds)]
    des = designs(s)
    rows = []
    for name in s.runs:
        kind, heads, start, scale, dname, steps = RUNS[name]
        steps = int(steps * s.step_factor)
        design = des[dname]
        model = build(kind, heads, start, scale, design.dim)
        progress(f"  {name}: {len(seeds)} seeds x {steps} SGD steps")
        fit = train.fit_sweep(model, design, [n], seeds, train.TrainConfig(
            steps=steps, batch_size=s.batch, learning_rate=lr, optimizer="sgd", record_every=s.record_every,
            record_prompts=s.record_prompts, summarize=record_summary(model, n)), cache=context.cache)
        # the PGD part's exact risk at every record (float64 closed form: no Monte Carlo error), one compiled program
        rec_w = np.asarray(fit.record.summaries["W"][0, 0], np.float64)  # [seeds, records, d, d]
        with jax.enable_x64(True):
            exact = np.asarray(jax.jit(jax.vmap(jax.vmap(lambda W: theory.pgd_risk(design, n, W))))(rec_w), np.float64)
        # at the end, paired on each seed's own fresh prompts: the network against the PGD predictor it implements
        final = jax.tree_util.tree_map(lambda a: a[0, 0], fit.params)
        keys = stream_keys(seeds, Stream.FINAL)
        # scored as build(kind, heads) with the default start: the prediction reads neither the start nor its scale,
        # so the runs of one kind and head count (and the tail average below) share one compiled evaluation program
        scorer = build(kind, heads, "random", 1.0, design.dim)
        full, full_se = evaluate.evaluate_sweep(scorer, fit.params, design, [n], keys, s.num_final)
        pgd, pgd_params = pgd_part(model, final, n)
        part, _ = evaluate.evaluate_sweep(pgd, jax.tree_util.tree_map(lambda a: a[None, None], pgd_params), design,
                                          [n], keys, s.num_final)
        losses = fit.losses[0, 0]  # [seeds, steps]: each step's fresh batch, for the plateau levels' SE
        rec_t, rec = lr * np.asarray(fit.record.steps, np.float64), np.asarray(fit.record.loss[0, 0], np.float64)
        blocks = losses[:, : steps // w * w].reshape(len(seeds), steps // w, w)
        t = lr * (np.arange(steps // w) * w + (w - 1) / 2)
        params0 = initial_params(model, seeds, steps) if start == "random" else None  # the aligned theory needs none
        times, th = theory_curve(model, kind, start, design, n, params0, lr * steps, s)
        levels = dy.pcr_risks(design, n).risks
        ladder = levels[[0, -1]] if kind == "merged" else levels[: min(heads, design.dim) + 1]
        # the last plateau's level from the iterates' average over the last tail_fraction of the run, each seed's
        # window cut to the records where its theory curve is on that plateau (within 1% of the ladder's span),
        # scored on the same fresh prompts as the final network (paired)
        th_rec = np.stack([np.interp(rec_t, times, th[min(k, len(th) - 1)]) for k in range(len(seeds))])
        window = (np.asarray(fit.record.steps)[None] >= steps * (1 - s.tail_fraction)) \
            & (np.abs(th_rec - ladder[-1]) <= 0.01 * float(ladder[0] - ladder[-1]))
        tail = tail_average(jax.tree_util.tree_map(lambda a: a[0, 0], fit.record.summaries["params"]), window)
        # scored apart from the final network (two draws of the same prompts; since SharedGramPrompts one
        # evaluation of both would cost about the same per network: docs/performance.md §2.16)
        tail_risk, tail_se = evaluate.evaluate_sweep(scorer, jax.tree_util.tree_map(lambda a: a[None, None], tail),
                                                     design, [n], keys, s.num_final)
        comps = [0, design.dim] if kind == "merged" else list(range(len(ladder)))
        sp = dy.spectrum(design, n)  # separate KQ, aligned: drop j near 1 / (2 lam_j c_j u0) for small u0
        small_init = 1 / (2 * sp.lam * sp.c * scale) if (kind, start) == ("separate", "aligned") else None
        spectrum = "/".join(f"{x:g}" for x in np.diag(np.asarray(design.cov_x)))
        for k, sd in enumerate(seeds):
            th_k = th[min(k, len(th) - 1)]
            theory_k = np.interp(t, times, th_k)
            for j in range(len(rec_t)):  # the record: the loss on the seed's fixed evaluation set
                rows.append({"kind": "curve", "run": name, "seed": sd, "t": float(rec_t[j]), "loss": float(rec[k, j]),
                             "theory": float(np.interp(rec_t[j], times, th_k)), "exact_pgd": float(exact[k, j])})
            rows.append({"kind": "final", "run": name, "seed": sd, "pcr_risk": float(ladder[-1]),
                         "risk": float(full[0, 0, k]), "se": float(full_se[0, 0, k]), "pgd_part": float(part[0, 0, k]),
                         "exact_pgd": float(exact[k, -1]),
                         "non_pgd_cost": float((full[0, 0, k] - part[0, 0, k]) / ladder[-1]),
                         "tail_records": int(window[k].sum()), "tail_risk": float(tail_risk[0, 0, k]),
                         "tail_se": float(tail_se[0, 0, k]),
                         "tail_z": float((tail_risk[0, 0, k] - ladder[-1]) / tail_se[0, 0, k])})
            drops_theory = dy.drop_times(times, th_k, ladder)
            drops = dy.drop_times(rec_t, rec[k], ladder)
            for j, (dt_, dth) in enumerate(zip(drops, drops_theory)):
                rows.append({"kind": "drop", "run": name, "seed": sd, "drop": j + 1, "spectrum": spectrum,
                             "t_trained": float(dt_), "t_theory": float(dth), "ratio": float(dt_ / dth),
                             "t_small_init": float(small_init[j]) if small_init is not None else float("nan")})
            # plateau j: the window nearest the middle (geometric) of its stretch in the theory curve, the
            # last plateau at the end of the run; on_plateau: the theory curve itself is there within 1% of
            # the ladder's span (a random start can leave L_0 before the first window)
            edges = np.concatenate([[t[0]], drops_theory, [t[-1]]])
            span = float(ladder[0] - ladder[-1])
            for j in range(len(ladder)):
                lo, hi = edges[j], edges[j + 1]
                if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
                    continue  # the theory does not reach this plateau within the run
                i = len(t) - 1 if j == len(ladder) - 1 else int(np.argmin(np.abs(t - np.sqrt(lo * hi))))
                mean, se = float(blocks[k, i].mean()), float(blocks[k, i].std(ddof=1) / np.sqrt(w))
                near = int(np.argmin(np.abs(rec_t - t[i])))  # the record nearest the window's middle
                rows.append({"kind": "plateau", "run": name, "seed": sd, "components": comps[j], "t": float(t[i]),
                             "loss": mean, "se": se, "pcr_risk": float(ladder[j]), "theory": float(theory_k[i]),
                             "exact_pgd": float(exact[k, near]), "exact_pgd_gap": float(exact[k, near] / ladder[j] - 1),
                             "exact_theory_gap": float(exact[k, near] / np.interp(rec_t[near], times, th_k) - 1),
                             "on_plateau": bool(abs(theory_k[i] - ladder[j]) <= 0.01 * span),
                             "z": (mean - float(ladder[j])) / se})
    return rows


def plot(rows, s):
    names = list(dict.fromkeys(r["run"] for r in rows))
    fig, axes = plotting.plt.subplots(2, (len(names) + 2) // 2, figsize=(4.2 * ((len(names) + 2) // 2), 7.2),
                                      constrained_layout=True, squeeze=False)
    axes = axes.ravel()
    for ax, name in zip(axes, names):
        curves = [r for r in rows if r["kind"] == "curve" and r["run"] == name]
        seeds = sorted({r["seed"] for r in curves})
        for k, sd in enumerate(seeds):
            c = [r for r in curves if r["seed"] == sd]
            ax.plot([r["t"] for r in c], [r["loss"] for r in c], color="C0", alpha=0.35, lw=0.8,
                    label="trained (SGD), one line per seed" if k == 0 else None)
            ax.plot([r["t"] for r in c], [r["theory"] for r in c], color="k", ls="--", lw=0.8,
                    label="theory (closed form / ODE / population flow)" if k == 0 else None)
        if RUNS[name][2] == "aligned":  # one theory curve for every seed: their PGD parts' mean is comparable to it
            by_t = {}
            for r in curves:
                by_t.setdefault(r["t"], []).append(r["exact_pgd"])
            ts = sorted(by_t)
            ax.plot(ts, [np.mean(by_t[x]) for x in ts], color="C2", lw=1.0,
                    label="the networks' PGD parts, exact risk (mean over seeds)")
        finals = [r for r in rows if r["kind"] == "final" and r["run"] == name and r.get("tail_records", 0) > 0]
        if finals and curves:  # the last plateau from the iterates' tail average, one marker per seed at the end
            ax.errorbar([curves[-1]["t"]] * len(finals), [r["tail_risk"] for r in finals],
                        yerr=[2 * r["tail_se"] for r in finals], fmt="x", color="C1", ms=4, lw=0.8,
                        label="last plateau: iterates averaged over its window (fresh prompts, 2 SE)")
        plateaus = [r for r in rows if r["kind"] == "plateau" and r["run"] == name]
        for level in sorted({r["pcr_risk"] for r in plateaus}):
            ax.axhline(level, color="C3", lw=0.6, ls=":")
        ax.plot([], [], color="C3", ls=":", label="PCR risks L_k (closed form)")
        ratios = [r["ratio"] for r in rows if r["kind"] == "drop" and r["run"] == name and np.isfinite(r["ratio"])]
        ax.set_title(f"{name}\ndrop time trained/theory: {np.median(ratios):.2f} (median)" if ratios else name,
                     fontsize=8)
        ax.set_xlabel("time t = learning rate x step")
        ax.set_ylabel("loss on each seed's fixed evaluation set")
        ax.legend(fontsize=6)
    drops = [r for r in rows if r["kind"] == "drop" and np.isfinite(r["ratio"])]
    if len(axes) > len(names) and drops:  # every drop time at a glance: trained against theory
        ax = axes[len(names)]
        for c, name in enumerate(names):
            sub = [r for r in drops if r["run"] == name]
            ax.loglog([r["t_theory"] for r in sub], [r["t_trained"] for r in sub], "o", ms=3, color=f"C{c}",
                      alpha=0.7, label=name)
        lim = [min(r["t_theory"] for r in drops) / 1.3, max(r["t_theory"] for r in drops) * 1.3]
        ax.plot(lim, lim, "k:", lw=0.8, label="trained = theory")
        ax.set_xlabel("drop time, theory")
        ax.set_ylabel("drop time, trained (loss crosses the mid level)")
        ax.set_title("every drop of every seed", fontsize=8)
        ax.legend(fontsize=5)
    for ax in axes[len(names) + 1:]:
        ax.axis("off")
    fig.suptitle(f"Linear attention over training: merged vs separate key-query (d = {len(s.eigenvalues)}, "
                 f"n = {s.n}, eigenvalues {s.eigenvalues}; steeper {s.eigenvalues_steeper}, {s.seeds} seeds)\ncurves: each seed's fixed "
                 f"evaluation set of {s.record_prompts} prompts, which carries its own Monte Carlo offset at every "
                 "step; plateau levels are read from fresh batches (summary)", fontsize=10)
    return fig


def summary(rows):
    out = {}
    for name in dict.fromkeys(r["run"] for r in rows):
        drops = [r for r in rows if r["kind"] == "drop" and r["run"] == name]
        plats = [r for r in rows if r["kind"] == "plateau" and r["run"] == name]
        entry = {"spectrum": drops[0]["spectrum"]} if drops else {}
        for j in sorted({r["drop"] for r in drops}):
            ratios = [r["ratio"] for r in drops if r["drop"] == j]
            ok = [x for x in ratios if np.isfinite(x)]
            iv = quality.seed_interval(ok) if len(ok) >= 2 else None
            entry[f"drop{j}_ratio_mean_ci95"] = [round(iv.mean, 3), round(iv.low, 3), round(iv.high, 3)] if iv else None
            entry[f"drop{j}_ratio_range"] = [round(min(ok), 3), round(max(ok), 3)] if ok else None
            entry[f"drop{j}_missed"] = len(ratios) - len(ok)
            entry[f"drop{j}_t_theory_median"] = round(float(np.median([r["t_theory"] for r in drops if r["drop"] == j])), 3)
            small = [r["t_small_init"] for r in drops if r["drop"] == j and np.isfinite(r["t_small_init"])]
            if small:
                entry[f"drop{j}_t_small_init"] = round(small[0], 3)
        for c in sorted({r["components"] for r in plats}):
            sub = [r for r in plats if r["components"] == c]
            on = [r for r in sub if r["on_plateau"]]
            pooled = (np.mean([r["loss"] for r in on]) - sub[0]["pcr_risk"]) / np.sqrt(sum(r["se"] ** 2 for r in on)) \
                * len(on) if on else None
            entry[f"plateau_k{c}"] = {"pcr_risk": round(sub[0]["pcr_risk"], 5),
                                      "trained_mean": round(float(np.mean([r["loss"] for r in on])), 5) if on else None,
                                      "max_abs_z": round(max(abs(r["z"]) for r in on), 2) if on else None,
                                      "pooled_z": round(float(pooled), 2) if on else None,
                                      "seeds_off_plateau": len(sub) - len(on),
                                      "exact_pgd_gap_mean_range": _mean_range([r["exact_pgd_gap"] for r in on]),
                                      "exact_theory_gap_mean_range": _mean_range([r["exact_theory_gap"] for r in on]),
                                      "theory_curve_there": round(float(np.mean([r["theory"] for r in sub])), 5)}
        finals = [r for r in rows if r["kind"] == "final" and r["run"] == name]
        if finals:
            entry["final_non_pgd_cost_mean_range"] = _mean_range([r["non_pgd_cost"] for r in finals])
            entry["final_risk_gap_mean_range"] = _mean_range([r["risk"] / r["pcr_risk"] - 1 for r in finals])
            tails = [r for r in finals if r["tail_records"] > 0]
            entry["last_plateau_tail_average"] = {
                "gap_mean_range": _mean_range([r["tail_risk"] / r["pcr_risk"] - 1 for r in tails]),
                "max_abs_z": round(max(abs(r["tail_z"]) for r in tails), 2) if tails else None,
                "pooled_z": round(float(sum(r["tail_risk"] - r["pcr_risk"] for r in tails)
                                        / np.sqrt(sum(r["tail_se"] ** 2 for r in tails))), 2) if tails else None,
                "records_min": min(r["tail_records"] for r in tails) if tails else None,
                "seeds_without_window": len(finals) - len(tails)}
        out[name] = entry
    # the drops' dependence on the covariance's eigenvalues: per spectrum (Sx's diagonal), each run's mean
    # drop time trained / theory, drop by drop (missed drops left out and counted above)
    by_spectrum = {}
    for name, entry in out.items():
        if "spectrum" in entry:
            means = [entry[f"drop{j}_ratio_mean_ci95"] for j in range(1, 4) if f"drop{j}_ratio_mean_ci95" in entry]
            by_spectrum.setdefault(entry["spectrum"], {})[name] = [m[0] if m else None for m in means]
    out["drop_ratio_by_spectrum"] = by_spectrum
    return out


def _mean_range(values):
    """[mean, min, max] of per-seed values (5 decimals), or None."""
    return [round(float(np.mean(values)), 5), round(float(np.min(values)), 5), round(float(np.max(values)), 5)] \
        if values else None


@dataclasses.dataclass(frozen=True)
class Settings:
    eigenvalues: tuple[float, ...] = (1.0, 0.6, 0.35)  # the feature covariance's spectrum (the aniso design)
    eigenvalues_steeper: tuple[float, ...] = (1.0, 0.5, 0.25)  # a steeper one (the steeper design): later drops
    noise_var: float = 0.0
    n: int = 20
    seeds: int = 8
    batch: int = 512
    learning_rate: float = 0.05
    window: int = 20
    step_factor: float = 1.0
    records: int = 800
    dt: float = 0.025
    record_every: int = 4
    record_prompts: int = 2048
    num_final: int = 200_000  # fresh prompts per seed for the final paired comparison
    tail_fraction: float = 0.25  # the last plateau's averaging window: at most this share of the run
    runs: tuple[str, ...] = tuple(RUNS)

EXPERIMENT = Experiment(
    name="dynamics_kq", title="Training dynamics: merged vs separate key-query linear attention",
    settings=Settings(), quick=dataclasses.replace(Settings(), seeds=2, batch=128, records=200, dt=0.1, record_prompts=512, num_final=20_000,
                              runs=("separate, 3 heads, aligned u0=0.1",)),
    run=run, plot=plot, summary=summary)
