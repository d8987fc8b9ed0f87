"""Strict numerics for the whole suite (as in equinox's tests/conftest.py): no silent dtype
promotion, no silent rank broadcasting, and four fake CPU devices for the sharding tests."""

import os

# Fusion emitters off: the suite's programs are small and their cost is mostly XLA's compilation, which
# this flag shortens (docs/performance.md §9: test_train and test_gram 252 s -> 167 s); the library
# never sets it for users' programs.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_cpu_use_fusion_emitters=false")

import jax  # noqa: E402
import pytest  # noqa: E402

import iclsim  # noqa: E402,F401

# The suite checks float64 samplers and models directly, so it turns x64 on for itself; iclsim never
# does (test_precision.py checks that in a fresh interpreter), and training pins its own setting.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

from tests import tolerance  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    if tolerance.Z_SCORES:
        name, z = max(tolerance.Z_SCORES, key=lambda t: t[1])
        terminalreporter.write_line(
            f"Monte Carlo checks: {len(tolerance.Z_SCORES)}, largest |closed - MC| / SE = {z:.2f} ({name})")
    for line in tolerance.REPORT:
        terminalreporter.write_line(line)


@pytest.fixture
def key():
    return jax.random.PRNGKey(20241122)
