"""Trust, round two (issue 32): nothing written outside --out, no stale or forged cache entry served, no
confident wrong number. Each test names the finding of issue 32 whose planted bug it catches (the bug
that was found on the code before this round)."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclsim import IID, cache, compiler, evaluate, models, results, runner, theory, train
from tests.test_trust import _fake, _module, assert_one_set

ROOT = Path(__file__).resolve().parent.parent
QUIET = dict(progress=lambda m: None)


# ---- finding 1: writes outside the output folder ----

def test_a_planted_lock_symlink_is_refused_and_its_target_untouched(tmp_path):
    """Finding 1: a symlink planted as out/.iclsim.lock was followed, its target truncated and overwritten
    with 'pid host'. Now the lock is opened with O_NOFOLLOW and a symlink is refused by name."""
    out, target = tmp_path / "out", tmp_path / "precious.txt"
    out.mkdir()
    target.write_text("keep me\n")
    (out / runner.LOCK_NAME).symlink_to(target)
    seen = []
    with pytest.raises(runner.RunError, match="not a lock file of iclsim"):
        runner.run_experiment(_fake(seen=seen), out, seed=0, **QUIET)
    assert target.read_text() == "keep me\n" and seen == []
    assert not (out / "fake.csv").exists()


def test_a_pending_set_listing_outside_names_is_refused(tmp_path):
    """Finding 1: a planted .iclsim-pending-*/READY listing '../x' made the next run move files outside
    --out. Now such a list is refused (RunError naming the entry) and nothing moves."""
    out = tmp_path / "out"
    pending = out / (results._PENDING + "planted")
    pending.mkdir(parents=True)
    (out / "escaped.txt").write_text("inside")
    (pending / "READY").write_text("../escaped.txt")
    with pytest.raises(runner.RunError, match="not a plain file name"):
        runner.run_experiment(_fake(), out, seed=0, **QUIET)
    assert not (tmp_path / "escaped.txt").exists()
    (pending / "READY").write_text(str(tmp_path / "abs.txt"))
    (pending / "abs.txt").write_text("x")
    with pytest.raises(runner.RunError, match="not a plain file name"):
        runner.run_experiment(_fake(), out, seed=0, **QUIET)
    assert not (tmp_path / "abs.txt").exists()


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", "/abs", ".hidden", "x..y", ""])
def test_experiment_names_that_leave_the_folder_are_refused(tmp_path, name):
    """Finding 1: an experiment named '../../escaped' wrote its files outside --out. Now Experiment refuses
    names with a path separator or '..' (RunError), before any run."""
    with pytest.raises(runner.RunError, match="not a plain name"):
        _fake(name=name)


# ---- finding 10: a failed move mid-commit ----

def test_a_failed_move_leaves_the_previous_set_and_a_clear_error(tmp_path):
    """Finding 10: a move that failed mid-commit (here a folder in the way of fake.png) left the new CSV
    beside the old JSON, a mixed set, with a raw OSError. Now the moves are undone: the previous set
    stays whole and a RunError says the previous results are unchanged."""
    runner.run_experiment(_fake(), tmp_path, seed=0, **QUIET)
    (tmp_path / "fake.json").rename(tmp_path / "keep.json")
    (tmp_path / "fake.png").rename(tmp_path / "keep.png")
    (tmp_path / "fake.png").mkdir()
    (tmp_path / "fake.png" / "blocker").write_text("x")
    with pytest.raises(runner.RunError, match="could not move the results.*previous results there are unchanged"):
        runner.run_experiment(_fake(), tmp_path, seed=1, **QUIET)
    (tmp_path / "fake.png" / "blocker").unlink()
    (tmp_path / "fake.png").rmdir()
    (tmp_path / "keep.json").rename(tmp_path / "fake.json")
    (tmp_path / "keep.png").rename(tmp_path / "fake.png")
    assert assert_one_set(tmp_path)["seed"] == 0


# ---- finding 2: stale cache entries ----

def test_a_helper_reached_through_a_module_attribute_is_in_the_key(tmp_path):
    """Finding 2: a loss calling userlib.scale() kept its key when scale was edited (modules were skipped,
    so the run loaded the old entry: loss 2.99 instead of 298.9). Now the attributes the code names on a
    user module are hashed too."""
    lib_src = """
        def scale(x):
            return x * {factor}
        """
    loss_src = """
        import userlib_r2
        def loss(model, params, prompts):
            return userlib_r2.scale(prompts.y_query).mean()
        """
    _module(tmp_path, "userlib_r2", lib_src.format(factor=1))
    user = _module(tmp_path, "userloss_r2", loss_src)
    before = cache.fingerprint(user.loss)
    user.userlib_r2 = _module(tmp_path, "userlib_r2", lib_src.format(factor=100))  # the edited helper
    assert cache.fingerprint(user.loss) != before
    user.userlib_r2 = _module(tmp_path, "userlib_r2", lib_src.format(factor=1))
    assert cache.fingerprint(user.loss) == before


def test_the_key_is_the_code_that_ran_not_the_file_on_disk(tmp_path):
    """Finding 2: the key hashed the source file on disk, so a module edited after its import stored the
    old code's results under the new code's key (a fresh process then loaded them). Now the key hashes the
    code objects in memory: editing the file changes nothing until the code is imported again."""
    src = """
        def loss(model, params, prompts):
            return (prompts.y_query * {factor}).mean()
        """
    path = tmp_path / "edited_r2.py"
    path.write_text(textwrap.dedent(src.format(factor=1)))
    import importlib.util
    spec = importlib.util.spec_from_file_location("edited_r2", path)
    ran = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ran)
    path.write_text(textwrap.dedent(src.format(factor=1000)))  # edited after the import
    key = cache.fingerprint(ran.loss)  # first: nothing of this code was hashed before
    old_code = cache.fingerprint(_module(tmp_path, "edited_r2", src.format(factor=1)).loss)
    new_code = cache.fingerprint(_module(tmp_path, "edited_r2", src.format(factor=1000)).loss)
    assert key == old_code != new_code


def test_the_xla_options_of_a_fit_are_in_its_key(tmp_path, monkeypatch):
    """Finding 2 (issue 31's persistence bullet): the XLA options applied to a single fit's program
    (SMALL_PROGRAM_OPTIONS, which move numbers at float level) were not in the key: a cache filled
    under other options was served. Now another option set is another key, and the point is retrained."""
    model, design = models.PGD(2), IID(2, noise_var=0.2)
    cfg = train.TrainConfig(steps=10, batch_size=16, warmup_steps=2)
    train.fit_sweep(model, design, [3], [0], cfg, cache=cache.SweepCache(tmp_path))
    again = cache.SweepCache(tmp_path)
    train.fit_sweep(model, design, [3], [0], cfg, cache=again)
    assert (again.hits, again.trained) == (1, 0)
    monkeypatch.setattr(compiler, "SMALL_PROGRAM_OPTIONS", {"xla_cpu_use_fusion_emitters": True})
    other = cache.SweepCache(tmp_path)
    train.fit_sweep(model, design, [3], [0], cfg, cache=other)
    assert (other.hits, other.trained) == (0, 1)



@pytest.mark.parametrize("change", ["evaluation option", "XLA_FLAGS"])
def test_a_cache_entry_made_under_one_compiler_option_is_not_served_under_another(tmp_path, monkeypatch, change):
    """Issue 31: every compiler option the engine applies is in the key (``compiler.key``), not only the
    training program's: a point stored under one evaluation option set, or under other XLA_FLAGS (which
    ``iclsim run --quick`` sets), is retrained, never served. Planted bug caught: ``compiler.key`` or the
    fingerprint leaving out an option set (the second store would be a hit)."""
    model, design = models.PGD(2), IID(2, noise_var=0.2)
    cfg = train.TrainConfig(steps=10, batch_size=16, warmup_steps=2)
    first = cache.SweepCache(tmp_path)
    train.fit_sweep(model, design, [3], [0], cfg, cache=first)
    assert (first.hits, first.trained) == (0, 1)
    if change == "XLA_FLAGS":
        monkeypatch.setenv("XLA_FLAGS", compiler.xla_flags() + " --xla_cpu_use_fusion_emitters=false")
    else:
        monkeypatch.setattr(compiler, "NO_LIBRARY_FUSION", {"xla_cpu_experimental_ynn_fusion_type": "default"})
    other = cache.SweepCache(tmp_path)
    train.fit_sweep(model, design, [3], [0], cfg, cache=other)
    assert (other.hits, other.trained) == (0, 1)
    monkeypatch.undo()
    back = cache.SweepCache(tmp_path)
    train.fit_sweep(model, design, [3], [0], cfg, cache=back)
    assert (back.hits, back.trained) == (1, 0)  # the first entry is still served under its own options


def test_no_ambient_state_in_iclsim():
    """Issue 31: the cache is an explicit argument: no module of iclsim keeps a context variable."""
    import iclsim

    for path in Path(iclsim.__file__).parent.glob("*.py"):
        assert "contextvars" not in path.read_text() and "ContextVar" not in path.read_text(), path


# ---- finding 3: forged cache entries, a cache folder of others ----

def test_a_forged_cache_entry_is_refused(tmp_path):
    """Finding 3: the entry checksum was a plain sha256 anyone can recompute, so a forged entry loaded
    silently (risk 1777.6 instead of 1.26). Now entries carry an HMAC under the user's secret: an entry
    forged with the old recipe is refused (CacheWarning), deleted and reported missing."""
    import hashlib
    import io
    store = cache.SweepCache(tmp_path / "c")
    key = cache.fingerprint("point", 1)
    losses, W = np.linspace(1, 0.1, 5).astype(np.float32), np.full((2, 2), 40.0, np.float32)
    h = hashlib.sha256(key.encode())  # what a forger can compute without the user's secret
    for a in (losses, W):
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    buf = io.BytesIO()
    np.savez(buf, losses=losses, checksum=np.array(h.hexdigest()), p0=W)
    path = store.path(key)
    path.parent.mkdir(parents=True)
    path.write_bytes(buf.getvalue())
    with pytest.warns(cache.CacheWarning, match="authentication failed"):
        assert store.load(key, jax.eval_shape(lambda: {"W": W})) is None
    assert not path.exists() and store.hits == 0
    store.save(key, {"W": np.eye(2, dtype=np.float32)}, losses)  # the user's own entry loads
    assert store.load(key, jax.eval_shape(lambda: {"W": W})) is not None


def test_a_cache_folder_of_others_or_writable_by_others_is_refused(tmp_path, monkeypatch):
    """Finding 3: a world-writable cache folder owned by another user was used without a word. Now it is
    refused before any training (ValueError with advice), by check() and by a sweep given the cache."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ValueError, match="writable by other users.*chmod o-w"):
        cache.SweepCache(shared).check()
    with pytest.raises(ValueError, match="writable by other users"):
        train.fit_sweep(models.PGD(2), IID(2), [3], [0], train.TrainConfig(steps=5, batch_size=8, warmup_steps=1),
                        cache=cache.SweepCache(shared))
    shared.chmod(0o755)
    cache.SweepCache(shared).check()
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 1)
    with pytest.raises(ValueError, match="belongs to another user"):
        cache.SweepCache(shared).check()


def test_a_cache_secret_readable_by_others_is_refused(tmp_path, monkeypatch):
    """Finding 3: the authentication key must be private: a secret file readable by others (or a symlink)
    is refused with advice; a fresh one is made 0600."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    path = cache.secret_path()
    assert len(cache.secret()) == 32 and path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    cache._secret_at.cache_clear()
    with pytest.raises(ValueError, match="mode 0600"):
        cache.secret()
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    cache._secret_at.cache_clear()
    with pytest.raises(ValueError, match="symlink"):
        cache.secret()
    cache._secret_at.cache_clear()


# ---- finding 4: predictions must be [B] ----

class _Column:
    """A model whose predictions are [B, 1] (a user's model that forgot to squeeze its last axis)."""

    dim, dtype, inert_padding, reads_gram = 2, jnp.float32, True, False

    def init(self, key):
        return {"w": jnp.zeros(2, jnp.float32)}

    def apply(self, params, prompts):
        return (prompts.x @ params["w"])[:, None]


def test_predictions_of_shape_b_by_1_are_refused_by_fit_evaluate_and_monte_carlo():
    """Finding 4: predictions [B, 1] broadcast (y - pred)^2 to [B, B]: evaluate returned 3.5e4 +- 0 (theory
    1.12), monte_carlo_risk (614.0, 0.0), fit trained on the wrong loss. Now each names the shape."""
    model, design, key = _Column(), IID(2, noise_var=0.1), jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match=r"predictions have shape \(\d+, 1\).*\[B\]"):
        train.fit(model, design, 3, steps=2, batch_size=8, warmup_steps=1)
    with pytest.raises(ValueError, match=r"predictions have shape \(\d+, 1\)"):
        evaluate.evaluate(model, model.init(key), design, 3, key, num_prompts=50, batch_size=50)
    with pytest.raises(ValueError, match=r"predictions have shape \(\d+, 1\)"):
        theory.monte_carlo_risk(lambda p: p.x[:, :1], design, 3, key, num_prompts=50, batch_size=50)
    from iclsim import testing
    with pytest.raises(ValueError, match=r"predictions have shape \(\d+, 1\)"):
        testing.assert_matches_theory(lambda p: p.x[:, :1], design, 3, 1.0, num_prompts=50, key=key)


# ---- finding 7: bounds before work; overflow, NaN and one-draw SEs raise ----

def test_sizes_that_cannot_fit_in_memory_are_refused_before_allocating():
    """Finding 7: bayes_risk(IID(2, noise_var=1), 10**6) built an 8 TB matrix and aborted the interpreter, as
    did --set dim=100000. Now a MemoryError names the sizes before anything is allocated (the test would
    abort otherwise; the bound is the machine's physical memory; these sizes exceed any machine's)."""
    with pytest.raises(MemoryError, match=r"bayes_risk at n = 1000000.*GiB"):
        theory.bayes_risk(IID(2, noise_var=1.0), 10**6)
    with pytest.raises(MemoryError, match=r"ground_truth at dim = 400"):
        theory.ground_truth(IID(400), 1, jax.random.PRNGKey(0), num_prompts=200_000)
    with pytest.raises(MemoryError, match=r"IID\(dim=1000000\) \(its dim x dim covariances\)"):
        IID(10**6)  # --set dim=100000 aborted the interpreter (here 10**6: too large for any machine)
    with pytest.raises(MemoryError, match=r"fit_sweep of 1 network\(s\)"):
        train.fit(models.PGD(2), IID(2), 2, steps=2, batch_size=10**13)


@pytest.mark.parametrize("design", [IID(3, cov_x=np.eye(3) * 1e154), IID(3, cov_x=np.eye(3) * 1e-160),
                                    IID(3, noise_var=1e308)], ids=["scale 1e154", "scale 1e-160", "noise 1e308"])
def test_closed_forms_that_overflow_raise(design):
    """Finding 7: optimal_pgd returned the zero predictor's risk at covariance scale 1e154 and NaN at 1e-160
    or noise 1e308. Now a non-finite float64 result raises FloatingPointError naming the function."""
    with pytest.raises(FloatingPointError, match="non-finite result"):
        theory.optimal_pgd(design, 4)


def test_nan_results_raise_instead_of_passing_on():
    """Finding 7: multistep_gd_risk with a step of 1e200, monte_carlo_risk of a NaN predictor and
    ground_truth with 3 prompts returned NaN; bayes_risk(num_draws=1) reported SE 0.0 ("exact")."""
    key = jax.random.PRNGKey(0)
    with pytest.raises(FloatingPointError, match="multistep_gd_risk"):
        theory.multistep_gd_risk(IID(3), 4, [1e200], key, num_draws=1000)
    with pytest.raises(FloatingPointError, match="non-finite"):
        theory.monte_carlo_risk(lambda p: p.x[:, 0] * jnp.nan, IID(2), 3, key, num_prompts=100)
    with pytest.raises(ValueError, match=r"num_prompts must be > dim\^2 = 4"):
        theory.ground_truth(IID(2), 3, key, num_prompts=3)
    with pytest.raises(ValueError, match="num_draws must be >= 2"):
        theory.bayes_risk(IID(2, noise_var=1.0), 3, num_draws=1)


def test_fit_raises_when_the_last_update_is_not_finite():
    """Finding 7: a last optimizer update that overflowed (every loss finite, computed before it) returned
    all-NaN parameters. Now fit raises FloatingPointError naming the point."""
    import optax

    result = train.fit(models.PGD(2), IID(2), 3, steps=5, batch_size=8, warmup_steps=1, optimizer=_last_update_inf)
    assert np.all(np.isfinite(result.params["W"]))  # the same update without its blow-up trains
    with pytest.raises(FloatingPointError, match="last optimizer update made the parameters non-finite"):
        train.fit(models.PGD(2), IID(2), 3, steps=5, batch_size=8, warmup_steps=1, optimizer=_last_update_inf_at_5)
    assert optax  # the optimizers below are optax transformations


def _stepper(blow_up_at):
    import optax

    def update(grads, count, params=None):
        count = count + 1
        return jnp.where(count >= blow_up_at, jnp.inf, -1e-3) * grads, count

    return optax.GradientTransformation(lambda params: jnp.zeros((), jnp.int32), update)


def _last_update_inf(schedule):
    return _stepper(10**6)


def _last_update_inf_at_5(schedule):
    return _stepper(5)


# ---- finding 8: testing helpers that passed on NaN ----

def test_testing_helpers_fail_on_nan_and_count_the_prompts_drawn():
    """Finding 8: assert_not_below passed when either value was NaN; assert_matches_theory reported 10001
    prompts when 20000 were drawn (rounded up to whole batches). Now the referee draws exactly the prompts
    asked for (the last draw block masked) and the check reports that count."""
    from iclsim import testing
    with pytest.raises(AssertionError, match="not all are finite"):
        testing.assert_not_below(float("nan"), (1.0, 0.1))
    with pytest.raises(AssertionError, match="not all are finite"):
        testing.assert_not_below(1.0, (float("nan"), 0.1))
    with pytest.raises(AssertionError, match="not all are finite"):
        testing.assert_matches_theory(lambda p: p.x[:, 0] * jnp.nan, IID(2), 3, 1.0, num_prompts=100)
    design, n = IID(2, noise_var=0.5), 4
    W, L = theory.optimal_pgd(design, n)
    check = testing.assert_matches_theory(theory.pgd_predict(W), design, n, float(L), num_prompts=10_001,
                                          key=jax.random.PRNGKey(3))
    assert check.num_prompts == 10_001


# ---- finding 9: theory returns numpy, not JAX float64 arrays ----

def test_theory_returns_numpy_float64_that_user_arithmetic_keeps():
    """Finding 9: theory returned JAX float64 arrays; with x64 off, the guide's own `risk + 1e-12` truncated
    to float32 (so the tolerance did nothing). Now results are numpy float64 (scalars for 0-d), checked in a
    fresh interpreter with x64 off."""
    code = textwrap.dedent("""
        import warnings, numpy as np
        warnings.simplefilter("error")
        import jax
        from iclsim import theory, IID
        W, L = theory.optimal_pgd(IID(3, noise_var=0.5), 4)
        assert type(L) is np.float64 and isinstance(W, np.ndarray) and W.dtype == np.float64, (type(L), type(W))
        assert L + 1e-12 != L and (L + 1e-12).dtype == np.float64
        r = theory.pgd_risk(IID(3), 4, W)
        assert type(r) is np.float64, type(r)
        print("ok", jax.config.jax_enable_x64)
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_ENABLE_X64": "0"})
    assert out.returncode == 0 and out.stdout.split() == ["ok", "False"], out.stderr[-2000:]


# ---- finding 11: left from the last round ----

@pytest.mark.parametrize("call, exc, message", [
    (lambda: IID(2, cov_x=np.eye(2) * (1 + 1j)), TypeError, "cov_x must be real"),
    (lambda: models.Ridge(2, penalty=np.inf), ValueError, "penalty must be >= 0 and finite"),
    (lambda: train.TrainConfig(learning_rate=True), ValueError, "learning_rate must be > 0 and finite"),
    (lambda: train.TrainConfig(dtype="float16"), ValueError, "dtype must be float32 or float64"),
    (lambda: models.PGD(2, dtype="float16"), ValueError, "dtype must be float32 or float64"),
    (lambda: train.fit(models.PGD(2), [IID(2), IID(2, noise_var=1.0)], 3, steps=2), TypeError, "use fit_sweep"),
    (lambda: train.fit(models.PGD(2), IID(2), 3, steps=2, seed=2**63), ValueError, r"seed must be an integer in"),
    (lambda: train.fit_sweep(models.PGD(2), IID(2), [3], [2**64 - 1], train.TrainConfig(steps=2)), ValueError,
     r"seeds must be an integer in"),
])
def test_leftovers_are_refused_by_name(call, exc, message):
    """Finding 11: complex covariances (imaginary part dropped), Ridge(penalty=inf), learning_rate=True,
    dtype='float16' and a list of designs given to fit were accepted; seeds from 2**63 to 2**64-1 wrapped
    onto negative seeds. Now each is a named error."""
    with pytest.raises(exc, match=message):
        call()


def test_svd_truncate_of_nan_and_effective_n_and_numpy_ranks():
    """Finding 11: svd_truncate of a NaN matrix returned NaN; iid_effective_n returned -1.6 (negative
    effective sample sizes in rag.csv); rank=np.int64 was refused by models but accepted by theory."""
    from iclsim import pruning
    with pytest.raises(ValueError, match="W must be finite"):
        pruning.svd_truncate(np.full((3, 3), np.nan), rank=1)
    n_eff = theory.iid_effective_n(2, 0.1, [2.5, 1.0])  # 2.5 > d + s^2 = 2.1: worse than the zero predictor
    assert n_eff[0] == 0.0 and n_eff[1] > 0
    assert models.PGD(3, rank=np.int64(2)) == models.PGD(3, rank=2)
    assert models.LinearAttention(3, rank=np.int64(2)).rank == 2


# ---- findings 5, 6, 7 (all failed), 10 (processes), 12: the command line ----

EXPS = '''
import os, time
import jax
import matplotlib.pyplot as plt
import dataclasses
from iclsim import IID, theory
from iclsim.runner import Experiment

@dataclasses.dataclass(frozen=True)
class Settings:
    points: int = 2
    sleep: float = 0.0
    tag: str = "{name}"
    passes: bool = True
    num_test: int = 100

def run(s, seed, context):
    if s.sleep:
        with open(os.path.join(context.out, f"pid-{{s.tag}}"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(s.sleep)
    if s.num_test != 100:
        theory.monte_carlo_risk(lambda p: p.x[:, 0], IID(2), 2, jax.random.PRNGKey(0), num_prompts=s.num_test)
    return [{{"k": k, "devices": jax.device_count(), "passed": s.passes}} for k in range(s.points)]

def plot(rows, s):
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([r["k"] for r in rows])
    return fig

EXPERIMENT = Experiment(name="{name}", title="{name}", run=run, plot=plot, summary=lambda rows: {{"rows": len(rows)}},
                        settings=Settings())
'''


@pytest.fixture
def two_exps(tmp_path):
    folder = tmp_path / "exps"
    folder.mkdir()
    for name in ("alpha", "beta"):
        (folder / f"{name}.py").write_text(EXPS.replace("{name}", name).replace("{{", "{").replace("}}", "}"))
    return folder


def _cli(*args):
    from iclsim import cli
    return cli.main([str(a) for a in args])


def test_runs_with_overrides_never_write_the_committed_figures(two_exps, tmp_path, monkeypatch, capsys):
    """Finding 5: `iclsim run rag --set steps=5` from the repository root replaced figures/rag.* (17 of 24
    networks failing) and fig1 then drew from it. Now a run with --set goes to results/overrides by default,
    is labelled, refuses a folder of committed results unless --force, and readers (fig1) refuse it."""
    monkeypatch.chdir(tmp_path)
    assert _cli("--experiments", two_exps, "run", "alpha", "--no-cache") == 0  # the committed run
    committed = (tmp_path / "figures" / "alpha.json").read_bytes()
    assert _cli("--experiments", two_exps, "run", "alpha", "--no-cache", "--set", "points=5") == 0
    assert (tmp_path / "figures" / "alpha.json").read_bytes() == committed
    meta = json.loads((tmp_path / "results" / "overrides" / "alpha.json").read_text())
    assert meta["label"] == "overrides points=5" and meta["overrides"] == {"points": 5}
    capsys.readouterr()
    assert _cli("--experiments", two_exps, "run", "alpha", "--no-cache", "--set", "points=5", "--out", "figures") == 1
    assert "holds full-fidelity results" in capsys.readouterr().err
    assert (tmp_path / "figures" / "alpha.json").read_bytes() == committed
    with pytest.raises(runner.RunError, match="made with --set overrides \\(points=5\\)"):
        runner.read_results(tmp_path / "results" / "overrides", "alpha", quick=False, seed=0, reader="fig1")


def test_a_run_whose_networks_all_fail_exits_non_zero(two_exps, tmp_path, capsys):
    """Finding 7: `trajectory --set num_reference=1` exited 0 with every network failed. Now the command
    exits 1 saying every network failed its gate (the results are still written, for inspection)."""
    code = _cli("--experiments", two_exps, "run", "alpha", "--no-cache", "--out", tmp_path / "o", "--set", "passes=false")
    assert code == 1
    assert "every network (2) failed its quality gate" in capsys.readouterr().err
    assert (tmp_path / "o" / "alpha.json").exists()


def test_broken_experiment_files_and_plugins_do_not_disable_the_others(two_exps, tmp_path, monkeypatch, capsys):
    """Finding 12: a broken experiment file and a broken installed plugin sent raw tracebacks to the command
    line and disabled every command. Now each is one warning line and the other experiments run."""
    import importlib.metadata
    (two_exps / "broken.py").write_text("def oops(:\n")
    plugin = importlib.metadata.EntryPoint(name="bad", value="no_such_module_r2:EXPERIMENT", group=runner.PLUGIN_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [plugin] if group == runner.PLUGIN_GROUP else [])
    assert _cli("--experiments", two_exps, "list") == 0
    captured = capsys.readouterr()
    assert "alpha" in captured.out and "beta" in captured.out
    warnings = [line for line in captured.err.splitlines() if line.strip()]
    assert len(warnings) == 2 and all(line.startswith("iclsim: warning:") for line in warnings)
    assert "broken.py failed to load: SyntaxError" in warnings[0] and "'bad'" in warnings[1]
    assert _cli("--experiments", two_exps, "run", "alpha", "--no-cache", "--out", tmp_path / "o") == 0
    with pytest.raises(runner.RunError, match="broken.py failed to load"):
        runner.discover(two_exps)  # the library call stays strict


@pytest.mark.parametrize("args, code, message", [
    (["--seed", "100000000000000000000"], 2, "--seed must be an integer in [0, "),
    (["--set", "num_test=1000000000000000"], 1, "num_prompts = 1000000000000000 is"),
])
def test_huge_numbers_on_the_command_line_are_one_line(two_exps, tmp_path, capsys, args, code, message):
    """Finding 12: --seed 1e20 (as an integer) and --set num_test=1e15 sent raw tracebacks (an OverflowError
    deep in numpy, an int32 batch count) to the command line. Now one line naming the value."""
    assert _cli("--experiments", two_exps, "run", "alpha", "--no-cache", "--out", tmp_path / "o", *args) == code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("iclsim: error")]
    assert "Traceback" not in err and len(errors) == 1 and message in errors[0], err


def _popen_cli(two_exps, out, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    return subprocess.Popen([sys.executable, "-m", "iclsim", "--experiments", str(two_exps), "run", "alpha", "beta",
                             "--no-cache", "--out", str(out), *args], env=env, cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_jobs_give_the_numbers_and_devices_of_a_sequential_run(two_exps, tmp_path):
    """Finding 6: rag's gap was 0.0335 or 0.02 depending on --jobs: the workers got a share of the parent's
    devices (4 // 2 = 2), which changes how networks share a device and so the evaluation's batches; the
    JSON recorded the parent's devices. Now workers have the parent's device count (4 here, as in this
    process: conftest's XLA_FLAGS), and the JSON records the devices of the process that computed them."""
    assert jax.device_count() == 4
    assert _cli("--experiments", two_exps, "run", "alpha", "beta", "--no-cache", "--out", tmp_path / "seq") == 0
    proc = _popen_cli(two_exps, tmp_path / "par", "--jobs", "2")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    for name in ("alpha", "beta"):
        seq, par = (runner.read_rows(tmp_path / kind / f"{name}.csv") for kind in ("seq", "par"))
        assert seq == par and {r["devices"] for r in par} == {4}
        meta = json.loads((tmp_path / "par" / f"{name}.json").read_text())
        assert len(meta["versions"]["devices"]) == 4


@pytest.mark.slow  # waits for two worker processes to start and to notice their parent's death
def test_killing_a_jobs_parent_ends_its_workers(two_exps, tmp_path):
    """Finding 10: kill -9 of an `iclsim run --jobs` parent left its workers running indefinitely. Now each
    worker watches its parent and exits within about a second of its death."""
    out = tmp_path / "o"
    out.mkdir()
    proc = _popen_cli(two_exps, out, "--jobs", "2", "--set", "sleep=300")
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(list(out.glob("pid-*"))) < 2:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        workers = [int(p.read_text()) for p in out.glob("pid-*")]
        assert len(workers) == 2
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 20
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in workers if _alive(pid)]
    for pid in alive:  # do not leave them behind when the test fails
        os.kill(pid, 9)
    assert not alive, f"workers {alive} outlived their killed parent"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_designs_of_a_sweep_that_cannot_stack_are_named():
    """Finding 12: a sweep over designs of two types, or of per-position noise beside a scalar, failed deep
    inside JAX's tree_map ('the prefix pytree ... has a subtree of type'); now a ValueError names them."""
    from iclsim import RAG, designs
    with pytest.raises(ValueError, match="one type: design 0 is a IID, design 1 a RAG"):
        designs.stack([IID(2), RAG(2, 0.3)])
    with pytest.raises(ValueError, match="fields of one shape: design 1"):
        train.fit_sweep(models.PGD(2), [IID(2, noise_var=0.1), IID(2, noise_var=[0.1, 0.2, 0.3], query_noise_var=0.1)],
                        [3], [0], train.TrainConfig(steps=2))


def test_context_lengths_are_matched_by_value_and_one_point_names_its_padding():
    """Finding 4: evaluate_sweep given the ns in another order than the fit labelled every network with
    the other n (2.95 / 2.26 instead of 2.01 / 1.005), and evaluate(model, point, design, 2) scored one
    point of a multi-n sweep unpadded (11.48 where evaluate_sweep gave 2.07). Now both take the sorted
    list (anything else is refused by name), and evaluate's n_slots pads as the sweep did: the same
    number as evaluate_sweep for that point. Planted bugs caught: a silently re-sorted ns (the labels
    would still be wrong for a fit over unsorted ns), an n_slots that is ignored (the padded score would then be refused or differ)."""
    from iclsim import evaluate as ev
    design, key = IID(2, noise_var=0.1), jax.random.PRNGKey(0)
    model = models.H3(2, 5)  # a filter over 5 context positions
    with pytest.raises(ValueError, match="ns must be strictly increasing"):
        train.fit_sweep(model, design, [5, 2], [0], train.TrainConfig(steps=2))
    fitted = train.fit_sweep(model, design, [2, 5], [0], train.TrainConfig(steps=50))
    with pytest.raises(ValueError, match="ns must be strictly increasing"):
        ev.evaluate_sweep(model, fitted.params, design, [5, 2], key, 2_000)
    with pytest.raises(ValueError, match="n_slots must be >= max"):
        ev.evaluate_sweep(model, fitted.params, design, [2, 5], key, 2_000, n_slots=4)
    risk, _ = ev.evaluate_sweep(model, fitted.params, design, [2, 5], key, 2_000)
    point = jax.tree_util.tree_map(lambda a: a[0, 0, 0], fitted.params)  # the n = 2 network
    padded, _ = ev.evaluate(model, point, design, 2, key, 2_000, n_slots=5)
    np.testing.assert_allclose(padded, risk[0, 0, 0], rtol=1e-6)
    with pytest.raises(ValueError, match="context length 5"):  # unpadded: named, not a plausible number
        ev.evaluate(model, point, design, 2, key, 2_000)


def test_check_model_refuses_a_class():
    """Finding 11: protocols.check_model accepted the class LinearAttention instead of an instance (its
    init and apply are functions of the class too). Now a TypeError that says to construct it."""
    from iclsim import protocols
    with pytest.raises(TypeError, match="must be an instance, got the class LinearAttention"):
        protocols.check_model(models.LinearAttention)
    with pytest.raises(TypeError, match="must be an instance"):
        train.fit_sweep(models.LinearAttention, IID(2), [3], [0], train.TrainConfig(steps=2))


def test_persistence_sits_above_the_engine():
    """Issue 31: the cache imports neither the models nor the engine, and the engine (train, evaluate, layout)
    imports neither the cache nor the fingerprints: it calls the cache object it is handed. Planted bugs
    caught: train importing iclsim.cache for a default cache, cache importing models to recognise Frozen."""
    code = ("import sys; import iclsim.cache; bad = [m for m in ('iclsim.models', 'iclsim.train', 'iclsim.layout') "
            "if m in sys.modules]; assert not bad, bad; "
            "[sys.modules.pop(m) for m in list(sys.modules) if m.startswith('iclsim')]; "
            "import iclsim.train, iclsim.evaluate; bad = [m for m in ('iclsim.cache', 'iclsim.fingerprint') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
