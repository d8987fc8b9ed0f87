"""Trust by construction (issue 20): cache keys that cover everything that moves a number, entries
that are checked, result sets that never mix runs, provenance checks, closed forms free of n.
Each test names the finding of issue 20 whose planted bug it catches."""

import dataclasses
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from iclsim import IID, RAG, Drift, cache, designs, fingerprint, gram, models, runner, theory, train
from iclsim._files import atomic_write
from tests.tolerance import assert_close

ROOT = Path(__file__).resolve().parent.parent


# ---- 1. cache identity ----

def _module(tmp_path, name, source):
    """Import ``source`` as module ``name`` from a file (so its functions and classes have source)."""
    path = tmp_path / f"{name}_{time.monotonic_ns()}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_cache_key_follows_the_source_of_a_loss_function(tmp_path):
    """Finding 1 (stale cache): a loss function edited in place (same module and name) gets a new key;
    the old key hashed functions by module and name only."""
    a = _module(tmp_path, "user_loss", """
        import jax.numpy as jnp
        def loss(model, params, prompts):
            return jnp.mean((prompts.y_query - model.apply(params, prompts)) ** 2)
        """)
    b = _module(tmp_path, "user_loss", """
        import jax.numpy as jnp
        def loss(model, params, prompts):
            return jnp.mean(jnp.abs(prompts.y_query - model.apply(params, prompts)))
        """)
    assert a.loss.__qualname__ == b.loss.__qualname__ and a.loss.__module__ == b.loss.__module__
    assert cache.fingerprint(a.loss) != cache.fingerprint(b.loss)
    assert cache.fingerprint(a.loss) == cache.fingerprint(a.loss)


def test_cache_key_follows_module_constants_and_helpers(tmp_path):
    """Finding 1: a loss that reads a module-level constant or helper gets a new key when either changes."""
    src = """
        SCALE = {scale}
        def _helper(x):
            return x * {factor}
        def loss(model, params, prompts):
            return SCALE * _helper(prompts.y_query).mean()
        """
    base = _module(tmp_path, "user_consts", src.format(scale=1.0, factor=2)).loss
    scale = _module(tmp_path, "user_consts", src.format(scale=2.0, factor=2)).loss
    helper = _module(tmp_path, "user_consts", src.format(scale=1.0, factor=3)).loss
    keys = {cache.fingerprint(f) for f in (base, scale, helper)}
    assert len(keys) == 3


def test_cache_key_follows_a_user_models_apply(tmp_path):
    """Finding 1: a user model class whose apply body changes (same name, same fields) gets a new key."""
    src = """
        import dataclasses
        import jax.numpy as jnp
        @dataclasses.dataclass(frozen=True)
        class Mine:
            dim: int
            def apply(self, params, prompts):
                return {body}
        """
    # as in two processes: each key is taken while its version of the module is the one imported
    one = cache.fingerprint(_module(tmp_path, "user_model", src.format(body="prompts.x @ params['w']")).Mine(3))
    two = cache.fingerprint(_module(tmp_path, "user_model", src.format(body="2 * (prompts.x @ params['w'])")).Mine(3))
    assert one != two


def test_two_lambdas_get_two_keys_even_in_one_statement():
    """Finding 1: two different lambdas were one key (both '<lambda>'); now they differ. Keys hash the
    code objects (issue 32), so lambdas sharing a statement are told apart too, not refused."""
    first = lambda m, p, pr: (pr.y_query - m.apply(p, pr)) ** 2  # noqa: E731
    second = lambda m, p, pr: abs(pr.y_query - m.apply(p, pr))  # noqa: E731
    assert cache.fingerprint(first) != cache.fingerprint(second)
    both = (lambda x: x, lambda x: 2 * x)
    assert cache.fingerprint(both[0]) != cache.fingerprint(both[1])


def test_uncacheable_settings_are_refused_with_advice():
    """Finding 1: closures over arrays, optimizer objects and objects hashed by identity are refused (UncacheableError, a TypeError, saying how to make them cacheable)."""
    table = np.arange(3.0)

    def closes_over_array(model, params, prompts):
        return table.sum()

    class Opaque:  # state only in its __dict__, not a dataclass
        def __init__(self):
            self.w = 1.0

    for bad, what in [(closes_over_array, "closure over the array 'table'"),
                      (optax.adam(1e-3), "GradientTransformation"),
                      (Opaque(), "no stable content")]:
        with pytest.raises(cache.UncacheableError, match=what) as err:
            cache.fingerprint(bad)
        assert "cacheable" in str(err.value) and isinstance(err.value, TypeError)


def test_cache_key_follows_versions_devices_and_package_source(monkeypatch, tmp_path):
    """Finding 1: the iclsim / JAX versions, the iclsim code and the device count enter the key (the iclsim
    code as it runs: the training engine is one of the hashed settings, issue 32 finding 2)."""
    settings = (models.PGD(3), IID(3, noise_var=0.1), 4, 0, 4, train.TrainConfig(steps=10), train.squared_loss)
    base = cache.fingerprint(*settings)
    env = fingerprint.environment()
    for change in [{"jax": "0.0.1"}, {"iclsim": "9.9"}, {"jaxlib": "x"}]:
        monkeypatch.setattr(fingerprint, "environment", lambda c=change: {**env, **c})
        assert cache.fingerprint(*settings) != base, change
    monkeypatch.setattr(fingerprint, "environment", lambda: env)
    assert cache.fingerprint(*settings) == base
    runtime = fingerprint.runtime()
    monkeypatch.setattr(fingerprint, "runtime", lambda: (runtime[0], runtime[1] + 1, *runtime[2:]))
    assert cache.fingerprint(*settings) != base
    monkeypatch.setattr(fingerprint, "runtime", lambda: runtime)
    # an iclsim helper the engine reaches through a module attribute (layout.plan) is in the key
    from iclsim import layout
    engine = cache.fingerprint(train._fit_sweep)
    real = layout.plan
    monkeypatch.setattr(layout, "plan", lambda *a, **k: real(*a, **k))
    assert cache.fingerprint(train._fit_sweep) != engine


def test_cache_key_covers_an_optimizer_function_edited_in_place(tmp_path):
    """Finding 1: an optimizer given as a module-level function of the schedule (TrainConfig.optimizer) is
    hashed by its source: the same name returning another optax transformation is another key; the
    training config's dtype is in the key too."""
    src = """
        import optax
        def opt(schedule):
            return {body}
        """
    sgd = cache.fingerprint(_module(tmp_path, "user_opt", src.format(body="optax.sgd(schedule)")).opt)
    adamw = cache.fingerprint(_module(tmp_path, "user_opt", src.format(body="optax.adamw(schedule)")).opt)
    assert sgd != adamw
    cfg32, cfg64 = train.TrainConfig(steps=10), train.TrainConfig(steps=10, dtype=jax.numpy.float64)
    assert cache.fingerprint(cfg32) != cache.fingerprint(cfg64)


def _entry(tmp_path):
    store = cache.SweepCache(tmp_path)
    params, losses = {"W": np.eye(2, dtype=np.float32)}, np.linspace(1, 0.1, 5).astype(np.float32)
    key = cache.fingerprint("point", 1)
    store.save(key, params, losses)
    return store, key, params, losses


def test_corrupt_cache_entry_is_named_deleted_and_missed(tmp_path):
    """Finding 7: a truncated entry (BadZipFile) used to crash the run without naming the file; a
    flipped byte passed unnoticed. Now each is named in a CacheWarning, deleted and reported missing."""
    store, key, params, losses = _entry(tmp_path)
    template = jax.eval_shape(lambda: params)
    loaded = store.load(key, template)
    assert_close(loaded[0]["W"], params["W"], rtol=0, atol=0)
    path = store.path(key)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.warns(cache.CacheWarning, match=f"{path.name}.*unreadable"):
        assert store.load(key, template) is None
    assert not path.exists() and store.corrupt == 1
    store.save(key, params, losses)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:  # flip one byte inside the stored W (not the zip headers)
        info = z.getinfo("p0.npy")
    offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size - 1
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = store.load(key, template)
    assert result is None and not path.exists(), "a damaged entry must not load"
    assert any(path.name in str(w.message) for w in caught)


def test_non_finite_cache_entry_is_refused(tmp_path):
    """Finding 7: a valid entry full of NaN was loaded silently into NaN rows; now refused and deleted."""
    store, key, params, losses = _entry(tmp_path)
    path = store.path(key)
    bad = {"W": np.full((2, 2), np.nan, np.float32)}
    buf = __import__("io").BytesIO()
    np.savez(buf, losses=losses, checksum=np.array(cache._checksum(key, [losses, bad["W"]])), p0=bad["W"])
    path.write_bytes(buf.getvalue())
    with pytest.warns(cache.CacheWarning, match="non-finite"):
        assert store.load(key, jax.eval_shape(lambda: params)) is None
    assert not path.exists()
    with pytest.raises(FloatingPointError, match="non-finite"):
        store.save(key, bad, losses)


def test_corrupt_entry_is_retrained_by_fit_sweep(tmp_path):
    """Finding 7 end to end: fit_sweep with a corrupted stored point warns, retrains it to the same numbers."""
    model, design = models.PGD(2), IID(2, noise_var=0.2)
    cfg = train.TrainConfig(steps=30, batch_size=32, warmup_steps=5)
    first = train.fit_sweep(model, design, [3], [0], cfg, cache=cache.SweepCache(tmp_path))
    (entry,) = list(tmp_path.rglob("*.npz"))
    entry.write_bytes(b"not a zip file")
    again = cache.SweepCache(tmp_path)
    with pytest.warns(cache.CacheWarning, match=entry.name):
        second = train.fit_sweep(model, design, [3], [0], cfg, cache=again)
    assert (again.hits, again.trained, again.corrupt) == (0, 1, 1)
    assert_close(second.losses, first.losses, rtol=1e-6, atol=1e-7)


def test_files_follow_the_umask(tmp_path):
    """Finding 12: results and cache entries were created 0600 whatever the umask (mkstemp)."""
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "r.csv", b"x\n")
        store, key, _, _ = _entry(tmp_path / "c")
    finally:
        os.umask(old)
    assert (tmp_path / "r.csv").stat().st_mode & 0o777 == 0o644
    assert store.path(key).stat().st_mode & 0o777 == 0o644


# ---- 2. results as a set ----

def _fake(name="fake", fail=None, seen=None):
    """An Experiment that trains nothing: rows carry the seed; ``fail(stage, seed)`` may raise."""
    import matplotlib.pyplot as plt

    def run(s, seed, context):
        if seen is not None:
            seen.append(seed)
        if fail:
            fail("run", seed)
        return [{"seed": seed, "k": k, "value": s.scale * k + seed} for k in range(s.points)]

    def plot(rows, s):
        if fail:
            fail("plot", rows[0]["seed"])
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([r["k"] for r in rows], [r["value"] for r in rows])
        ax.set_title(f"seed {rows[0]['seed']}")
        return fig

    settings = _FakeSettings()
    return runner.Experiment(name=name, title=name, settings=settings, run=run, plot=plot,
                             summary=lambda rows: {"rows": len(rows), "tiny": 4.440892098500626e-16},
                             quick=dataclasses.replace(settings, points=2))


@dataclasses.dataclass(frozen=True)
class _FakeSettings:
    scale: float = 1.5
    points: int = 3


def assert_one_set(folder: Path, name="fake"):
    """The folder's CSV, PNG and JSON are one run's: the JSON's sha256 match, the CSV's seed is the JSON's,
    and no pending or temporary file is left."""
    meta = json.loads((folder / f"{name}.json").read_text())
    for kind in ("csv", "png"):
        data = (folder / f"{name}.{kind}").read_bytes()
        assert meta["files"][kind]["sha256"] == hashlib.sha256(data).hexdigest(), kind
    assert {r["seed"] for r in runner.read_rows(folder / f"{name}.csv")} == {meta["seed"]}
    assert not [p for p in folder.iterdir() if p.name.startswith(".iclsim-pending") or p.name.endswith(".tmp")]
    return meta


def test_interrupted_rerun_leaves_the_previous_set_whole(tmp_path):
    """Finding 9: an interrupted --seed 1 rerun into a folder of seed-0 results left a seed-1 CSV beside
    the seed-0 JSON and PNG (the CSV was written before the figure). Now the set is written together."""
    def fail(stage, seed):
        if stage == "plot" and seed == 1:
            raise KeyboardInterrupt

    exp = _fake(fail=fail)
    runner.run_experiment(exp, tmp_path, seed=0, progress=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(exp, tmp_path, seed=1, progress=lambda m: None)
    assert assert_one_set(tmp_path)["seed"] == 0


@pytest.fixture
def sigint():
    """A setter of the SIGINT handler; the handler the test started with is restored after it."""
    previous = signal.getsignal(signal.SIGINT)
    yield lambda handler: signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("at_call", range(1, 8))
def test_sigint_while_writing_never_mixes_runs(tmp_path, monkeypatch, sigint, at_call):
    """Finding 9: a real SIGINT at any file operation of the write (each os.replace: the pending files,
    then the moves) leaves one whole set: the old one, or the new one completed before the interrupt.
    Python's own SIGINT handler is installed for the test: a background job starts with SIGINT ignored."""
    sigint(signal.default_int_handler)
    exp = _fake()
    runner.run_experiment(exp, tmp_path, seed=0, progress=lambda m: None)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == at_call:
            os.kill(os.getpid(), signal.SIGINT)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(exp, tmp_path, seed=1, progress=lambda m: None)
    monkeypatch.setattr(os, "replace", real)
    assert assert_one_set(tmp_path)["seed"] in (0, 1)


def test_an_ignored_sigint_stays_ignored_while_writing(tmp_path, monkeypatch, sigint):
    """A process that ignores SIGINT (nohup, a background job) is not interrupted by the write's hold on
    SIGINT. Planted bug caught: the hold raising KeyboardInterrupt after a signal the process ignores."""
    sigint(signal.SIG_IGN)
    exp = _fake()
    real = os.replace

    def replace(src, dst):
        os.kill(os.getpid(), signal.SIGINT)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    runner.run_experiment(exp, tmp_path, seed=1, progress=lambda m: None)
    monkeypatch.setattr(os, "replace", real)
    assert assert_one_set(tmp_path)["seed"] == 1
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_killed_commit_is_completed_by_the_next_run(tmp_path, monkeypatch):
    """Finding 9: a run killed between moving its files in (simulated: os.replace fails after the first
    move) is completed by the next run that takes the folder, before it writes anything."""
    exp = _fake()
    runner.run_experiment(exp, tmp_path, seed=0, progress=lambda m: None)
    real, moves = os.replace, []

    def crash(src, dst):
        if Path(src).parent.name.startswith(".iclsim-pending") and Path(dst).parent == tmp_path:
            moves.append(dst)
            if len(moves) == 2:
                raise SystemExit("killed")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(SystemExit):
        runner.run_experiment(exp, tmp_path, seed=1, progress=lambda m: None)
    monkeypatch.setattr(os, "replace", real)
    with pytest.raises(runner.RunError, match="not the CSV its JSON describes"):
        runner.read_results(tmp_path, "fake", quick=False, seed=0)  # readers refuse the half-moved set
    other = _fake(name="other")
    runner.run_experiment(other, tmp_path, seed=1, progress=lambda m: None)  # takes the folder: recovers
    assert assert_one_set(tmp_path)["seed"] == 1
    assert_one_set(tmp_path, "other")


HOLD = """
import sys, time
from iclsim import runner
with runner.results_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_concurrent_runs_into_one_folder_are_refused(tmp_path):
    """Finding 9: two concurrent runs into one folder mixed their files (1 in 3 trials). Now the second is
    refused naming the first's pid; when the first dies, its lock is recovered."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        seen = []
        with pytest.raises(runner.RunError, match=f"pid {holder.pid}.*another --out"):
            runner.run_experiment(_fake(seen=seen), tmp_path, seed=0, progress=lambda m: None)
        assert seen == [], "the refusal must come before the run"
    finally:
        holder.kill()
        holder.wait()
    runner.run_experiment(_fake(), tmp_path, seed=0, progress=lambda m: None)  # a dead holder's lock is free
    assert_one_set(tmp_path)
    assert not (tmp_path / runner.LOCK_NAME).exists()


def test_quick_run_refuses_full_results_unless_forced(tmp_path):
    """Finding 10: quick results silently overwrote full-fidelity figures."""
    runner.run_experiment(_fake(), tmp_path, quick=False, seed=0, progress=lambda m: None)
    seen = []
    with pytest.raises(runner.RunError, match="full-fidelity results.*--force"):
        runner.run_experiment(_fake(seen=seen), tmp_path, quick=True, seed=0, progress=lambda m: None)
    assert seen == []
    meta = runner.run_experiment(_fake(), tmp_path, quick=True, seed=0, progress=lambda m: None, force=True)
    assert meta["quick"] and assert_one_set(tmp_path)["quick"]


def _fig1():
    spec = importlib.util.spec_from_file_location("fig1_under_test", ROOT / "experiments" / "fig1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fig1_checks_the_provenance_of_its_sources(tmp_path):
    """Finding 10: fig1 read whatever CSVs lay in the folder (quick or not, any seed). Now it refuses
    sources of another fidelity or seed, naming what differs."""
    fig1 = _fig1()
    for name in fig1.SOURCES:
        runner.run_experiment(_fake(name=name), tmp_path, quick=True, seed=0, progress=lambda m: None)
    with pytest.raises(runner.RunError, match="quick results, this run is full-fidelity"):
        fig1.run(fig1.EXPERIMENT.settings, 0, runner.RunContext(print, None, tmp_path, False))
    with pytest.raises(runner.RunError, match="seed 0, this run seed 3"):
        fig1.run(fig1.EXPERIMENT.settings, 3, runner.RunContext(print, None, tmp_path, True))
    rows = fig1.run(fig1.EXPERIMENT.settings, 0, runner.RunContext(print, None, tmp_path, True))
    assert {r["source"] for r in rows} == set(fig1.SOURCES)


def test_output_problems_are_found_before_training(tmp_path):
    """Finding 8: --out naming an existing file (or a path under one) failed only after the training."""
    (tmp_path / "a_file").write_text("x")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "sub"):
        seen = []
        with pytest.raises(runner.RunError, match="existing file"):
            runner.run_experiment(_fake(seen=seen), out, seed=0, progress=lambda m: None)
        assert seen == []
    seen = []
    with pytest.raises(runner.RunError, match="cache folder"):
        runner.run_experiment(_fake(seen=seen), tmp_path / "ok", seed=0, progress=lambda m: None,
                              cache=cache.SweepCache(tmp_path / "a_file"))
    assert seen == []


# ---- 4. validation at the boundary, closed forms free of n ----

def test_closed_forms_cost_nothing_in_n():
    """Finding 6: optimal_pgd(IID(5), 10**9) materialised length-n arrays (over a minute, 20 GB); the
    weight sums are now analytic. Same risk as the isotropic formula d + s^2 - n d / (n + d + 1 + s^2)."""
    theory.optimal_pgd(IID(5, noise_var=0.5), 10)  # compile the shapes once
    start = time.perf_counter()
    _, L = theory.optimal_pgd(IID(5, noise_var=0.5), 10**9)
    assert time.perf_counter() - start < 0.5
    n = 10**9
    assert float(L) == pytest.approx(5 + 0.5 - n * 5 / (n + 6.5), rel=1e-9)
    assert float(theory.pgd_risk(IID(5), 2**40, np.eye(5) / 2**40)) == pytest.approx(5 * 6 / 2**40, rel=1e-6)
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, 9007199254740992\]"):
        theory.optimal_pgd(IID(5), 2**62)


@pytest.mark.parametrize("call, exc, message", [
    (lambda: Drift(3, [.5, .5], query_noise_var=[.1, .2]), ValueError, "query_noise_var must be a scalar"),
    (lambda: gram.sample_gram(IID(2), jax.random.PRNGKey(0), 4, 0, 3), ValueError, r"n must be an integer in \[1, 3\]"),
    (lambda: theory.rag_effective_risk(RAG(3, .2), -5), ValueError, "n must be an integer"),
    (lambda: theory.rag_effective_risk(RAG(3, .2, gamma=0.5), 5), ValueError, "gamma = 1"),
    (lambda: theory.pgd_risk(IID(3), 4, np.full((3, 3), np.nan)), ValueError, "W must be finite"),
    (lambda: theory.pgd_risk(IID(3), 4, np.eye(3), [1, np.inf, 1, 1]), ValueError, "weights must be finite"),
    (lambda: theory.optimal_pgd(IID(3), 2.5), TypeError, "n must be an integer"),
    (lambda: theory.lowrank_optimal_risk(IID(3), 4, 2.0), TypeError, "rank must be an integer"),
    (lambda: theory.optimal_pgd("IID", 3), TypeError, "optimal_pgd has a closed form"),
    (lambda: IID(2, cov_x="identity"), TypeError, "cov_x must be an array of numbers"),
    (lambda: RAG(2, 0.3, gamma="1"), TypeError, "gamma must be"),
])
def test_bad_input_is_refused_by_name(call, exc, message):
    """Finding 5: each of these returned garbage (a vector risk, a NaN Gram matrix, a negative risk) or
    failed deep inside numpy; now a named ValueError / TypeError."""
    with pytest.raises(exc, match=message):
        call()


def test_numpy_integers_and_tiny_covariances_are_accepted():
    """Finding 12: a valid covariance of scale 1e-20 was rejected as not positive definite; numpy integer
    ranks are accepted (and give the same as Python ints)."""
    tiny = IID(2, cov_x=1e-20 * np.array([[2.0, 0.5], [0.5, 1.0]]))
    assert tiny.cov_x[0, 0] == 2e-20
    with pytest.raises(ValueError, match="positive definite"):
        IID(2, cov_x=1e-20 * np.array([[1.0, 1.0], [1.0, 1.0]]))
    assert float(theory.lowrank_optimal_risk(IID(3), 4, np.int64(2))) == float(theory.lowrank_optimal_risk(IID(3), 4, 2))
