"""Every XLA compiler option the engine applies, in one place, and the part of the sweep cache's key
that covers them (``key``).

Options move numbers at float level (a fusion changes the order of a sum), so a trained point stored
under one set of options must never be served under another: ``fingerprint.fingerprint`` hashes
``key()``, which holds every option set below and XLA_FLAGS as this process sees them.

- ``SMALL_PROGRAM_OPTIONS``: a single fit's training program on CPU is compiled with XLA CPU's fusion
  emitters off, vmapped sweeps keep them (the measurements behind the choice: docs/performance.md §2.8).
  ``training_options`` says which programs get them.
- ``NO_LIBRARY_FUSION``: the evaluation program on CPU is compiled without XLA CPU's YNNPACK library
  fusion, which returned the first network's risk for every network of a vmapped sweep
  (docs/performance.md, the evaluation fault). ``evaluation_options`` applies it where this jaxlib
  knows the option.
- XLA_FLAGS, process-wide, set before JAX starts its backends: one CPU device per core
  (``use_all_cpu_cores``) and, for ``iclsim run --quick``, the fusion emitters off for every program
  (``quick_compilation``).
"""

from __future__ import annotations

import functools
import os
import re

import jax
import numpy as np

__all__ = ["SMALL_PROGRAM_OPTIONS", "NO_LIBRARY_FUSION", "training_options", "evaluation_options",
           "library_fusion_off", "xla_flags", "set_xla_flag", "use_all_cpu_cores", "quick_compilation", "key"]

# XLA options for a single fit's training program on CPU (``training_options``)
SMALL_PROGRAM_OPTIONS = {"xla_cpu_use_fusion_emitters": False}
# XLA options of the evaluation program on CPU: no YNNPACK library fusion (``evaluation_options``)
NO_LIBRARY_FUSION = {"xla_cpu_experimental_ynn_fusion_type": ""}


def training_options(one_point: bool, devices) -> dict | None:
    """The XLA options a training program is compiled with: ``SMALL_PROGRAM_OPTIONS`` for a single fit
    (``one_point``) on CPU, else none. The sweep cache puts the options of the program that trains a
    point in that point's key (``train.fit_sweep``)."""
    return SMALL_PROGRAM_OPTIONS if one_point and tuple(devices)[0].platform == "cpu" else None


def evaluation_options(devices) -> dict | None:
    """The XLA options the evaluation program is compiled with: ``library_fusion_off()`` on CPU, else none."""
    return library_fusion_off() if tuple(devices)[0].platform == "cpu" else None


@functools.cache
def library_fusion_off() -> dict | None:
    """``NO_LIBRARY_FUSION`` where this jaxlib knows the option, else None (an XLA without the option has
    no YNNPACK fusion to turn off). Asked once per process by compiling a one-operation program."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=NO_LIBRARY_FUSION).lower(np.float32(0)).compile()
    except jax.errors.JaxRuntimeError as err:
        if "No such compile option" in str(err):
            return None
        raise
    return NO_LIBRARY_FUSION


def xla_flags() -> str:
    """XLA_FLAGS as this process sees them, sorted (code generation flags such as
    --xla_cpu_use_fusion_emitters, which ``quick_compilation`` sets, may move numbers at float level)."""
    return " ".join(sorted(os.environ.get("XLA_FLAGS", "").split()))


def set_xla_flag(name: str, value, replace: bool = False) -> None:
    """Set --NAME=VALUE in XLA_FLAGS: kept as it is where XLA_FLAGS already names it, unless ``replace``.
    Takes effect only before JAX starts its backends."""
    flags = os.environ.get("XLA_FLAGS", "")
    if name in flags and not replace:
        return
    flags = re.sub(rf"--{name}=\S*", "", flags)
    os.environ["XLA_FLAGS"] = " ".join(f"{flags} --{name}={value}".split())


def use_all_cpu_cores() -> None:
    """Expose one XLA CPU device per core (unless XLA_FLAGS already sets a count), so that sweeps, whose
    axis ``fit_sweep`` splits over the devices, use every core (XLA CPU otherwise runs a program's
    vmapped points on one device). Must run before JAX starts its backends; no effect on GPUs/TPUs."""
    set_xla_flag("xla_force_host_platform_device_count", os.cpu_count() or 1)


def quick_compilation() -> None:
    """For --quick runs, whose programs are small and so dominated by their compilation: XLA CPU's fusion
    emitters off (unless XLA_FLAGS names them; docs/performance.md §2.8 has the measurements). Must run
    before JAX starts its backends; the sweep cache's keys cover XLA_FLAGS (``key``)."""
    set_xla_flag("xla_cpu_use_fusion_emitters", "false")


def key() -> tuple:
    """What the sweep cache's key holds of the compiler: every option set the engine applies (by value,
    read at each call, so a changed option is another key) and XLA_FLAGS."""
    return (("training", sorted(SMALL_PROGRAM_OPTIONS.items())), ("evaluation", sorted(NO_LIBRARY_FUSION.items())),
            ("XLA_FLAGS", xla_flags()))
