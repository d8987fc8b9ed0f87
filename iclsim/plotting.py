"""Figures in the papers' style: empirical curves solid with error bars over seeds, theory dotted
in the same colour. The backend is the caller's choice (the runner picks Agg before plotting)."""

from __future__ import annotations

from collections import defaultdict

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["LINESTYLES", "seed_stats", "curves", "panels"]

LINESTYLES = {"empirical": "-", "theory": ":", "approximation": "--"}


def seed_stats(rows, x: str, y: str, keys: tuple[str, ...]):
    """Group rows by keys, then by x: mean and standard deviation over seeds of y."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[tuple(r[k] for k in keys)][r[x]].append(r[y])
    out = {}
    for g, by_x in groups.items():
        xs = sorted(by_x)
        out[g] = (np.array(xs), np.array([np.mean(by_x[v]) for v in xs]),
                  np.array([np.std(by_x[v]) for v in xs]))
    return out


def curves(ax, rows, x: str = "n", y: str = "risk", theory: str | None = "theory", group=("design", "model"),
           label=lambda g: " / ".join(map(str, g)), theory_label="theory"):
    """Solid empirical mean +- std over seeds per group, dotted theory per first group key."""
    colours = {}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^v<>"
    models = sorted({r[group[-1]] for r in rows}) if len(group) > 1 else [None]
    for g, (xs, mean, std) in seed_stats(rows, x, y, group).items():
        c = colours.setdefault(g[0], cycle[len(colours) % len(cycle)])
        m = markers[models.index(g[-1]) % len(markers)] if len(group) > 1 else "o"
        ax.errorbar(xs, mean, yerr=std, color=c, ls=LINESTYLES["empirical"], marker=m, ms=4, capsize=2,
                    label=label(g))
    if theory:
        for g, (xs, mean, _) in seed_stats(rows, x, theory, group[:1]).items():
            ax.plot(xs, mean, color=colours.get(g[0], "k"), ls=LINESTYLES["theory"], lw=2,
                    label=f"{g[0]} {theory_label}")
    ax.set_xlabel(x)
    ax.grid(alpha=0.3)


def panels(count: int, width: float = 4.6, height: float = 3.6):
    fig, axes = plt.subplots(1, count, figsize=(width * count, height), squeeze=False)
    return fig, list(axes[0])
