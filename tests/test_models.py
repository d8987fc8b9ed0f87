"""Models reduce to (weighted) PGD exactly with hand-built parameters; masks are right for every n."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclsim import Drift, IID, bridge, models, theory, truncate_context
from iclsim.designs import GramPrompts
from iclsim.theory import mean_and_se, risk_moments
from tests.tolerance import assert_close, assert_within_se

F64 = jnp.float64
D, N = 3, 6

# design.sample as compiled programs, the design a (pytree) argument: designs of one family and field shapes
# share a program (run eagerly, every op of the sampler compiles a program of its own for each shape)
_sample = jax.jit(lambda design, key, batch: design.sample(key, batch, N, F64), static_argnums=2)


@pytest.fixture
def prompts(key):
    return _sample(IID(D, np.diag([1.0, 2.0, 0.5]), noise_var=0.3), key, 64)


def test_linear_attention_is_pgd_with_hand_built_weights(prompts):
    rng = np.random.default_rng(0)
    A = rng.normal(size=(D, D))
    model = models.LinearAttention(D, dtype=F64)
    Wq = np.zeros((D + 1, D + 1))
    Wq[:D, :D] = A
    Wv = np.zeros((D + 1, D + 1))
    Wv[D, D] = 2.5
    params = {"Wq": jnp.asarray(Wq), "Wk": jnp.eye(D + 1, dtype=F64), "Wv": jnp.asarray(Wv)}
    W, omega = model.effective_pgd(params, N)
    assert omega is None  # uniform weights
    assert_close(W, 2.5 * A / N, rtol=1e-14)
    assert_close(model.apply(params, prompts), theory.pgd_predict(W)(prompts), rtol=1e-11, atol=1e-12)


def test_linear_attention_rank_and_label_key_path(prompts, key):
    """Keys carrying the label (q12 != 0, p_x != 0) add q12 p_x^T to W; no x-x or y-y terms here."""
    model = models.LinearAttention(D, dtype=F64)
    rng = np.random.default_rng(1)
    q12, p_x = rng.normal(size=D), rng.normal(size=D)
    Q = np.zeros((D + 1, D + 1))
    Q[:D, D] = q12
    Wv = np.zeros((D + 1, D + 1))
    Wv[:D, D] = p_x
    params = {"Wq": jnp.asarray(Q), "Wk": jnp.eye(D + 1, dtype=F64), "Wv": jnp.asarray(Wv)}
    assert_close(model.apply(params, prompts), theory.pgd_predict(model.effective_pgd(params, N).W)(prompts),
                 rtol=1e-11, atol=1e-12)
    low = models.LinearAttention(D, rank=2, dtype=F64)
    W = low.effective_pgd(low.init(key), N).W
    assert np.linalg.matrix_rank(np.asarray(W), tol=1e-10) <= 2


@pytest.mark.parametrize("filter_kind", ["free", "ssm"])
def test_h3_is_wpgd_with_hand_built_weights(filter_kind, key):
    prompts = _sample(Drift.ar1(D, N, 0.8, 0.2), key, 64)
    model = models.H3(D, N, channels=4, filter=filter_kind, dtype=F64)
    rng = np.random.default_rng(2)
    params = model.init(key)
    Wq = np.zeros((D + 1, 4))
    Wq[:D] = rng.normal(size=(D, 4))
    Wk = np.zeros((D + 1, 4))
    Wk[:D] = rng.normal(size=(D, 4))
    Wv = np.zeros((D + 1, 4))
    Wv[D] = 1.0  # v_i = y_i in every channel
    shift = np.zeros((4, model.shift_size))
    shift[:, 0] = 1.0
    params.update(Wq=jnp.asarray(Wq), Wk=jnp.asarray(Wk), Wv=jnp.asarray(Wv), shift=jnp.asarray(shift),
                  w_o=jnp.asarray(rng.normal(size=4)))
    if filter_kind == "free":
        params["f"] = jnp.asarray(rng.uniform(0.1, 2.0, size=N + 1))
    W, omega = model.effective_pgd(params, N)
    assert_close(model.apply(params, prompts), theory.pgd_predict(W, omega)(prompts), rtol=1e-10, atol=1e-12)
    expected_W = Wq[:D] @ np.diag(params["w_o"]) @ Wk[:D].T / N
    f = np.asarray(model.kernel(params))
    raw = f[1:][::-1]
    assert_close(W, expected_W * np.mean(np.abs(raw)), rtol=1e-12)
    if filter_kind == "ssm":
        a = 1 / (1 + np.exp(-np.asarray(params["decay_logit"])))
        assert_close(f, [np.sum(np.asarray(params["c"]) * a**j) for j in range(N + 1)], rtol=1e-12)


def test_h3_shift_ssm_couples_previous_key(key):
    """A pure lag-1 shift makes the value at i meet the key of i-1."""
    prompts = _sample(IID(D), key, 16)
    model = models.H3(D, N, channels=1, dtype=F64)
    params = {"Wq": jnp.zeros((D + 1, 1), F64).at[0, 0].set(1.0), "Wk": jnp.zeros((D + 1, 1), F64).at[1, 0].set(1.0),
              "Wv": jnp.zeros((D + 1, 1), F64).at[D, 0].set(1.0), "w_o": jnp.ones(1, F64),
              "shift": jnp.asarray([[0.0, 1.0]], F64), "f": jnp.ones(N + 1, F64)}
    expected = prompts.x[:, 0] * jnp.sum(prompts.X[:, :-1, 1] * prompts.y[:, 1:], axis=1) / N
    assert_close(model.apply(params, prompts), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", [lambda: models.LinearAttention(D, dtype=F64), lambda: models.PGD(D, dtype=F64),
                                  lambda: models.PGD(D, rank=2, dtype=F64)])
@pytest.mark.parametrize("n", [1, 3, N])
def test_padding_is_inert(make, n, key):
    """A prompt truncated to its last n pairs and padded to N gives the n-pair answer times n / N."""
    model = make()
    params = model.init(key)
    p = _sample(IID(D, noise_var=0.2), key, 32)
    short = p._replace(X=p.X[:, N - n:], y=p.y[:, N - n:])
    assert_close(model.apply(params, truncate_context(p, n)) * N / n, model.apply(params, short), rtol=1e-10,
                 atol=1e-12)


def test_baselines(key):
    p = _sample(IID(D, noise_var=0.5), key, 32)
    ols = models.OLS(D, F64)
    beta_hat = np.stack([np.linalg.lstsq(np.asarray(X), np.asarray(y), rcond=None)[0] for X, y in zip(p.X, p.y)])
    assert_close(ols.apply({}, p), np.sum(np.asarray(p.x) * beta_hat, -1), rtol=1e-8)
    ridge = models.Ridge(D, 0.5, F64)
    beta_r = np.stack([np.linalg.solve(X.T @ X + 0.5 * np.eye(D), X.T @ y) for X, y in zip(np.asarray(p.X), np.asarray(p.y))])
    assert_close(ridge.apply({}, p), np.sum(np.asarray(p.x) * beta_r, -1), rtol=1e-8)
    gd = models.GD(D, steps=1, dtype=F64)
    eta = 0.05
    assert_close(gd.apply({"eta": jnp.asarray(eta, F64)}, p), theory.pgd_predict(eta * np.eye(D))(p), rtol=1e-12)


@pytest.mark.parametrize("make, message", [
    (lambda: models.LinearAttention(3, rank=5), r"rank must be an integer in \[1, 4\]"),
    (lambda: models.PGD(3, rank=4), r"rank must be an integer in \[1, 3\]"),
    (lambda: models.H3(3, 5, filter="fft"), "filter must be 'free' or 'ssm'"),
    (lambda: models.H3(3, 0), "context must be an integer >= 1"),
    (lambda: models.Ridge(3, -1.0), "penalty must be >= 0"),
])
def test_model_bad_input(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_h3_context_mismatch(key):
    """The check is on shapes, so it is made while tracing (jax.eval_shape: nothing compiled or run)."""
    model = models.H3(D, 5)
    with pytest.raises(ValueError, match="context length 5"):
        jax.eval_shape(lambda: model.apply(model.init(key), IID(D).sample(key, 4, 6)))


def test_lora_starts_at_base_and_moves_by_low_rank(key):
    base = models.LinearAttention(D, dtype=F64)
    params = base.init(key)
    lora = models.LoRA(base, models.Frozen(params), 1, ("Wq", "Wk"), dtype=F64)
    adapters = lora.init(key)
    p = _sample(IID(D), key, 16)
    np.testing.assert_array_equal(lora.apply(adapters, p), base.apply(params, p))
    moved = jax.tree_util.tree_map(lambda a: a + 0.3, adapters)
    delta = lora.effective_pgd(moved, N).W - base.effective_pgd(params, N).W
    assert np.linalg.matrix_rank(np.asarray(delta), tol=1e-10) <= 2
    with pytest.raises(ValueError, match="targets must name matrices"):
        models.LoRA(base, models.Frozen(params), 1, ("W",))
    with pytest.raises(ValueError, match="rank must be <= 4 for Wq"):
        models.LoRA(base, models.Frozen(params), 5, ("Wq",))


@pytest.mark.parametrize("make", [lambda: models.LinearAttention(D, dtype=F64),
                                  lambda: models.LinearAttention(D, rank=2, dtype=F64),
                                  lambda: models.PGD(D, dtype=F64), lambda: models.PGD(D, rank=2, dtype=F64)])
def test_token_path_equals_gram_path(make, prompts, key):
    """Models that read only S compute from tokens without forming S (O(n d) per prompt); the same
    prediction as from S = Z^T Z / n, also through LoRA."""
    model = make()
    params = jax.tree_util.tree_map(lambda a: a + 0.1, model.init(key))  # off the PGD subspace too
    gram = GramPrompts.from_matrix(models.context_gram(prompts), prompts.x, prompts.y_query)
    assert_close(model.apply(params, prompts), model.apply(params, gram),
                 rtol=1e-12, atol=1e-13)
    lora = models.LoRA(model, models.Frozen(params), 1, tuple(k for k in params if params[k].ndim == 2)[:1], dtype=F64)
    adapters = jax.tree_util.tree_map(lambda a: a + 0.2, lora.init(key))
    assert_close(lora.apply(adapters, prompts), lora.apply(adapters, gram), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("lora", [False, True])
def test_exact_risk_of_a_trained_attention_matches_monte_carlo(lora, key):
    """bridge.exact_risk of attention with every block non-zero, on prompts of n = 5 active pairs in
    8 slots (S sums the active pairs over 8), alone and as LoRA's merged base, against its Monte
    Carlo risk (4 SE); PGD's L(W) of the same model's effective W misses the non-PGD terms."""
    d, n, n_max = 3, 5, 8
    rng = np.random.default_rng(11)
    attention = models.LinearAttention(d, dtype=F64)
    params = {name: jnp.asarray(np.eye(d + 1) + rng.normal(size=(d + 1, d + 1)) / (d + 1)) for name in ("Wq", "Wk", "Wv")}
    params["Wk"] = params["Wk"].at[d].set(0.2)  # the query reads the labels and the values carry x
    params["Wv"] = params["Wv"].at[:d, d].set(0.2)
    model = attention
    if lora:
        model = models.LoRA(attention, models.Frozen(params), 1, ("Wq", "Wk"), dtype=F64)
        params = {t: {"A": jnp.asarray(rng.normal(size=(d + 1, 1))), "B": jnp.asarray(rng.normal(size=(d + 1, 1)) / 3)}
                  for t in ("Wq", "Wk")}
    design = IID(d, cov_x=np.diag([1.0, 0.5, 2.0]), noise_var=0.4)
    chunks, batch = 10, 10_000
    total, total_sq = risk_moments(lambda p: model.apply(params, p), design, n_max, n, key, chunks, batch, F64)
    mean, se = mean_and_se(total, total_sq, chunks * batch)
    exact = bridge.exact_risk(model, params, design, n, n_max)
    assert_within_se(exact, mean, se, name=f"exact_risk attention{' LoRA' if lora else ''}")
    W, _ = bridge.effective(model, params, n, n_max)
    assert abs(float(theory.pgd_risk(design, n, W)) - float(mean)) > 6 * float(se)
