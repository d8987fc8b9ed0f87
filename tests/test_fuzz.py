"""Fuzz the boundary (issue 20, finding 5): hypothesis draws bad values (wrong types, non-finite, out of
range, wrong shapes) for every public constructor of designs and every public function of theory, and
each must raise ValueError or TypeError naming the argument. Before this, many of them returned a
plausible number (a vector risk, a NaN Gram matrix, a negative risk) or failed deep inside numpy with
no name. No training, few examples per strategy: fast. The corrupted-cache, concurrent-writers and
interrupted-run tests of the issue live in tests/test_trust.py (the runner's result sets)."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iclsim import IID, RAG, Drift, TaskFeatureAlignment, TaskPool, designs, gram, theory

FUZZ = settings(max_examples=12, deadline=None, derandomize=True)
KEY = jax.random.PRNGKey(0)

not_numbers = st.sampled_from(["1", "a", None, [1, "x"], {"a": 1}, object(), b"1"])
non_finite = st.sampled_from([float("nan"), float("inf"), -float("inf")])
fractional = st.floats(0.01, 50.0).filter(lambda x: x != int(x))


def bad_ints(minimum=1, maximum=None):
    """Not an integer >= minimum (and <= maximum): other types, bools, floats, out of range."""
    out = [not_numbers, st.booleans(), fractional, non_finite, st.floats(1.0, 4.0).map(float),
           st.integers(-10**6, minimum - 1)]
    if maximum is not None:
        out.append(st.integers(maximum + 1, maximum + 10**6))
    return st.one_of(*out)


def bad_reals(low=None, high=None):
    """Not a finite number in [low, high]."""
    out = [not_numbers, non_finite, st.just(np.array([0.1, 0.2]))]
    if low is not None:
        out.append(st.floats(low - 100, low, exclude_max=True, allow_nan=False))
    if high is not None:
        out.append(st.floats(high, high + 100, exclude_min=True, allow_nan=False))
    return st.one_of(*out)


def bad_variances(length=None):
    out = [not_numbers, non_finite, st.floats(-100, -1e-6), st.just(np.ones((2, 2))), st.just([])]
    if length is not None:
        out.append(st.integers(1, 6).filter(lambda k: k != length).map(lambda k: np.full(k, 0.1)))
    return st.one_of(*out)


@st.composite
def bad_matrices(draw, d):
    """Not a d x d symmetric positive definite matrix."""
    kind = draw(st.sampled_from(["shape", "nan", "asym", "indef", "type", "zero"]))
    if kind == "shape":
        k = draw(st.integers(1, d + 2).filter(lambda k: k != d))
        return np.eye(k)
    if kind == "nan":
        m = np.eye(d)
        m[draw(st.integers(0, d - 1)), draw(st.integers(0, d - 1))] = draw(non_finite)
        return m
    if kind == "asym":
        m = np.eye(d)
        m[0, d - 1] += draw(st.floats(0.1, 2.0))
        return m
    if kind == "indef":
        m = np.eye(d)
        m[0, 0] = -draw(st.floats(1e-3, 10.0))
        return m
    if kind == "zero":
        return np.zeros((d, d))
    return draw(not_numbers)


def refused(call, *names):
    """call() raises ValueError or TypeError whose message names one of ``names``."""
    with pytest.raises((ValueError, TypeError)) as err:
        call()
    message = str(err.value)
    assert any(name in message for name in names), f"{message!r} names none of {names}"


# ---- designs ----

@FUZZ
@given(bad_ints())
def test_dim_is_checked_by_every_design(dim):
    for make in (lambda: IID(dim), lambda: RAG(dim, 0.3), lambda: TaskFeatureAlignment(dim, 0.3),
                 lambda: Drift(dim, [0.5]), lambda: TaskPool(dim, 4), lambda: RAG.marginal_isotropic(dim, 0.3),
                 lambda: Drift.ar1(dim, 3, 0.5)):
        refused(make, "dim")


@FUZZ
@given(bad_matrices(3), st.sampled_from(["cov_x", "cov_beta"]))
def test_iid_covariances(matrix, name):
    refused(lambda: IID(3, **{name: matrix}), name)


@FUZZ
@given(bad_variances(), st.sampled_from(["noise_var", "query_noise_var"]))
def test_iid_noise(noise, name):
    kwargs = {name: noise} if name == "noise_var" else {"noise_var": 0.1, name: noise}
    refused(lambda: IID(3, **kwargs), name)


@FUZZ
@given(bad_reals(-1.0, 1.0), bad_reals(0.0), bad_variances())
def test_rag_and_alignment(alpha, gamma, noise):
    refused(lambda: RAG(3, alpha), "alpha")
    refused(lambda: TaskFeatureAlignment(3, alpha), "alpha")
    refused(lambda: RAG.marginal_isotropic(3, alpha), "alpha")
    if not (isinstance(gamma, float) and gamma == 0.0):
        refused(lambda: RAG(3, 0.3, gamma=gamma), "gamma")
    refused(lambda: RAG(3, 0.3, noise_var=noise), "noise_var")
    refused(lambda: TaskFeatureAlignment(3, 0.3, noise_var=noise), "noise_var")


@FUZZ
@given(st.one_of(not_numbers, st.just([]), st.just([[0.5]]), st.just([0.5, np.nan]), st.just([0.5, 1.5])),
       bad_variances(length=2), bad_variances())
def test_drift(rho, noise, query_noise):
    refused(lambda: Drift(3, rho), "rho")
    refused(lambda: Drift(3, [0.5, 0.5], noise_var=noise, query_noise_var=0.1), "noise_var")
    refused(lambda: Drift(3, [0.5, 0.5], query_noise_var=query_noise), "query_noise_var")
    refused(lambda: Drift(3, [0.5, 0.5], query_noise_var=[0.1, 0.2]), "query_noise_var")
    refused(lambda: Drift(3, [0.5, 0.5], corr=np.full((2, 2), np.nan)), "corr")
    refused(lambda: Drift(3, [0.5, 0.5], corr=np.eye(3)), "corr")


@FUZZ
@given(bad_ints(), bad_reals(0.0, 1.0))
def test_drift_ar1(n, g):
    refused(lambda: Drift.ar1(3, n, 0.5), "n")
    refused(lambda: Drift.ar1(3, 4, g), "g")


@FUZZ
@given(bad_ints(), bad_ints(minimum=0), bad_variances())
def test_task_pool(num_tasks, pool_seed, noise):
    refused(lambda: TaskPool(3, num_tasks), "num_tasks")
    refused(lambda: TaskPool(3, 4, pool_seed=pool_seed), "pool_seed")
    refused(lambda: TaskPool(3, 4, noise_var=noise), "noise_var")


@FUZZ
@given(bad_ints(), bad_ints())
def test_sampling(n, batch):
    for design in (IID(2), RAG(2, 0.3), TaskFeatureAlignment(2, 0.3), TaskPool(2, 3)):
        refused(lambda: design.sample(KEY, 4, n), "n")
        refused(lambda: design.sample(KEY, batch, 3), "batch")
    refused(lambda: gram.sample_gram(IID(2), KEY, 4, n, 8), "n")
    refused(lambda: gram.sample_gram(IID(2), KEY, batch, 3, 8), "batch")
    refused(lambda: gram.sample_gram(IID(2), KEY, 4, 9, 8), "n")  # more pairs than slots
    refused(lambda: gram.bartlett_factor(KEY, batch, 3, 2), "batch")


# ---- theory ----

CLOSED = {  # every public function of theory that takes a design and n (designs of dim 2)
    "pgd_moments": lambda d, n: theory.pgd_moments(d, n),
    "pgd_risk": lambda d, n: theory.pgd_risk(d, n, np.eye(2)),
    "attention_risk": lambda d, n: theory.attention_risk(d, n, np.eye(3), np.ones(3)),
    "optimal_pgd": lambda d, n: theory.optimal_pgd(d, n),
    "optimal_wpgd": lambda d, n: theory.optimal_wpgd(d, n),
    "lowrank_optimal_pgd": lambda d, n: theory.lowrank_optimal_pgd(d, n, 1),
    "lowrank_optimal_risk": lambda d, n: theory.lowrank_optimal_risk(d, n, 1),
    "lora_optimal_pgd": lambda d, n: theory.lora_optimal_pgd(d, n, np.eye(2), 1),
    "lora_optimal_risk": lambda d, n: theory.lora_optimal_risk(d, n, np.eye(2), 1),
    "ground_truth": lambda d, n: theory.ground_truth(d, n, KEY, 100),
    "monte_carlo_risk": lambda d, n: theory.monte_carlo_risk(theory.pgd_predict(np.eye(2)), d, n, KEY, 100),
}


@FUZZ
@given(st.one_of(bad_ints(maximum=2**53), st.integers(2**53 + 1, 2**70)))
def test_context_length_everywhere(n):
    for name, call in CLOSED.items():
        refused(lambda: call(IID(2), n), "n")
    refused(lambda: theory.rag_effective_risk(RAG(3, 0.2), n), "n")


@FUZZ
@given(st.one_of(not_numbers, st.integers(), st.just(np.eye(2))))
def test_design_type_everywhere(design):
    for name, call in CLOSED.items():
        refused(lambda: call(design, 3), "design", name, "closed form")
    refused(lambda: theory.rag_effective_risk(design, 3), "rag_effective_risk")
    refused(lambda: theory.effective_sample_multiplier(design), "effective_sample_multiplier")


@st.composite
def bad_square(draw, d):
    kind = draw(st.sampled_from(["shape", "nan", "type"]))
    if kind == "shape":
        return np.eye(draw(st.integers(1, d + 2).filter(lambda k: k != d)))
    if kind == "nan":
        m = np.eye(d)
        m[draw(st.integers(0, d - 1)), draw(st.integers(0, d - 1))] = draw(non_finite)
        return m
    return draw(not_numbers)


@FUZZ
@given(bad_square(3), bad_square(4), bad_square(3))
def test_matrices(W, Q, W0):
    refused(lambda: theory.pgd_risk(IID(3), 4, W), "W")
    refused(lambda: theory.pgd_risk(Drift.ar1(3, 4, 0.5), 4, W), "W")
    refused(lambda: theory.attention_risk(IID(3), 4, Q, np.ones(4)), "Q")
    refused(lambda: theory.lora_optimal_pgd(IID(3), 4, W0, 1), "W0")
    refused(lambda: theory.lora_optimal_risk(IID(3), 4, W0, 1), "W0")
    if not (isinstance(W, np.ndarray) and np.all(np.isfinite(W))):  # pgd_predict takes any finite square W
        refused(lambda: theory.pgd_predict(W), "W")
    refused(lambda: theory.pgd_predict(np.ones((2, 3))), "W")


@FUZZ
@given(st.one_of(not_numbers.filter(lambda x: x is not None), st.just(np.ones(3)), st.just(np.ones(5)), st.just(np.array([1.0, np.nan, 1.0, 1.0]))))
def test_weights_and_value_vector(weights):
    refused(lambda: theory.pgd_risk(IID(3), 4, np.eye(3), weights), "weights")
    refused(lambda: theory.pgd_moments(IID(3), 4, weights), "weights")
    refused(lambda: theory.attention_risk(IID(3), 4, np.eye(4), weights), "v")


@FUZZ
@given(st.one_of(not_numbers, st.booleans(), fractional, st.integers(-100, -1), st.integers(4, 100)))
def test_ranks(rank):
    for fn in (theory.lowrank_optimal_pgd, theory.lowrank_optimal_risk):
        refused(lambda: fn(IID(3), 4, rank), "rank")
    for fn in (theory.lora_optimal_pgd, theory.lora_optimal_risk):
        refused(lambda: fn(IID(3), 4, np.eye(3), rank), "rank")


@FUZZ
@given(bad_ints(), bad_ints())
def test_monte_carlo_sizes(num_prompts, batch_size):
    predict = theory.pgd_predict(np.eye(2))
    refused(lambda: theory.monte_carlo_risk(predict, IID(2), 3, KEY, num_prompts), "num_prompts")
    refused(lambda: theory.monte_carlo_risk(predict, IID(2), 3, KEY, 100, batch_size), "batch_size")
    refused(lambda: theory.ground_truth(IID(2), 3, KEY, num_prompts), "num_prompts")
    refused(lambda: theory.mean_and_se(1.0, 2.0, num_prompts), "count")
    refused(lambda: theory.monte_carlo_risk("predict", IID(2), 3, KEY, 100), "predict")


@FUZZ
@given(bad_ints(), bad_reals(0.0), st.one_of(not_numbers, non_finite, st.floats(-10.0, 0.1)))
def test_iid_effective_n(dim, noise, risk):
    refused(lambda: theory.iid_effective_n(dim, 0.1, 1.0), "dim")
    refused(lambda: theory.iid_effective_n(3, noise, 1.0), "noise_var")
    refused(lambda: theory.iid_effective_n(3, 0.1, risk), "risk")
