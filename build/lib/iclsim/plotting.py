"""Figures a reader trusts at a glance: one colour per model (or per curve), one line style per
kind (trained: solid with markers; theory: dotted; approximations: dashed), error bars that say
what they are, and under each risk panel the relative gap (trained - theory) / theory with its
Monte Carlo interval. Categorical x values are drawn as points, integer x values get integer
ticks, and figures use constrained layout so titles never overlap.

Importing this module does not choose a matplotlib backend (the runner sets Agg)."""

from __future__ import annotations

from collections import defaultdict

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

__all__ = ["LINESTYLES", "ERROR_LABELS", "GAP_SIGMAS", "seed_stats", "curves", "gap", "legend", "panels",
           "colour_map", "integer_ticks", "plt"]

LINESTYLES = {"empirical": "-", "theory": ":", "approximation": "--", "reference": "-."}
ERROR_LABELS = {"se": "± Monte Carlo SE of the test risk", "seeds": "± sd over seeds", "none": "none (one seed)"}
GAP_SIGMAS = 2.0  # the gap panel's interval: ± 2 Monte Carlo SE (about 95%)
MARKERS = "osD^v<>pP*"
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def colour_map(names) -> dict:
    """A fixed colour per name, in order of first appearance."""
    out = {}
    for name in names:
        out.setdefault(name, _PALETTE[len(out) % len(_PALETTE)])
    return out


def seed_stats(rows, x: str, y: str, keys: tuple[str, ...]):
    """Group rows by keys, then by x: (xs, mean over seeds, sd over seeds) of y per group."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if y in r:
            groups[tuple(r[k] for k in keys)][r[x]].append(r[y])
    out = {}
    for g, by_x in groups.items():
        xs = _ordered(by_x)
        out[g] = (np.array(xs), np.array([np.mean(by_x[v]) for v in xs]), np.array([np.std(by_x[v]) for v in xs]))
    return out


def _ordered(values):
    values = list(dict.fromkeys(values))
    return values if any(isinstance(v, str) for v in values) else sorted(values)


def _stats(rows, x, y, keys, se="se"):
    """{group: {x: (mean over seeds, sd over seeds, Monte Carlo SE of the mean or nan)}}."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if y in r:
            groups[tuple(r[k] for k in keys)][r[x]].append((r[y], r.get(se, np.nan) if y == "risk" else np.nan))
    return {g: {v: (np.mean([a for a, _ in pts]), np.std([a for a, _ in pts]),
                    np.sqrt(np.sum([b**2 for _, b in pts])) / len(pts)) for v, pts in by_x.items()}
            for g, by_x in groups.items()}


def _error_kind(stats, errors):
    if errors != "auto":
        if errors not in ERROR_LABELS:
            raise ValueError(f"errors must be 'auto' or one of {sorted(ERROR_LABELS)}, got {errors!r}")
        return errors
    cells = [c for by_x in stats.values() for c in by_x.values()]
    if cells and all(np.isfinite(c[2]) for c in cells):
        return "se"
    return "seeds" if any(c[1] > 0 for c in cells) else "none"


def _positions(ax, rows, x):
    """x -> position on the axis: the value itself, or its index for categorical x (ticks labelled)."""
    values = _ordered(r[x] for r in rows)
    if any(isinstance(v, str) for v in values):
        ax.set_xticks(range(len(values)), [str(v) for v in values], fontsize=8)
        return {v: float(i) for i, v in enumerate(values)}, True
    if all(isinstance(v, (int, np.integer)) or float(v).is_integer() for v in values):
        integer_ticks(ax)
        if len(values) == 1:
            ax.set_xlim(values[0] - 1, values[0] + 1)
    return {v: float(v) for v in values}, False


def _styles(groups, group, colour_by):
    """Colour per value of ``colour_by``, marker per value of the other group keys."""
    ci = group.index(colour_by) if colour_by in group else len(group) - 1
    colours = colour_map(g[ci] for g in groups)
    others = list(dict.fromkeys(tuple(v for i, v in enumerate(g) if i != ci) for g in groups))
    return {g: (colours[g[ci]], MARKERS[others.index(tuple(v for i, v in enumerate(g) if i != ci)) % len(MARKERS)])
            for g in groups}


def curves(ax, rows, x: str = "n", y: str = "risk", theory: str | None = "theory", group=("design", "model"),
           label=lambda g: " / ".join(map(str, g)), theory_label="theory", errors: str = "auto",
           colour_by: str | None = None):
    """Trained (solid, markers, error bars) and theory (dotted) curves of y against x per group.

    Colour by ``colour_by`` (default the last group key, the model), marker by the other keys.
    Error bars: "se" the Monte Carlo SE of the seed-mean test risk (rows' "se" column), "seeds"
    the sd over seeds; "auto" takes "se" where every point has one; the kind is kept for
    ``legend``. Categorical x: points with small offsets per group, theory as short dotted
    dashes, nothing joins categories. A theory curve shared by groups of different colours
    (one optimum, several models) is drawn once, in black.
    """
    group = tuple(group)
    stats = _stats(rows, x, y, group)
    kind = _error_kind(stats, errors)
    ax._iclsim_errors = kind
    pos, categorical = _positions(ax, rows, x)
    styles = _styles(list(stats), group, colour_by)
    width = 0.5 / max(len(stats), 1)
    shifts = {g: (k - (len(stats) - 1) / 2) * width if categorical else 0.0 for k, g in enumerate(stats)}
    for g, by_x in stats.items():
        xs = _ordered(by_x)
        mean = np.array([by_x[v][0] for v in xs])
        err = {"se": [by_x[v][2] for v in xs], "seeds": [by_x[v][1] for v in xs], "none": None}[kind]
        colour, marker = styles[g]
        ax.errorbar([pos[v] + shifts[g] for v in xs], mean, yerr=err, color=colour, marker=marker, ms=5, capsize=2,
                    ls="none" if categorical else LINESTYLES["empirical"], label=label(g))
    if theory:
        _theory(ax, rows, x, theory, group, styles, pos, shifts, categorical, theory_label, width)
    if not getattr(ax, "_iclsim_has_gap", False):  # else the gap panel below carries the x label
        ax.set_xlabel(x)
    ax.grid(alpha=0.3)


def _theory(ax, rows, x, theory, group, styles, pos, shifts, categorical, theory_label, width):
    curves_ = seed_stats(rows, x, theory, group)
    shared = defaultdict(set)  # identical theory curves -> the colours of the groups drawing them
    for g, (xs, mean, _) in curves_.items():
        shared[(tuple(xs), tuple(np.round(mean, 12)))].add(styles[g][0] if g in styles else "k")
    drawn, labelled = set(), False
    for g, (xs, mean, _) in curves_.items():
        ident = (tuple(xs), tuple(np.round(mean, 12)))
        colour = "k" if len(shared[ident]) > 1 else next(iter(shared[ident]))
        lab = "_nolegend_" if labelled else f"{theory_label} (dotted)"
        if categorical:  # a short dotted bar over each group's point
            for v, value in zip(xs, mean):
                c = pos[v] + shifts.get(g, 0.0)
                ax.plot([c - 0.45 * width, c + 0.45 * width], [value, value], color=colour, ls=LINESTYLES["theory"],
                        lw=2.5, label=lab)
                lab, labelled = "_nolegend_", True
        elif ident not in drawn:  # a curve shared by several groups is drawn once
            drawn.add(ident)
            ax.plot([pos[v] for v in xs], mean, color=colour, ls=LINESTYLES["theory"], lw=2, label=lab,
                    marker="_" if len(xs) == 1 else None, ms=20)
            labelled = True


def gap(ax, rows, x: str = "n", y: str = "risk", theory: str = "theory", group=("design", "model"),
        colour_by: str | None = None, sigmas: float = GAP_SIGMAS):
    """Relative gap (trained - theory) / theory of the seed-mean, per group, with its Monte Carlo
    interval ± sigmas SE / theory (the sd over seeds where rows carry no SE); zero dotted."""
    group = tuple(group)
    stats = _stats(rows, x, y, group)
    ref = {g: dict(zip(xs, mean)) for g, (xs, mean, _) in seed_stats(rows, x, theory, group).items()}
    kind = _error_kind(stats, "auto")
    pos, categorical = _positions(ax, rows, x)
    styles = _styles(list(stats), group, colour_by)
    width = 0.5 / max(len(stats), 1)
    for k, (g, by_x) in enumerate(stats.items()):
        xs = [v for v in _ordered(by_x) if v in ref.get(g, {})]
        t = np.array([ref[g][v] for v in xs])
        rel = (np.array([by_x[v][0] for v in xs]) - t) / t
        spread = {"se": [by_x[v][2] for v in xs], "seeds": [by_x[v][1] for v in xs]}.get(kind)
        err = None if spread is None else sigmas * np.array(spread) / np.abs(t) if kind == "se" else np.array(spread) / np.abs(t)
        shift = (k - (len(stats) - 1) / 2) * width if categorical else 0.0
        colour, marker = styles[g]
        ax.errorbar([pos[v] + shift for v in xs], rel, yerr=err, color=colour, marker=marker, ms=4, capsize=2,
                    ls="none" if categorical else LINESTYLES["empirical"])
    ax.axhline(0.0, color="k", ls=LINESTYLES["theory"], lw=1)
    what = {"se": f"± {sigmas:g} MC SE", "seeds": "± sd over seeds"}.get(kind, "")
    ax.set_ylabel(f"(trained - theory) / theory\n{what}".rstrip(), fontsize=8)
    ax.set_xlabel(x)
    ax.grid(alpha=0.3)


def integer_ticks(ax):
    """Integer ticks on the x axis (ranks, positions)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def legend(ax, **kwargs):
    """The axis legend, titled with what its error bars are (from the last ``curves`` on it)."""
    kind = getattr(ax, "_iclsim_errors", None)
    title = f"error bars: {ERROR_LABELS[kind]}" if kind else None
    kwargs.setdefault("fontsize", 7)
    kwargs.setdefault("title_fontsize", 7)
    return ax.legend(title=title, **kwargs)


def panels(count: int, width: float = 4.6, height: float = 3.6, gap: bool = False):
    """A row of ``count`` panels in constrained layout: (fig, axes); with ``gap``, a short gap panel
    under each, sharing its x axis: (fig, axes, gap_axes)."""
    if not gap:
        fig, axes = plt.subplots(1, count, figsize=(width * count, height), squeeze=False, layout="constrained")
        return fig, list(axes[0])
    fig, axes = plt.subplots(2, count, figsize=(width * count, height * 1.35), squeeze=False, sharex="col",
                             gridspec_kw={"height_ratios": [3, 1]}, layout="constrained")
    for ax in axes[0]:
        ax._iclsim_has_gap = True
    return fig, list(axes[0]), list(axes[1])
