"""Importing iclsim leaves the caller's global state alone, and closed forms are float64 anyway.

Run in a fresh interpreter: the suite's conftest turns x64 on for itself. Planted bugs these catch:
``jax.config.update("jax_enable_x64", True)`` in ``iclsim/__init__.py``, ``matplotlib.use("Agg")`` at
import of ``iclsim.plotting``, and a closed form computed in the default (float32) precision.
"""

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, matplotlib
before = matplotlib.rcParams._get_backend_or_none()
import jax
import iclsim, iclsim.plotting, iclsim.train, iclsim.bridge, iclsim.sweeps, iclsim.models, iclsim.pruning
from iclsim import IID, RAG, evaluate, theory, train
from iclsim.models import LinearAttention
out = {"x64_after_import": bool(jax.config.jax_enable_x64), "backend_before": before,
       "backend_after": matplotlib.rcParams._get_backend_or_none()}
W, L = theory.optimal_pgd(IID(3, noise_var=0.1), 5)
out["optimal_pgd"] = [str(W.dtype), str(L.dtype)]
out["rag"] = str(theory.optimal_pgd(RAG(3, 0.3), 5).risk.dtype)
out["risk"] = str(theory.pgd_risk(IID(3), 5, W).dtype)
fitted = train.fit(LinearAttention(3), IID(3), 4, steps=20, batch_size=32)
out["params"] = sorted({str(a.dtype) for a in jax.tree_util.tree_leaves(fitted.params)})
out["risk_eval"] = evaluate.evaluate(LinearAttention(3), fitted.params, IID(3), 4, jax.random.PRNGKey(0), 64)[0]
out["x64_at_end"] = bool(jax.config.jax_enable_x64)
print(json.dumps(out))
"""


def test_import_changes_no_global_state_and_closed_forms_are_float64():
    env = {k: val for k, val in os.environ.items() if k not in ("MPLBACKEND", "JAX_ENABLE_X64")}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["x64_after_import"] is False
    assert out["backend_after"] == out["backend_before"]
    assert out["optimal_pgd"] == ["float64", "float64"]
    assert out["rag"] == "float64" and out["risk"] == "float64"
    assert out["params"] == ["float32"]  # training stays in its configured dtype
    assert isinstance(out["risk_eval"], float)
    assert out["x64_at_end"] is False  # fit and evaluate restore the caller's flag
