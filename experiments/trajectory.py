"""Paper B's implicit GD trajectory: the risk of a trained L-layer linear transformer read after every
layer, beside l-step gradient descent with its best step size (l = 1..L), and the per-layer norm
products ||Wv_l|| ||Wk_l|| of the mutual-information bound with the condition numbers of the weights."""

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import IID, models, plotting, theory, train
from iclsim.runner import Experiment
from iclsim.train import TrainConfig


def run(s, seed, progress):
    d, n, L = s["dim"], s["n"], s["layers"]
    design = IID(d, noise_var=s["noise_var"])
    key = jax.random.PRNGKey(90_000 + seed)
    model = models.LinearTransformer(d, L)
    seeds = [seed + k for k in range(s["seeds"])]
    progress(f"  training the {L}-layer transformer, seeds {seeds}")
    fitted = train.fit_sweep(model, design, [n], seeds, TrainConfig(s["steps"], s["batch"], s["lr"]))
    rows = []
    for k in range(s["seeds"]):
        params = jax.tree_util.tree_map(lambda a: a[0, 0, k], fitted.params)
        for layer in range(L):
            risk, se = theory.monte_carlo_risk(lambda p: model.predictions(params, p)[layer], design, n, key,
                                               s["num_test"], dtype=jnp.float32)
            a = params["layers"][layer]["attn"]
            norms = {name: float(jnp.linalg.norm(a[name], 2)) for name in ("Wq", "Wk", "Wv", "Wo")}
            conds = {f"cond_{name}": float(jnp.linalg.cond(a[name])) for name in ("Wq", "Wk", "Wv", "Wo")}
            rows.append({"model": "linear transformer", "seed": seed + k, "layer": layer + 1, "risk": risk, "se": se,
                         "norm_product": norms["Wv"] * norms["Wk"], **conds})
    progress("  training l-step GD references")
    for steps in range(1, L + 1):
        gd = models.GD(d, steps)
        fitted = train.fit(gd, design, n, s["gd_steps"], s["batch"], 0.01, seed)
        risk, se = train.evaluate(gd, fitted.params, design, n, key, s["num_test"])
        rows.append({"model": "GD, best step size", "seed": seed, "layer": steps, "risk": risk, "se": se,
                     "eta": float(fitted.params["eta"])})
    L_star = float(theory.optimal_pgd(design, n)[1])
    for r in rows:
        r["one_step_pgd_optimum"] = L_star
    return rows


def plot(rows, s):
    fig, (ax1, ax2) = plotting.panels(2)
    plotting.curves(ax1, rows, x="layer", theory=None, group=("model",))
    ax1.axhline(rows[0]["one_step_pgd_optimum"], color="k", ls=":", label="optimal one-step PGD")
    ax1.set_xlabel("layer l / GD steps")
    ax1.set_ylabel("test risk of the query prediction")
    ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    ax1.set_title("implicit GD trajectory")
    tr = [r for r in rows if r["model"] == "linear transformer"]
    plotting.curves(ax2, tr, x="layer", y="norm_product", theory=None, group=("model",))
    ax2.set_ylabel("||Wv_l|| ||Wk_l|| (spectral)")
    ax2.set_title("per-layer term of paper B's bound")
    fig.suptitle(f"{s['layers']}-layer linear transformer vs l-step GD (d = {s['dim']}, n = {s['n']})")
    return fig


def summary(rows):
    out = {}
    for r in rows:
        if r["seed"] == rows[0]["seed"]:
            out[f"{r['model']} l={r['layer']}"] = round(r["risk"], 4)
    return out


EXPERIMENT = Experiment(
    name="trajectory", title="Paper B: per-layer risk vs multi-step GD",
    settings={"dim": 5, "n": 20, "layers": 4, "noise_var": 0.1, "seeds": 2, "steps": 3000, "gd_steps": 1000,
              "batch": 256, "lr": 3e-3, "num_test": 50_000},
    quick={"layers": 2, "seeds": 1, "steps": 300, "gd_steps": 200, "num_test": 5_000},
    run=run, plot=plot, summary=summary)
