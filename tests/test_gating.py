"""Gating is weighting (docs/theory.md §10): the multitask design, GLA's two forms and its effective WPGD, and the
optimal-WPGD / GLA / linear-attention closed forms against Monte Carlo (4 SE), special cases and identities."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from iclsim import IID, gating, models, montecarlo, protocols, testing, theory
from iclsim.gla import GLA
from iclsim.multitask import Multitask
from tests.tolerance import assert_within_se

FAST = settings(max_examples=5, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate])
KEY = jax.random.PRNGKey(11)


@st.composite
def multitask_designs(draw, max_tasks=4):
    K = draw(st.integers(1, max_tasks))
    r = np.array(draw(st.lists(st.floats(-0.9, 1.0), min_size=K, max_size=K)))
    return Multitask(draw(st.integers(1, 4)), r, draw(st.integers(1, 4)), noise_var=draw(st.floats(0.0, 1.0)),
                     delimiters=draw(st.booleans()))


@functools.partial(jax.jit, static_argnums=2)
def _sample(design, key, batch):
    """design.sample(key, batch, fixed_n, float64) as one program per design layout and batch (the design is a
    traced pytree): eager, each of sample's operations compiles on its own."""
    return design.sample(key, batch, design.fixed_n, jnp.float64)


def _random_params(model, seed, scale=0.4):
    """A GLA's parameters in general position: init's layout (gate biases ``gate_bias``, gates near
    sigmoid(4)) with N(0, scale^2) added to every entry. Drawn with numpy: jax.random would compile a
    program per parameter shape."""
    rng = np.random.default_rng(seed)
    L, g, d = model.layers, model.channels, model.dim
    return {"W": jnp.asarray(scale * rng.normal(size=(L, d, d))),
            "gate_w": jnp.asarray(scale * rng.normal(size=(L, g, d + 1))),
            "gate_b": jnp.asarray(model.gate_bias + scale * rng.normal(size=(L, g)))}


# ---- the design ----

def test_design_layout_and_protocol():
    d = Multitask(3, [0.2, 0.5, 1.0], 2)
    assert (d.dim, d.fixed_n) == (5, 8)
    np.testing.assert_array_equal(d.positions(), [0, 0, -1, 1, 1, -1, 2, 2])
    protocols.check_design(d, d.fixed_n)
    p = _sample(d, KEY, 3)
    assert p.X.dtype == jnp.float64
    np.testing.assert_array_equal(p.X[:, 2], np.broadcast_to(np.eye(5)[3], (3, 5)))  # delimiter 1 on channel 3
    np.testing.assert_array_equal(p.y[:, [2, 5]], 0.0)
    np.testing.assert_array_equal(p.X[:, [0, 1, 3, 4, 6, 7], 3:], 0.0)  # data pairs: zero markers


def test_design_task_correlations_by_monte_carlo():
    """The relevance r_k is the correlation of segment k's task with the query's: with noiseless labels each
    segment's task is recovered exactly by least squares, and E[y_q (x.beta_k)] / E[(x.beta_k)^2] = r_k.
    2000 prompts: standard error about 0.03, tolerance 0.12 (4 SE)."""
    B = 2000
    d = Multitask(2, [0.3, -0.6], 4, noise_var=0.0, delimiters=False)
    p = d.sample(KEY, B, d.fixed_n, jnp.float64)
    X, y = np.asarray(p.X).reshape(B, 2, 4, 2), np.asarray(p.y).reshape(B, 2, 4)
    beta_k = np.einsum("bkij,bki->bkj", np.linalg.pinv(X).transpose(0, 1, 3, 2), y)
    proj = np.einsum("bd,bkd->bk", np.asarray(p.x), beta_k)
    est = np.array([np.mean(np.asarray(p.y_query) * proj[:, k]) / np.mean(proj[:, k] ** 2) for k in range(2)])
    np.testing.assert_allclose(est, [0.3, -0.6], atol=0.12)


@pytest.mark.parametrize("kwargs, match", [
    ({"task_dim": 0}, "task_dim"), ({"relevance": [1.5]}, "relevance"), ({"relevance": []}, "relevance"),
    ({"per_task": 0}, "per_task"), ({"corr": np.eye(3)}, "corr"), ({"noise_var": -1.0}, "noise_var"),
    ({"relevance": [0.9, 0.9], "corr": [[1.0, -0.9], [-0.9, 1.0]]}, "valid correlation"),
    ({"dim": 99}, "dim is derived"), ({"relevance": [np.nan]}, "relevance")])
def test_design_refuses_bad_setup_by_name(kwargs, match):
    args = {"task_dim": 3, "relevance": [0.5, 1.0], "per_task": 2, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        Multitask(**args)


# ---- GLA: forms, constant gates, effective WPGD ----

def _recurrent_and_parallel(gate, layers, seed, batch=3):
    design = Multitask(3, [0.4, 0.7, 1.0], 2)
    p = _sample(design, jax.random.PRNGKey(seed), batch)
    par = GLA(design.dim, gate, layers, dtype=jnp.float64)
    rec = GLA(design.dim, gate, layers, form="recurrent", dtype=jnp.float64)
    return _applied((rec, par), _random_params(par, seed), p)


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_recurrent_equals_parallel(gate):
    """The lax.scan and the masked-cumulative-product forms agree to rounding, two layers (the second reads
    the first's residuals) at random parameters; the slow tier fuzzes gate, depth and seed."""
    np.testing.assert_allclose(*_recurrent_and_parallel(gate, 2, 0), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@FAST
@given(st.sampled_from(["scalar", "vector"]), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_recurrent_equals_parallel_fuzzed(gate, layers, seed):
    np.testing.assert_allclose(*_recurrent_and_parallel(gate, layers, seed, batch=4), rtol=1e-10, atol=1e-12)


@functools.partial(jax.jit, static_argnums=0)
def _applied(models_, params, prompts):
    """Each model's prediction, as one compiled program per tuple of (hashable) models: run eagerly, a
    lax.scan compiles anew at every call."""
    return tuple(m.apply(params, prompts) for m in models_)


@FAST
@given(st.sampled_from(["scalar", "vector"]), st.integers(0, 2**31 - 1))
def test_effective_wpgd_reproduces_the_prediction(gate, seed):
    design = Multitask(3, [0.4, 0.7, 1.0], 2)
    p = _sample(design, jax.random.PRNGKey(seed), 3)
    model = GLA(design.dim, gate, dtype=jnp.float64)
    params = _random_params(model, seed)
    W, omega = model.effective_wpgd(params, p)
    weighted = p.X * (omega[..., None] if gate == "scalar" else omega)
    yhat = jnp.einsum("bi,ij,bnj,bn->b", p.x, W, weighted, p.y)
    np.testing.assert_allclose(yhat, model.apply(params, p), rtol=1e-10, atol=1e-12)
    assert bool(jnp.all((omega > 0) & (omega <= 1)))
    with pytest.raises(ValueError, match="layers=2"):
        GLA(design.dim, layers=2).effective_wpgd(_random_params(GLA(design.dim, layers=2), seed), p)


@jax.jit
def _constant_gate_predictions(key, W, bias, omega):
    """GLA (scalar and vector gates) with gate weights 0 and bias ``bias``, WPGD with ``omega``, and the open
    gate (bias 40) against PGD, all with the same W, on 4 IID prompts of len(omega) pairs drawn from ``key``:
    one program for every bias and seed."""
    p = IID(3, noise_var=0.1).sample(key, 4, omega.shape[0], jnp.float64)
    gla, vec = GLA(3, dtype=jnp.float64), GLA(3, "vector", dtype=jnp.float64)
    params = {"W": W[None], "gate_w": jnp.zeros((1, 1, 4)), "gate_b": jnp.full((1, 1), bias)}
    vparams = {"W": W[None], "gate_w": jnp.zeros((1, 3, 4)), "gate_b": jnp.full((1, 3), bias)}
    open_gate = {**params, "gate_b": jnp.full((1, 1), 40.0)}
    return (gla.apply(params, p), models.WPGD(3, p.X.shape[1], dtype=jnp.float64).apply({"W": W, "omega": omega}, p),
            gla.apply(open_gate, p), models.PGD(3, dtype=jnp.float64).apply({"W": W}, p), vec.apply(vparams, p))


@FAST
@given(st.floats(-3.0, 5.0), st.integers(0, 2**31 - 1))
def test_constant_gates_are_h3_wpgd_and_open_gates_linear_attention(bias, seed):
    """Gate weights 0: g = sigmoid(c) for every token, so omega_j = g^(n+1-j) (H3's exponential filter, as
    models.WPGD); c = 40 rounds g to 1 in float64: linear attention's PGD (models.PGD, the same W)."""
    n = 6
    W = jnp.asarray(np.random.default_rng(seed).normal(size=(3, 3)))
    g = 1.0 / (1.0 + np.exp(-bias))
    omega = g ** np.arange(n, 0, -1)
    gla, wpgd, gla_open, pgd, vec = _constant_gate_predictions(jax.random.PRNGKey(seed), W, jnp.asarray(bias),
                                                                  jnp.asarray(omega))
    np.testing.assert_allclose(gla, wpgd, rtol=1e-10)
    np.testing.assert_allclose(gla_open, pgd, rtol=1e-12)
    np.testing.assert_allclose(vec, gla, rtol=1e-10)


def test_gla_refuses_bad_configuration_by_name():
    for kwargs, match in [({"gate": "matrix"}, "gate"), ({"layers": 0}, "layers"), ({"form": "chunked"}, "form"),
                          ({"dim": 0}, "dim")]:
        with pytest.raises((ValueError, TypeError), match=match):
            GLA(**{"dim": 3, **kwargs})
    protocols.check_model(GLA(3), IID(3), 4)


# ---- theory ----

def test_optimal_wpgd_equals_drift_theory_and_one_task_equals_optimal_pgd():
    d = Multitask(4, [0.1, -0.3, 0.6, 1.0], 3, noise_var=0.25)
    ref = theory.optimal_wpgd(d.as_drift(), 12)
    opt = gating.optimal_wpgd(d)
    np.testing.assert_allclose(opt.risk, ref.risk, rtol=1e-12)
    np.testing.assert_allclose(opt.omega[d.positions() >= 0], np.asarray(ref.omega), rtol=1e-10)
    la = gating.linear_attention_optimum(d)
    np.testing.assert_allclose(la.risk, theory.optimal_pgd(d.as_drift(), 12).risk, rtol=1e-12)
    one = Multitask(5, [1.0], 9, noise_var=0.3, delimiters=False)
    pgd = theory.optimal_pgd(IID(5, noise_var=0.3), 9)
    for o in (gating.optimal_wpgd(one), gating.linear_attention_optimum(one)):
        np.testing.assert_allclose(o.risk, pgd.risk, rtol=1e-12)
        np.testing.assert_allclose(o.W, np.asarray(pgd.W) / 9 * 9, rtol=1e-10)  # same W, unscaled convention


@FAST
@given(multitask_designs(), st.integers(0, 2**31 - 1))
def test_optimum_is_unique_up_to_scale_and_ordered(design, seed):
    """L(w) is scale invariant; no random w beats w* (= A^-1 b); L_WPGD <= L_GLA <= L_LA; the closed-form
    conditions agree with the computed risks."""
    rng = np.random.default_rng(seed)
    opt = gating.optimal_wpgd(design)
    np.testing.assert_allclose(gating.wpgd_risk(design, 3.7 * opt.weights), opt.risk, rtol=1e-10)
    for _ in range(20):
        assert gating.wpgd_risk(design, rng.normal(size=design.tasks)) >= opt.risk - 1e-10
    if design.delimiters:
        gap = gating.gating_gap(design)
        assert gap.wpgd <= gap.gla + 1e-10 and gap.gla <= gap.linear_attention + 1e-10
        assert gap.gla_attains_wpgd == bool(np.isclose(gap.gla, gap.wpgd, rtol=1e-9, atol=1e-12))
        assert gap.strict_advantage == bool(gap.gap > 1e-9 * gap.linear_attention)
        for _ in range(20):  # no point of the cone beats gla_optimum
            w = np.cumsum(rng.exponential(size=design.tasks))
            assert gating.wpgd_risk(design, w) >= gap.gla - 1e-10


def test_ordered_relevance_gla_attains_wpgd_and_beats_linear_attention():
    gap = gating.gating_gap(Multitask(5, [0.2, 0.5, 1.0], 6, noise_var=0.1))
    assert gap.gla_attains_wpgd and gap.strict_advantage and gap.gap > 0.5
    same = gating.gating_gap(Multitask(5, [1.0, 1.0, 1.0], 6, corr=np.ones((3, 3)), noise_var=0.1))
    assert not same.strict_advantage and abs(same.gap) < 1e-12  # one task in three segments: uniform is optimal
    flipped = gating.gating_gap(Multitask(5, [-0.2, -0.5, -1.0], 6, noise_var=0.1))  # W < 0 absorbs the sign
    np.testing.assert_allclose(flipped[:4], gap[:4], rtol=1e-12)
    assert flipped.gla_attains_wpgd and flipped.strict_advantage
    single = gating.gating_gap(Multitask(5, [-0.5], 6, noise_var=0.1))
    assert single.gla == single.linear_attention and not single.strict_advantage


def test_closed_forms_match_monte_carlo():
    """The optimal WPGD, the GLA cone optimum and linear attention's optimum, each predicting with its (W, omega),
    against its closed-form risk within 4 SE on 60,000 prompts: the three scored in one program on the same
    prompts (montecarlo.prompt_totals from KEY)."""
    design = Multitask(4, [0.9, 0.2, 0.6], 4, noise_var=0.2)  # not ordered: the three optima differ
    optima = {"wpgd": gating.optimal_wpgd(design), "gla": gating.gla_optimum(design),
              "la": gating.linear_attention_optimum(design)}
    weights = [(jnp.asarray(o.W), jnp.asarray(o.omega)) for o in optima.values()]
    num = 60_000

    def totals(p, valid):
        err = jnp.where(valid, jnp.stack([(p.y_query - jnp.einsum("bi,ij,bnj,bn->b", p.x, W, p.X, omega[None, :] * p.y))
                                          ** 2 for W, omega in weights]), 0.0)
        return jnp.sum(err, axis=1), jnp.sum(err**2, axis=1)

    group = montecarlo.group_size(num, 10_000)
    total, total_sq = jax.jit(lambda key: montecarlo.prompt_totals(totals, design, design.fixed_n, key, num, group))(KEY)
    for i, (name, opt) in enumerate(optima.items()):
        est = montecarlo.estimate(total[i], total_sq[i], num)
        assert_within_se(opt.risk, est.mean, est.se, name, 4.0)


def test_gla_at_the_cone_optimum_matches_its_theory_by_monte_carlo():
    """A GLA whose delimiter gates realise the optimal cone weights predicts with the gla_optimum risk:
    data gates sigmoid(40) = 1 in float64, delimiter k's gate w_k / w_{k+1} set through its marker channel."""
    design = Multitask(3, [0.2, 0.5, 1.0], 4, noise_var=0.1)
    opt = gating.gla_optimum(design)
    w = opt.weights
    gates = w[:-1] / w[1:]
    d = design.task_dim
    gate_w = jnp.zeros((1, 1, design.dim + 1)).at[0, 0, d:d + 2].set(jnp.log(gates / (1 - gates)) - 40.0)
    n = design.fixed_n
    params = {"W": jnp.asarray(opt.W * w[-1] * n)[None], "gate_w": gate_w, "gate_b": jnp.full((1, 1), 40.0)}
    model = GLA(design.dim, dtype=jnp.float64)
    testing.assert_matches_theory((model, params), design, n, opt.risk, sigmas=4.0, num_prompts=60_000, key=KEY)


def test_gating_refuses_other_designs():
    with pytest.raises(TypeError, match="Multitask"):
        gating.optimal_wpgd(IID(3))
    with pytest.raises(ValueError, match="delimiters"):
        gating.gla_optimum(Multitask(3, [0.5, 1.0], 2, delimiters=False))
    with pytest.raises(ValueError, match="weights"):
        gating.wpgd_risk(Multitask(3, [0.5, 1.0], 2), [1.0])
