"""SharedGramPrompts, the evaluation program's Gram batch (one draw read by every network of a block): its
products S v and a^T S v are elementwise products and sums; the same values as GramPrompts' dot products and
as the Gram matrix formed, the same predictions from linear attention and the GD-form transformer, and the
class the evaluation hands its Gram draws to."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclsim import IID, RAG, evaluate, models, protocols
from iclsim.gram import sample_gram
from iclsim.prompts import GramPrompts, SharedGramPrompts
from tests.tolerance import assert_close

F64 = jnp.float64


def _draw(design, batch=64, n=5, n_slots=8, dtype=F64):
    return sample_gram(design, jax.random.PRNGKey(4), batch, n, n_slots, dtype)


def test_shared_products_equal_the_formed_gram_matrix():
    """S v (v per prompt and one v for all), a^T S v and T^T L^T v against S formed in float64, for both
    classes, on a draw whose mean term is non-zero (RAG's context mean follows the query; padded: n < n_slots).
    Planted bugs caught: the factor transposed in the shared product, the mean term dropped, quadratic
    reading v twice."""
    rng = np.random.default_rng(0)
    v, a = rng.normal(size=(2, 64, 5))
    one = rng.normal(size=5)

    @jax.jit
    def products(p, v, a, one):  # one program per class, not one eager program per operation
        return p.times(v), p.times(one), p.quadratic(a, v), p._inner_coords(v), p.S

    with jax.enable_x64(True):
        p = _draw(RAG(4, 0.6, noise_var=0.2))
        shared = SharedGramPrompts(*p)
        assert float(np.abs(np.asarray(p.mean)).max()) > 0.1 and float(p.weight[0]) == 5 / 8
        (times, times_one, quad, coords, S), got = (products(q, v, a, one) for q in (p, shared))
    S = np.asarray(S)
    for t, t1, q in ((times, times_one, quad), got[:3]):
        assert_close(t, np.einsum("bij,bj->bi", S, v), rtol=1e-12, atol=1e-12)
        assert_close(t1, S @ one, rtol=1e-12, atol=1e-12)
        assert_close(q, np.einsum("bi,bij,bj->b", a, S, v), rtol=1e-12, atol=1e-12)
    assert_close(got[3], coords, rtol=1e-12, atol=1e-12)
    # a pytree of the subclass: mapped, it stays SharedGramPrompts (the models' isinstance checks hold)
    assert isinstance(shared, GramPrompts)
    assert type(jax.tree_util.tree_map(lambda x: x, shared)) is SharedGramPrompts


@pytest.mark.parametrize("make", [lambda: models.LinearAttention(4), lambda: models.LinearTransformer(4, 3)],
                         ids=["attention", "3-layer GD form"])
def test_networks_sharing_a_draw_predict_as_from_gram_prompts(make):
    """Eight networks vmapped over one float32 draw (the evaluation's layout): the same predictions from
    SharedGramPrompts as from GramPrompts, to float32 rounding."""
    model = make()
    params = jax.vmap(model.init)(jax.random.split(jax.random.PRNGKey(1), 8))
    params = jax.tree_util.tree_map(lambda a: a * (1 + 0.1 * jnp.arange(8, dtype=a.dtype).reshape((8,) + (1,) * (a.ndim - 1))),
                                    params)
    p = _draw(IID(4, noise_var=0.5), batch=250, n=20, n_slots=20, dtype=jnp.float32)
    predict = jax.jit(jax.vmap(model.apply, in_axes=(0, None)))
    a, b = predict(params, p), predict(params, SharedGramPrompts(*p))
    assert a.shape == (8, 250)
    assert_close(b, a, rtol=2e-5, atol=2e-5 * float(jnp.abs(a).max()))


def test_the_evaluation_reads_its_gram_draws_through_shared_gram_prompts(monkeypatch):
    """make_score (the evaluation program's kernel) hands the model its Gram draw as SharedGramPrompts and its
    token draws as they are. Planted bug caught: the wrap removed from ``evaluate._risk_sums``."""
    seen = []
    original = protocols.predict

    def spy(model, params, prompts):
        seen.append(type(prompts).__name__)
        return original(model, params, prompts)

    monkeypatch.setattr(protocols, "predict", spy)
    model = models.LinearAttention(3)
    params = model.init(jax.random.PRNGKey(0))
    classes = {}
    with jax.enable_x64(True):
        for sampler in ("gram", "tokens"):
            seen.clear()
            jax.jit(evaluate.make_score(model, 6, 500, sampler=sampler))(params, IID(3), 6, jax.random.PRNGKey(1))
            classes[sampler] = set(seen)  # the loop body may be traced more than once
    assert classes == {"gram": {"SharedGramPrompts"}, "tokens": {"Prompts"}}
