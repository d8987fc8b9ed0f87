"""Training records (``TrainConfig.record_every`` / ``record_steps``, ``iclsim.records``) and plain gradient
descent (``optimizer="sgd"``): the recorded loss is the loss of the parameters of that step on each point's
fixed evaluation set, whatever the layout."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iclsim import IID, cache, models, protocols, records, rng, train
from iclsim.gram import draw
from tests.tolerance import assert_close

MODEL = models.LinearAttention(3)
CFG = train.TrainConfig(steps=40, batch_size=64, learning_rate=0.02, warmup_steps=5, record_every=10,
                        record_prompts=600)


# The hand-written references below run as compiled programs: eager, each of their operations compiles on its own.
_draw = jax.jit(draw, static_argnums=(2, 3, 4, 5, 6))  # (design, key, batch, n, n_slots, dtype, gram)
_loss = jax.jit(train.squared_loss, static_argnums=0)  # (model, params, prompts)
_init = jax.jit(MODEL.init)


def _evaluation_loss(model, params, design, n, n_slots, seed, config):
    """The loss of ``params`` on the point's evaluation set, drawn here from the named stream by hand."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), np.uint32(2**32 - 8))
    gram = train.uses_gram(model, design, n_slots, config.sampler)
    prompts = _draw(design, key, config.recorded_prompts(), n, n_slots, config.dtype, gram)
    return float(_loss(model, params, prompts))


def test_recorded_loss_is_the_evaluation_set_loss_of_that_steps_parameters():
    """Step 0 is the initialisation (split(PRNGKey(seed))[0]) and the last step the final parameters, each
    scored on the evaluation set of fold_in(PRNGKey(seed), Stream.RECORD) drawn independently. Planted bugs
    caught: a record taken after the step's update (step 0 would differ), the batch loss recorded (it is
    another sample), an evaluation set drawn from another key or at another n."""
    design, n, seed = IID(3, noise_var=0.3), 5, 2
    fitted = train.fit(MODEL, design, n, CFG.steps, CFG.batch_size, CFG.learning_rate, seed, warmup_steps=5,
                       record_every=10, record_prompts=600)
    np.testing.assert_array_equal(fitted.record.steps, [0, 10, 20, 30, 40])
    assert fitted.record.loss.shape == (5,) and fitted.record.summaries is None
    init = _init(jax.random.split(jax.random.PRNGKey(seed), CFG.steps + 1)[0])
    assert_close(fitted.record.loss[0], _evaluation_loss(MODEL, init, design, n, n, seed, CFG), rtol=1e-6)
    assert_close(fitted.record.loss[-1], _evaluation_loss(MODEL, fitted.params, design, n, n, seed, CFG), rtol=1e-6)
    assert rng.Stream.RECORD == 2**32 - 8
    # explicit steps, the last not the end: recorded inside the loop
    steps = train.fit(MODEL, design, n, CFG.steps, CFG.batch_size, CFG.learning_rate, seed, warmup_steps=5,
                      record_steps=(0, 3, 39), record_prompts=600)
    np.testing.assert_array_equal(steps.record.steps, [0, 3, 39])
    assert_close(steps.record.loss[0], fitted.record.loss[0], rtol=0, atol=0)
    assert_close(fitted.losses, steps.losses, rtol=0, atol=0)  # recording leaves training alone


def test_the_default_evaluation_set_is_one_batch_of_prompts():
    """record_prompts=None (the default) scores each record on batch_size prompts of the evaluation stream,
    the record an explicit record_prompts=batch_size gives, and follows batch_size when it is replaced.
    Planted bugs caught: a fixed default size (another set: another loss), the size read once at
    construction (the replaced config would keep the old one)."""
    design, n, seed = IID(3, noise_var=0.3), 5, 2
    config = train.TrainConfig(steps=20, batch_size=64, learning_rate=0.02, warmup_steps=5, record_every=10)
    assert config.record_prompts is None and config.recorded_prompts() == 64
    assert dataclasses.replace(config, batch_size=48).recorded_prompts() == 48
    default = train.fit_sweep(MODEL, design, [n], [seed], config)
    explicit = train.fit_sweep(MODEL, design, [n], [seed], dataclasses.replace(config, record_prompts=64))
    np.testing.assert_array_equal(default.record.loss, explicit.record.loss)
    init = _init(jax.random.split(jax.random.PRNGKey(seed), config.steps + 1)[0])
    other = _evaluation_loss(MODEL, init, design, n, n, seed, dataclasses.replace(config, record_prompts=2048))
    assert abs(other - default.record.loss[0, 0, 0, 0]) > 1e-3 * other  # another set size, another loss


def _flat_record(opt, rtol):
    """Every recorded loss and spectrum equals the first, while the batch loss is not flat."""
    config = train.TrainConfig(steps=30, batch_size=64, learning_rate=1e-9, optimizer=opt, record_every=10,
                               record_prompts=600, summarize=records.preconditioner_spectrum(MODEL, 6))
    fitted = train.fit_sweep(MODEL, [IID(3, noise_var=0.1), IID(3, noise_var=0.5)], [6], [0, 1], config)
    loss, spectrum = fitted.record.loss, fitted.record.summaries
    assert loss.shape == (2, 1, 2, 4) and spectrum.shape == (2, 1, 2, 4, 3)
    assert_close(loss, np.broadcast_to(loss[..., :1], loss.shape), rtol=rtol)
    assert_close(spectrum, np.broadcast_to(spectrum[..., :1, :], spectrum.shape), rtol=rtol, atol=1e-7)
    assert np.ptp(fitted.losses[0, 0, 0]) > 10 * rtol * fitted.losses[0, 0, 0, 0]  # the batch loss is not flat


def test_with_no_updates_the_record_is_flat():
    """optax.set_to_zero() (a zero learning rate): every recorded loss and spectrum equals the first. Planted bug
    caught: the noisy batch loss recorded (it varies step to step). The slow tier repeats it with sgd at a tiny
    learning rate."""
    _flat_record(optax.set_to_zero(), 1e-6)


@pytest.mark.slow
def test_with_tiny_sgd_updates_the_record_is_flat():
    """As test_with_no_updates_the_record_is_flat, with optimizer="sgd" at learning rate 1e-9."""
    _flat_record("sgd", 1e-5)


def test_records_do_not_depend_on_the_layout():
    """(design, n = 6, seed 1) fitted alone on one device and inside a sweep of other designs, ns and seeds over
    four devices: the same record (to float32 rounding of the training itself, as its parameters)."""
    config = dataclasses.replace(CFG, summarize=records.preconditioner_spectrum(MODEL, 6))
    target = IID(3, noise_var=0.2)
    alone = train.fit_sweep(MODEL, target, [6], [1], config, devices=jax.devices()[:1])
    sweep = train.fit_sweep(MODEL, [IID(3, noise_var=0.7), target], [3, 6], [0, 1, 2], config)
    assert_close(sweep.record.loss[1, 1, 1], alone.record.loss[0, 0, 0], rtol=1e-5)
    assert_close(sweep.record.summaries[1, 1, 1], alone.record.summaries[0, 0, 0], rtol=1e-4, atol=1e-6)
    assert not np.allclose(sweep.record.loss[1, 1, 0], sweep.record.loss[1, 1, 1])  # seeds differ


def test_sgd_is_plain_gradient_descent_at_a_constant_learning_rate():
    """optimizer="sgd": theta_{t+1} = theta_t - lr grad L_t(theta_t), lr constant (no warmup, no decay),
    against a hand-written loop on the engine's prompts. Planted bugs caught: the warmup-cosine schedule
    (its first step is 0), Adam."""
    design, n, seed, lr = IID(3, noise_var=0.2), 6, 3, 0.05
    fitted = train.fit(MODEL, design, n, 5, 64, lr, seed, optimizer="sgd")
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    gram = train.uses_gram(MODEL, design, n)
    params, losses = _gd_on(MODEL, _init(keys[0]), [_draw(design, k, 64, n, n, jnp.float32, gram) for k in keys[1:]],
                            lr)
    assert_close(fitted.losses, losses, rtol=1e-5)
    for name in params:
        assert_close(fitted.params[name], params[name], rtol=1e-4, atol=1e-6, name=name)


def test_summaries_read_the_models_preconditioners():
    """preconditioner_spectrum: the eigenvalues of the symmetric part of n W (protocols.effective, float64);
    layer_step_sizes: the step sizes a GD-form network was built with."""
    params = _init(jax.random.PRNGKey(4))
    W = np.asarray(protocols.effective(MODEL, params, 7).W) * 7
    assert_close(records.preconditioner_spectrum(MODEL, 7)(params), np.linalg.eigvalsh((W + W.T) / 2), rtol=1e-4,
                 atol=1e-6)
    gd = models.LinearTransformer(3, 3)
    assert_close(records.layer_step_sizes(gd)(gd.steps_params([0.5, -0.2, 1.5])), [0.5, -0.2, 1.5], rtol=1e-6)
    with pytest.raises(TypeError, match="layer_step_sizes needs a LinearTransformer with form='gd'"):
        records.layer_step_sizes(MODEL)
    with pytest.raises(TypeError, match="preconditioner_spectrum needs a model with effective_pgd"):
        records.preconditioner_spectrum(models.Ridge(3), 4)
    with pytest.raises(ValueError, match="n must be a positive int"):
        records.preconditioner_spectrum(MODEL, 0)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"record_every": 5, "record_steps": (1,)}, ValueError, "at most one of record_every and record_steps"),
    ({"record_every": 0}, ValueError, "record_every"),
    ({"record_every": 41}, ValueError, "record_every"),
    ({"record_steps": (3, 3)}, ValueError, "strictly increasing"),
    ({"record_steps": ()}, ValueError, "non-empty"),
    ({"record_steps": (0, 41)}, ValueError, r"record_steps\[\]"),
    ({"record_steps": 5}, TypeError, "record_steps must be a sequence"),
    ({"record_prompts": 0}, ValueError, "record_prompts"),
    ({"summarize": lambda p: p}, ValueError, "summarize needs record_every or record_steps"),
    ({"summarize": 3, "record_every": 5}, TypeError, "summarize must be None or a function"),
    ({"optimizer": "sgdd"}, ValueError, r"optimizer must be None, one of \('sgd',\)"),
])
def test_record_settings_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        train.TrainConfig(steps=40, **kwargs)


def _spectrum(params):
    return jnp.linalg.eigvalsh(params["Wq"] @ params["Wq"].T)


def _norms(params):
    return jnp.sqrt(jnp.sum(params["Wq"] ** 2))


def test_every_record_setting_is_in_the_cache_key(tmp_path):
    """Two configs differing only in one of the new fields never share a cache entry (fingerprints differ),
    and a recording sweep stores and reloads its record. Planted bug caught: a field left out of the key
    (a record of other steps, or no record, would load)."""
    base = train.TrainConfig(steps=20, batch_size=16)
    variants = [dict(record_every=5), dict(record_steps=(0, 20)), dict(record_every=5, record_prompts=100),
                dict(record_every=5, summarize=_spectrum), dict(record_every=5, summarize=_norms),
                dict(optimizer="sgd"), dict(pretraining_prompts=16), dict(pretraining_prompts=32)]
    keys = [cache.fingerprint(base)] + [cache.fingerprint(train.TrainConfig(steps=20, batch_size=16, **v))
                                        for v in variants]
    assert len(set(keys)) == len(keys)
    store = cache.SweepCache(tmp_path)
    config = train.TrainConfig(steps=20, batch_size=16, record_every=10, record_prompts=100, summarize=_spectrum)
    first = train.fit_sweep(MODEL, IID(3), [4], [0, 1], config, cache=store)
    again = train.fit_sweep(MODEL, IID(3), [4], [0, 1], config, cache=store)
    assert (store.trained, store.hits) == (2, 2)
    np.testing.assert_array_equal(again.record.loss, first.record.loss)
    np.testing.assert_array_equal(again.record.summaries, first.record.summaries)
    np.testing.assert_array_equal(again.record.steps, [0, 10, 20])
    plain = train.fit_sweep(MODEL, IID(3), [4], [0, 1], train.TrainConfig(steps=20, batch_size=16), cache=store)
    assert store.trained == 4 and plain.record is None
    np.testing.assert_array_equal(plain.losses, first.losses)


# ---- finite pretraining (TrainConfig.pretraining_prompts) ----

def _stored_set(design, seed, P, n, model=MODEL):
    """The point's stored pretraining set, drawn here by hand from fold_in(PRNGKey(seed), 2**32 - 9)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), np.uint32(2**32 - 9))
    return _draw(design, key, P, n, n, jnp.float32, train.uses_gram(model, design, n))


@functools.partial(jax.jit, static_argnums=0)
def _gd_step(model, params, batch):
    return jax.value_and_grad(lambda p: train.squared_loss(model, p, batch))(params)


@jax.jit
def _minus(params, grads, lr):
    return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)


def _gd_on(model, params, batches, lr):
    """Plain gradient descent on the given batches, one step each: (params, losses)."""
    losses = []
    for batch in batches:
        loss, grads = _gd_step(model, params, batch)
        params = _minus(params, grads, lr)
        losses.append(float(loss))
    return params, np.array(losses)


def test_full_batch_sgd_on_a_stored_set_is_plain_gradient_descent_on_it():
    """pretraining_prompts = batch_size with sgd: every step is the gradient of the loss on the same P prompts
    (drawn once from the PRETRAINING stream), so the losses and parameters are those of full-batch GD on that
    set computed here. Planted bugs caught: a fresh batch per step, the set drawn from the training key, a
    permutation that drops or repeats prompts."""
    design, n, seed, P, lr, steps = IID(3, noise_var=0.2), 6, 5, 128, 0.1, 12
    fitted = train.fit(MODEL, design, n, steps, P, lr, seed, optimizer="sgd", pretraining_prompts=P)
    init = _init(jax.random.split(jax.random.PRNGKey(seed), steps + 1)[0])
    params, losses = _gd_on(MODEL, init, [_stored_set(design, seed, P, n)] * steps, lr)
    assert_close(fitted.losses, losses, rtol=1e-5)
    for name in params:
        assert_close(fitted.params[name], params[name], rtol=1e-4, atol=1e-6, name=name)
    assert rng.Stream.PRETRAINING == 2**32 - 9


def test_minibatches_are_epochs_of_permutations_of_the_stored_set():
    """P = 3 batches of 32 plus 10 spare prompts: epoch e is permutation(key of its first step, P) cut into three
    batches (the last 10 unused), the set the same at every epoch. Checked against that recipe by hand, and
    for the same point on one device and with its batch split over four."""
    design, n, seed, P, B, lr, steps = IID(3, noise_var=0.2), 6, 1, 106, 32, 0.1, 7
    config = train.TrainConfig(steps=steps, batch_size=B, learning_rate=lr, optimizer="sgd", pretraining_prompts=P)
    one = train.fit_sweep(MODEL, design, [n], [seed], config, devices=jax.devices()[:1])
    split = train.fit_sweep(MODEL, design, [n], [seed], config)  # a single point: the batch split over 4 devices
    data = _stored_set(design, seed, P, n)
    keys = jax.random.split(jax.random.PRNGKey(seed), steps + 1)
    batches = []
    for t in range(steps):
        if t % 3 == 0:
            order = jax.random.permutation(keys[1 + t], P)
        rows = np.asarray(order)[(t % 3) * B:(t % 3 + 1) * B]
        batches.append(jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)[rows]), data))  # numpy: exact
    params, losses = _gd_on(MODEL, _init(keys[0]), batches, lr)
    for fitted in (one, split):
        assert_close(fitted.losses[0, 0, 0], losses, rtol=1e-5)
        assert_close(fitted.params["Wq"][0, 0, 0], params["Wq"], rtol=1e-4, atol=1e-6)


def test_no_stored_set_keeps_fresh_prompts():
    """pretraining_prompts=None (the default) draws fresh prompts every step: its losses differ from a stored
    set's of the same size, and equal those of a config that never mentions the field."""
    design = IID(3, noise_var=0.2)
    fresh = train.fit(MODEL, design, 6, 10, 64, seed=2, optimizer="sgd", learning_rate=0.05)
    default = train.fit(MODEL, design, 6, 10, 64, seed=2, optimizer="sgd", learning_rate=0.05,
                        pretraining_prompts=None)
    stored = train.fit(MODEL, design, 6, 10, 64, seed=2, optimizer="sgd", learning_rate=0.05, pretraining_prompts=64)
    np.testing.assert_array_equal(fresh.losses, default.losses)
    assert not np.allclose(fresh.losses[1:], stored.losses[1:])


def test_stored_set_bad_input():
    with pytest.raises(ValueError, match=r"batch_size must be <= pretraining_prompts = 32"):
        train.TrainConfig(batch_size=64, pretraining_prompts=32)
    with pytest.raises(ValueError, match="pretraining_prompts"):
        train.TrainConfig(batch_size=64, pretraining_prompts=0)
    with pytest.raises(TypeError, match="pretraining_prompts"):
        train.TrainConfig(batch_size=64, pretraining_prompts=64.0)
