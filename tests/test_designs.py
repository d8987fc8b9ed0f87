"""Samplers of THEORY section 1: shapes, dtypes, determinism, moments, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclsim import IID, RAG, Drift, TaskFeatureAlignment, designs, tokens, truncate_context
from tests.tolerance import MOMENT_RTOL, assert_within_se

ALL = [IID(3, noise_var=0.1), RAG(3, 0.4), RAG.marginal_isotropic(3, 0.5), TaskFeatureAlignment(3, 0.3, 0.2),
       Drift.ar1(3, 5, 0.8, 0.1)]


@pytest.mark.parametrize("design", ALL, ids=lambda d: type(d).__name__)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_shapes_dtypes_and_determinism(design, dtype, key):
    p = jax.jit(design.sample, static_argnums=(1, 2, 3))(key, 7, 5, dtype)
    assert p.X.shape == (7, 5, 3) and p.y.shape == (7, 5) and p.x.shape == (7, 3) and p.y_query.shape == (7,)
    assert all(a.dtype == dtype for a in p)
    q = jax.jit(design.sample, static_argnums=(1, 2, 3))(key, 7, 5, dtype)
    for a, b in zip(p, q):
        np.testing.assert_array_equal(a, b)
    Z = tokens(p)
    assert Z.shape == (7, 6, 4)
    np.testing.assert_array_equal(Z[:, :5, 3], p.y)
    np.testing.assert_array_equal(Z[:, 5, 3], 0.0)


def test_truncate_context_keeps_last_n(key):
    p = IID(2).sample(key, 4, 6)
    t = jax.jit(truncate_context)(p, 2)
    np.testing.assert_array_equal(t.X[:, :4], 0.0)
    np.testing.assert_array_equal(t.y[:, :4], 0.0)
    np.testing.assert_array_equal(t.X[:, 4:], p.X[:, 4:])


def _draw(design, key, batch, n):
    """design.sample(key, batch, n, float64) as one compiled program (run eagerly, every op of the sampler
    compiles a program of its own)."""
    return jax.jit(design.sample, static_argnums=(1, 2, 3))(key, batch, n, jnp.float64)


def _mc(samples):
    samples = np.asarray(samples, dtype=np.float64)
    return samples.mean(), samples.std(ddof=1) / np.sqrt(samples.size)


def test_iid_second_moments(key):
    cov_x = np.array([[2.0, 0.5], [0.5, 1.0]])
    cov_beta = np.array([[1.0, -0.3], [-0.3, 0.5]])
    design = IID(2, cov_x, cov_beta, noise_var=[0.1, 0.7], query_noise_var=0.3)
    p = _draw(design, key, 200_000, 2)
    assert_within_se(np.trace(cov_x @ cov_beta) + 0.3, *_mc(p.y_query**2), name="E[y^2] IID")
    assert_within_se(np.trace(cov_x @ cov_beta) + 0.7, *_mc(p.y[:, 1] ** 2), name="E[y_2^2] IID")
    assert_within_se(cov_x[0, 1], *_mc(p.X[:, 0, 0] * p.X[:, 0, 1]), name="cov_x[0,1]")


def test_rag_and_alignment_moments(key):
    p = _draw(RAG(4, 0.6, gamma=0.5), key, 100_000, 3)
    assert_within_se(0.6 * 4, *_mc(jnp.einsum("bd,bd->b", p.X[:, 0], p.x)), name="E[x_i.x] RAG")
    assert_within_se(0.36 * 4 + 0.25 * 4, *_mc(jnp.sum(p.X[:, 0] ** 2, -1)), name="E|x_i|^2 RAG")
    p = _draw(TaskFeatureAlignment(4, 0.5), key, 100_000, 3)
    # E[x_i . x_j] = alpha^2 E|beta|^2 for i != j
    assert_within_se(0.25 * 4, *_mc(jnp.einsum("bd,bd->b", p.X[:, 0], p.X[:, 1])), name="E[x_i.x_j] align")


def test_drift_task_correlations(key):
    """E[(x_i y_i).(x y)] = d rho_i and E[(x_i y_i).(x_j y_j)] = d P_ij (i != j)."""
    design = Drift.ar1(3, 4, 0.7)
    p = _draw(design, key, 200_000, 4)
    g = p.X * p.y[..., None]
    q = p.x * p.y_query[:, None]
    for i in range(4):
        assert_within_se(3 * design.rho[i], *_mc(jnp.sum(g[:, i] * q, -1)), name=f"drift rho_{i}")
    assert_within_se(3 * design.corr[0, 2], *_mc(jnp.sum(g[:, 0] * g[:, 2], -1)), name="drift P_02")


def test_stacked_designs_vmap(key):
    stacked = designs.stack([IID(2, noise_var=s) for s in (0.0, 1.0, 4.0)])
    ys = jax.jit(jax.vmap(lambda d: d.sample(key, 50_000, 3, jnp.float64).y_query))(stacked)
    np.testing.assert_allclose(np.mean(np.asarray(ys) ** 2, axis=1), [2.0, 3.0, 6.0], rtol=MOMENT_RTOL)


@pytest.mark.parametrize("make, message", [
    (lambda: IID(0), "dim must be an integer >= 1"),
    (lambda: IID(2, noise_var=-0.1), "noise_var must be finite and >= 0"),
    (lambda: IID(2, noise_var=[0.1, 0.2]), "query_noise_var is required"),
    (lambda: IID(2, cov_x=np.eye(3)), r"cov_x must have shape \(2, 2\)"),
    (lambda: IID(2, cov_x=[[1.0, 0.5], [0.0, 1.0]]), "cov_x must be symmetric"),
    (lambda: IID(2, cov_beta=[[1.0, 2.0], [2.0, 1.0]]), "cov_beta must be positive definite"),
    (lambda: IID(2, query_noise_var=-1.0), "query_noise_var must be finite and >= 0"),
    (lambda: RAG(2, 1.5), r"alpha must be in \[-1.0, 1.0\]"),
    (lambda: RAG(2, 0.5, gamma=0.0), "gamma must be > 0"),
    (lambda: RAG.marginal_isotropic(2, 1.0), r"alpha must be in \(-1, 1\)"),
    (lambda: TaskFeatureAlignment(2, -2.0), r"alpha must be in \[-1.0, 1.0\]"),
    (lambda: TaskFeatureAlignment(2, 0.5, noise_var=-1), "noise_var must be finite and >= 0"),
    (lambda: Drift(2, [1.2, 0.5]), r"rho must have entries in \[-1, 1\]"),
    (lambda: Drift(2, [0.5, 0.5], [[1.0, 0.2], [0.3, 1.0]]), "corr must be symmetric with a unit diagonal"),
    (lambda: Drift(2, [0.9, -0.9], [[1.0, 0.9], [0.9, 1.0]]), "valid correlation matrix"),
    (lambda: Drift(2, [0.5, 0.5], noise_var=[0.1, 0.2, 0.3]), "noise_var must have length 2"),
    (lambda: Drift.ar1(2, 3, 1.5), r"g must be in \[0.0, 1.0\]"),
    (lambda: IID(2).sample(jax.random.PRNGKey(0), 4, 0), "n must be an integer >= 1"),
    (lambda: IID(2, noise_var=[0.1, 0.2], query_noise_var=0.1).sample(jax.random.PRNGKey(0), 4, 3),
     "n must equal 2"),
    (lambda: Drift.ar1(2, 3, 0.5).sample(jax.random.PRNGKey(0), 4, 4), "n must equal 3"),
])
def test_bad_input_names_parameter(make, message):
    with pytest.raises(ValueError, match=message):
        make()
