"""Hypothesis strategies for designs with small d and n, so Monte Carlo checks stay fast."""

import numpy as np
from hypothesis import strategies as st

from iclsim import IID, RAG, Drift, TaskFeatureAlignment


@st.composite
def spd(draw, d):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d)) / np.sqrt(d)
    return A @ A.T + draw(st.floats(0.2, 1.0)) * np.eye(d)


variances = st.floats(0.0, 1.5)


@st.composite
def iid_designs(draw, max_dim=3, max_n=6, per_position=True):
    d = draw(st.integers(1, max_dim))
    n = draw(st.integers(1, max_n))
    cov_x = draw(st.one_of(st.none(), spd(d)))
    cov_beta = draw(st.one_of(st.none(), spd(d)))
    if per_position and draw(st.booleans()):
        noise = np.array(draw(st.lists(variances, min_size=n, max_size=n)))
        return IID(d, cov_x, cov_beta, noise, query_noise_var=draw(variances)), n
    return IID(d, cov_x, cov_beta, draw(variances)), n


@st.composite
def correlated_designs(draw, max_dim=3, max_n=6):
    d = draw(st.integers(1, max_dim))
    n = draw(st.integers(1, max_n))
    alpha = draw(st.floats(-1.0, 1.0))
    noise = draw(variances)
    kind = draw(st.sampled_from(["rag", "rag_gamma", "alignment"]))
    if kind == "rag":
        return RAG(d, alpha, noise_var=noise), n
    if kind == "rag_gamma":
        return RAG(d, alpha, gamma=draw(st.floats(0.3, 1.5)), noise_var=noise), n
    return TaskFeatureAlignment(d, alpha, noise), n


@st.composite
def drift_designs(draw, max_dim=3, max_n=6):
    d = draw(st.integers(1, max_dim))
    n = draw(st.integers(1, max_n))
    noise = draw(st.one_of(variances, st.lists(variances, min_size=n, max_size=n).map(np.array)))
    qn = draw(variances)
    if draw(st.booleans()):
        return Drift.ar1(d, n, draw(st.floats(0.0, 1.0)), noise, qn), n
    rho = np.array(draw(st.lists(st.floats(-1.0, 1.0), min_size=n, max_size=n)))
    return Drift(d, rho, None, noise, qn), n
