"""Print paper B's decided verdicts as markdown tables, read from the committed result sets (figures/*.json):
the numbers quoted in docs/results.md and the README come from this script, so anyone can regenerate them.

    python docs/verdicts.py [FOLDER]     # default: figures/
"""

import json
import sys
from pathlib import Path

SETTINGS = ("matched", "noisier test labels", "shorter context")


def load(folder: Path, name: str) -> dict:
    return json.loads((folder / f"{name}.json").read_text())["summary"]


def cell(block: dict, a: str = "A", b: str = "B", across: str = "verdict_across", pct: bool = False) -> str:
    """'A: median [low, high]; B: ...; verdict' for a per-base block."""
    def one(x):
        if not isinstance(x, dict) or "median" not in x:
            return "-"
        f = (lambda v: "-" if v is None else f"{100 * v:+.1f}%") if pct else \
            (lambda v: "-" if v is None else f"{v:+.3g}")
        lo, hi = x.get("interval", x.get("median_interval", [None, None]))
        return f"{f(x['median'])} [{f(lo)}, {f(hi)}]"
    verdict = block.get(across, block.get("across_bases", "?"))
    return f"A {one(block.get(a))}; B {one(block.get(b))}; **{verdict}**"


def main(folder: Path) -> None:
    depth, step = load(folder, "pruning_depth"), load(folder, "pruning_depth_step")
    search, bound = load(folder, "pruning_search"), load(folder, "pruning_bound")
    aniso = load(folder, "pruning_anisotropic")
    across = {"across": "across_bases"}
    # (claim, settings, measure(setting), block(setting), cell options): one table row per setting
    specs = [
        [("(i) pruning helps", SETTINGS, lambda s: "joint search, paired test change",
          lambda s: search["claims"][s]["claim_i_joint_search_change"], {**across, "pct": True}),
         ("(i) ... beyond controls", SETTINGS, lambda s: "search minus best control "
          f"({search['claims'][s]['pruning_beats_best_control']['A'].get('best_control')})",
          lambda s: search["claims"][s]["pruning_beats_best_control"], {**across, "pct": True})],
        [("(ii) deep more stable", SETTINGS, lambda s: "shallow - deep, SVD", lambda s: depth["claim_ii"][s], {}),
         ("(ii) ... the delete control", SETTINGS, lambda s: "shallow - deep, delete",
          lambda s: depth["controls"][s]["delete"], {})],
        [("(ii) as stated: depth", [s for s in ("matched", "shorter context") if s in step],
          lambda s: "same step, position 1 - 4", lambda s: step[s]["depth_effect"], {}),
         ("(ii) what drives it: step", [s for s in ("matched", "shorter context") if s in step],
          lambda s: "same position, shortest - longest step", lambda s: step[s]["step_effect"], {})],
        [("(iii) the bound orders harm", SETTINGS, lambda s: "Spearman(bound, harm)",
          lambda s: bound["claim_iii"][s]["bound"], {**across, "a": "base_A", "b": "base_B"})],
        [("(iv) paper B's protocol, layer 4", SETTINGS, lambda s: "paired test change",
          lambda s: search["claims"][s]["claim_iv_paper_b_layer4"], {**across, "pct": True}),
         ("(iv) stability (worst over the rate grid)", SETTINGS, lambda s: "layer 1 - layer 4",
          lambda s: search["claims"][s]["stability_shallow_minus_deep_worst"], across)],
        [("(ii) anisotropic data", SETTINGS, lambda s: "shallow - deep, SVD",
          lambda s: aniso["claim_ii_shallow_minus_deep"]["anisotropic"][s]["svd"], across)],
        [("(i) anisotropic data", ("noisier test labels", "shorter context"),
          lambda s: "SVD search minus delete/scale search",
          lambda s: aniso["claim_i_search"]["anisotropic"][s]["svd_minus_control"], {**across, "pct": True})],
    ]
    print("| claim | setting | measure (per seed, median [order-statistic interval, coverage 0.979]) | bases A; B; across |")
    print("|---|---|---|---|")
    for group in specs:  # the rows of a group interleave by setting
        settings = group[0][1]
        for s in settings:
            for claim, _, measure, block, options in group:
                print(f"| {claim} | {s} | {measure(s)} | {cell(block(s), **options)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "figures")
