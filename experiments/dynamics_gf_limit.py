"""Zhang, Frei & Bartlett (JMLR 2024): one merged linear self-attention head trained by gradient flow from
their initialisation (KQ_11 = sigma Theta Theta^T, v_d = sigma: ``MergedAttention(heads=1, start="aligned")``)
converges to the global optimum, whose prediction is x^T Gamma^{-1} (X^T y / n), Gamma = (1 + 1/n) Sx +
tr(Sx)/n I (``dynamics.zfb_limit``), and whose test risk under a shift of the feature covariance (or of the
context length) is a closed form (``dynamics.zfb_limit_risk``; docs/theory.md, "Training dynamics").

Trained by plain SGD (a constant step, then a cosine decay to settle the SGD noise), 8 seeds on a
non-white training covariance. Per seed: the learned W = v_d KQ_11 against Gamma^{-1} (relative Frobenius
gap), and on each test condition the trained network and the limit itself scored on the same prompts
(``evaluate.paired_risks``): the paired difference of risks (trained - limit) with its SE, and the limit's
Monte Carlo risk against its closed form (z in SE). A network passes the gate when its test risk on the
training distribution is within 2% + 4 SE of the limit's closed form (``quality.gate``)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from iclsim import IID, evaluate, plotting, quality, sweeps, train
from iclsim import dynamics as dy
from iclsim import multihead as mh
from iclsim.registry import Experiment

TEST_KEY = sweeps.TEST_STREAM - 3


def sgd(schedule):
    """Plain SGD on the schedule (constant, then a cosine decay to final_lr_fraction)."""
    return optax.sgd(schedule)


def rotation(d, angle):
    """A rotation by ``angle`` in every coordinate plane (i, i+1), composed."""
    R = np.eye(d)
    for i in range(d - 1):
        G = np.eye(d)
        G[[i, i, i + 1, i + 1], [i, i + 1, i, i + 1]] = [np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)]
        R = G @ R
    return R


def shifts(s):
    """{name: (test design, n_test)}: no shift, the covariance rotated, white, scaled, and a longer context."""
    lam = np.asarray(s.eigenvalues, np.float64)
    d, n = len(lam), s.n
    Sx = np.diag(lam)
    R = rotation(d, s.angle)
    return {"no shift": (IID(d, cov_x=Sx), n),
            "rotated": (IID(d, cov_x=R @ Sx @ R.T), n),
            "white": (IID(d, cov_x=np.mean(lam) * np.eye(d)), n),
            "scaled": (IID(d, cov_x=s.scale * Sx), n),
            "longer context": (IID(d, cov_x=Sx), s.n_test)}


def run(s, seed, context):
    progress = context.progress
    lam = np.asarray(s.eigenvalues, np.float64)
    d, n = len(lam), s.n
    design = IID(d, cov_x=np.diag(lam))
    seeds = [seed + k for k in range(s.seeds)]
    model = mh.MergedAttention(d, heads=1, init_scale=s.sigma, start="aligned")
    progress(f"  {len(seeds)} seeds x {s.steps} SGD steps")
    fit = train.fit_sweep(model, design, [n], seeds, train.TrainConfig(
        steps=s.steps, batch_size=s.batch, learning_rate=s.learning_rate, warmup_steps=0,
        final_lr_fraction=s.final_lr_fraction, optimizer=sgd), cache=context.cache)
    params = jax.tree_util.tree_map(lambda a: a[0, 0], fit.params)
    W_limit = dy.zfb_limit(design, n)
    W = np.stack([n * np.asarray(model.effective_pgd(jax.tree_util.tree_map(lambda a: a[k], params), n).W)
                  for k in range(len(seeds))])
    w_gap = np.linalg.norm(W - W_limit, axis=(1, 2)) / np.linalg.norm(W_limit)
    limit = {"KQ": jnp.zeros((len(seeds), 1, d + 1, d + 1), jnp.float32).at[:, 0, :d, :d].set(W_limit.astype(np.float32)),
             "v": jnp.zeros((len(seeds), 1, d + 1), jnp.float32).at[:, 0, d].set(1.0)}
    keys = sweeps.stream_keys(seeds, TEST_KEY)
    rows = []
    conditions = shifts(s)
    for name in s.tests:
        test, n_test = conditions[name]
        closed = dy.zfb_limit_risk(design, n, test, n_test)
        pr = evaluate.paired_risks(model, params, limit, test, n_test, keys, s.num_test)
        passed = quality.gate(pr.risk, closed, tolerance=s.gate, se=pr.risk_se)
        for k, sd in enumerate(seeds):
            rows.append({"test": name, "n_test": n_test, "seed": sd, "limit_closed": closed,
                         "limit_mc": float(pr.reference[k]), "limit_mc_se": float(pr.reference_se[k]),
                         "limit_z": (float(pr.reference[k]) - closed) / float(pr.reference_se[k]),
                         "trained": float(pr.risk[k]), "trained_se": float(pr.risk_se[k]),
                         "paired_diff": float(pr.difference[k]), "paired_se": float(pr.difference_se[k]),
                         "rel_gap": float(pr.difference[k]) / closed, "w_rel_gap": float(w_gap[k]),
                         "passed": bool(passed[k])})
    return rows


def plot(rows, s):
    tests = list(dict.fromkeys(r["test"] for r in rows))
    fig, (ax1, ax2) = plotting.plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    x = np.arange(len(tests))
    closed = [next(r for r in rows if r["test"] == t)["limit_closed"] for t in tests]
    ax1.plot(x, closed, "kD", ms=6, label="gradient-flow limit, closed form")
    for i, t in enumerate(tests):
        sub = [r for r in rows if r["test"] == t]
        jit = i + np.linspace(-0.15, 0.15, len(sub))
        ax1.plot(jit, [r["trained"] for r in sub], "o", color="C0", ms=3, alpha=0.7,
                 label="trained (one per seed)" if i == 0 else None)
        ax2.errorbar(jit, [100 * r["rel_gap"] for r in sub], yerr=[400 * r["paired_se"] / r["limit_closed"] for r in sub],
                     fmt="o", ms=3, color="C0", elinewidth=0.7, label="one seed, +-4 paired SE" if i == 0 else None)
    ax1.set_xticks(x, tests, rotation=20, fontsize=8)
    ax1.set_ylabel("test risk")
    ax1.legend(fontsize=7)
    ax1.set_title("test risk under train/test shifts", fontsize=9)
    ax2.axhline(0.0, color="k", ls=":")
    ax2.set_xticks(x, tests, rotation=20, fontsize=8)
    ax2.set_ylabel("(trained - limit) / limit, % (same prompts)")
    gaps = [r["w_rel_gap"] for r in rows if r["test"] == tests[0]]
    ax2.set_title(f"learned W vs Gamma^-1: relative gap {np.median(gaps):.4f} (median over seeds)", fontsize=9)
    ax2.legend(fontsize=7)
    fig.suptitle(f"Zhang-Frei-Bartlett limit: one merged head from their start, SGD (d = {len(s.eigenvalues)}, "
                 f"n = {s.n}, eigenvalues {s.eigenvalues}, {s.seeds} seeds)")
    return fig


def summary(rows):
    out = {"w_rel_gap_max": round(max(r["w_rel_gap"] for r in rows), 5),
           "limit_mc_vs_closed_max_abs_z": round(max(abs(r["limit_z"]) for r in rows), 2)}
    for t in dict.fromkeys(r["test"] for r in rows):
        sub = [r for r in rows if r["test"] == t]
        iv = quality.seed_interval([r["rel_gap"] for r in sub]) if len(sub) >= 2 else None
        out[t] = {"limit_closed": round(sub[0]["limit_closed"], 5),
                  "rel_gap_mean_ci95": [round(iv.mean, 5), round(iv.low, 5), round(iv.high, 5)] if iv else None,
                  "max_abs_paired_z": round(max(abs(r["paired_diff"] / r["paired_se"]) for r in sub), 1),
                  "failed": sum(not r["passed"] for r in sub)}
    return out


@dataclasses.dataclass(frozen=True)
class Settings:
    eigenvalues: tuple[float, ...] = (1.0, 0.6, 0.35)
    n: int = 20
    n_test: int = 40
    angle: float = 0.6
    scale: float = 2.0
    sigma: float = 0.05
    seeds: int = 8
    batch: int = 512
    learning_rate: float = 0.05
    final_lr_fraction: float = 0.02
    steps: int = 1500
    num_test: int = 50_000
    gate: float = 0.02
    tests: tuple[str, ...] = ("no shift", "rotated", "white", "scaled", "longer context")

EXPERIMENT = Experiment(
    name="dynamics_gf_limit", title="ZFB: the gradient-flow limit of one linear attention head under covariance shift",
    settings=Settings(), quick=dataclasses.replace(Settings(), seeds=2, batch=256, steps=600, num_test=2_000, tests=("rotated",)),
    run=run, plot=plot, summary=summary)
