"""Paper B's depth and search studies on anisotropic data (experiments/pruning_anisotropic.py): its design,
reference, geometry measures and its quick run."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iclsim import IID, anisotropic, quality, theory
from tests.quick import EXPERIMENTS, run_quick
from tests.tolerance import MC_SIGMAS, report

# the experiment's helpers, from the module the runner discovered (another test may have re-discovered it)
study = sys.modules[EXPERIMENTS["pruning_anisotropic"].run.__module__]


def test_power_law_covariance_has_the_spectrum_in_the_basis():
    """Sx = V diag(k^-a) V^T with trace d: its eigenvectors are V's columns in order of decreasing variance and
    its eigenvalue ratios are k^-a. Planted bugs caught: a trace normalised to 1, the basis's rows used as its
    eigenvectors (V^T diag V), the spectrum in increasing order; a non-orthonormal basis is refused."""
    d = 5
    V = anisotropic.eigenbasis(d, 3)
    assert np.allclose(V.T @ V, np.eye(d), atol=1e-12) and not np.allclose(np.abs(V), np.eye(d), atol=0.1)
    for power in (0.0, 1.0, 2.0):
        S = anisotropic.power_law_covariance(d, power, V)
        assert np.trace(S) == pytest.approx(d, rel=1e-12)
        lam = np.diag(V.T @ S @ V)
        assert np.allclose(V.T @ S @ V, np.diag(lam), atol=1e-12)
        assert np.allclose(lam / lam[0], np.arange(1, d + 1) ** -power, rtol=1e-12)
    with pytest.raises(ValueError, match="basis must be an orthonormal"):
        anisotropic.power_law_covariance(d, 1.0, 2 * V)
    with pytest.raises(ValueError, match="power must be"):
        anisotropic.power_law_covariance(d, -1.0, V)


def test_overlaps_and_diagonal_fraction_on_known_subspaces():
    """subspace_overlap: 1 for the same subspace (any basis of it), 0 for orthogonal ones, k/d on average over
    random pairs (Monte Carlo within 4 SE); best_eigen_overlap: 1 for a span of k basis vectors;
    diagonal_fraction: 1 for a matrix diagonal in the basis (plus any multiple of I), 0 for one whose
    anisotropic part is off-diagonal there. Planted bugs caught: an overlap not divided by k, the basis's
    rows read as its vectors, the isotropic part left in the diagonal fraction."""
    d, rng = 5, np.random.default_rng(0)
    V = anisotropic.eigenbasis(d, 1)
    R = np.linalg.qr(rng.standard_normal((2, 2)))[0]
    assert anisotropic.subspace_overlap(V[:, :2], V[:, :2] @ R) == pytest.approx(1.0, abs=1e-12)
    assert anisotropic.subspace_overlap(V[:, :2], V[:, 2:4]) == pytest.approx(0.0, abs=1e-12)
    draws = [anisotropic.subspace_overlap(np.linalg.qr(rng.standard_normal((d, 2)))[0], np.linalg.qr(rng.standard_normal((d, 2)))[0])
             for _ in range(4000)]
    assert abs(np.mean(draws) - 2 / d) <= MC_SIGMAS * np.std(draws) / np.sqrt(len(draws))
    assert anisotropic.best_eigen_overlap(V[:, [3, 1]] @ R, V) == pytest.approx(1.0, abs=1e-12)
    assert 2 / d < anisotropic.random_best_overlap(d, 2, 4000) < 1.0
    G = (V * np.array([3.0, 1.0, 0.5, 0.2, 0.1])) @ V.T + 2.0 * np.eye(d)
    assert anisotropic.diagonal_fraction(G, V) == pytest.approx(1.0, abs=1e-12)
    off = V @ (np.eye(d, k=1) + np.eye(d, k=-1)) @ V.T + 0.7 * np.eye(d)
    assert anisotropic.diagonal_fraction(off, V) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow  # a whole quick study (make test's budget); its library is unit-tested in the default tier
def test_eigenbasis_reference_is_the_best_gd_on_isotropic_data_and_its_risk_is_the_predictors():
    """On isotropic data the best L-step GD preconditioned in any basis is the best L-step GD: its risk agrees
    with theory.optimal_multistep_gd within 4 combined SE plus 0.5% (the family holds those steps; the
    minimiser works on finite draws). On anisotropic data its reported risk is that of its preconditioners
    V diag(g_l) V^T on prompts the design draws in the original coordinates (Monte Carlo, 4 SE). Planted bugs
    caught: the preconditioners applied in the wrong coordinates (V vs V^T), a risk without the query noise,
    the label noise left out of the draws, the steps applied in reverse order."""
    d, n, L = 4, 12, 2
    key = jax.random.PRNGKey(5)
    iso = IID(d, noise_var=0.3)
    _, iso_risk, iso_se = anisotropic.eigenbasis_multistep_gd(iso, anisotropic.eigenbasis(d, 2), n, L, key, 20_000)
    best = theory.optimal_multistep_gd(iso, n, L, key, 50_000)
    assert abs(iso_risk - best.risk) <= MC_SIGMAS * np.hypot(iso_se, best.se) + 0.005 * best.risk, (iso_risk, best.risk)
    V = anisotropic.eigenbasis(d, 7)
    aniso = IID(d, noise_var=0.2, cov_x=anisotropic.power_law_covariance(d, 1.0, V),
                cov_beta=anisotropic.power_law_covariance(d, 2.0, V))
    g, risk, se = anisotropic.eigenbasis_multistep_gd(aniso, V, n, L, key, 20_000, 40_000)  # two scoring chunks
    p = aniso.sample(jax.random.PRNGKey(11), 100_000, n, jnp.float32)
    X, y, x = (np.asarray(a, np.float64) for a in (p.X, p.y, p.x))
    w = np.zeros_like(x)
    for step in range(L):
        G = (V * g[step]) @ V.T
        w = w + np.einsum("ij,bj->bi", G, np.einsum("bnd,bn->bd", X, y - np.einsum("bnd,bd->bn", X, w)) / n)
    err = (np.asarray(p.y_query, np.float64) - np.sum(x * w, axis=1)) ** 2
    mc, mc_se = err.mean(), err.std() / np.sqrt(err.size)
    report(f"eigenbasis reference: isotropic {iso_risk:.4f} vs best GD {best.risk:.4f}; anisotropic {risk:.4f} vs MC {mc:.4f} +- {mc_se:.4f}")
    assert abs(risk - mc) <= MC_SIGMAS * np.hypot(se, mc_se), (risk, mc, mc_se)
    assert risk < float(theory.optimal_pgd(aniso, n).risk)  # two diagonal steps beat the best one-step PGD


def _contrast(rows, design, setting, seed, op, L, d):
    """Layer 1's harm minus layer L's, each the mean relative change over kept ranks 1..d-1 (written here from
    the rows, independently of the study's summary code)."""
    def harm(layer):
        return np.mean([r["relative_change"] for r in rows if r.get("kind") == "prune" and r["design"] == design
                        and r["setting"] == setting and r["seed"] == seed and r["op"] == op and r["layer"] == layer
                        and (op in ("delete", "scale") or 0 < r["rank"] < d)])
    return harm(1) - harm(L)


@pytest.mark.slow  # a whole quick study (make test's budget); its library is unit-tested in the default tier
def test_pruning_anisotropic_quick(tmp_path):
    """The quick study (L = 2, 3 seeds per base, 500 steps) on the anisotropic and isotropic designs.

    - Truncating Gamma_l itself at rank d ("product_svd", rank d) is the unpruned network: relative change
      below 1e-4 on every network, layer and setting (paired prompts). Planted bug caught: a control that
      drops or rescales a direction, or candidates scored on different prompts.
    - Every passing anisotropic network beats the best one-step PGD (which it can represent) on its matched
      test prompts, and deleting any layer's step hurts every passing network. Planted bug caught: networks
      trained on another design than the one scored, a 'delete' that leaves the step.
    - The anisotropic networks' step matrices align with the data's eigenbasis: the median share of Gamma_l's
      anisotropic part that is diagonal in it is above 0.8 (chance 1/(d+1)), its top singular direction
      matches an eigenvector (median best overlap above chance + 0.2) and is the lowest-variance one (the
      preconditioner inverts the covariance: median overlap with the bottom eigenvector above 0.5, chance
      0.2); their anisotropy is over 3x the isotropic networks'. Planted bugs caught: the basis's rows read as
      eigenvectors, covariances not passed to training.
    - The summary's per-base medians equal the medians of the shallow-minus-deep contrasts recomputed here from
      the rows, and its across-base verdict is quality.across_bases of the per-base verdicts. Planted bugs
      caught: contrasts over the wrong layers, failed networks counted, bases mixed.
    - A search that keeps the unpruned network reports a test change of exactly 0."""
    meta, rows = run_quick("pruning_anisotropic", tmp_path)
    s = meta["summary"]
    d, L = 5, 2
    sanity = [r for r in rows if r.get("kind") == "prune" and r["op"] == "product_svd" and r["rank"] == d]
    assert len(sanity) == 2 * 3 * 6 * L
    assert max(abs(r["relative_change"]) for r in sanity) < 1e-4
    layers = [r for r in rows if r.get("kind") == "layer"]
    aniso = [r for r in layers if r["design"] == "anisotropic" and r["passed"]]
    iso = [r for r in layers if r["design"] == "isotropic" and r["passed"]]
    assert len(aniso) >= 5 * L and len(iso) >= 5 * L  # at most one failure of six per design
    assert all(r["matched_risk"] < r["one_step_pgd"] for r in aniso)
    deleted = [r for r in rows if r.get("kind") == "prune" and r["op"] == "delete" and r["setting"] == "matched"
               and r["passed"]]
    assert deleted and min(r["relative_change"] for r in deleted) > 0
    med = {c: float(np.median([r[c] for r in aniso])) for c in ("diagonal_fraction", "gamma_top1_overlap_best",
                                                               "gamma_top1_overlap_bottom", "anisotropy")}
    report(f"pruning_anisotropic quick: anisotropic medians {med}; isotropic anisotropy "
           f"{np.median([r['anisotropy'] for r in iso]):.4f}")
    assert med["diagonal_fraction"] > 0.8
    assert med["gamma_top1_overlap_best"] > anisotropic.random_best_overlap(d, 1) + 0.2
    assert med["gamma_top1_overlap_bottom"] > 0.5
    assert med["anisotropy"] > 3 * np.median([r["anisotropy"] for r in iso])
    for design in ("anisotropic", "isotropic"):
        for setting in ("matched", "noisier test labels", "shorter context"):
            block = s["claim_ii_shallow_minus_deep"][design][setting]["svd"]
            for base in ("A", "B"):
                seeds = sorted({r["seed"] for r in layers if r["design"] == design and r["base"] == base and r["passed"]})
                values = [_contrast(rows, design, setting, sd, "svd", L, d) for sd in seeds]
                assert block[base]["median"] == pytest.approx(np.median(values), abs=1e-4)
                assert block[base]["passing_seeds"] == len(seeds)
            assert block["across_bases"] == quality.across_bases([block["A"]["verdict"], block["B"]["verdict"]])
    kept = [r for r in rows if r.get("kind") == "search" and r["layer"] == 0]
    assert kept and all(r["test_change"] == 0.0 for r in kept)
