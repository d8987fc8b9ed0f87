"""Paper A, Figure 1: one overview of the three aspects (architecture, distributional alignment,
low rank), drawn from the results of h3_weighting, rag and lowrank in the output folder, without
retraining (run those first: ``iclsim run all`` orders them). Their provenance is checked
(``runner.read_results``): results of another fidelity (quick or not), seed or iclsim version are
refused."""

import numpy as np

from iclsim import plotting
from iclsim.runner import Experiment, read_results

SOURCES = ("h3_weighting", "rag", "lowrank")


def run(s, seed, progress):
    rows = []
    for name in SOURCES:
        found = read_results(s["out"], name, quick=s.get("quick", False), seed=seed, reader="fig1")
        rows += [{"source": name, **r} for r in found]
    return rows


def plot(rows, s):
    fig, (ax1, ax2, ax3) = plotting.panels(3)
    arch = [r for r in rows if r["source"] == "h3_weighting" and r["model"] != "H3 (SSM filter)"]
    labels = list(dict.fromkeys(r["design"] for r in arch))
    x = np.arange(len(labels))
    for k, m in enumerate(["H3 (free filter)", "linear attention"]):
        ax1.plot(x, [np.mean([r["risk"] for r in arch if r["design"] == lab and r["model"] == m]) for lab in labels],
                 "o-", label=m)
    ax1.plot(x, [next(r["L_H3"] for r in arch if r["design"] == lab) for lab in labels], "k:", lw=2, label="WPGD theory")
    ax1.plot(x, [next(r["L_ATT"] for r in arch if r["design"] == lab) for lab in labels], "r:", lw=2, label="PGD theory")
    ax1.set_xticks(x, labels, fontsize=8)
    ax1.set_title("architecture: H3 vs linear attention")
    ax1.set_ylabel("test risk L")
    ax1.legend(fontsize=7)
    plotting.curves(ax2, [r for r in rows if r["source"] == "rag"], group=("design",))
    ax2.set_title("distributional alignment: RAG")
    ax2.legend(fontsize=7)
    plotting.curves(ax3, [r for r in rows if r["source"] == "lowrank"], x="rank", group=("design",))
    ax3.set_title("low-rank attention")
    ax3.legend(fontsize=7)
    fig.suptitle("Paper A, Fig. 1 overview: trained models (solid) vs theory (dotted)")
    return fig


def summary(rows):
    return {f"{name}_rows": sum(r["source"] == name for r in rows) for name in SOURCES}


EXPERIMENT = Experiment(name="fig1", title="Paper A Fig. 1: overview of architecture, alignment and low rank",
                        settings={}, run=run, plot=plot, summary=summary, after=SOURCES)
