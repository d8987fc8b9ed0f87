"""Paper B's trajectory bound (iclsim.bound, docs/theory.md §6.2) against a hand computation of its formula, its
invariances, the deleted layer, the rank of a truncated step, and wrong setups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclsim import IID, bound, models, pruning
from iclsim.designs import Prompts

D, N = 4, 12


class FixedContexts:
    """A test double for a design: the same handful of contexts for every key, so the bound can be recomputed
    by hand on exactly those contexts. The referee draws whole blocks: the first rows of each block are the
    contexts, the rest repeat them (a count of at most the handful reads only the first rows of block 0)."""

    def __init__(self, X, y):
        self.dim = X.shape[-1]
        self.X, self.y = X, y

    def sample(self, key, batch, n, dtype=jnp.float32):
        assert batch >= self.X.shape[0] and n == self.X.shape[1]
        rows = np.arange(batch) % self.X.shape[0]
        zeros = jnp.zeros((batch, self.dim), dtype)
        return Prompts(jnp.asarray(self.X[rows], dtype), jnp.asarray(self.y[rows], dtype), zeros, jnp.zeros(batch, dtype))


def _contexts(count=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((count, N, D))
    beta = rng.standard_normal((count, D))
    y = np.einsum("bnd,bd->bn", X, beta) + 0.3 * rng.standard_normal((count, N))
    return X, y


def _network(factors):
    """A GD-form network from per-layer (Wq, Wk, w_v)."""
    return {"layers": [{"attn": {"Wq": jnp.asarray(q, jnp.float32), "Wk": jnp.asarray(k, jnp.float32),
                                 "w_v": jnp.asarray(v, jnp.float32)}} for q, k, v in factors]}


def _by_hand(factors, X, y):
    """Theorem 2, Lemma 6 and Example 1 terms per layer from the formula of docs/theory.md §6.2, one context at a
    time in numpy float64: the update's support from the SVD of Gamma, the noise covariance Cov(g_i) / n of the
    per-demonstration gradients g_i = Gamma x_i r_i on that support, its log pseudo-determinant, and
    p log((A + tr C) / p) - log pdet C; a zero step adds 0."""
    factors = [(np.asarray(q, np.float64), np.asarray(k, np.float64), float(v)) for q, k, v in
               [(np.asarray(q, np.float32), np.asarray(k, np.float32), np.float32(v)) for q, k, v in factors]]
    out = np.zeros((3, len(factors)))
    for Xc, yc in zip(X, y):
        w = np.zeros(D)
        for t, (Wq, Wk, wv) in enumerate(factors):
            gamma = -wv * Wq @ Wk.T
            r = yc - Xc @ w
            U, s, _ = np.linalg.svd(gamma)
            p = int(np.sum(s > 1e-5 * s[0])) if s[0] > 0 else 0
            if p:
                basis = U[:, :p]
                g = np.array([basis.T @ gamma @ (x * ri) for x, ri in zip(Xc, r)])  # [n, p]
                G = g.mean(axis=0)
                C = (g.T @ g / N - np.outer(G, G)) / N
                _, logdet = np.linalg.slogdet(C)
                carry = D + 1 + w @ w
                factor = (abs(wv) * np.mean([abs(ri) * np.linalg.norm(Wk.T @ x) for x, ri in zip(Xc, r)])
                          * np.linalg.norm(Wq)) ** 2
                for form, A in enumerate((G @ G * carry, G @ G, factor * carry)):
                    out[form, t] += (p * np.log((A + np.trace(C)) / p) - logdet) / len(X)
            w = w + gamma @ (Xc.T @ r) / N
    return out


_DOUBLES: dict = {}


def _fixed(X, y):
    """One ``FixedContexts`` per (X, y) for the whole module: the bound compiles a test double into its program
    (a static argument, compared by identity), so the tests share one program per layer count."""
    return _DOUBLES.setdefault((X.tobytes(), y.tobytes()), FixedContexts(X, y))


def _gd(steps):
    return [(np.sqrt(s) * np.eye(D), np.sqrt(s) * np.eye(D), -1.0) for s in steps]


def _random_layers(L, seed):
    rng = np.random.default_rng(seed)
    return [(np.eye(D) * 0.7 + 0.3 * rng.standard_normal((D, D)), np.eye(D) * 0.7 + 0.3 * rng.standard_normal((D, D)),
             -1.0 + 0.2 * rng.standard_normal()) for _ in range(L)]


def _bound(factors, X, y):
    return bound.trajectory_bound(models.LinearTransformer(D, len(factors)), _network(factors), _fixed(X, y),
                                  N, jax.random.PRNGKey(0), X.shape[0])


@pytest.mark.parametrize("factors", [_gd([0.3, 0.8, 1.7]), _random_layers(3, 1),
                                     # a rank-2 step: the update lives in 2 dimensions
                                     [(np.diag([1.0, 0.8, 0, 0]), np.diag([0.5, 1.2, 0, 0]), -1.0)] + _gd([0.6, 1.1])])
def test_terms_match_the_formula_by_hand(factors):
    """Every per-layer term of the three forms, and the totals sqrt(sum / n), equal the hand computation on the
    same contexts to 1e-9. Planted bugs caught: the noise covariance without its 1/n, residuals not updated
    between layers (later terms read y instead of y - X w_{t-1}), Theorem 2's carry ||I + W_{t-1}||_F^2 left
    out or computed as d + ||w||^2, log det instead of the pseudo-determinant on a rank-2 step (-inf), the
    factor form with the sum of squares paper B writes instead of the square of the sum."""
    X, y = _contexts()
    b = _bound(factors, X, y)
    hand = _by_hand(factors, X, y)
    np.testing.assert_allclose(b.terms, hand[0], rtol=1e-9)
    np.testing.assert_allclose(b.lemma_terms, hand[1], rtol=1e-9)
    np.testing.assert_allclose(b.factor_terms, hand[2], rtol=1e-9)
    np.testing.assert_allclose(b.bound, np.sqrt(hand[0].sum() / N), rtol=1e-9)
    np.testing.assert_allclose(b.factor_bound, np.sqrt(hand[2].sum() / N), rtol=1e-9)
    assert b.terms.dtype == np.float64


def test_rank_of_a_truncated_step_is_the_support():
    """Truncating a layer's Wq, Wk to rank k (paper B's operator) leaves an update of dimension k (the float32
    factors' discarded directions leave singular values ~1e-16 of the product); a genuine direction 1e-3 times
    the largest still counts. Planted bugs caught: a support counted from the factors' width (then the log det
    of a singular covariance: nan), a tolerance so loose it drops a real direction."""
    model = models.LinearTransformer(D, 2)
    params = _network(_random_layers(2, 3))
    X, y = _contexts()
    for k in (1, 2, 3):
        b = bound.trajectory_bound(model, pruning.prune(params, 0, "attn", rank=k), _fixed(X, y), N,
                                   jax.random.PRNGKey(0), X.shape[0])
        assert b.support.tolist() == [k, D]
        assert np.all(np.isfinite(b.terms))
    weak = [(np.diag([1.0, 0.9, 0.8, 1e-3]), np.eye(D), -1.0)] + _gd([0.7])
    b = _bound(weak, X, y)
    assert b.support.tolist() == [D, D]
    np.testing.assert_allclose(b.terms, _by_hand(weak, X, y)[0], rtol=1e-9)


def test_a_layers_own_term_ignores_its_step_size():
    """Scaling layer t's step (w_v -> c w_v) leaves its own term unchanged in every form (G_t and C_t scale
    together: the mutual information is scale-free) and changes the later layers' terms through the residuals.
    Planted bug caught: the noise covariance not built from the same Gamma as the gradient (then the term grows
    with c like a norm)."""
    X, y = _contexts()
    factors = _random_layers(3, 2)
    scaled = [factors[0], (factors[1][0], factors[1][1], 2.5 * factors[1][2]), factors[2]]
    a, b = _bound(factors, X, y), _bound(scaled, X, y)
    for part in ("terms", "lemma_terms", "factor_terms"):
        np.testing.assert_allclose(getattr(b, part)[:2], getattr(a, part)[:2], rtol=1e-9)
        assert abs(getattr(b, part)[2] - getattr(a, part)[2]) > 1e-3


def test_invariant_forms_ignore_the_factorisation_and_the_factor_form_does_not():
    """Wq -> c Wq, Wk -> Wk / c keeps every form (the factor norms enter as the product ||Wk x|| ||Wq||_F);
    Wq -> Wq A, Wk -> Wk A^{-T} (the same Gamma, the same network) keeps Theorem 2 and Lemma 6 but moves
    Example 1's factor-norm form. Planted bug caught: the invariant form computed from factor norms."""
    X, y = _contexts()
    factors = _random_layers(2, 4)
    A = np.diag([3.0, 1 / 3.0, 1.0, 2.0])
    rescaled = [(4.0 * q, k / 4.0, v) for q, k, v in factors]
    mixed = [(q @ A, k @ np.linalg.inv(A).T, v) for q, k, v in factors]
    base, c, m = _bound(factors, X, y), _bound(rescaled, X, y), _bound(mixed, X, y)
    for part in ("terms", "lemma_terms", "factor_terms"):
        np.testing.assert_allclose(getattr(c, part), getattr(base, part), rtol=1e-5)
    np.testing.assert_allclose(m.terms, base.terms, rtol=1e-5)
    np.testing.assert_allclose(m.lemma_terms, base.lemma_terms, rtol=1e-5)
    assert np.all(np.abs(m.factor_terms - base.factor_terms) > 1e-2)


def test_a_deleted_layer_adds_nothing_and_the_rest_is_the_shorter_trajectory():
    """Deleting layer 2 of 3 (w_v = 0): its term is 0 (paper B, Appendix B.6) in every form, and layers 1 and 3
    give exactly the terms of the 2-layer network without it. Planted bugs caught: a zero step given the
    -log det of a zero covariance (inf or nan), a deleted layer that still moves the residuals."""
    X, y = _contexts()
    factors = _random_layers(3, 5)
    deleted = pruning.apply_candidate(_network(factors), pruning.Candidate(1, "attn", None, "delete"))
    b = bound.trajectory_bound(models.LinearTransformer(D, 3), deleted, _fixed(X, y), N,
                               jax.random.PRNGKey(0), X.shape[0])
    short = _bound([factors[0], factors[2]], X, y)
    assert b.support.tolist() == [D, 0, D]
    for part in ("terms", "lemma_terms", "factor_terms"):
        assert getattr(b, part)[1] == 0.0
        np.testing.assert_allclose(getattr(b, part)[[0, 2]], getattr(short, part), rtol=1e-9)


def test_networks_axis_and_keys_pair_the_networks():
    """A leading network axis gives each network's single-network bound; one key puts every network on the same
    contexts, per-network keys on their own. Planted bug caught: networks of a batch mixed up or all scored as
    the first one."""
    model = models.LinearTransformer(D, 2)
    nets = [_network(_gd([0.4, 1.2])), _network(_random_layers(2, 6)), _network(_random_layers(2, 7))]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *nets)
    design = IID(D, noise_var=0.1)
    key = jax.random.PRNGKey(3)
    together = bound.trajectory_bound(model, stacked, design, N, key, 64)
    for i, net in enumerate(nets):
        alone = bound.trajectory_bound(model, net, design, N, key, 64)
        np.testing.assert_allclose(together.terms[i], alone.terms, rtol=1e-10)
    keys = np.stack([np.asarray(jax.random.PRNGKey(s)) for s in (3, 4, 5)])
    own = bound.trajectory_bound(model, stacked, design, N, keys, 64)
    np.testing.assert_allclose(own.terms[0], together.terms[0], rtol=1e-10)
    assert np.all(np.abs(own.terms[1:] - together.terms[1:]) > 0)


def test_monte_carlo_mean_settles():
    """On GD with steps (0.5, 1.0) the Monte Carlo means over 250 contexts from two keys agree within 4 standard
    errors, the SE taken from the spread of 16 independent 250-context means (two independent estimates of the
    same expectation; one context count: one compiled program). Planted bug caught: a key ignored or contexts
    drawn once and reused for every key (then the estimates are identical, which this test also rejects)."""
    model = models.LinearTransformer(D, 2)
    design = IID(D, noise_var=0.1)
    net = _network(_gd([0.5, 1.0]))
    a = bound.trajectory_bound(model, net, design, N, jax.random.PRNGKey(0), 250)
    b = bound.trajectory_bound(model, net, design, N, jax.random.PRNGKey(1), 250)
    small = np.array([bound.trajectory_bound(model, net, design, N, jax.random.PRNGKey(10 + i), 250).terms
                      for i in range(16)])
    se = small.std(axis=0, ddof=1) * np.sqrt(2)
    assert np.all(np.abs(a.terms - b.terms) <= 4 * se), (a.terms, b.terms, se)
    assert np.all(a.terms != b.terms)


def test_wrong_setups_name_the_argument():
    """A full-form model, n < 2, a key per network of the wrong count and a design of another dimension are
    refused with the argument named."""
    model = models.LinearTransformer(D, 2)
    net = _network(_gd([0.4, 1.2]))
    design = IID(D, noise_var=0.1)
    with pytest.raises(ValueError, match="form='gd'"):
        bound.trajectory_bound(models.LinearTransformer(D, 2, form="full"), net, design, N, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="n must"):
        bound.trajectory_bound(model, net, design, 1, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="num_contexts"):
        bound.trajectory_bound(model, net, design, N, jax.random.PRNGKey(0), 0)
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), net, net)
    with pytest.raises(ValueError, match="key must"):
        bound.trajectory_bound(model, stacked, design, N, np.zeros((3, 2), np.uint32))
    with pytest.raises(ValueError, match="dimension"):
        bound.trajectory_bound(model, net, IID(D + 1), N, jax.random.PRNGKey(0))
