"""The theory of the course of training (iclsim.dynamics) and the multi-head models it describes
(iclsim.multihead): PCR plateau risks against Monte Carlo (4 SE), the closed-form merged time course and the
separate-KQ scalar ODEs against a direct RK4 gradient flow of the exact population loss over the models' own
parameters, the population loss against Monte Carlo of the models' predictions, the small-init drop times
of the literature, and the Zhang-Frei-Bartlett limit (Gamma^{-1}) against the flow and Monte Carlo."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclsim import IID, gram, montecarlo, theory
from iclsim import dynamics as dy
from iclsim import multihead as mh
from tests.tolerance import MC_SIGMAS, assert_close, assert_within_se

KEY = jax.random.PRNGKey(11)
F64 = jnp.float64
ANISO = IID(3, cov_x=np.diag([2.0, 1.0, 0.5]), cov_beta=np.diag([1.0, 1.5, 0.7]), noise_var=0.2)


def _mc_risk(predict, design, n, num=60_000):
    return montecarlo.risk(predict, design, n, KEY, num)


def test_pcr_plateau_risks_match_monte_carlo():
    """Each plateau risk L_k (k = 0..3) within 4 SE of Monte Carlo of W_k's predictions on 60,000 prompts, the
    four weights scored in one program on the same prompts (the ones montecarlo.risk would draw from KEY)."""
    n, num = 8, 60_000
    risks = dy.pcr_risks(ANISO, n).risks
    predicts = [theory.pgd_predict(dy.pcr_weight(ANISO, n, k)) for k in range(4)]

    def totals(p, valid):
        err = jnp.where(valid, jnp.stack([(p.y_query - f(p)) ** 2 for f in predicts]), 0.0)
        return jnp.sum(err, axis=1), jnp.sum(err**2, axis=1)

    group = montecarlo.group_size(num, 10_000)
    total, total_sq = jax.jit(lambda key: montecarlo.prompt_totals(totals, ANISO, n, key, num, group))(KEY)
    for k in range(4):
        est = montecarlo.estimate(total[k], total_sq[k], num)
        assert_within_se(risks[k], est.mean, est.se, f"PCR k={k}", MC_SIGMAS)


def test_pcr_identities():
    """L_0 is the zero predictor's risk, L_d the PGD optimum, and each L_k the exact risk of W_k; the
    components arrive by decreasing lam_i c_i, so the reductions from 1 to d do not increase here."""
    n = 8
    p = dy.pcr_risks(ANISO, n)
    assert_close(p.risks[0], theory.predict_zero_risk(ANISO), name="L_0")
    assert_close(p.risks[-1], theory.optimal_pgd(ANISO, n).risk, name="L_d")
    for k in range(4):
        assert_close(theory.pgd_risk(ANISO, n, dy.pcr_weight(ANISO, n, k)), p.risks[k], name=f"L_{k}")
    drive = p.spectrum.lam * p.spectrum.c
    assert np.all(np.diff(drive) <= 0)
    with pytest.raises(ValueError, match="cov_beta must commute"):
        dy.pcr_risks(IID(2, cov_x=np.diag([2.0, 1.0]), cov_beta=np.array([[1.0, 0.5], [0.5, 1.0]])), 4)


@pytest.mark.parametrize("model", [mh.MergedAttention(3, heads=2, init_scale=0.7, dtype=F64),
                                   mh.SeparateAttention(3, heads=4, rank=2, init_scale=4.0, dtype=F64)])
def test_population_loss_matches_monte_carlo_of_the_model(model):
    """The loss the flows descend is the model's risk: Monte Carlo of apply at random parameters (token
    prompts) within 4 SE of population_loss(n W_eff)."""
    n = 6
    params, W = jax.jit(lambda key: (model.init(key), model.effective_pgd(model.init(key), n).W * n))(
        jax.random.PRNGKey(3))  # one program (eager, each operation compiles on its own)
    est = _mc_risk(lambda p: model.apply(params, p), ANISO, n)
    assert_within_se(dy.population_loss(ANISO, n)(W), est.mean, est.se, type(model).__name__, MC_SIGMAS)


@pytest.mark.parametrize("model", [mh.MergedAttention(3, heads=3, dtype=F64), mh.SeparateAttention(3, heads=2, dtype=F64)])
def test_models_read_tokens_and_gram_alike_and_start_on_the_subspace(model):
    n, d = 5, 3

    @jax.jit  # one program (eager, each operation compiles on its own)
    def forms():
        params = jax.tree_util.tree_map(lambda a: 50 * a, model.init(jax.random.PRNGKey(0)))
        prompts = ANISO.sample(jax.random.PRNGKey(1), 7, n, F64)
        S = jnp.einsum("bni,bnj->bij", *(2 * [jnp.concatenate([prompts.X, prompts.y[..., None]], -1)])) / n
        gp = gram.GramPrompts.from_matrix(S, prompts.x, prompts.y_query)
        W = model.effective_pgd(params, n).W
        Q = model.merged(params) if hasattr(model, "merged") else params["KQ"]
        return params, model.apply_gram(params, gp), model.apply(params, prompts), theory.pgd_predict(W)(prompts), Q

    params, by_gram, by_tokens, by_W, Q = forms()
    assert_close(by_gram, by_tokens, rtol=1e-10, name="gram vs tokens")
    assert_close(by_W, by_tokens, rtol=1e-10, name="effective W")
    assert np.all(np.asarray(Q)[:, :d, d] == 0) and np.all(np.asarray(params["v"])[:, :d] == 0)


def test_authors_init_scales():
    """The authors' code: merged entries N(0, s^2); separate Wq, Wk entries N(0, s^2 / (H r D)), value / (H D^2)."""
    H, r, d, s = 64, 2, 7, 0.3
    D = d + 1
    p = jax.jit(mh.SeparateAttention(d, heads=H, rank=r, init_scale=s, dtype=F64).init)(jax.random.PRNGKey(2))
    assert abs(np.std(np.asarray(p["Wq"])) / (s / np.sqrt(H * r * D)) - 1) < 0.05
    assert abs(np.std(np.asarray(p["v"])[:, d]) / (s / np.sqrt(H * D * D)) - 1) < 0.15
    q = jax.jit(mh.MergedAttention(d, heads=H, init_scale=s, dtype=F64).init)(jax.random.PRNGKey(2))
    assert abs(np.std(np.asarray(q["KQ"])[:, :, :d]) / s - 1) < 0.05


@pytest.mark.parametrize("heads", [pytest.param(1, marks=pytest.mark.slow), 3])  # make test: 3 heads; slow: 1
def test_merged_time_course_matches_the_population_flow(heads):
    """White design, aligned balanced start: the logistic closed form against RK4 on the model's own
    parameters (the gradient of the exact population loss by autodiff), and its drop time."""
    design, n, u0 = IID(3, cov_x=0.7 * np.eye(3), noise_var=0.3), 10, 0.02
    model = mh.MergedAttention(3, heads=heads, init_scale=u0, start="aligned", dtype=F64)
    closed = dy.merged_time_course(design, n, np.linspace(0.0, 30.0, 301), heads, u0)
    flow = dy.population_flow(model, design, n, model.init(None), 30.0, records=300, dt=0.01)
    assert_close(flow.loss, closed.loss, rtol=1e-6, atol=1e-7, name="merged")
    assert abs(closed.loss[-1] - theory.optimal_pgd(design, n).risk) < 1e-9
    drop = dy.drop_times(flow.times, flow.loss, [closed.loss[0], closed.loss[-1]])[0]
    assert abs(drop - dy.merged_drop_time(design, n, heads, u0)) <= 0.1  # the grid spacing


def test_separate_scalar_odes_match_the_population_flow():
    design, n, u0 = IID(3, cov_x=np.diag([1.5, 1.0, 0.4]), noise_var=0.1), 12, 0.05
    model = mh.SeparateAttention(3, heads=4, init_scale=u0, start="aligned", dtype=F64)
    ode = dy.separate_kq_flow(design, n, 200.0, heads=4, init_scale=u0, records=400, dt=0.02)
    flow = dy.population_flow(model, design, n, model.init(None), 200.0, records=400, dt=0.02)
    assert_close(flow.loss, ode.loss, rtol=1e-6, atol=1e-7, name="separate")
    assert_close(ode.loss[-1], dy.pcr_risks(design, n).risks[-1], rtol=1e-6, name="ends at the optimum")


def test_separate_drop_times_follow_the_eigenvalues_and_one_over_init():
    """Small init: drop i at about 1 / (2 lam_i c_i u0) (the ODE's blow-up time), in eigenvalue order, and
    the loss rests on the PCR risks between drops."""
    design, n, u0 = IID(3, cov_x=np.diag([2.0, 1.0, 0.5]), noise_var=0.0), 20, 1e-3
    p = dy.pcr_risks(design, n)
    ode = dy.separate_kq_flow(design, n, 3000.0, heads=3, init_scale=u0, records=3000, dt=0.1)
    drops = dy.drop_times(ode.times, ode.loss, p.risks)
    predicted = 1 / (2 * p.spectrum.lam * p.spectrum.c * u0)
    assert np.all(np.diff(drops) > 0)
    np.testing.assert_allclose(drops / predicted, 1.0, atol=0.02)
    for k in (1, 2):  # the middle of each plateau: between drop k and drop k + 1
        mid = int(np.searchsorted(ode.times, np.sqrt(drops[k - 1] * drops[k])))
        assert abs(ode.loss[mid] - p.risks[k]) < 1e-3 * p.risks[0]


def test_zfb_limit_is_gamma_inverse_and_the_flow_reaches_it():
    """ZFB Theorem 4.1: W = Gamma^{-1}, Gamma = (1 + 1/n) Sx + tr(Sx)/n I (w ~ N(0, I), no noise), reached
    by the flow from their start (one merged head, aligned) also for a non-white Sx."""
    Sx = np.diag([1.6, 0.9, 0.5])
    design, n = IID(3, cov_x=Sx, noise_var=0.0), 10
    gamma = (1 + 1 / n) * Sx + np.trace(Sx) / n * np.eye(3)
    assert_close(dy.zfb_limit(design, n), np.linalg.inv(gamma), name="Gamma^-1")
    model = mh.MergedAttention(3, heads=1, init_scale=0.05, start="aligned", dtype=F64)
    flow = dy.population_flow(model, design, n, model.init(None), 400.0, records=50, dt=0.02)
    assert abs(flow.loss[-1] - theory.optimal_pgd(design, n).risk) < 1e-8


def test_zfb_limit_risk_under_a_covariance_shift_matches_monte_carlo():
    train, n = IID(3, cov_x=np.diag([1.6, 0.9, 0.5]), noise_var=0.0), 10
    test = IID(3, cov_x=np.array([[1.0, 0.4, 0.0], [0.4, 1.2, 0.3], [0.0, 0.3, 0.8]]), noise_var=0.0)
    W = dy.zfb_limit(train, n)
    for n_test in (10, 30):
        est = _mc_risk(theory.pgd_predict(W / n_test), test, n_test)
        assert_within_se(dy.zfb_limit_risk(train, n, test, n_test), est.mean, est.se, "ZFB shift", MC_SIGMAS)


def test_wrong_setups_name_the_argument():
    with pytest.raises(ValueError, match="start must be one of"):
        mh.MergedAttention(3, start="spectral")
    with pytest.raises(ValueError, match="init_scale"):
        mh.SeparateAttention(3, init_scale=0.0)
    with pytest.raises(ValueError, match="rank"):
        mh.SeparateAttention(3, rank=5)
    with pytest.raises(ValueError, match="cov_x must be a multiple of I"):
        dy.merged_time_course(ANISO, 4, [0.0, 1.0])
    with pytest.raises(ValueError, match="cov_x must be diagonal"):
        dy.separate_kq_flow(IID(2, cov_x=np.array([[1.0, 0.3], [0.3, 1.0]])), 4, 10.0)
    with pytest.raises(ValueError, match="invariant subspace"):
        model = mh.MergedAttention(2, dtype=F64)
        params = model.init(jax.random.PRNGKey(0))
        dy.population_flow(model, IID(2), 4, {**params, "v": params["v"] + 1.0}, 1.0)
