"""A sweep helper for experiments: train every model on every design at every n and seed, score
each on fresh prompts and set it beside its closed-form prediction as tidy rows (one per model)."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import evaluate, protocols, quality, train
from iclsim._precision import float64
from iclsim.bridge import effective, exact_risk
from iclsim.rng import Stream
from iclsim.rng import stream_keys as rng_stream_keys

__all__ = ["TEST_STREAM", "stream_keys", "risk_curves", "worst", "worst_exact_gap"]

# Experiments score on prompts keyed fold_in(PRNGKey(seed), TEST_STREAM): the named stream ``rng.Stream.TEST``
# (see ``rng``: no training run reaches it, so test prompts never repeat a training step's).
TEST_STREAM = Stream.TEST


def stream_keys(seeds: Sequence[int], stream: int = TEST_STREAM) -> np.ndarray:
    """fold_in(PRNGKey(s), stream) for each seed s, [seeds, 2] uint32 (``rng.stream_keys``): each network's own
    prompt set, the key per seed ``evaluate.evaluate_sweep`` takes (an interval over seeds then contains the
    variation of the prompt set)."""
    return rng_stream_keys(seeds, stream)


@float64
def risk_curves(models: Mapping[str, tuple], designs: Mapping[str, object], ns: Sequence[int], seeds: Sequence[int],
                theory_risk: Callable, key, num_test: int, progress=print,
                optimum: Callable | None = None, extra: Callable | None = None, cache=None) -> list[dict]:
    """Train every model on every design at every n and seed (one compiled program per model),
    score on ``num_test`` fresh prompts, and compare with theory.

    models: name -> (model, TrainConfig); designs: label -> design (same structure, stacked);
    theory_risk(design, n, model) -> L; optimum(design, n, model) -> a result with ``.W`` (``theory.Optimum``) for the effective-W
    comparison (only for models with ``effective_pgd``); extra(model, W, omega, design, n) -> dict
    of more columns; cache: a ``cache.SweepCache`` handed to ``train.fit_sweep`` (the run context's, in an
    experiment), or None. Each row: design, model, n, seed, risk, se, theory, gap (relative), and where
    available exact_risk (closed-form risk of the trained model, ``exact_risk``) and w_rel
    (relative Frobenius distance to W*); passed: the quality gate (``quality.gate``: risk within 10% plus
    4 Monte Carlo SE of the theory column).
    """
    labels, design_list = list(designs), list(designs.values())
    n_slots = max(ns)
    rows = []
    for name, (model, config) in models.items():
        progress(f"  training {name}: {len(design_list)} designs x {len(ns)} n x {len(seeds)} seeds, "
                 f"{config.steps} steps")
        fitted = train.fit_sweep(model, design_list, ns, seeds, config, cache=cache)
        risk, se = evaluate.evaluate_sweep(model, fitted.params, design_list, ns, key, num_test)
        for i, (label, design) in enumerate(zip(labels, design_list)):
            for j, n in enumerate(ns):
                L = float(theory_risk(design, n, model))  # the closed forms once per (design, n), not per seed
                W_star = optimum(design, n, model).W if optimum is not None and protocols.implements_pgd(model) else None
                for k, seed in enumerate(seeds):
                    row = {"design": label, "model": name, "n": n, "seed": seed, "risk": float(risk[i, j, k]),
                           "se": float(se[i, j, k]), "theory": L, "gap": (float(risk[i, j, k]) - L) / L,
                           "final_loss": float(np.mean(fitted.losses[i, j, k, -100:])),
                           # the quality gate: within 10% (+ 4 Monte Carlo SE) of the closed-form reference
                           "passed": bool(quality.gate(float(risk[i, j, k]), L, se=float(se[i, j, k])))}
                    if protocols.implements_pgd(model):
                        p = jax.tree_util.tree_map(lambda a: a[i, j, k], fitted.params)
                        W, omega = effective(model, p, n, n_slots)
                        if W_star is not None:
                            row["w_rel"] = float(jnp.linalg.norm(W - W_star) / jnp.linalg.norm(W_star))
                        exact = exact_risk(model, p, design, n, n_slots, W, omega)
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
