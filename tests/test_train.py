"""The training engine: shapes, determinism, one compilation per sweep, divergence, float32."""

import gc
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import iclsim.evaluate as evaluation
from iclsim import IID, cache, layout, loop, models, montecarlo, rng, sweeps, theory, train
from iclsim.evaluate import evaluate, evaluate_sweep
from iclsim.gram import draw
from tests.tolerance import TRAINED_EXACT_GAP, TRAINED_W_REL_LONG, assert_close, assert_within_se

CFG = train.TrainConfig(steps=150, batch_size=64, learning_rate=0.02, warmup_steps=10)


class CompileCounter:
    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


COUNTER = CompileCounter()
LA, LA_DESIGNS = models.LinearAttention(3), [IID(3, noise_var=v) for v in (0.0, 0.5, 1.0)]


# Trained sweeps shared by the tests of this file (pytest-xdist's --dist loadfile keeps it in one worker): each
# training program compiles once instead of once per test.
@pytest.fixture(scope="module")
def one_device_sweep():
    """Linear attention, noise 0 and 0.5, n = 2, 5, 7, seeds 0-3, trained on one device."""
    return train.fit_sweep(LA, LA_DESIGNS[:2], [2, 5, 7], [0, 1, 2, 3], CFG, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def la_sweep():
    """Linear attention, noise 0, 0.5 and 1, n = 2, 7, seeds 0-4, trained on the 4 devices: the networks
    the evaluation tests score."""
    return train.fit_sweep(LA, LA_DESIGNS, [2, 7], [0, 1, 2, 3, 4], CFG)


def _params(params, designs=slice(None), ns=slice(None), seeds=slice(None)):
    """A sub-sweep's parameters [designs, ns, seeds, ...], sliced in numpy (eager slices compile one by one)."""
    return jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)[designs, ns, seeds]), params)


def test_sweep_shapes_dtype_and_determinism(one_device_sweep):
    a = one_device_sweep
    assert a.params["Wq"].shape == (2, 3, 4, 4, 4) and a.params["Wq"].dtype == jnp.float32
    assert a.losses.shape == (2, 3, 4, 150) and a.losses.dtype == np.float32
    b = train.fit_sweep(LA, LA_DESIGNS[:2], [2, 5, 7], [0, 1, 2, 3], CFG, devices=jax.devices()[:1])
    np.testing.assert_array_equal(a.losses, b.losses)
    assert not np.array_equal(a.losses[:, :, 0], a.losses[:, :, 1])  # seeds differ


def test_sweep_reuses_one_compiled_program():
    """A second sweep of the same shapes compiles nothing. The first call must be seen compiling (a
    config no other test uses), so a renamed JAX compile event fails here instead of passing vacuously."""
    model, config = models.PGD(3), train.TrainConfig(steps=151, batch_size=64, learning_rate=0.02, warmup_steps=10)
    start = COUNTER.count
    train.fit_sweep(model, [IID(3, noise_var=0.1)], [3, 6], [0, 1], config)
    before = COUNTER.count
    assert before > start, "no compile event seen: JAX renamed /jax/core/compile/backend_compile_duration?"
    # other noise level, other context lengths and seeds of the same shapes: no new compilation
    train.fit_sweep(model, [IID(3, noise_var=0.9)], [4, 6], [5, 9], config)
    assert COUNTER.count == before


def test_sweep_entry_equals_single_fit():
    """At n = max(ns) a sweep member sees exactly the stream a single fit sees."""
    model = models.PGD(3)
    design = IID(3, noise_var=0.2)
    sweep = train.fit_sweep(model, design, [2, 6], [3], CFG)
    single = train.fit(model, design, 6, steps=150, batch_size=64, learning_rate=0.02, seed=3, warmup_steps=10)
    assert_close(sweep.params["W"][0, 1, 0], single.params["W"], rtol=1e-4, atol=1e-6)


def test_seed_keys_are_jax_keys():
    seeds = [0, 1, 7, 2**31, 2**40 + 5, -3]
    want = np.stack([np.asarray(jax.random.PRNGKey(s)) for s in seeds])
    got = rng.seed_keys(seeds)
    assert got.dtype == np.uint32 and np.array_equal(got, want)


def test_training_equals_a_plain_optax_loop():
    """fit (one flat parameter vector for Adam, the batch split over the devices, no vmap for one point)
    is the textbook loop: split the seed's key into the initialisation's and each step's, then per
    step a fresh batch, value_and_grad and optax.adam on the parameter tree."""
    model, design, n, seed = models.LinearAttention(3), IID(3, noise_var=0.3), 6, 4
    cfg = train.TrainConfig(steps=40, batch_size=64, learning_rate=0.02, warmup_steps=10)
    fitted = train.fit(model, design, n, cfg.steps, cfg.batch_size, cfg.learning_rate, seed,
                       warmup_steps=cfg.warmup_steps)
    keys = jax.random.split(jax.random.PRNGKey(seed), cfg.steps + 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.02, 10, 40, 0.02 * 1e-3)
    opt = optax.adam(schedule)
    params = jax.jit(model.init)(keys[0])  # init and opt.init compiled (eager: one program per operation)
    state = jax.jit(opt.init)(params)
    gram = train.uses_gram(model, design, n)

    @jax.jit  # one step compiled once (eager, its ops dispatch one by one: 30-60 s of the suite)
    def step(params, state, k):
        prompts = draw(design, k, cfg.batch_size, n, n, cfg.dtype, gram)
        loss, grads = jax.value_and_grad(lambda p: train.squared_loss(model, p, prompts))(params)
        with jax.numpy_dtype_promotion("standard"):
            updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for s in range(cfg.steps):
        params, state, loss = step(params, state, keys[s + 1])
        losses.append(float(loss))
    assert_close(fitted.losses, np.array(losses), rtol=1e-4, atol=1e-6, name="losses")
    for name in params:
        assert_close(fitted.params[name], params[name], rtol=1e-4, atol=1e-6, name=name)


@pytest.mark.parametrize("size", [1, 3])
def test_map_is_vmap(size):
    """layout._map equals jax.vmap; at size 1 it traces the function once without batching rules."""
    def f(a, b, c):
        return {"sum": a["x"] @ b + c, "n": jnp.sum(a["x"]) * c}

    args = ({"x": jnp.arange(size * 6.0).reshape(size, 2, 3)}, jnp.ones(3), jnp.arange(size * 2.0).reshape(size, 2))
    got, want = layout._map(f, (0, None, 0))(*args), jax.vmap(f, (0, None, 0))(*args)
    for k in want:
        assert got[k].shape == want[k].shape
        assert_close(got[k], want[k], name=k)


def test_diverging_training_stops_with_message():
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step \d+ for model PGD.*n = 4, seed = 0"):
        train.fit(models.PGD(3), IID(3), 4, steps=50, batch_size=32, learning_rate=1e30)


def test_divergence_with_finite_losses_is_caught():
    """Learning rate 1e6 on linear attention: the loss explodes but stays finite (about 1e24 without the
    check). Planted bug caught: a check of finiteness only."""
    with pytest.raises(FloatingPointError, match=r"above divergence_factor = 1e\+06 times the initial loss .* for "
                                                 r"model LinearAttention.*IID.*n = 8, seed = 0"):
        train.fit(models.LinearAttention(4), IID(4, noise_var=0.1), 8, steps=2000, learning_rate=1e6)
    small = train.TrainConfig(steps=40, batch_size=32, learning_rate=0.05, warmup_steps=5, divergence_factor=None)
    assert np.all(np.isfinite(train.fit_sweep(models.PGD(3), IID(3), [4], [0], small).losses))


def test_optimizer_field_takes_any_optax_transformation():
    """The default is the Adam/warmup-cosine of before; an optax transformation or a function of the
    schedule is used as given. Planted bugs caught: the field ignored (SGD would equal Adam), the
    schedule not passed (the function form would differ from building it by hand)."""
    base = dict(steps=30, batch_size=32, learning_rate=0.02, warmup_steps=5)
    model, design = models.PGD(3), IID(3, noise_var=0.2)
    default = train.fit_sweep(model, design, [4], [0], train.TrainConfig(**base)).losses
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.02, 5, 30, 0.02 * 1e-3)
    adam = train.fit_sweep(model, design, [4], [0], train.TrainConfig(**base, optimizer=optax.adam(schedule))).losses
    as_function = train.fit_sweep(model, design, [4], [0], train.TrainConfig(**base, optimizer=optax.adam)).losses
    sgd = train.fit_sweep(model, design, [4], [0], train.TrainConfig(**base, optimizer=optax.sgd(0.02))).losses
    np.testing.assert_array_equal(adam, default)
    np.testing.assert_array_equal(as_function, default)
    assert not np.array_equal(sgd, default)
    with pytest.raises(TypeError, match=r"optimizer must be None, one of \(.sgd.,\), an optax.GradientTransformation"):
        train.TrainConfig(optimizer=0.1)
    with pytest.raises(TypeError, match="must return an optax.GradientTransformation"):
        train.TrainConfig(**base, optimizer=lambda s: s).transformation()


def test_momentum_is_heavy_ball_and_zero_builds_plain_sgd():
    """TrainConfig(optimizer="sgd", momentum=b) trains by Polyak's heavy ball, x_{t+1} = x_t - lr g_t + b (x_t -
    x_{t-1}) from rest (x_{-1} = x_0), checked against that recursion written out on a diagonal quadratic; momentum
    0 builds exactly optax.sgd(lr) (the same state and the same update program), so every "sgd" run's numbers stay
    bit for bit. Planted bugs caught: momentum ignored, optax.sgd(lr, momentum=0.0) at momentum 0 (a trace state:
    another program), Nesterov's variant."""
    curvature, lr, b = np.array([1.0, 0.3, 0.05]), 0.5, 0.6
    opt = train.TrainConfig(optimizer="sgd", learning_rate=lr, momentum=b).transformation()
    params = jnp.asarray([1.0, -2.0, 0.5])
    state = opt.init(params)
    prev = cur = np.asarray(params, np.float64)
    for _ in range(8):
        updates, state = opt.update(jnp.asarray(curvature) * params, state, params)
        params = optax.apply_updates(params, updates)
        prev, cur = cur, cur - lr * curvature * cur + b * (cur - prev)
        np.testing.assert_allclose(params, cur, rtol=1e-5, atol=1e-6)
    plain, ref, g = train.TrainConfig(optimizer="sgd", learning_rate=lr).transformation(), optax.sgd(lr), jnp.ones(3)
    assert jax.tree_util.tree_structure(plain.init(g)) == jax.tree_util.tree_structure(ref.init(g))
    program = lambda t: str(jax.make_jaxpr(lambda u, p: t.update(u, t.init(p), p))(g, g))  # noqa: E731
    assert program(plain) == program(ref)


@pytest.mark.parametrize("momentum, error", [(-0.1, ValueError), (1.0, ValueError), (float("nan"), ValueError),
                                             (np.inf, ValueError), (True, TypeError), ("0.5", TypeError)])
def test_momentum_must_be_in_zero_one(momentum, error):
    with pytest.raises(error, match=r"momentum must be (a number )?in \[0\.0, 1\.0\)"):
        train.TrainConfig(optimizer="sgd", momentum=momentum)


def test_momentum_only_with_sgd():
    """Heavy ball is optimizer "sgd" with momentum: any other optimizer with momentum > 0 is refused by name (it
    would be silently ignored); momentum 0 goes with any."""
    for optimizer in (None, optax.sgd(0.1), optax.adam):
        with pytest.raises(ValueError, match=r"momentum > 0 \(heavy ball\) needs optimizer='sgd'"):
            train.TrainConfig(optimizer=optimizer, momentum=0.5)
        assert train.TrainConfig(optimizer=optimizer, momentum=0).momentum == 0.0


def test_momentum_is_in_the_cache_key(tmp_path):
    """Configs differing only in momentum are different sweep points: different keys, and one's cached networks
    are never loaded for another (the same momentum loads). Planted bug caught: momentum left out of the key
    (heavy ball would load plain GD's networks)."""
    store = cache.SweepCache(tmp_path)
    config = lambda m: train.TrainConfig(steps=20, batch_size=16, learning_rate=0.05,  # noqa: E731
                                         optimizer="sgd", momentum=m)
    assert len({cache.fingerprint(config(m)) for m in (0.0, 0.5, 0.9)}) == 3
    fit = lambda m: train.fit_sweep(models.PGD(2), IID(2), [3], [0], config(m), cache=store)  # noqa: E731
    plain, heavy = fit(0.0), fit(0.5)
    assert (store.hits, store.trained) == (0, 2) and not np.array_equal(plain.losses, heavy.losses)
    np.testing.assert_array_equal(fit(0.5).losses, heavy.losses)
    assert (store.hits, store.trained) == (1, 2)


def test_trained_pgd_reaches_theory_and_evaluate_is_unbiased(key):
    d, n = 3, 8
    design = IID(d, noise_var=0.5)
    model = models.PGD(d)
    result = train.fit(model, design, n, steps=1500, batch_size=256, learning_rate=0.01)
    W_star, L_star = theory.optimal_pgd(design, n)
    W = jnp.asarray(model.effective_pgd(result.params, n).W, jnp.float64)
    assert float(jnp.linalg.norm(W - W_star) / jnp.linalg.norm(W_star)) < TRAINED_W_REL_LONG
    assert abs(float(theory.pgd_risk(design, n, W)) / float(L_star) - 1) < TRAINED_EXACT_GAP
    exact = models.PGD(d, dtype=jnp.float64)
    mean, se = evaluate(exact, {"W": W_star * n}, design, n, key, 100_000)
    assert_within_se(L_star, mean, se, name="evaluate vs optimal_pgd")


def test_float64_training_on_request():
    model = models.PGD(2, dtype=jnp.float64)
    cfg = train.TrainConfig(steps=20, batch_size=16, dtype=jnp.float64)
    result = train.fit_sweep(model, IID(2), [3], [0], cfg)
    assert result.params["W"].dtype == jnp.float64


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"batch_size": -1}, "batch_size must be an integer >= 1"),
    ({"learning_rate": 0.0}, "learning_rate must be > 0"),
])
def test_config_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train.TrainConfig(**kwargs)


def test_sweep_bad_n():
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        train.fit_sweep(models.PGD(2), IID(2), [0, 3], [0], CFG)


@pytest.mark.parametrize("seeds, shards", [([0], 4), ([0, 1], 2), ([0, 1, 2, 3], 1)])
def test_sharded_sweep_equals_one_device_sweep(one_device_sweep, seeds, shards):
    """Over 4 (fake CPU) devices: one seed block has its batch split 4 ways, two blocks 2 ways each,
    four blocks one per device; all give the one-device numbers (of the one-device sweep of seeds 0-3: a
    point trains the same whatever else is in the sweep, test_point_is_trained_the_same_...)."""
    assert len(jax.devices()) == 4, "conftest sets --xla_force_host_platform_device_count=4"
    assert layout.batch_shards(len(seeds), 4, CFG.batch_size) == shards
    one = one_device_sweep
    four = train.fit_sweep(LA, LA_DESIGNS[:2], [2, 5, 7], seeds, CFG)
    assert_close(four.losses, one.losses[:, :, :len(seeds)], rtol=1e-5, atol=1e-6)
    for name in one.params:
        assert_close(four.params[name], one.params[name][:, :, :len(seeds)], rtol=1e-4, atol=1e-6, name=name)


def test_sharded_evaluation_equals_one_device_evaluation(la_sweep):
    """Evaluation splits the (design, n) pairs over the 4 fake devices: same risks as on one."""
    model, designs, params = LA, LA_DESIGNS, _params(la_sweep.params, seeds=slice(2))
    key = jax.random.PRNGKey(5)
    one = evaluate_sweep(model, params, designs, [2, 7], key, 3000, 1000, devices=jax.devices()[:1])
    four = evaluate_sweep(model, params, designs, [2, 7], key, 3000, 1000)  # 6 pairs padded to 8
    assert one[0].shape == four[0].shape == (3, 2, 2)
    assert_close(four[0], one[0], rtol=1e-6)
    assert_close(four[1], one[1], rtol=1e-6)


def test_one_evaluation_program_serves_every_prompt_count(la_sweep):
    """The prompt count is an argument of the evaluation program, not part of it: scoring the same sweep on
    3000 and on 7000 prompts (a validation and a test set) traces and compiles one program, and each count's
    risks equal those of the key's fixed draw blocks (``montecarlo``: block b from fold_in(key, b)) computed
    here one block at a time (to float32 rounding: one network alone against two vmapped). Planted bugs
    caught: the count back in the program's cache key (two programs), block b drawn from key b + 1 (other
    prompts)."""
    model, design = LA, IID(3, noise_var=0.3)
    params = _params(la_sweep.params, slice(1, 2), slice(1, 2), slice(2))  # two trained networks
    key = jax.random.PRNGKey(8)
    evaluation._compiled_evaluation.cache_clear()
    scores = {num: evaluate_sweep(model, params, design, [4], key, num, 1000, devices=jax.devices()[:1])
              for num in (3000, 7000)}
    assert evaluation._compiled_evaluation.cache_info().currsize == 1
    group = 1000 // montecarlo.DRAW_BLOCK  # draw blocks per round at batch_size 1000
    evaluation._compiled_evaluation(model, 4, group, False, tuple(jax.devices()[:1]), *_split_of(design), False, True)
    assert evaluation._compiled_evaluation.cache_info().currsize == 1  # the program both calls used
    def block_by_block(net, k, num):
        def body(carry, b):
            p = draw(design, jax.random.fold_in(k, b), montecarlo.DRAW_BLOCK, 4, 4, jnp.float32, False)
            err = ((p.y_query - model.apply(net, p)) ** 2).astype(jnp.float64)
            return carry + jnp.sum(err), None
        blocks = jnp.arange(num // montecarlo.DRAW_BLOCK)
        return jax.lax.scan(body, jnp.zeros((), jnp.float64), blocks)[0]

    with jax.enable_x64(True):
        by_blocks = jax.jit(block_by_block, static_argnums=2)  # one program per count, the network traced
        for num, (risk, _) in scores.items():
            for s in range(2):
                net = jax.tree_util.tree_map(lambda a: a[0, 0, s], params)
                assert_close(risk[0, 0, s], float(by_blocks(net, key, num)) / num, rtol=1e-6, name=f"{num} prompts")


def _split_of(design):
    """(treedef, shared) of a sweep of one design, as evaluate_sweep splits it."""
    split = layout.split_design(jax.tree_util.tree_map(lambda a: np.asarray(a)[None], design))
    return split.treedef, split.shared


def test_evaluation_of_one_pair_splits_its_seeds_over_devices(la_sweep):
    """One (design, n) pair with 5 seeds (a pruning grid's shape) is split into 4 seed groups on the 4
    fake devices, each drawing the pair's prompts: same risks as on one device, in seed order."""
    model, design, params = LA, IID(3, noise_var=0.3), _params(la_sweep.params, slice(1, 2), slice(1, 2))
    key = jax.random.PRNGKey(6)
    one = evaluate_sweep(model, params, design, [4], key, 3000, 1000, devices=jax.devices()[:1])
    four = evaluate_sweep(model, params, design, [4], key, 3000, 1000)
    assert one[0].shape == four[0].shape == (1, 1, 5)
    assert len(set(np.round(one[0].ravel(), 9))) == 5  # distinct models: a misplaced seed would show
    assert_close(four[0], one[0], rtol=1e-6)
    assert_close(four[1], one[1], rtol=1e-6)


def test_evaluation_with_a_key_per_seed_scores_each_seed_on_its_own_prompts(la_sweep):
    """A key per seed (``sweeps.stream_keys``): every point of seed s scores as that seed alone with key s,
    on 4 devices and on one (seeds 0 and 2 share a key, so they share one draw); typed keys give the same;
    the seeds' prompts are not the shared key's; a key array of another shape is refused, naming the shapes
    allowed; ``stream_keys`` is fold_in(PRNGKey(seed), stream) for any int64 seed and checks its input."""
    model, designs = LA, LA_DESIGNS[:2]
    params = _params(la_sweep.params, slice(2), seeds=slice(3))
    keys = sweeps.stream_keys([7, 8, 7], 2**32 - 5)
    for s in (7, 8, -3, 2**40):  # the suite runs with x64 on, so PRNGKey takes any int64 seed as training does
        want = jax.random.fold_in(jax.random.PRNGKey(s), 2**32 - 5)
        assert np.array_equal(sweeps.stream_keys([s], 2**32 - 5)[0], want)
    for bad, match in (([], "seeds must hold"), ([1.5], "seeds must be an integer"), ([True], "seeds must be")):
        with pytest.raises((TypeError, ValueError), match=match):
            sweeps.stream_keys(bad)
    with pytest.raises(ValueError, match=r"stream must be an integer in \[0, 4294967295\]"):
        sweeps.stream_keys([1], 2**32)
    four = evaluate_sweep(model, params, designs, [2, 7], keys, 3000, 500)
    one = evaluate_sweep(model, params, designs, [2, 7], keys, 3000, 500, devices=jax.devices()[:1])
    typed = evaluate_sweep(model, params, designs, [2, 7], jax.random.wrap_key_data(keys), 3000, 500)
    for s in range(3):
        alone = evaluate_sweep(model, _params(params, seeds=slice(s, s + 1)), designs,
                               [2, 7], keys[s], 3000, 500, devices=jax.devices()[:1])
        for got in (four, one, typed):
            assert_close(got[0][..., s], alone[0][..., 0], rtol=1e-6)
            assert_close(got[1][..., s], alone[1][..., 0], rtol=1e-6)
    shared = evaluate_sweep(model, params, designs, [2, 7], keys[0], 3000, 500)
    assert_close(shared[0][..., [0, 2]], four[0][..., [0, 2]], rtol=1e-6)
    assert np.all(np.abs(shared[0][..., 1] - four[0][..., 1]) > 1e-4)  # seed 1: other prompts
    for bad in (keys[:2], keys[:, :1], keys.astype(np.int32)):
        with pytest.raises(ValueError, match=r"key must .* one per seed: shape \(seeds, 2\) = \(3, 2\)"):
            evaluate_sweep(model, params, designs, [2, 7], bad, 3000, 500)
    with pytest.raises(ValueError, match=r"typed keys of shape \(3,\); got typed keys of shape \(2,\)"):
        evaluate_sweep(model, params, designs, [2, 7], jax.random.wrap_key_data(keys[:2]), 3000, 500)


def test_point_is_trained_the_same_whatever_else_is_in_the_sweep():
    """Seed blocks share draws and design settings equal across a sweep are passed once: neither
    changes what a point computes. (design, n = 6, seed 1) alone vs in sweeps where the noise, the
    covariance, n and the seeds vary, over 1 and 4 devices."""
    model, target = models.H3(3, 6), IID(3, noise_var=0.2)
    alone = train.fit_sweep(model, target, [6], [1], CFG, devices=jax.devices()[:1])
    others = [IID(3, noise_var=0.7), IID(3, np.diag([1.0, 2.0, 0.5]), noise_var=0.2)]
    for designs, devices in (([target, others[0]], jax.devices()), ([others[1], target], jax.devices()[:1])):
        sweep = train.fit_sweep(model, designs, [3, 6], [0, 1, 2], CFG, devices=devices)
        i = designs.index(target)
        assert_close(sweep.losses[i, 1, 1], alone.losses[0, 0, 0], rtol=1e-5, atol=1e-6)
        for name in alone.params:
            assert_close(sweep.params[name][i, 1, 1], alone.params[name][0, 0, 0], rtol=1e-4, atol=1e-6, name=name)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 16), st.integers(1, 64))
def test_batch_shards_use_the_spare_devices(blocks, devices, batch_size):
    """The shard count divides the devices and the batch, leaves a device group per block when the
    blocks are fewer than the devices, and no larger count would."""
    s = layout.batch_shards(blocks, devices, batch_size)
    assert devices % s == 0 and batch_size % s == 0
    assert s == 1 or s * blocks <= devices
    assert not any(devices % t == 0 and batch_size % t == 0 for t in range(s + 1, devices // blocks + 1))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=24), st.integers(1, 5))
def test_seed_blocks_partition_the_sweep(seeds, devices):
    """Every point is in a block, each block holds one seed, the block count is a multiple of the
    devices, and the busiest device does no more than with one block per seed or one per point."""
    seeds = np.array(seeds)
    blocks = layout.seed_blocks(seeds, devices)
    assert len(blocks) % devices == 0
    assert set(blocks.ravel()) == set(range(len(seeds)))
    assert all(len(set(seeds[row])) == 1 for row in blocks)

    def work(blocks, size):
        return -(-blocks // devices) * (size + 1)

    groups = np.unique(seeds, return_counts=True)[1]
    assert work(len(blocks), blocks.shape[1]) <= min(work(len(groups), groups.max()), work(len(seeds), 1))


def test_cache_trains_only_missing_points_and_force_retrains(tmp_path):
    model, design = models.PGD(3), IID(3, noise_var=0.3)
    store = cache.SweepCache(tmp_path, chunk=2)
    first = train.fit_sweep(model, design, [2, 4], [0, 1], CFG, cache=store)
    assert (store.hits, store.trained) == (0, 4)
    # more seeds: the 4 finished points are loaded, only the 2 new ones trained (a larger max n
    # would be new points: the context slots, and so the trained weights, change with it)
    second = train.fit_sweep(model, design, [2, 4], [0, 1, 2], CFG, cache=store)
    assert (store.hits, store.trained) == (4, 6)
    assert_close(second.params["W"][0, :, :2], first.params["W"][0], rtol=0, atol=0)
    plain = train.fit_sweep(model, design, [2, 4], [0, 1, 2], CFG)
    assert_close(second.losses, plain.losses, rtol=1e-6, atol=1e-7)
    forced = cache.SweepCache(tmp_path, force=True)
    train.fit_sweep(model, design, [2, 4], [0], CFG, cache=forced)
    assert (forced.hits, forced.trained) == (0, 2)
    # other settings (noise, steps) are other points
    other = cache.SweepCache(tmp_path)
    train.fit_sweep(model, IID(3, noise_var=0.31), [2, 4], [0], CFG, cache=other)  # forced's shapes: its program
    assert (other.hits, other.trained) == (0, 2)
    assert not list(tmp_path.rglob("*.tmp*"))


def test_a_second_process_waits_for_points_being_trained_and_loads_them(tmp_path):
    """Two experiments of one ``--jobs`` run that need the same networks: the second waits on the first's
    claim and loads its points instead of training them again (a thread stands in for the process: flock
    holds per open file, so two threads conflict as two processes do)."""
    import threading

    points, template = [0, 1, 2], {"w": jax.ShapeDtypeStruct((2,), np.float32)}
    started, calls = threading.Event(), {"A": 0, "B": 0}

    def runner(name, delay):
        def run(batch):
            calls[name] += 1
            started.set()
            time.sleep(delay)  # training: the claim is held meanwhile
            return {"w": np.array([[p, 10.0 * p] for p in batch], np.float32)}, np.ones((len(batch), 4), np.float32)
        return run

    stores, out = {"A": cache.SweepCache(tmp_path), "B": cache.SweepCache(tmp_path)}, {}

    def sweep(name, delay):
        out[name] = layout.load_or_run(stores[name], runner(name, delay), points, template, lambda p: ("claim", p))

    first = threading.Thread(target=sweep, args=("A", 0.3))
    first.start()
    assert started.wait(30)
    sweep("B", 0.0)  # arrives while A trains
    first.join()
    assert calls == {"A": 1, "B": 0}
    assert (stores["A"].trained, stores["B"].trained, stores["B"].hits, stores["B"].missing) == (3, 0, 3, 0)
    np.testing.assert_array_equal(out["B"][0]["w"], out["A"][0]["w"])
    # force still retrains, even after waiting
    forced = cache.SweepCache(tmp_path, force=True)
    layout.load_or_run(forced, runner("B", 0.0), points, template, lambda p: ("claim", p))
    assert (calls["B"], forced.trained) == (1, 3)


def test_claims_are_taken_chunk_by_chunk_and_fall_back_where_flock_is_missing(tmp_path, monkeypatch):
    """A sweep claims one chunk's points at a time (a large sweep never holds more than ``chunk`` open claim
    files); on a file system without flock the points are trained unclaimed, with a CacheWarning."""
    import errno
    import fcntl

    template = {"w": jax.ShapeDtypeStruct((2,), np.float32)}

    def run(batch):
        return {"w": np.array([[p, 1.0] for p in batch], np.float32)}, np.ones((len(batch), 2), np.float32)

    store, sizes = cache.SweepCache(tmp_path / "a", chunk=2), []
    claim = store.claim

    def recording(keys):
        sizes.append(len(keys))
        return claim(keys)

    store.claim = recording
    layout.load_or_run(store, run, list(range(5)), template, lambda p: ("chunks", p))
    assert sizes == [2, 2, 1] and store.trained == 5

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    bare = cache.SweepCache(tmp_path / "b")
    with pytest.warns(cache.CacheWarning, match="does not support flock"):
        out = layout.load_or_run(bare, run, [0, 1], template, lambda p: ("chunks", p))
    assert bare.trained == 2 and out[0]["w"][1, 0] == 1.0


def test_a_planted_claim_file_is_refused_not_written_through(tmp_path):
    store = cache.SweepCache(tmp_path / "c")
    key = store.key("claim", 0)
    target = tmp_path / "victim"
    target.write_text("keep")
    claim = store.path(key).with_suffix(".claim")
    claim.parent.mkdir(parents=True)
    claim.symlink_to(target)
    with pytest.raises(ValueError, match="not a claim file"):
        layout.load_or_run(store, lambda b: None, [0], {"w": jax.ShapeDtypeStruct((2,), np.float32)},
                           lambda p: ("claim", p))
    assert target.read_text() == "keep"


def test_interrupted_sweep_resumes_from_finished_chunks(tmp_path):
    model, design = models.PGD(3), IID(3, noise_var=0.3)

    def interrupt(trained, missing):  # after the first chunk is stored (the engine's code, in the key, untouched)
        if trained == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.fit_sweep(model, design, [2, 4, 6, 8], [0], CFG,
                        cache=cache.SweepCache(tmp_path, chunk=2, progress=interrupt))
    resumed = cache.SweepCache(tmp_path, chunk=2)
    result = train.fit_sweep(model, design, [2, 4, 6, 8], [0], CFG, cache=resumed)
    assert (resumed.hits, resumed.trained) == (2, 2)
    assert_close(result.losses, train.fit_sweep(model, design, [2, 4, 6, 8], [0], CFG).losses, rtol=1e-6, atol=1e-7)
    assert not list(tmp_path.rglob("*.tmp*"))


def test_fingerprint_is_stable_and_content_based():
    base = models.LinearAttention(3).init(jax.random.PRNGKey(0))
    lora = lambda: models.LoRA(models.LinearAttention(3), models.Frozen(dict(base)), 1, ("Wq",))  # noqa: E731
    assert cache.fingerprint(lora(), IID(3, noise_var=0.1), 4) == cache.fingerprint(lora(), IID(3, noise_var=0.1), 4)
    assert cache.fingerprint(IID(3, noise_var=0.1)) != cache.fingerprint(IID(3, noise_var=0.2))
    assert cache.fingerprint(CFG) != cache.fingerprint(train.TrainConfig(steps=151, batch_size=64))


def _largest_xor(jaxpr) -> int:
    """The most elements any xor of the program (threefry's rounds) works on, sub-programs included."""
    best = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "xor":
            best = max([best] + [int(np.prod(v.aval.shape)) for v in eqn.invars])
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    best = max(best, _largest_xor(inner))
    return best


def test_a_seed_block_draws_once_for_all_its_members():
    """The members of a seed block (other n, same key) share one draw per step: the training program's
    threefry works on as many words for a block of 4 members as for 1. A draw that came to depend on a
    member's value (say inside a loop whose counter vmap batches per member) would run 4 times as wide;
    that regression made alignment's full run 39 s instead of 17 s (docs/performance.md §6)."""
    one_point = loop.trainer(models.LinearAttention(3), train.TrainConfig(steps=3, batch_size=64), 12,
                                 train.squared_loss, True)

    def width(members):
        program = layout.blocked(lambda n, key: one_point(IID(3), n, key), (layout.MEMBER, layout.BLOCK),
                                 (jax.devices()[0],))
        ns = jnp.asarray(np.linspace(6, 12, members).astype(int)[None])
        return _largest_xor(jax.make_jaxpr(program.__wrapped__)(ns, rng.seed_keys([0])).jaxpr)

    assert width(1) > 0 and width(4) == width(1)


def test_programs_run_with_the_garbage_collector_paused_and_restore_it():
    """A compiled sweep program is called with Python's cyclic collector paused (no collection while it
    makes cyclic garbage), and the caller's setting is back after, on success, on error, and when the caller
    had it off; a fit leaves it as it found it."""
    events = []

    def churn(fail=False):
        before = len(events)
        for _ in range(50_000):
            a = []
            a.append(a)
        if fail:
            raise RuntimeError("inside")
        return gc.isenabled(), len(events) - before

    gc.callbacks.append(lambda phase, info: events.append(phase))
    try:
        assert churn()[1] > 0, "the churn makes the collector run when it is on"
        assert layout._gc_paused(churn)() == (False, 0) and gc.isenabled()
        with pytest.raises(RuntimeError, match="inside"):
            layout._gc_paused(churn)(True)
        assert gc.isenabled()
        gc.disable()
        layout._gc_paused(churn)()
        train.fit(models.LinearAttention(3), IID(3), 4, 5, 8, 1e-2, seed=0)
        assert not gc.isenabled()
    finally:
        gc.callbacks.pop()
        gc.enable()
    train.fit(models.LinearAttention(3), IID(3), 4, 5, 8, 1e-2, seed=0)
    assert gc.isenabled()


def test_persisted_compilations_refuse_a_bad_threshold(tmp_path):
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="min_compile_secs must be a finite number >= 0"):
            with cache.persist_compilations(tmp_path, min_compile_secs=bad):
                pass


def test_persisted_compilations_include_a_single_fit(tmp_path):
    """Under the default threshold a single fit's training program, which compiles in well under JAX's
    default 1 s, is stored: a cache that skipped it would make every rerun compile again."""
    folder = tmp_path / "xla"
    with cache.persist_compilations(folder):
        train.fit(models.LinearAttention(3), IID(3), 5, 23, 24, 1e-2, seed=0)  # a config no other test uses
    assert any("jit_" in p.name for p in folder.iterdir()), sorted(p.name for p in folder.iterdir())


@pytest.mark.slow  # two fresh interpreters that each import JAX and compile
def test_compiled_programs_persist_across_processes(tmp_path):
    """A second process that builds the same training program loads it from the persistent
    compilation cache (a hit, no new file) and trains to the same numbers; outside the block the
    process's settings are back as they were."""
    script = textwrap.dedent("""
        import sys, jax
        from iclsim import IID, cache, models, train
        hits = []
        jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event))
        with cache.persist_compilations(sys.argv[1], min_compile_secs=0):
            losses = train.fit(models.LinearAttention(3), IID(3), 5, 20, 32, 1e-2, seed=0).losses
        assert jax.config.jax_compilation_cache_dir is None
        print(hits.count("/jax/compilation_cache/cache_hits"), repr(float(losses.sum())))
    """)
    folder = tmp_path / "xla"

    def run():
        out = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        hits, loss = out.stdout.split()
        return int(hits), loss, sorted(p.name for p in folder.iterdir())

    (hits1, loss1, files1), (hits2, loss2, files2) = run(), run()
    assert hits1 == 0 and files1, "the first process stores its programs"
    assert hits2 >= 1 and files2 == files1, "the second loads them and compiles nothing new"
    assert loss2 == loss1


def _sgd(schedule):
    return optax.sgd(schedule)


def _clipped_adam(schedule):
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def test_a_function_optimizer_is_cached_by_its_source(tmp_path):
    """TrainConfig(optimizer=f) with a module-level f is cached under f's source: the same f loads, another
    f retrains. Planted bugs caught: an optimizer left out of the key (the clipped Adam would load SGD's
    numbers), or every custom optimizer bypassing the cache."""
    from iclsim.cache import SweepCache

    cache = SweepCache(tmp_path)
    fit = lambda opt: train.fit_sweep(models.PGD(2), IID(2), [3], [0],  # noqa: E731
                                      train.TrainConfig(steps=5, batch_size=8, optimizer=opt), cache=cache)
    first, again = fit(_sgd), fit(_sgd)
    assert cache.trained == 1 and cache.hits == 1
    np.testing.assert_array_equal(first.losses, again.losses)
    other = fit(_clipped_adam)
    assert cache.trained == 2 and not np.array_equal(other.losses, first.losses)


def test_evaluations_return_named_estimates():
    """evaluate and evaluate_sweep return an ``Estimate(mean, se)`` (named parts that still unpack as risk, se);
    the PGD model at W = 0 predicts 0, so its risk is E y^2 = tr(Sb) + s^2 = 3 + 0.5 within 4 SE."""
    design, model = IID(3, noise_var=0.5), models.PGD(3)
    params = jax.tree_util.tree_map(jnp.zeros_like, model.init(jax.random.PRNGKey(0)))
    one = evaluate(model, params, design, 4, jax.random.PRNGKey(1), 20_000)
    assert isinstance(one, montecarlo.Estimate) and (one.mean, one.se) == tuple(one)
    assert abs(one.mean - 3.5) < 4 * one.se
    stacked = jax.tree_util.tree_map(lambda a: a[None, None, None], params)
    sweep = evaluate_sweep(model, stacked, design, [4], jax.random.PRNGKey(1), 20_000)
    assert isinstance(sweep, montecarlo.Estimate) and sweep.mean.shape == sweep.se.shape == (1, 1, 1)
    assert sweep.mean[0, 0, 0] == one.mean
