"""SVD pruning (paper B): truncation rank, untouched weights, search optimality, exact one-layer curve."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclsim import IID, models, pruning, theory
from iclsim.evaluate import evaluate
from tests.tolerance import assert_close, assert_within_se

F64 = jnp.float64


@pytest.mark.parametrize("shape", [(11, 11), (6, 3), (2, 9)])
@pytest.mark.parametrize("rate", pruning.DEFAULT_RATES)
def test_truncation_rank(shape, rate):
    W = np.random.default_rng(0).normal(size=shape)
    k = max(1, int(np.floor(min(shape) * (1 - rate))))
    assert pruning.kept_singular_values(shape, rate) == k
    T = np.asarray(pruning.svd_truncate(W, rate))
    assert np.linalg.matrix_rank(T, tol=1e-9) == k
    s = np.linalg.svd(W, compute_uv=False)
    assert_close(np.linalg.norm(W - T), np.sqrt(np.sum(s[k:] ** 2)), rtol=1e-9, atol=1e-12)  # Eckart-Young


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5])
def test_clipping_rate_outside_range(rate):
    with pytest.raises(ValueError, match=r"clipping_rate must be in \[0, 1\)"):
        pruning.svd_truncate(np.eye(3), rate)


def test_prune_touches_only_its_module(key):
    model = models.LinearTransformer(3, 3, form="full", mlp=True)
    params = jax.jit(model.init)(key)
    before = jax.tree_util.tree_map(np.array, params)
    pruned = pruning.prune(params, 1, "mlp", 0.5)
    for name in ("W_in", "W_out"):
        assert not np.array_equal(pruned["layers"][1]["mlp"][name], params["layers"][1]["mlp"][name])
    for layer in (0, 2):
        for module in ("attn", "mlp"):
            for name, w in params["layers"][layer][module].items():
                assert pruned["layers"][layer][module][name] is w
    for name, w in params["layers"][1]["attn"].items():
        assert pruned["layers"][1]["attn"][name] is w
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)  # input untouched
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\]"):
        pruning.prune(params, 3, "attn", 0.5)
    with pytest.raises(ValueError, match="module must be one of"):
        pruning.prune(params, 0, "ffn", 0.5)


def test_search_ties_go_to_the_unpruned_network(key):
    """A rank-1 W is unchanged by any truncation: every candidate ties on validation, so the first (the
    unpruned network) is chosen. Planted bug caught: ties broken towards the most pruned candidate."""
    model = models.PGD(3, dtype=F64)
    params = {"W": (jnp.outer(jnp.arange(1.0, 4.0, dtype=F64), jnp.ones(3, F64)) * 0.05)[None]}
    cands = [pruning.Candidate(0, "attn", None), pruning.Candidate(0, "attn", 2), pruning.Candidate(0, "attn", 1)]
    res = pruning.search(model, params, IID(3), 5, cands, key, jax.random.fold_in(key, 1), 1_000, 1_000)
    assert list(res.chosen) == [0]
    assert_close(res.test_after, res.test_before, rtol=1e-12)


@pytest.mark.parametrize("rate", [0.0, 0.5, 0.9])
def test_one_layer_exact_pruning_curve_matches_monte_carlo(rate, key):
    """Attention in PGD form: the pruned model's risk is L(W) of its effective W (4 SE)."""
    d, n = 4, 8
    rng = np.random.default_rng(3)
    model = models.LinearAttention(d, dtype=F64)
    Wq = np.zeros((d + 1, d + 1)); Wq[:d, :d] = rng.normal(size=(d, d)) / d
    Wv = np.zeros((d + 1, d + 1)); Wv[d, d] = 1.0
    params = {"Wq": jnp.asarray(Wq), "Wk": jnp.eye(d + 1, dtype=F64), "Wv": jnp.asarray(Wv)}
    pruned = pruning.prune(params, 0, "attn", rate)
    design = IID(d, noise_var=2.0)
    exact = theory.pgd_risk(design, n, model.effective_pgd(pruned, n).W)
    # the referee's program takes the parameters as arguments: one compile for every rate
    mean, se = evaluate(model, pruned, design, n, key, 100_000)
    assert_within_se(exact, mean, se, name=f"pruned one-layer attention xi={rate}")


def test_one_layer_transformer_is_one_gd_step(key):
    """von Oswald et al.: Wq = Wk = diag(I, 0), Wv = e_y e_y^T, Wo = I gives x^T X^T y / n."""
    d, n = 3, 7
    model = models.LinearTransformer(d, 1, form="full", dtype=F64)
    P = jnp.diag(jnp.asarray([1.0] * d + [0.0], F64))
    E = jnp.zeros((d + 1, d + 1), F64).at[d, d].set(1.0)
    params = {"layers": [{"attn": {"Wq": P, "Wk": P, "Wv": E, "Wo": jnp.eye(d + 1, dtype=F64)}}]}

    @jax.jit
    def both(params, key):  # one program, where eager calls compile one per operation
        p = IID(d).sample(key, 16, n, F64)
        return model.apply(params, p), theory.pgd_predict(jnp.eye(d, dtype=F64) / n)(p), model.predictions(params, p)

    transformer, gd, predictions = both(params, key)
    assert_close(transformer, gd, rtol=1e-12, atol=1e-14)
    assert predictions.shape == (1, 16)
