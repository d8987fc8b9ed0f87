"""Lu et al.'s asymptotic ICL error (docs/theory.md §12) and the closed-form ridge fit on a finite
pretraining set: identities, limits from the paper, and the fit against the infinite-data optimum and
against Monte Carlo."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iclsim import TaskPool, asymptotics, models, montecarlo, pretraining, theory, train
from tests.tolerance import assert_within_se, report

KAPPAS = [0.3, 1.0, 4.0, np.inf]


@pytest.mark.parametrize("kappa", KAPPAS)
def test_resolvent_solves_its_quadratic_and_its_derivative_is_the_slope(kappa):
    """M = M_kappa(z) is the positive root of (z/kappa) M^2 + (z + 1 - 1/kappa) M - 1 = 0; M' matches a
    central difference."""
    z = np.array([0.05, 0.7, 3.0, 40.0])
    m = asymptotics.resolvent(z, kappa)
    k = np.float64(kappa)
    np.testing.assert_allclose(z / k * m**2 + (z + 1 - 1 / k) * m - 1, 0.0, atol=1e-13)
    h = 1e-6 * z
    slope = (asymptotics.resolvent(z + h, kappa) - asymptotics.resolvent(z - h, kappa)) / (2 * h)
    np.testing.assert_allclose(asymptotics.resolvent_derivative(z, kappa), slope, rtol=1e-7)


@pytest.mark.parametrize("alpha,rho", [(0.5, 0.0), (1.0, 0.1), (4.0, 1.0)])
def test_infinite_data_limit_is_the_optimal_pgd_risk(alpha, rho):
    """tau -> inf, kappa = inf, lambda -> 0: e_ICL -> rho + (1 + rho)/(alpha + 1 + rho), the d -> inf limit of
    the isotropic optimum (d + s^2 - n d/(n + d + 1 + s^2))/d with n = alpha d, s^2 = d rho (theory.optimal_pgd
    at d = 400 within 1%)."""
    e = asymptotics.ridge_icl_error(alpha, np.inf, 1e7, rho, 1e-9)
    assert e == pytest.approx(rho + (1 + rho) / (alpha + 1 + rho), rel=1e-6)
    d = 400
    finite = theory.optimal_pgd(pretraining.lu_design(d, rho), int(alpha * d)).risk / d
    assert e == pytest.approx(float(finite), rel=0.01)


@pytest.mark.parametrize("kappa", KAPPAS)
@pytest.mark.parametrize("tau", [0.3, 0.7, 1.6, 5.0])
def test_small_ridge_tends_to_the_ridgeless_formula(kappa, tau):
    """Away from the peak the ridge formula at lambda = 1e-8 equals the separate ridgeless closed form."""
    ridge = asymptotics.ridge_icl_error(1.5, kappa, tau, 0.2, 1e-8)
    assert ridge == pytest.approx(asymptotics.ridgeless_icl_error(1.5, kappa, tau, 0.2), rel=1e-5)


def test_double_descent_peak_sits_at_the_interpolation_threshold():
    """Ridgeless error diverges at tau = 1 from both sides; with a small ridge the error has its peak near
    tau = 1 and the peak moves and flattens as lambda grows."""
    below = [asymptotics.ridgeless_icl_error(2.0, 1.0, t, 0.1) for t in (0.9, 0.99, 0.999)]
    above = [asymptotics.ridgeless_icl_error(2.0, 1.0, t, 0.1) for t in (1.1, 1.01, 1.001)]
    assert below[0] < below[1] < below[2] and above[0] < above[1] < above[2] and min(below[2], above[2]) > 50
    p_small, p_large = (asymptotics.interpolation_peak(2.0, 1.0, 0.1, lam) for lam in (1e-4, 1e-1))
    assert abs(p_small - 1) < 0.01
    top_small = asymptotics.ridge_icl_error(2.0, 1.0, p_small, 0.1, 1e-4)
    top_large = asymptotics.ridge_icl_error(2.0, 1.0, p_large, 0.1, 1e-1)
    assert top_large < top_small / 3


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="kappa"):
        asymptotics.ridge_icl_error(1.0, 0.0, 1.0, 0.1, 1e-3)
    with pytest.raises(ValueError, match="tau"):
        asymptotics.ridge_icl_error(1.0, 1.0, -1.0, 0.1, 1e-3)
    with pytest.raises(ValueError, match="ridge"):
        asymptotics.ridge_icl_error(1.0, 1.0, 1.0, 0.1, 0.0)
    with pytest.raises(ValueError, match="tau must differ from 1"):
        asymptotics.ridgeless_icl_error(1.0, 1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="gamma"):
        pretraining.icl_error(np.zeros((3, 3)), 4, 0.1)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _fit_program(design, P, n, ridge, key):
    """fit_ridge on P float64 prompts of ``design`` drawn from ``key``: one program per design layout, P and n
    (the design, ridge and key traced); eager, each operation compiles on its own for each P."""
    return pretraining.fit_ridge(design.sample(key, P, n, jnp.float64), ridge)


def _fit(design, P, n, ridge, seed):
    with jax.enable_x64(True):
        return _fit_program(design, P, n, ridge, jax.random.PRNGKey(seed))


# make test fits one case; the slow tier the other two
@pytest.mark.parametrize("d,n,rho", [pytest.param(2, 3, 0.0, marks=pytest.mark.slow), (3, 6, 0.2),
                                    pytest.param(4, 4, 1.0, marks=pytest.mark.slow)])
def test_finite_pretraining_fit_tends_to_the_infinite_data_optimum(d, n, rho):
    """Fresh tasks (kappa = inf), lambda -> 0: as tau = P/d^2 grows the fitted attention's exact excess risk
    over theory.optimal_pgd falls (at least 8x from tau = 20 to tau = 640) and its PGD block Gamma[:, :d] / n
    tends to W* while the y^2 column tends to 0 (Paper A, Theorem 1)."""
    design = pretraining.lu_design(d, rho)
    opt = theory.optimal_pgd(design, n)
    excess, dist = [], []
    for tau in (20, 640):
        fits = [_fit(design, tau * d * d, n, 1e-10, s) for s in range(4)]
        excess.append(np.mean([pretraining.icl_error(g, n, rho) - opt.risk / d for g in fits]))
        dist.append(np.mean([np.abs(np.asarray(g)[:, :d] / n - opt.W).max() / np.abs(opt.W).max()
                             + np.abs(np.asarray(g)[:, d]).max() for g in fits]))
    report(f"finite pretraining d={d}: excess risk {excess[0]:.3g} (tau 20) -> {excess[1]:.3g} (tau 640)")
    assert 0 < excess[1] < excess[0] / 8 and dist[1] < dist[0] / 2 and dist[1] < 0.25


def test_fit_is_the_ridge_normal_equation_and_masks_the_rest():
    """The fit zeroes the gradient of (1/P) sum (y/sqrt(d) - <Gamma, H>)^2 + (lambda/d) ||Gamma||^2 over the
    first ``count`` prompts only; vmapped over seeds it equals seed-by-seed fits."""
    design = TaskPool(3, 5, noise_var=0.3, pool_seed=1)

    @jax.jit  # one program (eager, each operation compiled on its own)
    def fits(design):
        p = design.sample(jax.random.PRNGKey(0), 40, 4, jnp.float64)
        g = pretraining.fit_ridge(p, 0.7, 25)
        head = jax.tree_util.tree_map(lambda a: a[:25], p)

        def loss(G):
            fit = pretraining.features(head) @ G.ravel()
            return jnp.mean((head.y_query / jnp.sqrt(3.0) - fit) ** 2) + 0.7 / 3 * jnp.sum(G**2)

        stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), p, design.sample(jax.random.PRNGKey(1), 40, 4,
                                                                                              jnp.float64))
        both = jax.vmap(pretraining.fit_ridge, in_axes=(0, None, None))(stacked, 0.7, 25)
        return g, jax.grad(loss)(g), both

    with jax.enable_x64(True):
        g, grad, both = fits(design)
    assert float(jnp.abs(grad).max()) < 1e-10
    np.testing.assert_allclose(np.asarray(both[0]), np.asarray(g), rtol=1e-10)


def test_finite_d_error_of_a_fit_matches_monte_carlo():
    """The exact ICL error (theory.attention_risk / d) of a fit on a 3-task pool, whose y^2 column is far
    from 0 (memorisation), against the fitted LinearAttention scored on 100k fresh-task prompts (4 SE)."""
    d, n, rho = 5, 7, 0.2
    g = _fit(TaskPool(d, 3, noise_var=d * rho, pool_seed=2), 300, n, 1e-3, 0)
    assert np.abs(np.asarray(g)[:, d]).max() > 0.1
    model = models.LinearAttention(d, dtype=jnp.float64)
    with jax.enable_x64(True):
        params = pretraining.attention_params(g, jnp.float64)
    est = montecarlo.risk(lambda p: model.apply(params, p), pretraining.lu_design(d, rho), n, jax.random.PRNGKey(3),
                          100_000)
    assert_within_se(pretraining.icl_error(g, n, rho), est.mean / d, est.se / d, "pretraining.icl_error")


_fit_ridge = jax.jit(pretraining.fit_ridge)  # one program per prompt shape (eager: one per operation)
GD_REL = 1e-4  # float32 gradient descent vs the float64 ridge solution, ||Gamma_GD - Gamma*|| / ||Gamma*||


@pytest.mark.parametrize("P", [8, 30])  # below and above the d(d+1) = 12 parameters
def test_gradient_descent_on_the_ridge_objective_reaches_fit_ridge(P):
    """Full-batch GD (optax sgd) on ``ridge_objective`` over a seed's stored set ends at ``fit_ridge`` on the same
    set (``stored_prompts``), to GD_REL, once the predicted contraction max |1 - 2 step lambda_i|^steps over the
    features' span (docs/theory.md §12) is far below it. A penalty d times too large or too small moves the
    optimum by more than 100 GD_REL here, so a mis-scaled ``ridge_objective`` fails, as do a set drawn from
    another stream or a model predicting other than <Gamma, H>."""
    d, n, rho, ridge, seed, steps = 3, 4, 0.2, 0.6, 7, 3000
    design = pretraining.lu_design(d, rho)
    with jax.enable_x64(True):
        stored = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)[0], jnp.float64),
                                        pretraining.stored_prompts(design, [seed], P, n))
        best = np.asarray(_fit_ridge(stored, ridge))
        H = np.asarray(pretraining.features(stored))
    ev = np.linalg.eigvalsh(H.T @ H / P)
    span = ev[ev > 1e-9 * ev[-1]] + ridge / d
    step = 0.9 / span[-1]
    assert np.max(np.abs(1 - 2 * step * span)) ** steps < 1e-3 * GD_REL  # converged, in theory
    config = train.TrainConfig(steps=steps, batch_size=P, learning_rate=float(step), optimizer="sgd",
                               pretraining_prompts=P)
    fit = train.fit_sweep(pretraining.ReducedAttention(d), design, [n], [seed], config,
                          loss_fn=functools.partial(pretraining.ridge_objective, ridge=ridge))
    trained = np.asarray(fit.params["Gamma"][0, 0, 0], np.float64)
    gap = np.linalg.norm(trained - best) / np.linalg.norm(best)
    with jax.enable_x64(True):
        moved = [np.linalg.norm(np.asarray(_fit_ridge(stored, r)) - best) / np.linalg.norm(best)
                 for r in (ridge * d, ridge / d)]
    report(f"GD on the ridge objective, P = {P}: ||Gamma_GD - Gamma*|| / ||Gamma*|| = {gap:.2e} "
           f"(penalty x d or / d moves Gamma* by {min(moved):.2e})")
    assert gap < GD_REL and min(moved) > 100 * GD_REL
    assert float(fit.losses[0, 0, 0, -1]) == pytest.approx(float(_ridge_objective(stored, best, ridge)), rel=1e-5)


FLOAT64_FLOOR = 1e-11  # float64 rounding floors ||Gamma - Gamma*|| / ||Gamma*|| near eps * cond, ~3e-12 at cond 1e4


def test_heavy_ball_bound_is_optax_heavy_ball_on_each_eigendirection():
    """heavy_ball_bound(spectrum, lr, momentum, T) is, for each eigenvalue alone, |x_T / x_0| of optax's sgd with
    momentum from rest on 0.5 h x^2 (h = 2 lambda: the Hessian of the ridge objective is 2A), float64, 40 steps:
    inside, at and beyond the tuned range's edges, plain GD at momentum 0. Planted bugs caught: starting with a
    zero previous error instead of from rest, the bare rate^T, the other row of the recursion's matrix."""
    spectrum = np.array([0.01, 0.05, 0.3, 1.0, 1.6])
    lr, beta = pretraining.heavy_ball([spectrum[[0, 3]]], 0.9)  # tuned on [0.01, 1 / 0.9]: 0.3 inside, 1.6 beyond L
    with jax.enable_x64(True):
        for lam in spectrum:
            for step, mom in ((lr, beta), (0.4, 0.0)):
                opt = optax.sgd(step, momentum=mom or None)
                x = jnp.array(1.0, jnp.float64)
                state = opt.init(x)
                for _ in range(40):
                    updates, state = opt.update(2 * lam * x, state, x)
                    x = x + updates
                bound = pretraining.heavy_ball_bound([lam], step, mom, 40)
                assert bound == pytest.approx(abs(float(x)), rel=1e-10, abs=1e-300), (lam, mom)
    assert pretraining.heavy_ball_bound(spectrum, lr, beta, 40) == max(
        pretraining.heavy_ball_bound([lam], lr, beta, 40) for lam in spectrum)


def test_heavy_ball_on_the_ridge_objective_reaches_fit_ridge_far_sooner_than_gradient_descent():
    """Heavy ball (``TrainConfig(optimizer="sgd", momentum=...)``) tuned from the span's spectrum as
    pretraining_tau tunes it (``pretraining.heavy_ball``: Hessian 2A in [mu, L / step_fraction]) ends at
    ``fit_ridge``'s solution on the stored set (same fixed point), float64, within ``pretraining.heavy_ball_bound``,
    which lies between rate^steps and
    (1 + (1 + rate) steps) rate^steps (rate = sqrt(momentum); docs/theory.md §12); momentum 0 gives plain GD's
    bound max |1 - lr h|^steps. Near the threshold (P = 11, d(d+1) = 12, condition number 1e4 on the span) plain
    GD at its best step 2 / (mu + L) for the same [mu, L] is still far off after as many steps, and needs over 40
    times as many by its rate. Planted bugs caught: momentum ignored by the optimizer (plain GD at heavy ball's
    step diverges), the step tuned from A's eigenvalues instead of the Hessian's (twice too long), a
    bound on A's eigenvalues instead of the Hessian's (momentum 0 must give GD's)."""
    d, n, rho, ridge, seed, P, steps = 3, 4, 0.2, 1e-3, 7, 11, 2000
    design = pretraining.lu_design(d, rho)
    with jax.enable_x64(True):
        stored = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)[0], jnp.float64),
                                        pretraining.stored_prompts(design, [seed], P, n, jnp.float64))
        best = np.asarray(_fit_ridge(stored, ridge))
        H = np.asarray(pretraining.features(stored))
    span = pretraining.span_spectrum(H, ridge)
    lr, beta = pretraining.heavy_ball([span], 0.9)
    big, small = 2 * span[-1] / 0.9, 2 * span[0]  # the Hessian's tuned range [mu, L]
    assert big / small > 1e4
    rate = np.sqrt(beta)
    assert rate == pytest.approx((np.sqrt(big / small) - 1) / (np.sqrt(big / small) + 1), rel=1e-12)
    bound = pretraining.heavy_ball_bound(span, lr, beta, steps)
    assert rate**steps <= bound <= (1 + (1 + rate) * steps) * rate**steps and bound < 1e-10
    gd_step = 2 / (small + big)
    gd_bound = pretraining.heavy_ball_bound(span, gd_step, 0.0, steps)
    assert gd_bound == pytest.approx(np.max(np.abs(1 - gd_step * 2 * span)) ** steps, rel=1e-9)
    gaps = {}
    for name, step, momentum in (("heavy ball", lr, beta), ("GD", gd_step, 0.0)):
        config = train.TrainConfig(steps=steps, batch_size=P, learning_rate=float(step), optimizer="sgd",
                                   momentum=momentum, pretraining_prompts=P, dtype=jnp.float64)
        fit = train.fit_sweep(pretraining.ReducedAttention(d, dtype=jnp.float64), design, [n], [seed], config,
                              loss_fn=functools.partial(pretraining.ridge_objective, ridge=ridge))
        gaps[name] = np.linalg.norm(np.asarray(fit.params["Gamma"][0, 0, 0]) - best) / np.linalg.norm(best)
    gd_needs = np.log(bound) / np.log((big / small - 1) / (big / small + 1))
    report(f"heavy ball vs GD on the ridge objective (P = {P}, cond {big / small:.2e}), {steps} steps: gap "
           f"{gaps['heavy ball']:.2e} (bound {bound:.2e}) vs GD {gaps['GD']:.2e} (bound {gd_bound:.2e}); GD needs "
           f"{gd_needs:.0f} steps for the same bound")
    assert gaps["heavy ball"] <= bound + FLOAT64_FLOOR and gaps["GD"] <= gd_bound
    assert gaps["GD"] > 1e-2 and gd_needs > 40 * steps


def test_heavy_ball_tuning_refuses_bad_arguments_by_name():
    """span_spectrum, heavy_ball and heavy_ball_bound name the argument and its allowed range: features without
    d(d+1) columns, a negative ridge, no spectrum or a nonpositive eigenvalue, a step fraction outside (0, 1), a
    nonpositive learning rate, momentum outside [0, 1), a fractional or negative step count. The spectrum of
    features of rank r has r eigenvalues, each shifted by ridge / d."""
    H = np.random.default_rng(0).normal(size=(5, 12))  # d = 3, rank 5 < 12
    span = pretraining.span_spectrum(H, 0.3)
    np.testing.assert_allclose(span, np.linalg.eigvalsh(H @ H.T / 5) + 0.1, rtol=1e-10)
    for call, name in ((lambda: pretraining.span_spectrum(H[:, :11], 0.3), "d\\(d\\+1\\) columns"),
                       (lambda: pretraining.span_spectrum(H, -1.0), "ridge"),
                       (lambda: pretraining.heavy_ball([], 0.9), "spectra"),
                       (lambda: pretraining.heavy_ball([span, -span], 0.9), "spectra"),
                       (lambda: pretraining.heavy_ball([span], 1.0), "step_fraction"),
                       (lambda: pretraining.heavy_ball_bound(span, 0.0, 0.5, 10), "learning_rate"),
                       (lambda: pretraining.heavy_ball_bound(span, 0.1, 1.0, 10), "momentum"),
                       (lambda: pretraining.heavy_ball_bound(span, 0.1, 0.5, -1), "steps"),
                       (lambda: pretraining.heavy_ball_bound([], 0.1, 0.5, 10), "spectrum must hold"),
                       (lambda: pretraining.span_spectrum(np.zeros((5, 12)), 0.0), "no nonzero feature")):
        with pytest.raises(ValueError, match=name):
            call()
    with pytest.raises(TypeError, match="steps"):
        pretraining.heavy_ball_bound(span, 0.1, 0.5, 10.5)
    with pytest.raises(TypeError, match="a list of spectra"):
        pretraining.heavy_ball(span, 0.9)


def _ridge_objective(prompts, gamma, ridge):
    """fit_ridge's objective written out: (1/P) sum (y/sqrt(d) - <Gamma, H>)^2 + (ridge/d) ||Gamma||_F^2."""
    d = gamma.shape[0]
    H = np.asarray(pretraining.features(prompts))
    return np.mean((np.asarray(prompts.y_query) / np.sqrt(d) - H @ gamma.ravel()) ** 2) + ridge / d * np.sum(gamma**2)


def test_reduced_attention_predicts_as_its_attention_form():
    """ReducedAttention with Gamma predicts sqrt(d) <Gamma, H> (iclsim units), which is LinearAttention with
    ``attention_params(Gamma)``; it starts at Gamma = 0 and refuses a bad dim by name."""
    d, n = 4, 6
    rng = np.random.default_rng(0)
    gamma = rng.normal(size=(d, d + 1))
    model = pretraining.ReducedAttention(d, dtype=jnp.float64)

    @jax.jit  # one program (eager, each operation compiles on its own)
    def predictions(gamma):
        p = TaskPool(d, 3, noise_var=0.5, pool_seed=0).sample(jax.random.PRNGKey(1), 32, n, jnp.float64)
        attention = models.LinearAttention(d, dtype=jnp.float64).apply(pretraining.attention_params(gamma, jnp.float64),
                                                                        p)
        return p, model.apply({"Gamma": gamma}, p), attention, model.init(jax.random.PRNGKey(0))["Gamma"]

    with jax.enable_x64(True):
        p, mine, attention, start = predictions(jnp.asarray(gamma))
    mine, attention = np.asarray(mine), np.asarray(attention)
    assert not np.any(np.asarray(start))
    H = np.einsum("bi,bj->bij", np.asarray(p.x), np.concatenate(
        [np.einsum("bni,bn->bi", np.asarray(p.X), np.asarray(p.y)) / n,
         np.sum(np.asarray(p.y) ** 2, axis=1, keepdims=True) / (n * d)], axis=1)) / np.sqrt(d)
    np.testing.assert_allclose(mine, np.sqrt(d) * np.einsum("bij,ij->b", H, gamma), rtol=1e-10)
    np.testing.assert_allclose(mine, attention, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="dim"):
        pretraining.ReducedAttention(0)


def test_pretraining_tau_refuses_trained_settings_it_cannot_compare_and_reads_axes_from_the_fits():
    """The experiment's trained networks are compared with the fresh-task curve at each of their d: train_dims
    empty, repeated or with a d not among dims, fresh_tasks off, or a step fraction / gate tolerance outside (0, 1)
    is a RunError naming the setting (and for train_dims the allowed dims), raised before any fit; train_dims at
    every d of dims or a subset is accepted; its summary and plot take kappa and d from the closed-form rows only.
    Planted bugs caught: the trained rows' d read as a curve's d (summary and plot crashed on an empty curve); only
    train_dims[0] checked against dims."""
    import dataclasses
    import re
    import sys

    from iclsim.registry import RunContext
    from iclsim.runner import RunError
    from tests.quick import EXPERIMENTS

    study = sys.modules[EXPERIMENTS["pretraining_tau"].run.__module__]
    quick = EXPERIMENTS["pretraining_tau"].quick
    context = RunContext(progress=lambda line: None)
    d = quick.dims[0]
    allowed = "train_dims.*dims = " + re.escape(str(quick.dims))
    for change, name in (({"train_dims": (d + 1,)}, allowed), ({"train_dims": (d, d + 1)}, allowed),
                         ({"train_dims": ()}, allowed), ({"train_dims": (d, d)}, allowed),
                         ({"fresh_tasks": False}, "fresh_tasks"),
                         ({"step_fraction": 1.0}, "step_fraction"), ({"gate_tolerance": 0.0}, "gate_tolerance")):
        with pytest.raises(RunError, match=name):
            study.run(dataclasses.replace(quick, **change), 0, context)
    for train_dims in ((8, 12, 16), (16, 8), (12,)):
        study._check_training(dataclasses.replace(study.SETTINGS, train_dims=train_dims))
    study._check_training(dataclasses.replace(quick, train_dims=(d + 1,), train_taus=()))  # no networks, no check
    rows = [{"grid": "curve", "kappa": "0.5", "d": 6}, {"grid": "peak", "kappa": "inf", "d": 12},
            {"grid": "trained", "kappa": "inf", "d": 8}]
    assert study._axes(rows) == (["0.5", "inf"], [6, 12])
