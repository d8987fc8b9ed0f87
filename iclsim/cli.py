"""Command line: ``iclsim list`` and
``iclsim run NAME|all [--quick] [--out DIR] [--seed S] [--cache DIR | --no-cache] [--force]``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from iclsim import runner
from iclsim.cache import SweepCache, persist_compilations

__all__ = ["use_all_cpu_cores", "main"]


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


def use_all_cpu_cores() -> None:
    """Expose one XLA CPU device per core (unless XLA_FLAGS already sets a count), so that sweeps, whose
    axis ``fit_sweep`` splits over the devices, use every core (XLA CPU otherwise runs a program's
    vmapped points on one device). Must run before JAX starts its backends; no effect on GPUs/TPUs."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={os.cpu_count() or 1}".strip()


def main(argv=None) -> int:
    use_all_cpu_cores()
    parser = argparse.ArgumentParser(prog="iclsim", description=__doc__)
    parser.add_argument("--experiments", type=Path, default=runner.EXPERIMENTS_DIR, help="experiments folder")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the experiments")
    run = sub.add_parser("run", help="run experiments and write results and figures")
    run.add_argument("names", nargs="+", help="experiment names, or 'all'")
    run.add_argument("--quick", action="store_true", help="small settings that run in under a minute")
    run.add_argument("--out", type=Path, default=Path("figures"), help="output folder (default: figures)")
    run.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    run.add_argument("--cache", type=Path, default=Path(".iclsim-cache"),
                     help="folder of trained sweep points and compiled programs (in xla/), reused by later runs "
                          "(default: .iclsim-cache)")
    run.add_argument("--no-cache", action="store_true", help="neither read nor write the cache (trained points or programs)")
    run.add_argument("--force", action="store_true", help="retrain every point and overwrite the cache (compiled programs are still reused)")
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
    with contextlib.nullcontext() if args.no_cache else persist_compilations(args.cache / "xla"):
        for name in _order(experiments, names):
            cache = None if args.no_cache else SweepCache(args.cache, force=args.force)
            runner.run_experiment(experiments[name], args.out, args.quick, args.seed, cache=cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
