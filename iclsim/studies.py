"""Shared machinery of the experiments: train a sweep of models, score them on fresh prompts, and
set each beside its closed-form prediction as tidy rows (one row per model)."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import theory, train


def active_weights(omega, n: int, n_max: int):
    """Weights of a padded WPGD/H3 model restricted to its last n (active) positions, mean |.| = 1,
    and the factor that moves their scale into W."""
    w = jnp.asarray(omega, jnp.float64)[n_max - n:]
    scale = jnp.mean(jnp.abs(w))
    scale = jnp.where(scale > 0, scale, 1.0)
    return w / scale, scale


def effective(model, params, n: int, n_max: int):
    """(W, omega or None) a trained model implements on prompts of n active pairs padded to n_max,
    in theory's convention (omega over the n active positions)."""
    eff = model.effective_pgd(params, n_max)
    if not isinstance(eff, tuple):
        return jnp.asarray(eff, jnp.float64), None
    W, omega = eff
    omega, scale = active_weights(omega, n, n_max)
    return jnp.asarray(W, jnp.float64) * scale, omega


def risk_curves(models: Mapping[str, tuple], designs: Mapping[str, object], ns: Sequence[int], seeds: Sequence[int],
                theory_risk: Callable, key, num_test: int, progress=print,
                optimum: Callable | None = None) -> list[dict]:
    """Train every model on every design at every n and seed (one compiled program per model),
    score on ``num_test`` fresh prompts, and compare with theory.

    models: name -> (model, TrainConfig); designs: label -> design (same structure, stacked);
    theory_risk(design, n) -> L; optimum(design, n) -> (W*, omega* or None) for the effective-W
    comparison (only for models with ``effective_pgd``). Each row: design, model, n, seed,
    risk, se, theory, gap (relative), and where available exact_risk (closed-form risk of the
    model's effective W, IID/Drift) and w_rel (relative Frobenius distance to W*).
    """
    labels, design_list = list(designs), list(designs.values())
    n_max = max(ns)
    rows = []
    for name, (model, config) in models.items():
        progress(f"  training {name}: {len(design_list)} designs x {len(ns)} n x {len(seeds)} seeds, "
                 f"{config.steps} steps")
        fitted = train.fit_sweep(model, design_list, ns, seeds, config)
        risk, se = train.evaluate_sweep(model, fitted.params, design_list, ns, key, num_test)
        for i, (label, design) in enumerate(zip(labels, design_list)):
            for j, n in enumerate(ns):
                L = float(theory_risk(design, n))
                for k, seed in enumerate(seeds):
                    row = {"design": label, "model": name, "n": n, "seed": seed, "risk": float(risk[i, j, k]),
                           "se": float(se[i, j, k]), "theory": L, "gap": (float(risk[i, j, k]) - L) / L,
                           "final_loss": float(np.mean(fitted.losses[i, j, k, -100:]))}
                    if hasattr(model, "effective_pgd"):
                        p = jax.tree_util.tree_map(lambda a: a[i, j, k], fitted.params)
                        W, omega = effective(model, p, n, n_max)
                        if optimum is not None:
                            W_star, _ = optimum(design, n)
                            row["w_rel"] = float(jnp.linalg.norm(W - W_star) / jnp.linalg.norm(W_star))
                        try:
                            row["exact_risk"] = float(theory.pgd_risk(design, n, W, omega))
                        except TypeError:  # no closed form for general W on this design
                            pass
                    rows.append(row)
    return rows


def worst(rows: list[dict], column: str) -> tuple[float, dict]:
    """The row with the largest |column| and that value."""
    best = max((r for r in rows if column in r), key=lambda r: abs(r[column]))
    return abs(best[column]), best
