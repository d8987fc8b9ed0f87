"""Benchmarks, measured side by side in one run; the JSON object is the last line printed.

  sweep_speedup     vmapped sweep (context lengths x seeds) vs the same models trained one at a time
                    with a Python loop over fit(), compilation included in both
  n_cost_ratio      time per training step at n = 200 over n = 20 (linear attention, IID, d = 10)
  sampling_fraction time to draw one batch of prompts / time of one training step (n = 20)
  matmul_fraction   achieved FLOP/s of a training step (XLA cost analysis) / FLOP/s of a large matmul

Usage: python benchmarks/run.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import iclsim
from iclsim import IID, models, train


def timed(fn, repeats=1):
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def sweep_speedup(ns, seeds, steps):
    model, design = models.LinearAttention(10), IID(10)
    cfg = train.TrainConfig(steps=steps, batch_size=512, learning_rate=0.01)
    t_sweep = timed(lambda: train.fit_sweep(model, design, ns, seeds, cfg).losses)
    train._compiled_sweep.cache_clear()

    def loop():
        return [train.fit(model, design, n, steps, 512, 0.01, s).losses for n in ns for s in seeds]

    t_loop = timed(loop)
    return t_sweep, t_loop


def step_time(n, steps):
    model, design = models.LinearAttention(10), IID(10)
    cfg = train.TrainConfig(steps=steps, batch_size=512, learning_rate=0.01)
    train.fit_sweep(model, design, [n], [0], cfg)  # compile
    return timed(lambda: train.fit_sweep(model, design, [n], [1], cfg).losses) / steps


def sampling_and_flops(n, repeats):
    model, design = models.LinearAttention(10), IID(10)
    params = model.init(jax.random.PRNGKey(0))
    sample = jax.jit(lambda k: design.sample(k, 512, n))
    keys = [jax.random.PRNGKey(i) for i in range(repeats)]
    sample(keys[0])
    t_sample = timed(lambda: [sample(k) for k in keys][-1]) / repeats
    grad = jax.jit(jax.grad(lambda p, k: train.squared_loss(model, p, design.sample(k, 512, n))))
    flops = grad.lower(params, keys[0]).compile().cost_analysis()
    flops = (flops[0] if isinstance(flops, list) else flops).get("flops", float("nan"))
    a = jax.random.normal(jax.random.PRNGKey(1), (2048, 2048), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()
    t_mm = timed(lambda: mm(a), 5)
    return t_sample, flops, 2 * 2048**3 / t_mm


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    steps = 100 if args.quick else 500
    ns = [5, 10, 20, 40] if args.quick else [5, 10, 15, 20, 25, 30, 35, 40]
    seeds = [0, 1] if args.quick else list(range(8))
    t_sweep, t_loop = sweep_speedup(ns, seeds, steps)
    t20, t200 = step_time(20, steps), step_time(200, steps)
    t_sample, flops, mm_rate = sampling_and_flops(20, 20)
    result = {
        "device": str(jax.devices()[0]), "jax": jax.__version__, "iclsim": iclsim.__version__,
        "models_in_sweep": len(ns) * len(seeds), "steps": steps,
        "sweep_s": round(t_sweep, 2), "loop_s": round(t_loop, 2), "sweep_speedup": round(t_loop / t_sweep, 2),
        "step_ms_n20": round(1e3 * t20, 3), "step_ms_n200": round(1e3 * t200, 3), "n_cost_ratio": round(t200 / t20, 2),
        "sample_ms_n20": round(1e3 * t_sample, 3), "sampling_fraction": round(t_sample / t20, 2),
        "step_gflops": round(flops / 1e9, 4), "matmul_gflops_per_s": round(mm_rate / 1e9, 1),
        "matmul_fraction": round(flops / t20 / mm_rate, 4),
    }
    if not args.json:
        for k, v in result.items():
            print(f"{k:22s} {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
