"""Finite pretraining data (docs/theory.md §12): the ICL error of linear attention fitted by ridge regression on
P = tau d^2 prompts from k = kappa d tasks, against Lu et al.'s asymptotic curve (d -> inf at fixed alpha,
kappa, tau) and against its own exact finite-d error.

Each seed draws its own pool of tasks (``TaskPool``; ``fresh_tasks``: also kappa = inf, a fresh task per prompt) and its own
pretraining prompts; the fit is the closed form ``pretraining.fit_ridge`` (a vmapped program over seeds, one
per d and kappa, the tau sweep masking a shared set of prompts) and its error the exact finite-d formula
``pretraining.icl_error`` (``theory.attention_risk``, no sampling error). At the largest d the fits of seed 0
are also scored on fresh prompts by the Monte Carlo referee (the finite-d formula checked, z in the rows).
The finite-d correction is measured, not assumed: at each tau the seed means over d = dims are fitted by
a + b/d (weighted least squares) and the intercept a, with its 95% interval, is set against the asymptote.
The double-descent peak: per seed, the tau of the largest error on a fine grid around tau = 1, with its
interval over seeds, per d and extrapolated in 1/d the same way. The closed-form fits need no quality gate
(none can fail to converge).

Trained networks: at every d in ``train_dims`` (by default all of dims) on fresh tasks and on each seed's own pool
at every kappa in ``train_kappas`` (the pool of that seed's closed-form fits at that d), for each tau in
``train_taus`` (spanning the peak), the reduced attention ``pretraining.ReducedAttention`` is trained by full-batch
heavy-ball gradient descent on each seed's stored set of P prompts (``TrainConfig(pretraining_prompts=P,
batch_size=P, optimizer="sgd", momentum=..)``) with the loss ``pretraining.ridge_objective``, fit_ridge's objective
with its penalty, so the optimum is the ridge solution on that set. The objective is a quadratic with Hessian 2A
(A = H^T H / P + (ridge/d) I) whose spectrum on the span is known exactly (``pretraining.span_spectrum``), so
Polyak's step and momentum are tuned from it (``pretraining.heavy_ball``), one pair per (kappa, d, tau) over all its
seeds: L = 2 max_seeds lambda_max(A) / ``step_fraction``, mu = 2 min_seeds lambda_min(A) on the span; a row's
``gd_bound`` is heavy ball's predicted ||Gamma - Gamma*|| / ||Gamma*|| after ``train_steps`` on its seed's spectrum
(``pretraining.heavy_ball_bound``, docs/theory.md §12). Each network
is paired with ``fit_ridge`` on its own stored set (``pretraining.stored_prompts``, the trainer's draw, not the
curve's nested draw) and both are scored by the exact finite-d formula; the gate passes a network whose Gamma is
within ``gate_tolerance`` (relative Frobenius) of its ridge solution, failures counted and shown, never averaged
in. The passers' seed means are set against the closed-form curve at their d and, at |tau - 1| >= 0.5, fitted over
train_dims by a + b/d as the closed-form means are: the intercept's interval against the asymptote puts the trained
networks on Lu et al.'s curve with its finite-d correction measured."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import TaskPool, asymptotics, designs, models, montecarlo, plotting, pretraining, quality, theory, train
from iclsim.rng import draw_many, normals
from iclsim.runner import Experiment, RunError

from ._tau_rows import by, extrapolate, seed_stats, trained_intercept, trained_summary


def _design(d, kappa, rho, pool_seed):
    if kappa is None:
        return pretraining.lu_design(d, rho)
    return TaskPool(d, max(1, int(round(kappa * d))), noise_var=d * rho, pool_seed=pool_seed)


# one compiled fit per shape, shared by every kappa and grid (vmapped over seeds; the count is traced)
_FIT = jax.jit(jax.vmap(pretraining.fit_ridge, in_axes=(0, None, None)))
_FEATURES = jax.jit(jax.vmap(pretraining.features))


@functools.lru_cache(maxsize=None)
def _errors_program(d, n, rho):
    """jit(vmap) of the exact finite-d ICL error over a batch of fitted Gammas (one per d, n, rho)."""
    design = pretraining.lu_design(d, rho)

    def one(g):
        Q, v = pretraining.attention_form(g)
        return theory.attention_risk(design, n, Q, v) / d

    return jax.jit(jax.vmap(one))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _draws(design, key, count, n):
    """The draws of ``design.sample(key, count, n, float64)`` (``IID`` or ``TaskPool``) before its labels, as one
    compiled program per design kind and shape: (X, x, beta, label noise, query noise)."""
    d, f64 = design.dim, jnp.float64
    if isinstance(design, TaskPool):
        (gX, x, gn, gq), (u,), _ = draw_many(key, f64, [(count, n, d), (count, d), (count, n), (count, 1)], [(count,)])
        return gX, x, design._task(u, f64), gn, gq
    gb, gX, gx, gn, gq = normals(key, f64, (count, d), (count, n, d), (count, d), (count, n), (count, 1))
    lx = jnp.linalg.cholesky(jnp.asarray(design.cov_x, f64))
    return gX @ lx.T, gx @ lx.T, gb @ jnp.linalg.cholesky(jnp.asarray(design.cov_beta, f64)).T, gn, gq


def _sample(design, key, count, n):
    """``design.sample(key, count, n, float64)`` bit for bit: the draws compiled once (``_draws``), the labels by
    ``designs``' own arithmetic op by op, as ``sample`` runs outside jit (compiled with the draws, the labels'
    multiply-add would be fused and round differently)."""
    X, x, beta, gn, gq = _draws(design, key, count, n)
    query_noise_var = design.noise_var if isinstance(design, TaskPool) else design.query_noise_var
    return designs._prompts(X, x, beta, beta, gn, gq, design.noise_var, query_noise_var)


def _sweep(d, kappa, s, seeds, taus):
    """[len(taus), len(seeds)] exact ICL errors of the fits on P = round(tau d^2) prompts, and the Gammas."""
    n, rho = int(round(s.alpha * d)), s.noise_var
    counts = [max(1, int(round(t * d * d))) for t in taus]
    with jax.enable_x64(True):
        prompts = [_sample(_design(d, kappa, rho, sd), jax.random.PRNGKey(sd), max(counts), n) for sd in seeds]
        stacked = jax.tree_util.tree_map(lambda *a: jnp.asarray(np.stack([np.asarray(x) for x in a])), *prompts)
        errors = _errors_program(d, n, rho)
        gammas = [_FIT(stacked, s.ridge, c) for c in counts]
        return np.array([np.asarray(errors(g)) for g in gammas]), gammas, counts


def run(s, seed, context):
    progress = context.progress
    _check_training(s)
    seeds = [seed + k for k in range(s.seeds)]
    alpha, rho, lam = s.alpha, s.noise_var, s.ridge
    rows = []
    for kappa in [*s.kappas, *([None] if s.fresh_tasks else [])]:
        kap = np.inf if kappa is None else kappa
        label = "inf" if kappa is None else f"{kappa:g}"
        for d in s.dims:
            progress(f"  kappa = {label}, d = {d}: {len(seeds)} seeds x {len(s.taus)} + {len(s.peak_taus)} tau")
            for grid, taus in (("curve", s.taus), ("peak", s.peak_taus)):
                errs, gammas, counts = _sweep(d, kappa, s, seeds, taus)
                for i, tau in enumerate(taus):
                    asym = asymptotics.ridge_icl_error(alpha, kap, tau, rho, lam)
                    for k, sd in enumerate(seeds):
                        row = {"grid": grid, "kappa": label, "d": d, "tau": tau, "P": counts[i], "seed": sd,
                               "n": int(round(alpha * d)), "icl_error": float(errs[i, k]), "asymptotic": asym}
                        if grid == "curve" and d == max(s.dims) and k == 0:
                            row.update(_monte_carlo(gammas[i][0], d, row["n"], rho, s.num_test, sd))
                        rows.append(row)
    return rows + _trained(s, seeds, progress, context.cache)


def _check_training(s):
    """The trained networks' settings, checked before any fit (a wrong one would fail after the closed forms)."""
    if s.train_taus and not s.fresh_tasks:
        raise RunError(f"the trained networks are compared with the fresh-task curve at each of train_dims: "
                       f"fresh_tasks must be true (got fresh_tasks = {s.fresh_tasks}); or set train_taus to ()")
    off = [d for d in s.train_dims if d not in s.dims]
    if s.train_taus and (not s.train_dims or off or len(set(s.train_dims)) < len(s.train_dims)):
        raise RunError(f"the trained networks are compared with the closed-form curve at their d: train_dims must be "
                       f"distinct values of dims = {s.dims}, at least one (got train_dims = {s.train_dims}); "
                       f"or set train_taus to ()")
    missing = [k for k in s.train_kappas if k not in s.kappas]
    if s.train_taus and missing:
        raise RunError(f"the networks trained on a pool are compared with the curve at their kappa: every train_kappas "
                       f"must be one of kappas = {s.kappas} (got {missing})")
    if not 0 < s.step_fraction < 1:
        raise RunError(f"step_fraction must be in (0, 1) (heavy ball is tuned for curvatures up to L = 2 "
                       f"lambda_max(A) / step_fraction), got {s.step_fraction!r}")
    if not 0 < s.gate_tolerance < 1:
        raise RunError(f"gate_tolerance must be in (0, 1) (relative distance to the ridge solution), "
                       f"got {s.gate_tolerance!r}")


def _trained(s, seeds, progress, cache):
    """Rows of the gradient-trained networks (module docstring): per kappa (fresh tasks, then ``train_kappas``), d in
    ``train_dims`` and tau in ``train_taus``, one sweep over the seeds on fresh tasks; on a finite pool one fit per
    seed, each on its own pool at that d (the pool of that seed's closed-form fits, ``_design``)."""
    rho, lam = s.noise_var, s.ridge
    loss = functools.partial(pretraining.ridge_objective, ridge=lam)
    rows = []
    for kappa in (None, *s.train_kappas):
        label = "inf" if kappa is None else f"{kappa:g}"
        for d in s.train_dims:
            n = int(round(s.alpha * d))
            model, errors = pretraining.ReducedAttention(d), _errors_program(d, n, rho)
            groups = [(pretraining.lu_design(d, rho), seeds)] if kappa is None else \
                [(_design(d, kappa, rho, sd), [sd]) for sd in seeds]
            for tau in s.train_taus:
                rows += _trained_tau(s, d, model, loss, errors, groups, label, tau, n, progress, cache)
    return rows


def _trained_tau(s, d, model, loss, errors, groups, label, tau, n, progress, cache):
    """The rows of one (kappa, d, tau): each group (design, its seeds) trained in one sweep on its stored sets, with
    one heavy-ball step and momentum for every seed (``pretraining.heavy_ball`` over all their spectra)."""
    rho, lam = s.noise_var, s.ridge
    kap = np.inf if label == "inf" else float(label)
    P = max(1, int(round(tau * d * d)))
    seeds = [sd for _, ss in groups for sd in ss]
    with jax.enable_x64(True):  # float32 to float64 and the concatenation on the host: exact, no eager programs
        stacked = [jax.tree_util.tree_map(lambda a: np.asarray(a).astype(np.float64),
                                          pretraining.stored_prompts(g, ss, P, n)) for g, ss in groups]
        stacked = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *stacked)
        ridge = np.asarray(_FIT(stacked, lam, P))
        H = np.asarray(_FEATURES(stacked))
    spectra = [pretraining.span_spectrum(h, lam) for h in H]
    lr, beta = pretraining.heavy_ball(spectra, s.step_fraction)
    progress(f"  trained: kappa = {label}, d = {d}, tau = {tau:g} (P = {P}): {len(seeds)} seeds x {s.train_steps} "
             f"heavy-ball steps, step {lr:.3g}, momentum {beta:.6f} (rate {np.sqrt(beta):.5f})")
    config = train.TrainConfig(steps=s.train_steps, batch_size=P, learning_rate=lr, optimizer="sgd",
                               pretraining_prompts=P, momentum=beta)
    fits = [train.fit_sweep(model, g, [n], ss, config, loss_fn=loss, cache=cache) for g, ss in groups]
    gammas = np.concatenate([np.asarray(f.params["Gamma"])[0, 0].astype(np.float64) for f in fits])
    final = np.concatenate([np.asarray(f.losses)[0, 0, :, -1].astype(np.float64) for f in fits])
    with jax.enable_x64(True):
        e_gd, e_ridge = np.asarray(errors(jnp.asarray(gammas))), np.asarray(errors(jnp.asarray(ridge)))
    asym = asymptotics.ridge_icl_error(s.alpha, kap, tau, rho, lam)
    rows = []
    for k, sd in enumerate(seeds):
        gap = float(np.linalg.norm(gammas[k] - ridge[k]) / np.linalg.norm(ridge[k]))
        rows.append({"grid": "trained", "kappa": label, "d": d, "tau": tau, "P": P, "seed": sd, "n": n,
                     "icl_error": float(e_gd[k]), "ridge_error": float(e_ridge[k]), "param_gap": gap,
                     "gd_bound": pretraining.heavy_ball_bound(spectra[k], lr, beta, s.train_steps),
                     "passed": bool(np.isfinite(gap) and gap <= s.gate_tolerance), "learning_rate": lr,
                     "momentum": beta, "final_loss": float(final[k]), "asymptotic": asym})
    return rows


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _mc_sums(gamma, key, n, rho, num):
    """``montecarlo.risk``'s sums (``montecarlo.risk_sums``) for Gamma's attention form on ``num`` fresh prompts,
    one compiled program for every Gamma of a shape (``risk`` compiles its predictor, Gamma included, per call)."""
    d = gamma.shape[0]
    model, params = models.LinearAttention(d, dtype=jnp.float64), pretraining.attention_params(gamma, jnp.float64)
    return montecarlo.risk_sums(lambda p: model.apply(params, p), pretraining.lu_design(d, rho), n, n, key, num,
                                montecarlo.group_size(num, 10_000), jnp.float64)


def _monte_carlo(gamma, d, n, rho, num, sd):
    with jax.enable_x64(True):
        total, total_sq = _mc_sums(jnp.asarray(gamma, jnp.float64), jax.random.fold_in(jax.random.PRNGKey(sd), 77), n,
                                   rho, num)
    est = montecarlo.estimate(total, total_sq, num)
    est = montecarlo.Estimate(float(est.mean), float(est.se))
    exact = float(pretraining.icl_error(gamma, n, rho))
    return {"mc_error": est.mean / d, "mc_se": est.se / d, "mc_z": (est.mean / d - exact) / (est.se / d)}


def _peaks(rows, kappa, d):
    """Per seed: the tau of the largest exact error on the peak grid."""
    sub = by(rows, "peak", kappa=kappa, d=d)
    out = []
    for sd in sorted({r["seed"] for r in sub}):
        mine = [r for r in sub if r["seed"] == sd]
        out.append(max(mine, key=lambda r: r["icl_error"])["tau"])
    return np.array(out)


def _axes(rows):
    """The kappas and dims of the closed-form fits (the curve and peak grids, not the trained rows)."""
    fits = [r for r in rows if r["grid"] in ("curve", "peak")]
    return list(dict.fromkeys(r["kappa"] for r in fits)), sorted({r["d"] for r in fits})


def summary(rows):
    kappas, dims = _axes(rows)
    out = {}
    for kappa in kappas:
        base = by(rows, "curve", kappa=kappa, d=dims[-1])
        taus = sorted({r["tau"] for r in base})
        worst_rel, worst_z = 0.0, 0.0
        for tau in taus:
            asym = by(rows, "curve", kappa=kappa, d=dims[-1], tau=tau)[0]["asymptotic"]
            mean, se, iv = seed_stats(rows, "curve", kappa, dims[-1], tau)
            if abs(tau - 1) >= 0.5:  # away from the peak, where the finite-d shift of the pole dominates
                worst_rel = max(worst_rel, abs(mean - asym) / asym)
                if len(dims) > 1:
                    stats = [seed_stats(rows, "curve", kappa, d, tau) for d in dims]
                    a, a_se = extrapolate(dims, [m for m, _, _ in stats], [e for _, e, _ in stats])
                    worst_z = max(worst_z, abs(a - asym) / a_se)
                    out[f"kappa={kappa} tau={tau:g}: extrapolated gap (95%)"] = (
                        [round((a - 1.96 * a_se - asym) / asym, 4), round((a + 1.96 * a_se - asym) / asym, 4)])
        out[f"kappa={kappa}: worst |gap| at d={dims[-1]} (|tau-1| >= 0.5)"] = round(worst_rel, 4)
        if len(dims) > 1:
            out[f"kappa={kappa}: worst |extrapolated - asymptotic| / SE"] = round(worst_z, 2)
        peaks = {d: quality.seed_interval(_peaks(rows, kappa, d)) for d in dims}
        for d, iv in peaks.items():
            out[f"kappa={kappa} d={d}: peak tau (95%)"] = [round(iv.low, 4), round(iv.mean, 4), round(iv.high, 4)]
        if len(dims) > 1:
            a, a_se = extrapolate(dims, [iv.mean for iv in peaks.values()],
                                   [max((iv.high - iv.low) / 3.92, 1e-3) for iv in peaks.values()])
            out[f"kappa={kappa}: peak tau extrapolated to d=inf (95%)"] = [round(a - 1.96 * a_se, 4),
                                                                           round(a + 1.96 * a_se, 4)]
    mc = [r["mc_z"] for r in rows if r["grid"] == "curve" and "mc_z" in r and np.isfinite(r["mc_z"])]
    out["finite-d formula vs Monte Carlo: worst |z|"] = round(float(np.max(np.abs(mc))), 2) if mc else None
    out.update(trained_summary(rows))
    return out


def plot(rows, s):
    alpha, rho, lam = s.alpha, s.noise_var, s.ridge
    kappas, dims = _axes(rows)
    colours = plotting.colour_map(kappas)
    fig, (ax, gax, pax) = plotting.panels(3, width=4.8)
    dense = np.geomspace(min(s.taus), max(s.taus), 240)
    for kappa in kappas:
        kap = np.inf if kappa == "inf" else float(kappa)
        c = colours[kappa]
        ax.plot(dense, [asymptotics.ridge_icl_error(alpha, kap, t, rho, lam) for t in dense], "-", color=c, lw=1.5,
                label=f"kappa = {kappa}: asymptotic")
        for j, d in enumerate(dims):
            taus = sorted({r["tau"] for r in by(rows, "curve", kappa=kappa, d=d)})
            ivs = [seed_stats(rows, "curve", kappa, d, t)[2] for t in taus]
            m = np.array([iv.mean for iv in ivs])
            ax.errorbar(taus, m, yerr=[m - [iv.low for iv in ivs], [iv.high for iv in ivs] - m], fmt="o",
                        ms=2 + 1.5 * j, color=c, alpha=0.4 + 0.6 * (j + 1) / len(dims), capsize=2,
                        label=f"  fits, d = {d}" if kappa == kappas[0] else None)
        for tau in (t for t in s.taus if abs(t - 1) >= 0.5):
            asym = asymptotics.ridge_icl_error(alpha, kap, tau, rho, lam)
            stats = [seed_stats(rows, "curve", kappa, d, tau) for d in dims]
            gax.plot([1 / d for d in dims], [(m - asym) / asym for m, _, _ in stats], "-o", ms=3, color=c, alpha=0.7)
            if len(dims) > 1:  # the a + b/d intercept with its 95% interval, at 1/d = 0
                a, a_se = extrapolate(dims, [m for m, _, _ in stats], [e for _, e, _ in stats])
                gax.errorbar([0.0], [(a - asym) / asym], yerr=[[1.96 * a_se / asym]], fmt="_", color=c, alpha=0.7,
                             capsize=2)
        ivs = [quality.seed_interval(_peaks(rows, kappa, d)) for d in dims]
        m = np.array([iv.mean for iv in ivs])
        pax.errorbar([1 / d for d in dims], m, yerr=[m - [iv.low for iv in ivs], [iv.high for iv in ivs] - m],
                     fmt="o", color=c, capsize=3, label=f"kappa = {kappa}")
        pax.plot([0], [asymptotics.interpolation_peak(alpha, kap, rho, lam)], "*", ms=10, color=c)
    _plot_trained(ax, gax, rows, colours)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([0.25, 0.5, 1, 2, 4], ["0.25", "0.5", "1", "2", "4"])
    ax.minorticks_off()
    ax.set_xlabel("tau = P / d^2")
    ax.set_ylabel("ICL error (paper's units; 1 + rho: predict 0)")
    ax.set_title(f"ridge fits and GD-trained (8 seeds, 95%) vs Lu et al.\n(alpha = {alpha:g}, rho = {rho:g}, lambda = {lam:g})",
                 fontsize=9)
    ax.legend(fontsize=6)
    gax.axhline(0, color="k", ls=":", lw=1)
    gax.set_xlim(-0.005, 1 / min(dims) + 0.008)  # room for the diamonds just right of 1/d
    gax.set_xlabel("1 / d")
    gax.set_ylabel("(finite-d mean - asymptotic) / asymptotic")
    gax.set_title("finite-d gap per tau (|tau - 1| >= 0.5), dots: fits,\ndiamonds: GD-trained; at 1/d = 0: a + b/d "
                  "fit, 95%", fontsize=9)
    x = np.linspace(0, 1 / min(dims), 20)
    pax.plot(x, 1 + x, "k:", lw=1, label="P = d(d+1) (parameters)")
    pax.set_xlim(left=-0.005)
    pax.set_xlabel("1 / d")
    pax.set_ylabel("tau of the peak (per seed, 95% over seeds)")
    pax.set_title("double-descent peak; star: asymptotic peak", fontsize=9)
    pax.legend(fontsize=7)
    return fig


def _plot_trained(ax, gax, rows, colours):
    """The GD-trained networks' seed means (gate passers, 95% over seeds), hollow diamonds in their kappa's colour,
    larger at larger d as the closed-form fits' dots are. On the tau panel each d's diamonds sit a little to the
    right of their tau (further for a larger d) so they do not hide the closed-form fits at the same d; on the
    1/d panel, at |tau - 1| >= 0.5, each d's relative gap to the asymptote just right of 1/d, and at 1/d = 0 the
    a + b/d intercept over the trained d with its 95% interval. A tau where fewer than half the seeds pass is left
    out (its count is in the legend, its interval in the summary)."""
    trained = [r for r in rows if r["grid"] == "trained"]
    dims = sorted({r["d"] for r in trained})
    labels = list(dict.fromkeys(r["kappa"] for r in trained))
    for j, d in enumerate(dims):
        at_d = [r for r in trained if r["d"] == d]
        gaps = [abs(r["icl_error"] - r["ridge_error"]) / r["ridge_error"] for r in at_d if r["passed"]]
        legend = (f"GD-trained, d = {d} ({len(gaps)}/{len(at_d)} passed;\n  = ridge on its own prompts within "
                  f"{max(gaps) if gaps else float('nan'):.0e})")
        for label in labels:
            mine = [r for r in at_d if r["kappa"] == label]
            taus, ivs = [], []
            for tau in sorted({r["tau"] for r in mine}):
                vals = [r["icl_error"] for r in mine if r["tau"] == tau and r["passed"]]
                if len(vals) >= max(2, sum(r["tau"] == tau for r in mine) / 2):
                    taus.append(tau)
                    ivs.append(quality.seed_interval(vals))
            if not ivs:
                continue
            c, m = colours.get(label, "k"), np.array([iv.mean for iv in ivs])
            ax.errorbar(np.array(taus) * 1.05 ** (j + 1), m, fmt="D",
                        yerr=[m - [iv.low for iv in ivs], [iv.high for iv in ivs] - m], mfc="none", ms=4 + 1.5 * j,
                        mew=1.2, color=c, capsize=2, label=legend)
            legend = None
            for tau, iv in zip(taus, ivs):
                if abs(tau - 1) >= 0.5:
                    asym = next(r["asymptotic"] for r in mine if r["tau"] == tau)
                    gax.errorbar([1 / d + 0.002], [(iv.mean - asym) / asym], yerr=[[(iv.mean - iv.low) / asym],
                                 [(iv.high - iv.mean) / asym]], fmt="D", mfc="none", ms=4, mew=1, color=c, capsize=2)
    for label in labels if len(dims) > 1 else ():
        for tau in sorted({r["tau"] for r in trained if r["kappa"] == label and abs(r["tau"] - 1) >= 0.5}):
            if fit := trained_intercept(rows, label, dims, tau):
                a, a_se, asym = fit
                gax.errorbar([0.002], [(a - asym) / asym], yerr=[[1.96 * a_se / asym]], fmt="D", mfc="none", ms=4,
                             mew=1, color=colours.get(label, "k"), capsize=2)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Lu et al.'s (alpha, rho, lambda); the pools (kappa = k/d, and with ``fresh_tasks`` kappa = inf, a fresh task
    per prompt); the tau grids (``taus`` for the curve, ``peak_taus`` around the threshold); seeds (each its own
    pool and prompts); the Monte Carlo prompts of the finite-d check. The trained networks: at each d in
    ``train_dims`` (each one of ``dims``) on fresh tasks and on each seed's pool at every kappa in ``train_kappas``,
    at each tau in ``train_taus`` (empty: none), ``train_steps`` full-batch heavy-ball steps tuned on [2 min_seeds
    lambda_min(A), 2 max_seeds lambda_max(A) / ``step_fraction``] (``pretraining.heavy_ball``), passed when their
    Gamma is within ``gate_tolerance`` (relative) of the ridge solution on the same prompts (float32 heavy ball reaches about 1e-6)."""

    dims: tuple[int, ...] = (8, 12, 16)
    alpha: float = 1.0
    noise_var: float = 0.1
    ridge: float = 1e-3
    kappas: tuple[float, ...] = (0.5, 2.0)
    fresh_tasks: bool = True
    taus: tuple[float, ...] = (0.25, 0.5, 0.8, 1.0, 1.25, 1.6, 2.5, 4.0)
    peak_taus: tuple[float, ...] = tuple(round(0.95 + 0.025 * i, 3) for i in range(13))
    seeds: int = 8
    num_test: int = 10_000
    train_dims: tuple[int, ...] = (8, 12, 16)
    train_taus: tuple[float, ...] = (0.5, 1.0, 1.25, 2.5)
    train_kappas: tuple[float, ...] = (0.5, 2.0)
    train_steps: int = 1000
    step_fraction: float = 0.9
    gate_tolerance: float = 1e-3


SETTINGS = Settings()
# quick: one d (a second, d = 4, costs 8 more CPU-s, 60% more; tests/test_pretraining_dims.py trains two small d)
QUICK = dataclasses.replace(SETTINGS, dims=(6,), kappas=(), taus=(0.5, 2.0), peak_taus=(1.0, 1.15, 1.3),
                            num_test=1_000, train_dims=(6,), train_taus=(0.5, 2.0), train_kappas=(), train_steps=1000)

EXPERIMENT = Experiment(
    name="pretraining_tau",
    title="Lu et al.: ICL error of ridge-fitted and GD-trained linear attention vs pretraining data tau = P/d^2",
    settings=SETTINGS, quick=QUICK, run=run, plot=plot, summary=summary)
