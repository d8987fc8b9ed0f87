"""One process of the multi-process check (tests/test_multiprocess.py); not a test module.

    python tests/_multiprocess_worker.py OUT DEVICES [PORT NUM_PROCESSES PROCESS_ID]

Exposes DEVICES CPU devices in this process; with PORT it joins a jax.distributed cluster whose
coordinator (process 0) listens on 127.0.0.1:PORT, so that ``jax.devices()`` holds every process's
devices and the sweeps below are split over all of them (cross-process collectives on CPU: gloo
over TCP, JAX's default, named here). Without PORT it runs the same sweeps alone. Every process
receives the whole sweep: it writes the trained parameters and losses to OUT.fit.npz, then the
test risks to OUT.evaluate.npz.
"""

import os
import sys

out, local_devices = sys.argv[1], int(sys.argv[2])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

if len(sys.argv) > 3:
    port, num_processes, process_id = (int(a) for a in sys.argv[3:6])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id,
                               initialization_timeout=60, heartbeat_timeout_seconds=30, shutdown_timeout_seconds=30)

import numpy as np  # noqa: E402

from iclsim import IID, evaluate, models, train  # noqa: E402

DIM, NS, SEEDS = 3, [2, 4], [0, 1]  # n <= 4: token prompts, which compile in half the time of Gram draws
CONFIG = train.TrainConfig(steps=100, batch_size=64, learning_rate=1e-2, warmup_steps=10)
EVAL_KEY, EVAL_PROMPTS, EVAL_BATCH = 7, 4096, 1024


def leaves(tree, prefix):
    return {f"{prefix}{i}": np.asarray(a) for i, a in enumerate(jax.tree_util.tree_leaves(tree))}


def main():
    assert jax.local_device_count() == local_devices, jax.local_devices()
    model, design = models.LinearAttention(DIM), IID(DIM)
    # two seeds: the sweep's seed blocks are split over the devices (of every process)
    sweep = train.fit_sweep(model, design, NS, SEEDS, CONFIG)
    # one seed: a single block, so all the devices split each step's batch and average the gradients
    single = train.fit_sweep(model, design, [NS[0]], [SEEDS[0]], CONFIG)
    np.savez(f"{out}.fit.npz", losses=sweep.losses, single_losses=single.losses, process_count=jax.process_count(),
             device_count=jax.device_count(), **leaves(sweep.params, "param_"),
             **leaves(single.params, "single_param_"))
    risk, se = evaluate.evaluate_sweep(model, sweep.params, design, NS, jax.random.PRNGKey(EVAL_KEY), EVAL_PROMPTS,
                                    EVAL_BATCH)
    np.savez(f"{out}.evaluate.npz", risk=risk, se=se)
    if jax.process_count() > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
