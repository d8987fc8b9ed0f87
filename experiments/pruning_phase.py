"""When SVD pruning helps, exactly (docs/theory.md §6.1): phase diagrams of the test-risk change of the
rank-k truncation of the train optimum W*, against a shift in test label noise (left) and a shift of
the task covariance's tail (right), with the closed-form boundary (where the change is 0) drawn.
Trained-then-pruned PGD models (one per seed, gated against the optimum) are placed on the same grid:
their truncated W is scored exactly (``theory.pgd_risk``), and the crossing of each kept rank is
compared with the closed form's."""

import dataclasses

import jax
import numpy as np

from iclsim import IID, models, plotting, pruning, quality, theory, train
from iclsim.runner import Experiment
from iclsim.train import TrainConfig


def task_spectrum(s):
    """Power-law task variances l_i proportional to i^-power, scaled to sum d."""
    l = np.arange(1, s.dim + 1, dtype=float) ** -s.power
    return l * s.dim / l.sum()


def shifted(s, noise_var=None, tail=1.0):
    """The test design: the train one with another label noise, or its tail directions (beyond the
    first ``head``) scaled by ``tail`` (0 < tail <= 1)."""
    l = task_spectrum(s).copy()
    l[s.head:] *= tail
    return IID(s.dim, noise_var=s.noise_var if noise_var is None else noise_var, cov_beta=np.diag(l))


def crossing(risk_at):
    """The test noise where risk_at(noise) (affine in the noise, as every PGD risk is) crosses 0."""
    a, b = risk_at(0.0), risk_at(1.0)
    return float("inf") if b - a >= 0 else float(a / (a - b))


def run(s, seed, context):
    progress = context.progress
    d, n = s.dim, s.n
    train_design = shifted(s)
    seeds = [seed + k for k in range(s.seeds)]
    progress(f"  training {len(seeds)} PGD models on the power-law design, library defaults")
    fitted = train.fit_sweep(models.PGD(d), train_design, [n], seeds, TrainConfig(steps=s.steps),
                             cache=context.cache)
    W_star, L_star = theory.optimal_pgd(train_design, n)
    trained = [np.asarray(fitted.params["W"][0, 0, i], np.float64) / n for i in range(len(seeds))]  # theory's W
    passed = quality.gate([float(theory.pgd_risk(train_design, n, W)) for W in trained], float(L_star))
    rows = []
    axes = [("noise", v, shifted(s, noise_var=v)) for v in s.test_noise_vars] + \
           [("tail", t, shifted(s, tail=t)) for t in s.tails]
    for axis, value, test in axes:
        full = float(theory.pgd_risk(test, n, W_star))
        for k in range(1, d + 1):
            exact = float(theory.truncated_optimum_risk(train_design, n, test, n, k))
            row = {"axis": axis, "value": value, "rank": k, "model": "optimum W*", "seed": -1,
                   "relative_change": (exact - full) / full, "passed": True}
            rows.append(row)
            for sd, W, ok in zip(seeds, trained, passed):
                base = float(theory.pgd_risk(test, n, W))
                cut = float(theory.pgd_risk(test, n, pruning.svd_truncate(W, rank=k)))
                rows.append({"axis": axis, "value": value, "rank": k, "model": "trained PGD", "seed": sd,
                             "relative_change": (cut - base) / base, "passed": bool(ok)})
    # the noise at which dropping down to rank k starts to help: closed form vs each trained model
    for k in range(1, d):
        closed = crossing(lambda v: float(theory.truncated_optimum_risk(train_design, n, shifted(s, noise_var=v), n, k)
                                          - theory.pgd_risk(shifted(s, noise_var=v), n, W_star)))
        for sd, W, ok in zip(seeds, trained, passed):
            measured = crossing(lambda v: float(theory.pgd_risk(shifted(s, noise_var=v), n, pruning.svd_truncate(W, rank=k))
                                                - theory.pgd_risk(shifted(s, noise_var=v), n, W)))
            rows.append({"axis": "boundary", "value": closed, "rank": k, "model": "trained PGD", "seed": sd,
                         "measured_boundary": measured, "passed": bool(ok)})
    return rows


def _closed_form_grid(s, axis, xs):
    """Relative test-risk change of [W*]_k against W*, [ranks 1..d-1, len(xs)], on a fine grid."""
    train_design = shifted(s)
    W_star = theory.optimal_pgd(train_design, s.n)[0]
    out = []
    for k in range(1, s.dim):
        row = []
        for x in xs:
            test = shifted(s, noise_var=x) if axis == "noise" else shifted(s, tail=x)
            full = float(theory.pgd_risk(test, s.n, W_star))
            row.append((float(theory.truncated_optimum_risk(train_design, s.n, test, s.n, k)) - full) / full)
        out.append(row)
    return np.array(out)


def plot(rows, s):
    from matplotlib.colors import SymLogNorm

    fig, axes = plotting.plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    d = s.dim
    panels = [(axes[0], "noise", f"test label-noise variance (train: {s.noise_var:g})", s.test_noise_vars),
              (axes[1], "tail", f"test / train variance of the task tail (directions > {s.head})", s.tails)]
    for ax, axis, label, values in panels:
        xs = np.geomspace(min(values), max(values), 80)
        grid = _closed_form_grid(s, axis, xs)
        lim = float(np.max(np.abs(grid)))
        mesh = ax.pcolormesh(xs, np.arange(1, d), grid, cmap="RdBu_r", shading="nearest",
                             norm=SymLogNorm(linthresh=1e-3, vmin=-lim, vmax=lim))
        ax.contour(xs, np.arange(1, d), grid, levels=[0.0], colors="k", linewidths=2)
        tr = [r for r in rows if r["axis"] == axis and r["model"] == "trained PGD" and r["passed"]]
        for x in values:
            for k in range(1, d):
                vals = [r["relative_change"] for r in tr if r["value"] == x and r["rank"] == k]
                if len(vals) >= 2:
                    iv = quality.seed_interval(vals)
                    marker = "v" if iv.high < 0 else ("^" if iv.low > 0 else "o")
                    ax.plot(x, k, marker, color="w", mec="k", ms=7)
        ax.set_xscale("log")
        ax.set_yticks(range(1, d))
        ax.set_xlabel(label)
        ax.set_ylabel(f"kept rank k of W (of {d})")
        fig.colorbar(mesh, ax=ax, label="relative test-risk change of [W*]_k (symlog)")
    handles = [plotting.plt.Line2D([], [], color="k", lw=2, label="closed-form boundary (change = 0)")] + [
        plotting.plt.Line2D([], [], ls="", marker=m, color="w", mec="k", label=lab)
        for m, lab in [("v", "trained PGD: pruning helps (95% CI over seeds < 0)"), ("^", "trained PGD: pruning hurts"),
                       ("o", "trained PGD: not resolved")]]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=8)
    fig.suptitle(f"When SVD truncation of W helps: d = {d}, n = {s.n}, task variances ~ i^-{s.power:g}; "
                 "blue: truncation lowers the test risk")
    return fig


def summary(rows):
    gate = {r["seed"]: r["passed"] for r in rows if r["model"] == "trained PGD"}
    out = {"networks_passed": sum(gate.values()), "networks_failed": len(gate) - sum(gate.values())}
    for k in sorted({r["rank"] for r in rows if r["axis"] == "boundary"}):
        sub = [r for r in rows if r["axis"] == "boundary" and r["rank"] == k and r["passed"]]
        measured = [r["measured_boundary"] for r in sub]
        iv = quality.seed_interval(measured) if len(measured) >= 2 else None
        out[f"noise_boundary_rank{k}"] = {"closed_form": round(sub[0]["value"], 3) if sub else None,
                                          "trained_mean": round(iv.mean, 3) if iv else None,
                                          "trained_ci95": [round(iv.low, 3), round(iv.high, 3)] if iv else None}
    return out


@dataclasses.dataclass(frozen=True)
class Settings:
    """The shifted training design (``power``, ``head``), training, and the phase diagram's axes
    (``test_noise_vars`` x ``tails``)."""

    dim: int = 5
    n: int = 20
    noise_var: float = 0.1
    power: float = 1.5
    head: int = 2
    seeds: int = 8
    steps: int = 4000
    test_noise_vars: tuple[float, ...] = (0.1, 1, 3, 10, 30, 100)
    tails: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1, 0.03, 0.01)


SETTINGS = Settings()
QUICK = dataclasses.replace(SETTINGS, seeds=3, steps=600, test_noise_vars=(0.1, 10, 100), tails=(1.0, 0.1, 0.01))

EXPERIMENT = Experiment(
    name="pruning_phase", title="When SVD pruning helps: closed-form phase diagram vs trained models",
    settings=SETTINGS, quick=QUICK,
    run=run, plot=plot, summary=summary)
