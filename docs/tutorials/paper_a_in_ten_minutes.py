# %% [markdown]
# # Paper A in ten minutes
#
# Paper A (Li, Rawat and Oymak, *Fine-grained Analysis of In-context Linear Estimation*, NeurIPS 2024)
# proves that one-layer linear attention and one-layer H3, trained on in-context linear regression,
# implement one step of preconditioned gradient descent (PGD) with the *optimal* preconditioner W*, and
# gives W* and its risk L* in closed form ([theory](../theory.md) §2-§3). This notebook checks that claim
# at small size: a data design, the two models, a sweep over noise levels and context lengths trained as
# one compiled program, the closed-form line beside the trained risks, and the gap panel.

# %%
import jax
import matplotlib.pyplot as plt
import numpy as np

from iclsim import IID, evaluate, models, plotting, theory, train

# %% [markdown]
# ## A design and its closed form
#
# `IID(dim, noise_var)` draws tasks `beta ~ N(0, I)`, features `x ~ N(0, I)` and labels
# `y = x.beta + N(0, noise_var)` ([theory](../theory.md) §1.1; `cov_x` and `cov_beta` set the
# covariances Sx and Sb). `theory.optimal_pgd` returns the optimal preconditioner and its exact risk.

# %%
d = 5
design = IID(dim=d, noise_var=0.5)
optimum = theory.optimal_pgd(design, n=10)
print("L* at n = 10:", round(float(optimum.risk), 4))
print("W* is a multiple of I on isotropic data:", np.round(np.diag(optimum.W), 4))

# %% [markdown]
# ## Two models, one sweep
#
# `train.fit_sweep` trains one model per (design, context length, seed) in one compiled program: here
# 2 noise levels x 4 context lengths x 2 seeds = 16 models of each kind. H3 is built for the largest
# context it will see (`context=max(ns)`). The settings are small, so that the notebook runs in under a
# minute; the full experiment is `iclsim run fig2`.

# %%
ns = [2, 5, 10, 20]
designs = [IID(d, noise_var=s2) for s2 in (0.0, 0.5)]
config = train.TrainConfig(steps=1000, batch_size=256, learning_rate=0.01)
zoo = {"linear attention": models.LinearAttention(d), "H3": models.H3(d, context=max(ns))}

rows = []
for name, model in zoo.items():
    fitted = train.fit_sweep(model, designs, ns, seeds=[0, 1], config=config)
    risk, se = evaluate.evaluate_sweep(model, fitted.params, designs, ns, jax.random.PRNGKey(1), num_prompts=20_000)
    for i, des in enumerate(designs):
        for j, n in enumerate(ns):
            for k in range(2):
                rows.append({"design": f"s2={des.noise_var:g}", "model": name, "n": n, "seed": k,
                             "risk": float(risk[i, j, k]), "se": float(se[i, j, k]),
                             "theory": float(theory.optimal_pgd(des, n).risk)})
print(len(rows), "trained models scored on 20 000 shared test prompts")

# %% [markdown]
# ## The theory line and the gap panel
#
# Solid lines are the trained risks (mean over seeds), dotted the closed-form optimum L*; the lower
# panel shows the relative gap (trained - theory) / theory with its Monte Carlo interval. At this small
# training budget the gap is a few percent at most; `iclsim run fig2` trains longer and lands within
# about 1% (see [the fig2 result](../gallery/fig2.md)).

# %%
fig, axes, gaps = plotting.panels(1, gap=True)
plotting.curves(axes[0], rows, theory_label="optimal one-step PGD")
plotting.gap(gaps[0], rows)
axes[0].set_ylabel("test risk L")
plotting.legend(axes[0])
plt.show()

# %%
worst = max(abs(r["risk"] - r["theory"]) / r["theory"] for r in rows)
print(f"worst relative gap over {len(rows)} models: {worst:.1%}")

# %% [markdown]
# ## The weights implement PGD
#
# A PGD-form model reports the preconditioner its weights implement (`effective_pgd`). For trained linear
# attention it sits close to W*, which is paper A's Theorem 1 read off the weights, not only off the risk.

# %%
attention = models.LinearAttention(d)
single = train.fit(attention, design, n=10, steps=1000, batch_size=256, learning_rate=0.01, seed=0)
W = attention.effective_pgd(single.params, 10).W
print("relative distance to W*:", round(float(np.linalg.norm(W - optimum.W) / np.linalg.norm(optimum.W)), 3))
with jax.enable_x64(True):  # closed forms in float64, asked for locally
    exact = float(theory.pgd_risk(design, 10, W))
print("exact risk of the trained W:", round(exact, 4), "against L* =", round(float(optimum.risk), 4))
