"""The public pure kernels (``train.make_train``, ``evaluate.make_score``) that ``fit_sweep`` and
``evaluate_sweep`` map over a sweep, and progress reports from the Python API (``iclsim.progress``)."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclsim import IID, compiler, evaluate, models, progress, rng, train
from iclsim.designs import stack
from tests.tolerance import assert_close

MODEL = models.LinearAttention(3)
CFG = train.TrainConfig(steps=30, batch_size=64, learning_rate=0.02, warmup_steps=5, record_every=10,
                        record_prompts=300)
DESIGNS, NS, SEEDS = [IID(3, noise_var=v) for v in (0.1, 0.5)], [3, 6], [0, 1]


@pytest.fixture(scope="module")
def fitted():
    """fit_sweep of MODEL over DESIGNS x NS x SEEDS (8 points) with CFG, silent: trained once for the module."""
    return train.fit_sweep(MODEL, DESIGNS, NS, SEEDS, CFG)


def test_fit_sweep_is_the_vmapped_kernel(fitted):
    """A sweep over seeds equals jax.vmap(make_train(...)) on the same points bit for bit, on one device and
    over four. Where points of one seed share a block (designs x ns), members are batched differently, and
    the numbers agree to float32 rounding. Planted bugs caught: a kernel that splits its key otherwise, or
    draws the evaluation set from another stream."""
    design, seeds = IID(3, noise_var=0.3), [0, 1, 2, 3]
    kernel = train.make_train(MODEL, CFG, 6)
    mapped = jax.jit(jax.vmap(kernel, (0, None, None)))(jnp.asarray(rng.seed_keys(seeds)), design, 6)
    for devices in (jax.devices()[:1], jax.devices()):
        sweep = train.fit_sweep(MODEL, design, [6], seeds, CFG, devices=devices)
        np.testing.assert_array_equal(np.asarray(mapped.losses), sweep.losses[0, 0])
        np.testing.assert_array_equal(np.asarray(mapped.record.loss), sweep.record.loss[0, 0])
        for name in sweep.params:
            np.testing.assert_array_equal(np.asarray(mapped.params[name]), sweep.params[name][0, 0], err_msg=name)
    points = [(i, j, k) for i in range(2) for j in range(2) for k in range(2)]
    out = jax.jit(jax.vmap(kernel))(jnp.asarray(rng.seed_keys([SEEDS[k] for _, _, k in points])),
                                    stack([DESIGNS[i] for i, _, _ in points]), jnp.asarray([NS[j] for _, j, _ in points]))
    assert_close(np.reshape(out.losses, fitted.losses.shape), fitted.losses, rtol=1e-5, atol=1e-6)
    assert_close(np.reshape(out.record.loss, fitted.record.loss.shape), fitted.record.loss, rtol=1e-5)


def test_make_train_refuses_a_dtype_other_than_the_models():
    with pytest.raises(ValueError, match=r"TrainConfig.dtype \(float64\) must equal model.dtype \(float32\)"):
        train.make_train(MODEL, train.TrainConfig(dtype=jnp.float64), 4)
    with pytest.raises(ValueError, match="n_slots"):
        train.make_train(MODEL, CFG, 0)


def test_make_score_is_evaluate_sweeps_referee():
    """Each network scored by make_score (compiled as evaluate_sweep compiles its program) gets evaluate_sweep's
    (risk, se) under the same key, to the last bits of the float64 division, on token draws and on Gram draws
    (where a block of networks shares one draw). Planted bugs caught: other prompts (another key derivation, a
    draw keyed by batch), sums in float32."""
    design = IID(3, noise_var=0.3)
    params = jax.jit(jax.vmap(MODEL.init))(jax.random.split(jax.random.PRNGKey(3), 3))
    swept = jax.tree_util.tree_map(lambda a: a[None, None], params)  # [1 design, 1 n, 3 seeds]
    key = jax.random.PRNGKey(9)
    for sampler in ("tokens", "gram"):
        risk, se = evaluate.evaluate_sweep(MODEL, swept, design, [6], key, 3000, 1000, sampler=sampler)
        score = jax.jit(evaluate.make_score(MODEL, 6, 3000, 1000, sampler=sampler),
                        compiler_options=compiler.evaluation_options(jax.devices()))
        for k in range(3):
            got = score(jax.tree_util.tree_map(lambda a: a[k], params), design, 6, key)
            assert_close(got.mean, risk[0, 0, k], rtol=1e-14, name=sampler)
            assert_close(got.se, se[0, 0, k], rtol=1e-12, name=sampler)
    with pytest.raises(ValueError, match="num_prompts"):
        evaluate.make_score(MODEL, 6, 0)
    with jax.enable_x64(False), pytest.raises(RuntimeError, match=r"summed in float64: .*jax.enable_x64\(True\)"):
        evaluate.make_score(MODEL, 6, 1000)(jax.tree_util.tree_map(lambda a: a[0], params), design, 6, key)


def test_progress_reports_increasing_points_and_leaves_the_numbers_alone(fitted):
    """fit_sweep and evaluate_sweep with a progress function: reports k of N with k increasing to N, elapsed
    non-decreasing and a time left once anything is done; the numbers equal the silent run's (the module's
    ``fitted``) bit for bit."""
    designs, ns, seeds, silent = DESIGNS, NS, SEEDS, fitted
    reports = []
    loud = train.fit_sweep(MODEL, designs, ns, seeds, CFG, progress=reports.append)
    np.testing.assert_array_equal(loud.losses, silent.losses)
    np.testing.assert_array_equal(loud.record.loss, silent.record.loss)
    _check_reports(reports, 8, inside=True)
    reports.clear()
    key = jax.random.PRNGKey(2)
    loud_risk = evaluate.evaluate_sweep(MODEL, silent.params, designs, ns, key, 2000, 500, progress=reports.append)
    np.testing.assert_array_equal(loud_risk, evaluate.evaluate_sweep(MODEL, silent.params, designs, ns, key, 2000, 500))
    _check_reports(reports, 8, inside=False)
    out = io.StringIO()
    progress.printer("fit_sweep", out)(progress.Progress(3.0, 8, 10.0, 16.7))
    assert out.getvalue() == "fit_sweep: 3.0 of 8 points, 10 s elapsed, about 17 s left\n"
    with pytest.raises(TypeError, match="progress must be None or a function"):
        train.fit_sweep(MODEL, designs, ns, seeds, CFG, progress=3)


def _check_reports(reports, total, inside):
    done = [r.done for r in reports]
    assert done[0] == 0 and done[-1] == total and all(r.total == total for r in reports)
    assert all(b > a for a, b in zip(done, done[1:])), done
    assert all(b.elapsed >= a.elapsed for a, b in zip(reports, reports[1:]))
    assert reports[0].remaining is None and all(r.remaining >= 0 for r in reports[1:])
    if inside:  # the step callbacks report inside the one program, not only its end
        assert any(0 < d < total for d in done), done
    else:  # chunks of points: one report per chunk
        assert len(reports) == total + 1
