"""Command line: ``iclsim list`` and ``iclsim run NAME|all [--quick] [--out DIR] [--seed S]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iclsim import runner


def _order(experiments: dict, names: list[str]) -> list[str]:
    """The requested names, each after those of its ``after`` experiments that are also requested."""
    ordered: list[str] = []

    def visit(name):
        if name in ordered:
            return
        for dep in experiments[name].after:
            if dep in names:
                visit(dep)
        ordered.append(name)

    for name in names:
        visit(name)
    return ordered


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="iclsim", description=__doc__)
    parser.add_argument("--experiments", type=Path, default=runner.EXPERIMENTS_DIR, help="experiments folder")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the experiments")
    run = sub.add_parser("run", help="run experiments and write results and figures")
    run.add_argument("names", nargs="+", help="experiment names, or 'all'")
    run.add_argument("--quick", action="store_true", help="small settings that run in under a minute")
    run.add_argument("--out", type=Path, default=Path("figures"), help="output folder (default: figures)")
    run.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    args = parser.parse_args(argv)

    experiments = runner.discover(args.experiments)
    if args.command == "list":
        for name, exp in experiments.items():
            print(f"{name:16s} {exp.title}")
        return 0
    names = list(experiments) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in experiments]
    if unknown:
        print(f"unknown experiment(s): {', '.join(unknown)}; known: {', '.join(experiments)}", file=sys.stderr)
        return 2
    for name in _order(experiments, names):
        runner.run_experiment(experiments[name], args.out, args.quick, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
