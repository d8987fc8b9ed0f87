"""Paper A, Figure 1: one overview of the three aspects (architecture, distributional alignment,
low rank), drawn from the results of h3_weighting, rag and lowrank in the output folder, without
retraining (run those first: ``iclsim run all`` orders them). Their provenance is checked
(``runner.read_results``): results of another fidelity (quick or not), seed or iclsim version are
refused."""

import dataclasses

from iclsim import plotting
from iclsim.runner import Experiment, read_results

SOURCES = ("h3_weighting", "rag", "lowrank")


def run(s, seed, context):
    rows = []
    for name in SOURCES:
        found = read_results(context.out, name, quick=context.quick, seed=seed, reader="fig1")
        rows += [{"source": name, **r} for r in found]
    return rows


def plot(rows, s):
    fig, (ax1, ax2, ax3), (g1, g2, g3) = plotting.panels(3, gap=True)
    arch = [r for r in rows if r["source"] == "h3_weighting" and r["model"] != "H3 (SSM filter)"]
    plotting.curves(ax1, arch, x="design", group=("model",), theory_label="optimum (WPGD / PGD)")
    plotting.gap(g1, arch, x="design", group=("model",))
    ax1.set_title("architecture: H3 vs linear attention")
    ax1.set_ylabel("test risk L")
    plotting.legend(ax1)
    rag = [r for r in rows if r["source"] == "rag"]
    plotting.curves(ax2, rag, group=("design",), theory_label="exact optimum")
    plotting.gap(g2, rag, group=("design",))
    ax2.set_title("distributional alignment: RAG")
    plotting.legend(ax2)
    low = [r for r in rows if r["source"] == "lowrank"]
    plotting.curves(ax3, low, x="rank", group=("design",), theory_label="Eckart-Young optimum")
    plotting.gap(g3, low, x="rank", group=("design",))
    ax3.set_title("low-rank attention")
    plotting.legend(ax3)
    fig.suptitle("Paper A, Fig. 1 overview: trained models (solid) vs theory (dotted)")
    return fig


def summary(rows):
    return {f"{name}_rows": sum(r["source"] == name for r in rows) for name in SOURCES}


@dataclasses.dataclass(frozen=True)
class Settings:
    """fig1 has no settings of its own: it draws the results of SOURCES."""


EXPERIMENT = Experiment(name="fig1", title="Paper A Fig. 1: overview of architecture, alignment and low rank",
                        settings=Settings(), run=run, plot=plot, summary=summary, after=SOURCES)
