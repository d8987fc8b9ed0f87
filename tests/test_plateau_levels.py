"""dynamics_kq's plateau instruments (experiments/dynamics_kq.py): the PGD part of a multi-head network, whose
exact risk reads a plateau's level without Monte Carlo error, and the paired cost of the terms outside it."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclsim import IID, dynamics, theory
from iclsim import multihead as mh
from tests.quick import EXPERIMENTS

study = sys.modules[EXPERIMENTS["dynamics_kq"].run.__module__]


@pytest.mark.parametrize("cls", [mh.MergedAttention, mh.SeparateAttention])
def test_pgd_part_predicts_as_the_network_on_the_subspace_and_not_off_it(cls):
    """On the subspace KQ[:d, d] = 0, v[:d] = 0 (the aligned start) the network's prediction is its PGD part's
    (``models.PGD`` with W = n W_eff), prompt by prompt; moved off it (KQ[:d, d] or Wq[:d]... and v[:d]
    nonzero) the two differ by the terms outside the PGD form. Planted bugs caught: W not scaled by n, the
    PGD part read at another n, a pgd_part that copies the network."""
    d, n = 3, 7
    design = IID(d, cov_x=np.diag([1.0, 0.6, 0.35]))
    model = cls(d, heads=2, init_scale=1.0, start="aligned", dtype=jnp.float64)
    params = model.init(jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda a: a * (1.0 + 0.1 * jnp.arange(a.size, dtype=a.dtype).reshape(a.shape) / a.size),
                                    params)  # still on the subspace (its zeros stay zero), heads no longer equal
    off = dict(params, v=params["v"].at[:, :d].set(0.2))
    prompts = jax.jit(lambda k: design.sample(k, 64, n, jnp.float64))(jax.random.PRNGKey(1))

    @jax.jit
    def network_and_part(p):
        pgd, part = study.pgd_part(model, jax.tree_util.tree_map(lambda a: a[None], p), n)
        return model.apply(p, prompts), pgd.apply(jax.tree_util.tree_map(lambda a: a[0], part), prompts)

    on, on_part = network_and_part(params)
    np.testing.assert_allclose(on, on_part, rtol=1e-10)
    assert float(jnp.std(on)) > 0.1  # a network that predicts something
    moved, moved_part = network_and_part(off)
    assert float(jnp.max(jnp.abs(moved - moved_part))) > 1e-2

def test_recorded_w_gives_the_exact_plateau_level():
    """``effective_w`` as a record summary returns theory's W (pgd_risk of it is the network's risk on the
    subspace): at the aligned start's optimum scale the exact risk is the PCR risk with every component,
    and at zero scale L_0 = E y^2. Planted bugs caught: W scaled by n (risk far from L_d), the summary read at
    another n."""
    d, n = 3, 20
    design = IID(d, cov_x=np.mean([1.0, 0.6, 0.35]) * np.eye(d))
    model = mh.MergedAttention(d, heads=1, init_scale=1.0, start="aligned", dtype=jnp.float64)
    W_star = theory.optimal_pgd(design, n).W
    c = float(W_star[0, 0])  # W* = c I on a white design
    # KQ[:d, :d] = a I / sqrt(d) and v[d] = a give W = a^2 I / (sqrt(d) n): pick a for W = W*
    a = np.sqrt(c * np.sqrt(d) * n)
    params = {"KQ": jnp.zeros((1, d + 1, d + 1)).at[0, :d, :d].set(a / np.sqrt(d) * jnp.eye(d)),
              "v": jnp.zeros((1, d + 1)).at[0, d].set(a)}
    W = study.effective_w(model, n)(params)
    levels = dynamics.pcr_risks(design, n).risks
    with jax.enable_x64(True):
        assert float(theory.pgd_risk(design, n, W)) == pytest.approx(float(levels[-1]), rel=1e-9)
        zero = jax.tree_util.tree_map(jnp.zeros_like, params)
        assert float(theory.pgd_risk(design, n, study.effective_w(model, n)(zero))) == pytest.approx(float(levels[0]),
                                                                                                       rel=1e-12)


def test_tail_average_is_each_seeds_mean_over_its_window():
    """``tail_average``: per seed, the plain mean of the records its mask selects (any leaf shape, the leaf's
    dtype kept); a seed whose window is empty gets its last record. Planted bugs caught: the mean over every
    record, the mean taken across seeds, weights not normalised, the empty window giving NaN or the first record."""
    rng = np.random.default_rng(0)
    records = {"KQ": rng.normal(size=(3, 6, 2, 2)).astype(np.float32), "v": rng.normal(size=(3, 6, 2))}
    mask = np.array([[0, 0, 1, 1, 1, 0], [1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]], bool)
    got = study.tail_average(records, mask)
    for name, a in records.items():
        want = np.stack([a[0, 2:5].mean(axis=0), a[1, [0, 5]].mean(axis=0), a[2, -1]])
        np.testing.assert_allclose(got[name], want, rtol=1e-6)
        assert got[name].dtype == a.dtype and got[name].shape == a.shape[:1] + a.shape[2:]


def test_tail_average_removes_the_sgd_excess_of_a_noisy_minimiser():
    """Iterates scattered around a minimiser (a quadratic's, as SGD at a constant step leaves them): the
    average over the window sits at the minimiser, so its loss has no excess, while the last iterate's excess
    is the scatter's variance. Planted bug caught: averaging over the window's complement (the early records)."""
    rng = np.random.default_rng(1)
    target = np.array([1.0, -2.0])
    path = np.concatenate([np.linspace(0, 1, 50)[:, None] * target, target + 0.1 * rng.normal(size=(400, 2))])
    mask = np.arange(450)[None] >= 200
    avg = study.tail_average({"w": path[None]}, mask)["w"][0]
    excess_avg, excess_last = np.sum((avg - target) ** 2), np.sum((path[-1] - target) ** 2)
    # the last iterate's excess has mean 2 x 0.1^2 = 0.02; the average over 250 records 0.02 / 250 = 8e-5
    assert excess_avg < 3e-4 and excess_avg < 0.1 * excess_last, (excess_avg, excess_last)


@pytest.mark.parametrize("bad", [0.0, -0.25, 1.5, True])
def test_tail_fraction_out_of_range_is_a_named_error(bad):
    """A tail_fraction outside (0, 1] names the setting and its range before anything is trained (0 would leave
    every seed without a window; above 1 the window is not a tail)."""
    import dataclasses

    settings = dataclasses.replace(EXPERIMENTS["dynamics_kq"].settings, tail_fraction=bad)
    with pytest.raises(ValueError, match=r"tail_fraction must be a number in \(0, 1\]"):
        study.run(settings, 0, None)
