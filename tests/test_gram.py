"""The Gram sampler (gram.sample_gram) draws the context Gram matrix exactly in distribution:
its pieces against known laws, and the whole against per-token prompts (moments and
Kolmogorov-Smirnov), and training on it reaches the same risk."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.extend.random import threefry2x32_p

from iclsim import IID, RAG, Drift, TaskFeatureAlignment, TaskPool, evaluate, gram, models, rng, theory, train
from iclsim.models import context_gram
from tests.strategies import spd
from tests.tolerance import (SAMPLER_AGREEMENT, SAMPLER_GAP, assert_distribution, assert_same_distribution,
                             assert_within_se, relative_gap, report)

NUM = 20_000

# the gamma CDF P(a, x) as one compiled program for every shape parameter a (run eagerly, each of its ops
# compiles a program of its own)
_gamma_cdf = jax.jit(jax.scipy.special.gammainc)
_standard_gamma = jax.jit(gram.standard_gamma)  # likewise, one program for every shape parameter


@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=4))
def test_threefry_equals_jax_threefry_primitive(words):
    """rng._threefry2x32 (written out with constant rotations) is jax's threefry2x32 bit for bit."""
    k0, k1, hi0, lo0 = (np.uint32(w) for w in words)
    hi = hi0 + np.arange(1000, dtype=np.uint32) * np.uint32(7919)
    lo = lo0 ^ np.arange(1000, dtype=np.uint32)
    want = threefry2x32_p.bind(jnp.uint32(k0), jnp.uint32(k1), jnp.asarray(hi), jnp.asarray(lo))
    got = jax.jit(rng._threefry2x32)(jnp.uint32(k0), jnp.uint32(k1), jnp.asarray(hi), jnp.asarray(lo))
    for g, w in zip(got, want):
        assert np.array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_one_flat_draw_gives_jax_normals_uniforms_and_fresh_keys(dtype, key):
    """draw_many's normals are bit for bit jax.random.normal's of the same flat size (so token prompts
    are drawn as before); its uniforms lie in (0, 1) with mean 1/2; its keys are new and distinct."""
    (a, b), (u,), keys = rng.draw_many(key, dtype, [(50, 7), (3,)], [(NUM,)], keys=2)
    key_words = 4 if dtype == jnp.float32 else 2  # two keys: four uint32 words or two uint64 words
    count = 50 * 7 + 3  # the normals lead the one draw
    flat = jax.random.normal(key, (count + NUM + key_words,), dtype)[:count]
    assert np.array_equal(np.concatenate([np.ravel(a), b]), np.asarray(flat))
    u = np.asarray(u, np.float64)
    assert u.min() > 0 and u.max() < 1
    assert_within_se(0.5, u.mean(), np.sqrt(1 / 12 / NUM), "uniform mean")
    words = {tuple(np.asarray(k).tolist()) for k in (key, *keys)}
    assert len(words) == 3


def test_batch_shard_draws_the_rows_of_the_full_draw(key):
    """With a rng.BatchShard on the 4 fake devices, each shard's draw of 2 rows is its rows of the
    same draw of 8 rows, every piece, and its fresh keys are the full draw's: so a batch split over
    devices trains on exactly the unsplit prompts."""
    normal_shapes, uniform_shapes = [(8, 3), (8,), (8, 2, 2)], [(8, 5)]
    full = rng.draw_many(key, jnp.float32, normal_shapes, uniform_shapes, keys=2)

    def shard(key):
        z, u, k = rng.draw_many(key, jnp.float32, [(2,) + s[1:] for s in normal_shapes],
                                [(2,) + s[1:] for s in uniform_shapes], keys=2, shard=rng.BatchShard("rows", 4))
        return z, u, jnp.stack(k)[None]

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("rows",))
    rows = jax.sharding.PartitionSpec("rows")
    z, u, k = jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=jax.sharding.PartitionSpec(), out_specs=rows,
                                    check_vma=False))(key)
    for got, want in zip([*z, *u], [*full[0], *full[1]]):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert all(np.array_equal(np.asarray(k)[i], np.stack(full[2])) for i in range(4))


def test_task_pool_draws_its_tasks_uniformly():
    """TaskPool picks task floor(u K) for a uniform u: each of K = 7 tasks with frequency 1/7 (4 SE), in
    token prompts (beta solved from 4 noiseless pairs) and in the context law (beta in its factor)."""
    d, K, num = 3, 7, 70_000
    design = TaskPool(d, K)
    # each draw as one compiled program (run eagerly, every op compiles one program of its own)
    p = jax.jit(design.sample, static_argnums=(1, 2, 3))(jax.random.PRNGKey(1), num, 4, jnp.float64)
    X, y = np.asarray(p.X), np.asarray(p.y)
    from_tokens = np.linalg.solve(np.einsum("bni,bnj->bij", X, X), np.einsum("bni,bn->bi", X, y)[..., None])[..., 0]
    law = jax.jit(design.context_law, static_argnums=(1, 2))(jax.random.PRNGKey(2), num, jnp.float64)
    from_law = np.asarray(law.factor[:, d, :d])
    for beta in (from_tokens, from_law):
        task = np.argmin(((beta[:, None, :] - design.pool[None]) ** 2).sum(-1), axis=1)
        assert np.allclose(beta, design.pool[task], atol=1e-6)
        freq = np.bincount(task, minlength=K) / num
        for k in range(K):
            assert_within_se(1 / K, freq[k], np.sqrt((1 / K) * (1 - 1 / K) / num), f"frequency of task {k}")


@pytest.mark.parametrize("alpha", [1.0, 1.5, 4.0, 37.5])
def test_standard_gamma_matches_gamma_law(alpha, key):
    a = jnp.full((NUM,), alpha, jnp.float32)
    g = np.asarray(_standard_gamma(key, a), np.float64)
    assert np.all(g > 0)
    assert_within_se(alpha, g.mean(), g.std() / np.sqrt(NUM), f"gamma({alpha}) mean")
    # variance alpha: its estimator's SE from the fourth moment
    assert_within_se(alpha, g.var(), np.std((g - g.mean()) ** 2) / np.sqrt(NUM), f"gamma({alpha}) variance")
    assert_distribution(g, lambda x: _gamma_cdf(alpha, x), f"gamma({alpha})")


@pytest.mark.parametrize("alpha", [1.0, 4.0])
def test_gamma_redraw_loop_matches_gamma_law(alpha, key):
    """Every first proposal rejected (z below -1/c, so (1 + c z)^3 <= 0): every value comes from the
    redraw loop, which the first-pass proposals otherwise leave to a few entries a batch. Planted bugs
    caught: the loop keeping rejected proposals, or overwriting accepted values."""
    a = jnp.full((NUM,), alpha, jnp.float32)
    c = 1.0 / np.sqrt(9.0 * (alpha - 1.0 / 3.0))
    z = jnp.full((NUM, gram.PROPOSALS), -2.0 / c, jnp.float32)
    u = jnp.full((NUM, gram.PROPOSALS), 0.5, jnp.float32)
    g = np.asarray(jax.jit(gram._gamma)(z, u, key, a), np.float64)
    assert np.all(g > 0)
    assert_within_se(alpha, g.mean(), g.std() / np.sqrt(NUM), f"gamma({alpha}) from the loop, mean")
    assert_distribution(g, lambda x: _gamma_cdf(alpha, x), f"gamma({alpha}) from the loop")


@pytest.mark.parametrize("dof", [0, 1, 2, 5, 12])
def test_bartlett_factor_is_wishart(dof, key):
    dim = 5
    T = np.asarray(gram.bartlett_factor(key, NUM, dim, dof), np.float64)
    assert np.allclose(np.triu(T, 1), 0)
    W = T @ np.swapaxes(T, 1, 2)
    # E W = dof I, Var W_ii = 2 dof, Var W_ij = dof; rank min(dof, dim)
    mean, se = W.mean(0), W.std(0) / np.sqrt(NUM)
    for i in range(dim):
        for j in range(dim):
            if dof == 0:
                assert np.all(W[:, i, j] == 0)
            else:
                assert_within_se(dof * (i == j), mean[i, j], se[i, j], f"Wishart({dof}) mean [{i},{j}]")
    if dof:
        assert_within_se(2 * dof, W[:, 0, 0].var(), np.std((W[:, 0, 0] - dof) ** 2) / np.sqrt(NUM),
                         f"Wishart({dof}) Var W_00")
        assert_distribution(W[:, dim - 1, dim - 1], lambda x: _gamma_cdf(dof / 2, x / 2),
                            f"Wishart({dof}) W_44 ~ chi2({dof})")
    assert np.linalg.matrix_rank(W[0]) == min(dof, dim)


@st.composite
def gram_designs(draw):
    d = draw(st.integers(1, 4))
    noise = draw(st.floats(0.0, 1.0))
    alpha = draw(st.floats(-0.9, 0.9))
    kind = draw(st.sampled_from(["iid", "rag", "alignment", "pool"]))
    if kind == "iid":
        design = IID(d, draw(st.one_of(st.none(), spd(d))), draw(st.one_of(st.none(), spd(d))), noise)
    elif kind == "rag":
        design = RAG(d, alpha, draw(st.floats(0.3, 1.5)), noise)
    elif kind == "alignment":
        design = TaskFeatureAlignment(d, alpha, noise)
    else:
        design = TaskPool(d, draw(st.integers(1, 5)), noise, draw(st.integers(0, 9)))
    n = draw(st.integers(1, 7))
    return design, n, n + draw(st.integers(0, 3))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _both_draws(design, k1, k2, n, n_slots):
    """Both samplers' draws as one compiled program (run eagerly, their ops dispatch one by one)."""
    toks = gram.draw(design, k2, NUM, n, n_slots, jnp.float64, gram=False)
    return gram.draw(design, k1, NUM, n, n_slots, jnp.float64, gram=True), toks, context_gram(toks)


# one case of each family with a context law, n active pairs in n_slots >= n slots (make test); the slow tier
# fuzzes the same check over random designs (test_gram_prompts_match_token_prompts_fuzzed)
FAMILY_CASES = [
    (IID(3, np.array([[1.5, 0.3, 0.0], [0.3, 1.0, -0.2], [0.0, -0.2, 0.6]]), np.diag([2.0, 1.0, 0.5]), 0.3), 4, 6),
    (RAG(2, 0.5, 0.8, 0.1), 5, 5),
    (TaskFeatureAlignment(3, -0.6, 0.2), 3, 6),
    (TaskPool(2, 3, 0.5, 4), 2, 4),
]


@pytest.mark.parametrize("case", FAMILY_CASES, ids=lambda c: type(c[0]).__name__)
def test_gram_prompts_match_token_prompts(case):
    """S drawn directly vs S of prompts drawn token by token (n active pairs in n_slots slots): every
    entry's mean within 4 SE, and the loss of a fixed linear attention equal in law (KS)."""
    _check_gram_against_tokens(*case)


@pytest.mark.slow
@settings(max_examples=8, deadline=None, derandomize=True)
@given(gram_designs())
def test_gram_prompts_match_token_prompts_fuzzed(case):
    """The same check over random designs of every family, dims 1-4, n 1-7, up to 3 padded slots."""
    _check_gram_against_tokens(*case)


def _check_gram_against_tokens(design, n, n_slots):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(n * 31 + n_slots), 3)
    direct, toks, S_tok = _both_draws(design, k1, k2, n, n_slots)
    S_gram, S_tok = np.asarray(direct.S), np.asarray(S_tok)
    for i, j in zip(*np.triu_indices(design.dim + 1)):
        a, b = S_gram[:, i, j], S_tok[:, i, j]
        se = np.sqrt(a.var() / NUM + b.var() / NUM)
        if se == 0:
            assert a.mean() == b.mean() == 0
            continue
        assert_within_se(b.mean(), a.mean(), se, f"E S[{i},{j}] gram vs tokens, {type(design).__name__}")
    model = models.LinearAttention(design.dim, dtype=jnp.float64)
    loss_direct, loss_toks = _attention_losses(model, k3, direct, toks)
    assert_same_distribution(np.asarray(loss_direct), np.asarray(loss_toks),
                             f"attention loss, {type(design).__name__} n={n}/{n_slots}")


@functools.partial(jax.jit, static_argnums=0)
def _attention_losses(model, key, direct, toks):
    """The squared error of one attention (initialised from key) on the Gram draws and on the token draws, as
    one compiled program (run eagerly, each shape of each case compiles every op anew)."""
    params = model.init(key)
    return tuple((p.y_query - model.apply(params, p)) ** 2 for p in (direct, toks))


def test_gram_sampler_refuses_designs_without_a_context_law(key):
    with pytest.raises(ValueError, match="no context law"):
        gram.sample_gram(Drift.ar1(2, 3, 0.5), key, 4, 3, 3)
    with pytest.raises(ValueError, match="scalar noise_var"):
        IID(2, noise_var=[0.1, 0.2], query_noise_var=0.1).context_law(key, 4)
    cfg = train.TrainConfig(steps=5, sampler="gram")
    with pytest.raises(ValueError, match="sampler='gram' needs"):
        train.fit_sweep(models.H3(2, 3), IID(2), [3], [0], cfg)
    with pytest.raises(ValueError, match="sampler must be one of"):
        train.TrainConfig(sampler="fast")


def test_default_sampler_choice():
    """Gram draws where exact and cheaper than tokens (n_slots > d / 2 + 1 + 2 PROPOSALS = d / 2 + 9)."""
    assert train.uses_gram(models.LinearAttention(3), IID(3, noise_var=0.1), 11)
    assert not train.uses_gram(models.LinearAttention(3), IID(3, noise_var=0.1), 10)  # 40 token draws < 43 for S
    assert not train.uses_gram(models.LinearAttention(10), IID(10), 14)  # 154 token draws < 155 for S
    assert train.uses_gram(models.LinearAttention(10), IID(10), 15)
    assert train.uses_gram(models.LinearAttention(10), IID(10), 8, "gram")
    assert train.uses_gram(models.PGD(3, rank=2), [RAG(3, 0.5), RAG(3, 0.1)], 40)
    assert not train.uses_gram(models.H3(3, 40), IID(3), 40)
    assert not train.uses_gram(models.LinearAttention(3), Drift.ar1(3, 40, 0.9), 40)
    assert not train.uses_gram(models.LinearAttention(3), IID(3), 40, "tokens")


@pytest.mark.slow  # two full trainings and 200k-prompt evaluations
def test_training_on_gram_prompts_reaches_the_same_risk(key):
    """Attention trained on Gram draws and on token draws (same settings) both land on the
    Theorem 1 optimum; the trained risks on common fresh prompts agree within 1.5%."""
    design, ns = IID(4, noise_var=0.25), [2, 8]
    model = models.LinearAttention(4)
    risks = {}
    for sampler in ("gram", "tokens"):
        cfg = train.TrainConfig(steps=1500, batch_size=256, sampler=sampler)
        fitted = train.fit_sweep(model, design, ns, [0], cfg)
        risks[sampler] = evaluate.evaluate_sweep(model, fitted.params, design, ns, key, 200_000, sampler="tokens")[0]
    for j, n in enumerate(ns):
        L = float(theory.optimal_pgd(design, n).risk)
        g, t = risks["gram"][0, j, 0], risks["tokens"][0, j, 0]
        report(f"gram vs tokens training, n = {n}: risk {g:.4f} vs {t:.4f}, optimum {L:.4f}")
        assert relative_gap(g, L) < SAMPLER_GAP and relative_gap(t, L) < SAMPLER_GAP
        assert relative_gap(g, t) < SAMPLER_AGREEMENT
