"""Every paper-A experiment's quick figure, drawn from synthetic rows of the columns its run()
writes (no training): the PNG is written and non-trivial, and the figure keeps its promises (one
colour per model, theory dotted, a gap panel, points across categories, integer rank ticks)."""

import io

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from iclsim import plotting, runner  # noqa: E402

EXPERIMENTS = runner.discover()
RNG = np.random.default_rng(0)


def _row(theory, **cols):
    risk = theory * (1 + RNG.normal(0, 0.02))
    return {"risk": risk, "se": 0.01 * theory, "theory": theory, "gap": (risk - theory) / theory, **cols}


def rows_fig2(s):
    rows = []
    panels = {"(a) noiseless": ["noiseless"], "(b) noisy labels": ["s2=1"], "(c) non-isotropic task": ["Sb power law"]}
    for panel, designs in panels.items():
        for design in designs:
            for model in ("linear attention", "H3"):
                for n in s.ns:
                    for seed in range(s.seeds):
                        rows.append(_row(s.dim * 4 / (n + 4), panel=panel, design=design, model=model, n=n,
                                         seed=seed))
    return rows


def rows_h3(s):
    n, rows = s.n, []
    for design in ("drift", "AR(1) drift", "noise ramp", "IID"):
        for model in ("H3 (free filter)", "H3 (SSM filter)", "linear attention"):
            L_H3, L_ATT = 3.7, 4.0 if design != "IID" else 3.7
            for seed in range(max(s.seeds, 2)):
                row = _row(L_ATT if model == "linear attention" else L_H3, design=design, model=model, n=n, seed=seed,
                           L_H3=L_H3, L_ATT=L_ATT)
                if model.startswith("H3"):
                    omega = np.linspace(0.5, 1.5, n)
                    row.update({f"omega_{i + 1}": omega[i] + RNG.normal(0, 0.05) for i in range(n)})
                    row.update({f"omega_star_{i + 1}": omega[i] for i in range(n)})
                rows.append(row)
    return rows


def rows_lowrank(s):
    rows = []
    for design in ("spiked", "flat"):
        for r in s.ranks:
            for seed in range(s.seeds):
                row = _row(2.0 + (s.dim - r) * 0.3, design=design, model=f"rank {r}", n=s.n, seed=seed, rank=r)
                if design == "spiked" and r <= s.spikes:
                    row["overlap"] = 0.97
                rows.append(row)
    return rows


def rows_lora(s):
    rows = []
    for family in ("attention", "PGD"):
        for r in s.ranks:
            rows.append(_row(2.0 - 0.1 * r, design="new", model=f"{family} LoRA r={r}", n=s.n, seed=0,
                             family=family, rank=r, W_rank=r, no_adaptation=2.5, retrained=1.8))
    return rows


def rows_correlated(s, approximation):
    rows = []
    for a in s.alphas:
        for n in s.ns:
            row = _row(s.dim * 4 / (n * (1 + a) + 4), design=f"alpha={a:g}", model="linear attention", n=n, seed=0,
                       n_eff_ratio=1 + a + RNG.normal(0, 0.01), n_eff_ratio_theory=1 + a)
            if approximation:
                row["approximation"] = row["theory"] * 1.01
            rows.append(row)
    return rows


def quick(name):
    exp = EXPERIMENTS[name]
    return exp.quick


BUILDERS = {
    "fig2": lambda s: rows_fig2(s),
    "h3_weighting": lambda s: rows_h3(s),
    "lowrank": lambda s: rows_lowrank(s),
    "lora": lambda s: rows_lora(s),
    "rag": lambda s: rows_correlated(s, True),
    "alignment": lambda s: rows_correlated(s, False),
    "fig1": lambda s: ([{"source": "h3_weighting", **r} for r in rows_h3(quick("h3_weighting"))]
                       + [{"source": "rag", **r} for r in rows_correlated(quick("rag"), True)]
                       + [{"source": "lowrank", **r} for r in rows_lowrank(quick("lowrank"))]),
}


def _render(name):
    s = quick(name)
    fig = EXPERIMENTS[name].plot(BUILDERS[name](s), s)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return fig, buf.getvalue()


def _lines(ax):
    return [ln for ln in ax.get_lines() if len(ln.get_xdata())]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_quick_figure_is_written(name, tmp_path):
    fig, png = _render(name)
    path = tmp_path / f"{name}.png"
    path.write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    assert fig.get_layout_engine() is not None  # constrained layout: titles do not overlap
    gap_axes = [ax for ax in fig.axes if "theory" in ax.get_ylabel() and "-" in ax.get_ylabel()]
    assert gap_axes, f"{name}: no relative-gap panel"
    plotting.plt.close(fig)


def test_fig2_one_colour_per_model_theory_dotted_and_mc_error_bars():
    fig, _ = _render("fig2")
    top = fig.axes[0]
    solid = [ln for ln in _lines(top) if ln.get_linestyle() == "-"]
    dotted = [ln for ln in _lines(top) if ln.get_linestyle() == ":"]
    assert len({ln.get_color() for ln in solid}) == 2  # linear attention and H3
    assert dotted and all(ln.get_color() == "k" for ln in dotted)  # one optimum shared by both models: black
    assert "Monte Carlo SE" in top.get_legend().get_title().get_text()
    assert "MC SE" in fig.axes[1].get_ylabel() or any("MC SE" in ax.get_ylabel() for ax in fig.axes)
    plotting.plt.close(fig)


def test_categorical_axis_has_points_not_lines():
    fig, _ = _render("h3_weighting")
    ax, below = fig.axes[0], fig.axes[2]  # risk panel and its gap panel (which carries the tick labels)
    assert [t.get_text() for t in below.get_xticklabels()] == ["drift", "AR(1) drift", "noise ramp", "IID"]
    for a in (ax, below):
        data = [ln for ln in _lines(a) if ln.get_transform() == a.transData]  # not the zero reference line
        joined = [ln for ln in data if ln.get_linestyle() not in ("None", "none", " ", "")]
        assert data and all(np.ptp(ln.get_xdata()) < 1 for ln in joined)  # no line spans two categories
    plotting.plt.close(fig)


def test_rank_axes_have_integer_ticks():
    fig, _ = _render("lowrank")
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    plotting.plt.close(fig)


def test_gap_panel_shows_the_relative_gap():
    rows = [{"design": "a", "model": "m", "n": n, "seed": 0, "risk": 1.1 * t, "se": 0.01, "theory": t}
            for n, t in [(1, 2.0), (2, 1.0)]]
    fig, axes, gaps = plotting.panels(1, gap=True)
    plotting.gap(gaps[0], rows)
    line = _lines(gaps[0])[0]
    assert np.allclose(line.get_ydata(), [0.1, 0.1])
    assert "2 MC SE" in gaps[0].get_ylabel()
    plotting.plt.close(fig)


def test_plotting_does_not_choose_a_backend():
    import subprocess
    import sys
    code = ("import matplotlib; matplotlib.use('svg'); import iclsim.plotting; "
            "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()")
    subprocess.run([sys.executable, "-c", code], check=True)
