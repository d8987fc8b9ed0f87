# %% [markdown]
# # Property-test your own theorem
#
# A closed form is worth a figure only after it is checked. `iclsim.testing` gives the pieces:
# hypothesis strategies that draw designs (`testing.iid_designs` and friends), and Monte Carlo
# assertions that fail with the estimate, its standard error and z (`assert_matches_theory`,
# `assert_paired_difference`, `assert_not_below`). This notebook states a small theorem, tests it
# against the library's closed form over many drawn designs, checks it against simulation, and shows a
# planted error being caught. (It needs the test extra: `pip install 'iclsim[test]'`.)

# %%
import hypothesis.strategies as st
import jax
import numpy as np
from hypothesis import given, settings

from iclsim import IID, testing, theory

# %% [markdown]
# ## The theorem
#
# For isotropic IID prompts (Sx = Sb = I, `cov_x = cov_beta = None`) with label noise s^2, the optimal
# one-step PGD preconditioner and its risk are
#
#     W* = I / (n + d + 1 + s^2),      L* = d + s^2 - d n / (n + d + 1 + s^2).
#
# (From [theory](../theory.md) §3: C = n Sb and M = n (n + 1) I + n (d + s^2) I.) Written as our own function:

# %%
def isotropic_optimum(d, n, noise_var):
    """(W*, L*) of one-step PGD on isotropic IID prompts, the formula above."""
    c = n + d + 1 + noise_var
    return np.eye(d) / c, d + noise_var - d * n / c


W, L = isotropic_optimum(5, 10, 0.5)
print(round(L, 4), "against theory.optimal_pgd:", round(float(theory.optimal_pgd(IID(5, noise_var=0.5), 10).risk), 4))

# %% [markdown]
# ## Property test against the library's closed form
#
# `testing.iid_designs` draws a `DesignCase(design, n)`; `cov=lambda d: st.none()` keeps the covariances
# at the identity, `per_position=False` keeps one noise variance. Hypothesis runs the test on many drawn
# cases and shrinks a failure to the smallest one.

# %%
isotropic = testing.iid_designs(max_dim=6, max_n=30, per_position=False, cov=lambda d: st.none())


@settings(max_examples=50, deadline=None)
@given(isotropic)
def test_isotropic_optimum(case):
    design, n = case
    W, L = isotropic_optimum(design.dim, n, design.noise_var)
    optimum = theory.optimal_pgd(design, n)
    np.testing.assert_allclose(W, optimum.W, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(L, optimum.risk, rtol=1e-10)


test_isotropic_optimum()
print("50 drawn designs: the formula equals theory.optimal_pgd")

# %% [markdown]
# A property that holds for *every* IID design, isotropic or not: the optimum is never worse than
# predicting 0, whose risk is tr(Sx Sb) + s^2. `testing.iid_designs()` draws SPD, spiked and power-law
# covariances.

# %%
@settings(max_examples=30, deadline=None)
@given(testing.iid_designs(max_dim=4, max_n=10, per_position=False))
def test_optimum_beats_predicting_zero(case):
    design, n = case
    predict_zero = np.trace(np.asarray(design.cov_x) @ np.asarray(design.cov_beta)) + design.noise_var
    assert theory.optimal_pgd(design, n).risk <= predict_zero + 1e-12


test_optimum_beats_predicting_zero()
print("30 drawn designs: L* <= tr(Sx Sb) + s^2")

# %% [markdown]
# ## Against simulation
#
# The library's closed form could share our mistake, so the honest referee is Monte Carlo:
# `assert_matches_theory` draws fresh prompts, scores the predictor x^T W X^T y (`theory.pgd_predict`) and
# fails unless the estimate is within 4 standard errors of the formula.

# %%
design, n = IID(5, noise_var=0.5), 10
W, L = isotropic_optimum(5, n, 0.5)
check = testing.assert_matches_theory(theory.pgd_predict(W), design, n, L, num_prompts=50_000,
                                      key=jax.random.PRNGKey(7))
print(f"Monte Carlo {check.estimate:.4f} +- {check.se:.4f} against {check.expected:.4f}: z = {check.z:.2f}")

# %% [markdown]
# ## A planted error is caught
#
# Drop the `+ 1` from the denominator (a plausible slip: it comes from E[x x^T x x^T] = (d + 2) I, not
# d I). The Monte Carlo check refuses it, and says by how much.

# %%
def wrong_optimum(d, n, noise_var):
    c = n + d + noise_var
    return np.eye(d) / c, d + noise_var - d * n / c


W_wrong, L_wrong = wrong_optimum(5, n, 0.5)
try:
    testing.assert_matches_theory(theory.pgd_predict(W_wrong), design, n, L_wrong, num_prompts=50_000,
                                  key=jax.random.PRNGKey(7))
except AssertionError as err:
    print("caught:", err)

# %% [markdown]
# ## Small differences: pair the prompts
#
# The risk of a slightly mis-scaled preconditioner differs from L* by little. Two separate estimates
# cannot resolve it; the per-prompt difference on shared prompts can (`assert_paired_difference`).
# The exact difference comes from `theory.pgd_risk`, the closed-form risk of any W (a JAX function,
# differentiable in W; closed forms are asked for in float64 locally, with `jax.enable_x64`).

# %%
W_scaled = 1.2 * W
with jax.enable_x64(True):
    exact = float(theory.pgd_risk(design, n, W_scaled) - L)
paired = testing.assert_paired_difference(theory.pgd_predict(W_scaled), theory.pgd_predict(W), design, n, exact,
                                          num_prompts=50_000, key=jax.random.PRNGKey(8))
print(f"exact difference {exact:.4f}; paired Monte Carlo {paired.estimate:.4f} +- {paired.se:.4f}")
