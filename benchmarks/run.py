"""Benchmarks, measured side by side in one run; the JSON object is the last line printed.

  quick_reference_speedup the quick benchmark, where a researcher waits: reference_speedup (below) of a
                          300-step training, compilation included, at n = 20; *_long at n = 200. Measured
                          first, in every mode, so it always includes the process's first compilation
  reference_speedup       wall time of a plain eager PyTorch training (benchmarks/reference_torch.py) over
                          iclsim's fit of the same training (linear attention, IID, d = 10, n = 20, batch 512,
                          Adam warmup-cosine, same steps), compilation included; *_long at n = 200;
                          *_warm_cache: iclsim's program loaded from the persistent compilation cache;
                          *_second_run: a second training in the same process on each side (another seed;
                          iclsim's program already compiled): the steady-state throughput ratio
  sweep_speedup           vmapped sweep of 64 models (8 context lengths x 8 seeds) vs the same models trained
                          one at a time with a Python loop over fit(), compilation included in both
  n_cost_ratio            time per training step at n = 200 over n = 20 (linear attention, IID, d = 10)
  sampling_fraction       time to draw one batch of token prompts the naive way / time of one training step
  matmul_fraction         achieved FLOP/s of a training step (XLA cost analysis) / FLOP/s of a 2048^3 matmul
  cost_table              ms per training step over d and n, Gram draws (default) and token draws
  record_overhead_*       (--records, and in the full benchmark) a sweep of 50 points (5 context lengths x 10
                          seeds, linear attention, batch 512, 1000 and 2000 steps) with 50 training records (every 20
                          or 40 steps: the loss on record_prompts fixed prompts, TrainConfig's default, and the
                          preconditioner's spectrum) over the same sweep with them off, compilation excluded,
                          alternating off/on, best of three each; wall and (record_overhead_cpu_*) CPU seconds
                          (issue 34's bar: under 5%)
  reproduce_wall_s        sum of the wall times recorded in figures/*.json (the last `make reproduce`)
  wall_*_s                (--wall) a fresh clone of the committed HEAD in a temporary folder: `make test`
                          with the install (wall_make_test_fresh_clone_s), then `make quick` with its caches
                          removed (wall_make_quick_empty_cache_s); exit codes beside them
  machine                 date (UTC), CPU, core count, load average before and after, and the FLOP/s of a
                          2048^3 float32 matmul, so that a slow day shows beside the numbers
  targets                 each bar of issue 23 with the value measured and whether it is met (never asserted)

Modes: --quick runs only the quick benchmark (300-step trainings only); the default runs it and the full
benchmark; --small runs the full benchmark at smaller sizes (to check every path runs); --wall adds
the wall times to any mode (a whole `make test` and `make quick`; the install needs the network or
pip's cache).

Usage: python benchmarks/run.py [--quick | --small] [--wall] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import iclsim
from iclsim import IID, cache, models, train
from iclsim.cli import use_all_cpu_cores

ROOT = Path(__file__).resolve().parent.parent
DIM, BATCH, LR = 10, 512, 1e-2
QUICK_STEPS = 300
ENVIRONMENT = dict(os.environ)  # as started, before use_all_cpu_cores() sets XLA_FLAGS for this process
# (key, comparison, bar): the targets of issue 23 (the full benchmark keeps issue 6's bars)
TARGETS = (("quick_reference_speedup", ">=", 1.0), ("quick_reference_speedup_long", ">=", 3.0),
           ("reference_speedup", ">=", 1.5), ("reference_speedup_long", ">=", 5.0), ("sweep_speedup", ">=", 2.0),
           ("n_cost_ratio", "<=", 1.5), ("wall_make_quick_empty_cache_s", "<=", 45.0),
           ("wall_make_test_fresh_clone_s", "<=", 240.0))


def timed(fn, repeats=1):
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def config(steps, sampler="auto"):
    return train.TrainConfig(steps=steps, batch_size=BATCH, learning_rate=LR, sampler=sampler)


def reference_speedup(n, steps):
    """(iclsim s, iclsim s with the program in the persistent compilation cache, iclsim s with the program
    in memory, torch s, torch s of a second run, torch final loss, iclsim final loss) for one whole
    training, or None without torch."""
    try:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import reference_torch
    except ImportError:
        return None

    def run(cold=True, seed=0):
        if cold:
            jax.clear_caches()
            train._compiled_sweep.cache_clear()
        start = time.perf_counter()
        fitted = train.fit(models.LinearAttention(DIM), IID(DIM), n, steps, BATCH, LR, seed=seed)
        return time.perf_counter() - start, float(fitted.losses[-max(steps // 10, 1):].mean())

    with tempfile.TemporaryDirectory() as folder, cache.persist_compilations(folder):
        (t_iclsim, loss), (t_warm, _) = run(), run()  # cold: compiles (and stores); warm: loads the program
    t_steady, _ = run(cold=False, seed=1)  # the compiled program already in memory (a second run)
    t_torch, torch_loss = reference_torch.timed_train(dim=DIM, n=n, steps=steps, batch=BATCH, lr=LR)
    t_torch_again, _ = reference_torch.timed_train(dim=DIM, n=n, steps=steps, batch=BATCH, lr=LR, seed=1)
    return t_iclsim, t_warm, t_steady, t_torch, t_torch_again, torch_loss, loss


def sweep_speedup(ns, seeds, steps):
    model, design = models.LinearAttention(DIM), IID(DIM)
    train._compiled_sweep.cache_clear()
    t_sweep = timed(lambda: train.fit_sweep(model, design, ns, seeds, config(steps)).losses)
    train._compiled_sweep.cache_clear()

    def loop():
        return [train.fit(model, design, n, steps, BATCH, LR, s).losses for n in ns for s in seeds]

    return t_sweep, timed(loop)


def step_time(n, steps, dim=DIM, sampler="auto"):
    """Seconds per training step, compilation excluded."""
    model, design = models.LinearAttention(dim), IID(dim)
    train.fit_sweep(model, design, [n], [0], config(steps, sampler))  # compile
    return timed(lambda: train.fit_sweep(model, design, [n], [1], config(steps, sampler)).losses) / steps


def record_overhead(steps, records=50, repeats=3, record_prompts=None):
    """{"off", "on"}: (best wall seconds, best CPU seconds of this process) of a 50-point sweep (5 context
    lengths x 10 seeds) with training records off and on (``records`` of them, every steps / records steps: the
    loss on ``record_prompts`` fixed prompts, None for ``TrainConfig``'s default, and the effective
    preconditioner's spectrum), each compiled first, then timed alternating off/on, best of ``repeats``. CPU
    seconds (all threads) are the steadier measure on a shared machine, where wall time follows the load."""
    from iclsim import records as rec
    model, design, ns, seeds = models.LinearAttention(DIM), IID(DIM), [5, 10, 20, 30, 40], list(range(10))
    off = config(steps)
    on = dataclasses.replace(off, record_every=steps // records, summarize=rec.preconditioner_spectrum(model, max(ns)),
                             **({} if record_prompts is None else {"record_prompts": record_prompts}))
    for cfg in (off, on):
        train.fit_sweep(model, design, ns, seeds, cfg)  # compile
    times = {"off": [], "on": []}
    for r in range(repeats):
        for name, cfg in (("off", off), ("on", on)):
            wall, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(train.fit_sweep(model, design, ns, [s + 100 + r for s in seeds], cfg).losses)
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: (min(w for w, _ in t), min(c for _, c in t)) for name, t in times.items()}


def sampling_and_flops(n, repeats):
    """(seconds to draw one batch of token prompts, FLOPs of one training step by XLA's cost analysis)."""
    model, design = models.LinearAttention(DIM), IID(DIM)
    params = model.init(jax.random.PRNGKey(0))
    sample = jax.jit(lambda k: design.sample(k, BATCH, n))
    keys = [jax.random.PRNGKey(i) for i in range(repeats)]
    sample(keys[0])
    t_sample = timed(lambda: [sample(k) for k in keys][-1]) / repeats
    grad = jax.jit(jax.grad(lambda p, k: train.squared_loss(
        model, p, iclsim.gram.sample_gram(design, k, BATCH, n, n))))
    flops = grad.lower(params, keys[0]).compile().cost_analysis()
    flops = (flops[0] if isinstance(flops, list) else flops).get("flops", float("nan"))
    return t_sample, flops


def matmul_rate(size=2048, repeats=5):
    """FLOP/s of a size^3 float32 matmul, compilation excluded: the machine's speed today."""
    a = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()
    return 2 * size**3 / timed(lambda: mm(a), repeats)


def machine():
    """What the numbers were measured on, and how busy it was when the run started."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "load_average_start": _load()}


def _read(path):
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _load():
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def wall_times(timeout_s=3600):
    """Wall seconds of what a new user waits for, in a fresh clone of the committed HEAD (uncommitted
    changes are not in it: ``dirty`` says whether there were any): ``make test`` with the install, then
    ``make quick`` after removing every cache the clone holds (trained points, compiled programs,
    results; the installed .venv stays). Run with the environment this process started with, less the
    variables that would point it at another tree or change the device count."""
    env = {k: v for k, v in ENVIRONMENT.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "XLA_FLAGS") and not k.startswith("JAX_")}
    git = ["git", "-C", str(ROOT)]
    out = {"commit": subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
           "dirty": bool(subprocess.run(git + ["status", "--porcelain"], capture_output=True, text=True).stdout.strip())}
    with tempfile.TemporaryDirectory(prefix="iclsim-wall-") as folder:
        clone = Path(folder) / "iclsim"
        subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)], check=True, env=env)
        for name, target in (("make_test_fresh_clone", "test"), ("make_quick_empty_cache", "quick")):
            if target == "quick":
                for cache in ("results", ".iclsim-cache", ".cache", ".pytest_cache", ".hypothesis"):
                    shutil.rmtree(clone / cache, ignore_errors=True)
            seconds, code, tail = _timed_command(["make", target], clone, env, timeout_s)
            out.update({f"wall_{name}_s": round(seconds, 1), f"wall_{name}_exit": code})
            if code != 0:
                out[f"wall_{name}_output_tail"] = tail
    return out


def _timed_command(command, cwd, env, timeout_s):
    """(wall seconds, exit code or "timeout", last lines of the output); on timeout the command's whole
    process group (it runs in a session of its own) is killed."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        code = "timeout"
    return time.perf_counter() - start, code, "\n".join(output.splitlines()[-20:])


def targets(result):
    """{key: {value, bar, met}} for every target, met None where this run did not measure it at the
    target's size (--small measures the full benchmark's quantities at other sizes)."""
    table = {}
    for key, op, bar in TARGETS:
        value = result.get(key) if result["mode"] == "full" or key.startswith(("quick_", "wall_")) else None
        met = None if value is None else (value >= bar if op == ">=" else value <= bar)
        table[key] = {"value": value, "bar": f"{op} {bar}", "met": met}
    return table


def add_reference(result, prefix, steps):
    """reference_speedup at n = 20 and (``_long``) n = 200, the keys prefixed by ``prefix``."""
    for key, n in ((f"{prefix}reference_speedup", 20), (f"{prefix}reference_speedup_long", 200)):
        ref = reference_speedup(n, steps)
        if ref is not None and "torch" not in result:
            import torch
            result["torch"] = f"{torch.__version__}, {torch.get_num_threads()} threads"
        if ref is None:
            result[key] = None
            result["reference_note"] = "torch not installed: pip install -e '.[reference]'"
            continue
        t_iclsim, t_warm, t_steady, t_torch, t_torch_again, torch_loss, iclsim_loss = ref
        result.update({f"{key}": round(t_torch / t_iclsim, 2), f"{key}_iclsim_s": round(t_iclsim, 2),
                       f"{key}_warm_cache": round(t_torch / t_warm, 2), f"{key}_warm_cache_iclsim_s": round(t_warm, 2),
                       f"{key}_second_run": round(t_torch_again / t_steady, 2),
                       f"{key}_second_run_iclsim_s": round(t_steady, 2), f"{key}_second_run_torch_s": round(t_torch_again, 2),
                       f"{key}_torch_s": round(t_torch, 2), f"{key}_final_loss_iclsim": round(iclsim_loss, 4),
                       f"{key}_final_loss_torch": round(torch_loss, 4), f"{key}_steps": steps})


def reproduce_wall():
    walls = {p.stem: json.loads(p.read_text())["wall_time_s"] for p in sorted((ROOT / "figures").glob("*.json"))}
    return round(sum(walls.values()), 1), walls


def main():
    use_all_cpu_cores()  # as the CLI does: one CPU device per core, the sweep split over them
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="only the quick benchmark (300 steps, compilation included)")
    mode.add_argument("--small", action="store_true", help="the full benchmark at smaller sizes")
    parser.add_argument("--wall", action="store_true", help="also time `make test` (fresh clone, install included) "
                                                            "and `make quick` (empty cache)")
    parser.add_argument("--records", action="store_true", help="also (or, with --quick, only besides the quick "
                                                               "benchmark) the training-records overhead at 50 points")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    result = {"device": str(jax.devices()[0]), "device_count": jax.device_count(), "jax": jax.__version__,
              "iclsim": iclsim.__version__, "mode": "quick" if args.quick else "small" if args.small else "full",
              "machine": machine()}
    add_reference(result, "quick_", QUICK_STEPS)
    mm_rate = matmul_rate()
    result["machine"]["matmul_gflops_per_s"] = round(mm_rate / 1e9, 1)
    if not args.quick:
        full(result, args.small, mm_rate)
    elif args.records:
        add_record_overhead(result)
    if args.wall:
        result.update(wall_times())
    result["machine"]["load_average_end"] = _load()
    result["targets"] = targets(result)
    if not args.json:
        for k, v in result.items():
            print(f"{k:34s} {v}")
    print(json.dumps(result))


def full(result, small, mm_rate):
    steps = 100 if small else 500
    ref_steps = QUICK_STEPS if small else 2000
    ns = [5, 10, 20, 40] if small else [5, 10, 15, 20, 25, 30, 35, 40]
    seeds = [0, 1] if small else list(range(8))
    result["steps"] = steps
    add_reference(result, "", ref_steps)
    t_sweep, t_loop = sweep_speedup(ns, seeds, steps)
    result.update({"models_in_sweep": len(ns) * len(seeds), "sweep_s": round(t_sweep, 2), "loop_s": round(t_loop, 2),
                   "sweep_speedup": round(t_loop / t_sweep, 2)})
    t20, t200 = step_time(20, steps), step_time(200, steps)
    t20_tok, t200_tok = step_time(20, steps, sampler="tokens"), step_time(200, steps, sampler="tokens")
    result.update({"step_ms_n20": round(1e3 * t20, 3), "step_ms_n200": round(1e3 * t200, 3),
                   "n_cost_ratio": round(t200 / t20, 2), "step_ms_n20_tokens": round(1e3 * t20_tok, 3),
                   "step_ms_n200_tokens": round(1e3 * t200_tok, 3), "n_cost_ratio_tokens": round(t200_tok / t20_tok, 2)})
    t_sample, flops = sampling_and_flops(20, 20)
    result.update({"sample_ms_n20_tokens": round(1e3 * t_sample, 3), "sampling_fraction": round(t_sample / t20, 2),
                   "step_gflops": round(flops / 1e9, 4), "matmul_gflops_per_s": round(mm_rate / 1e9, 1),
                   "matmul_fraction": round(flops / t20 / mm_rate, 4)})
    dims, lengths = ([5, 10], [10, 160]) if small else ([5, 10, 20], [10, 40, 160, 640])
    result["cost_table_ms"] = {f"d={d},n={n},{s}": round(1e3 * step_time(n, steps // 2, d, s), 3)
                               for d in dims for n in lengths for s in ("gram", "tokens")}
    add_record_overhead(result)
    result["reproduce_wall_s"], result["reproduce_wall_by_experiment_s"] = reproduce_wall()


def add_record_overhead(result):
    for steps in (1000, 2000):
        t = record_overhead(steps)
        result.update({f"record_off_s_{steps}": round(t["off"][0], 3), f"record_on_s_{steps}": round(t["on"][0], 3),
                       f"record_off_cpu_s_{steps}": round(t["off"][1], 3), f"record_on_cpu_s_{steps}": round(t["on"][1], 3),
                       f"record_overhead_{steps}": round(t["on"][0] / t["off"][0] - 1, 4),
                       f"record_overhead_cpu_{steps}": round(t["on"][1] / t["off"][1] - 1, 4)})


if __name__ == "__main__":
    main()
