"""Benchmarks, measured side by side in one run; the JSON object is the last line printed.

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
  reproduce_wall_s        sum of the wall times recorded in figures/*.json (the last `make reproduce`)

Usage: python benchmarks/run.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
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


def sampling_and_flops(n, repeats):
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
    a = jax.random.normal(jax.random.PRNGKey(1), (2048, 2048), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()
    return t_sample, flops, 2 * 2048**3 / timed(lambda: mm(a), 5)


def reproduce_wall():
    walls = {p.stem: json.loads(p.read_text())["wall_time_s"] for p in sorted((ROOT / "figures").glob("*.json"))}
    return round(sum(walls.values()), 1), walls


def main():
    use_all_cpu_cores()  # as the CLI does: one CPU device per core, the sweep split over them
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    steps = 100 if args.quick else 500
    ref_steps = 300 if args.quick else 2000
    ns = [5, 10, 20, 40] if args.quick else [5, 10, 15, 20, 25, 30, 35, 40]
    seeds = [0, 1] if args.quick else list(range(8))
    result = {"device": str(jax.devices()[0]), "device_count": jax.device_count(), "jax": jax.__version__,
              "iclsim": iclsim.__version__, "steps": steps}
    for key, n in (("reference_speedup", 20), ("reference_speedup_long", 200)):
        ref = reference_speedup(n, ref_steps)
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
                       f"{key}_final_loss_torch": round(torch_loss, 4), f"{key}_steps": ref_steps})
    t_sweep, t_loop = sweep_speedup(ns, seeds, steps)
    result.update({"models_in_sweep": len(ns) * len(seeds), "sweep_s": round(t_sweep, 2), "loop_s": round(t_loop, 2),
                   "sweep_speedup": round(t_loop / t_sweep, 2)})
    t20, t200 = step_time(20, steps), step_time(200, steps)
    t20_tok, t200_tok = step_time(20, steps, sampler="tokens"), step_time(200, steps, sampler="tokens")
    result.update({"step_ms_n20": round(1e3 * t20, 3), "step_ms_n200": round(1e3 * t200, 3),
                   "n_cost_ratio": round(t200 / t20, 2), "step_ms_n20_tokens": round(1e3 * t20_tok, 3),
                   "step_ms_n200_tokens": round(1e3 * t200_tok, 3), "n_cost_ratio_tokens": round(t200_tok / t20_tok, 2)})
    t_sample, flops, mm_rate = sampling_and_flops(20, 20)
    result.update({"sample_ms_n20_tokens": round(1e3 * t_sample, 3), "sampling_fraction": round(t_sample / t20, 2),
                   "step_gflops": round(flops / 1e9, 4), "matmul_gflops_per_s": round(mm_rate / 1e9, 1),
                   "matmul_fraction": round(flops / t20 / mm_rate, 4)})
    dims, lengths = ([5, 10], [10, 160]) if args.quick else ([5, 10, 20], [10, 40, 160, 640])
    result["cost_table_ms"] = {f"d={d},n={n},{s}": round(1e3 * step_time(n, steps // 2, d, s), 3)
                               for d in dims for n in lengths for s in ("gram", "tokens")}
    result["reproduce_wall_s"], result["reproduce_wall_by_experiment_s"] = reproduce_wall()
    if not args.json:
        for k, v in result.items():
            print(f"{k:34s} {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
