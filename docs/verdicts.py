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
    print("| claim | setting | measure (per seed, median [order-statistic interval, coverage 0.979]) | bases A; B; across |")
    print("|---|---|---|---|")
    for s in SETTINGS:
        c = search["claims"][s]
        print(f"| (i) pruning helps | {s} | joint search, paired test change | "
              f"{cell(c['claim_i_joint_search_change'], across='across_bases', pct=True)} |")
        print(f"| (i) ... beyond controls | {s} | search minus best control ({c['pruning_beats_best_control']['A'].get('best_control')}) | "
              f"{cell(c['pruning_beats_best_control'], across='across_bases', pct=True)} |")
    for s in SETTINGS:
        print(f"| (ii) deep more stable | {s} | shallow - deep, SVD | {cell(depth['claim_ii'][s])} |")
        print(f"| (ii) ... the delete control | {s} | shallow - deep, delete | {cell(depth['controls'][s]['delete'])} |")
    for s in ("matched", "shorter context"):
        if s in step:
            print(f"| (ii) as stated: depth | {s} | same step, position 1 - 4 | {cell(step[s]['depth_effect'])} |")
            print(f"| (ii) what drives it: step | {s} | same position, shortest - longest step | "
                  f"{cell(step[s]['step_effect'])} |")
    for s in SETTINGS:
        blk = bound["claim_iii"][s]["bound"]
        print(f"| (iii) the bound orders harm | {s} | Spearman(bound, harm) | "
              f"{cell(blk, a='base_A', b='base_B', across='across_bases')} |")
    for s in SETTINGS:
        c = search["claims"][s]
        print(f"| (iv) paper B's protocol, layer 4 | {s} | paired test change | "
              f"{cell(c['claim_iv_paper_b_layer4'], across='across_bases', pct=True)} |")
        print(f"| (iv) stability (worst over the rate grid) | {s} | layer 1 - layer 4 | "
              f"{cell(c['stability_shallow_minus_deep_worst'], across='across_bases')} |")
    for s in SETTINGS:
        blk = aniso["claim_ii_shallow_minus_deep"]["anisotropic"][s]["svd"]
        print(f"| (ii) anisotropic data | {s} | shallow - deep, SVD | {cell(blk, across='across_bases')} |")
    for s in ("noisier test labels", "shorter context"):
        blk = aniso["claim_i_search"]["anisotropic"][s]
        print(f"| (i) anisotropic data | {s} | SVD search minus delete/scale search | "
              f"{cell(blk['svd_minus_control'], across='across_bases', pct=True)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "figures")
