# %% [markdown]
# # Paper B's pruning study in the linear setting
#
# Paper B (Yao et al., *Enhancing In-Context Learning Performance with just SVD-Based Weight Pruning*,
# NeurIPS 2024) reports that truncating a weight matrix to its top singular directions can *improve*
# in-context learning, that pruning deep layers is more stable than pruning shallow ones, and explains
# both with a generalisation bound over the implicit gradient-descent trajectory. In the linear setting
# every one of these claims can be computed exactly or measured with paired prompts
# ([theory](../theory.md) §6). This notebook works the one-layer case, where the risk of a pruned model
# is a closed form, and then says what the multi-layer studies of the gallery show and what they do not.

# %%
import jax
import matplotlib.pyplot as plt

from iclsim import IID, models, pruning, theory, train

# %% [markdown]
# ## A trained layer and its truncations
#
# One-layer linear attention trained on isotropic prompts (d = 5, n = 20, label noise 0.1). Its weights
# implement one PGD step with preconditioner W (paper A); truncating W to rank k
# (`pruning.svd_truncate`) and scoring it with the exact risk `theory.pgd_risk` gives the pruning curve
# with no Monte Carlo error. Three test distributions: matched, noisier labels, much noisier labels.

# %%
d, n = 5, 20
attention = models.LinearAttention(d)
fitted = train.fit(attention, IID(d, noise_var=0.1), n=n, steps=1000, batch_size=256, learning_rate=0.01, seed=0)
W = attention.effective_pgd(fitted.params, n).W

tests = {"matched, s2 = 0.1": 0.1, "noisier, s2 = 4": 4.0, "much noisier, s2 = 60": 60.0}
ranks = list(range(d, 0, -1))
curves = {}
with jax.enable_x64(True):  # closed forms in float64, asked for locally
    for label, s2 in tests.items():
        test = IID(d, noise_var=s2)
        risks = [float(theory.pgd_risk(test, n, pruning.svd_truncate(W, rank=k))) for k in ranks]
        curves[label] = (risks, d + s2)  # predicting 0 has risk tr(Sx Sb) + s2

fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
for ax, (label, (risks, zero)) in zip(axes, curves.items()):
    ax.plot(ranks, risks, "o-", label="truncated W (exact)")
    ax.axhline(zero, color="gray", ls="--", label="predicting 0")
    ax.set_title(label)
    ax.set_xlabel("kept rank k")
    ax.invert_xaxis()
axes[0].set_ylabel("test risk L")
axes[0].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# **What it shows.** On isotropic data W is close to a multiple of I, every direction carries the same
# weight, and the risk of the rank-k truncation moves linearly from L(W) to the risk of predicting 0:
# truncation helps *exactly when the model is worse than predicting 0* on the test distribution
# ([theory](../theory.md) §6.1). Here that happens only for the much noisier labels; for the matched
# and the moderately noisier test, every truncation hurts.

# %%
for label, (risks, zero) in curves.items():
    change = risks[-1] / risks[0] - 1
    print(f"{label}: unpruned {risks[0]:.3f}, predicting 0 {zero:.3f}, rank 1 {risks[-1]:.3f} ({change:+.1%})")

# %% [markdown]
# ## Against a control
#
# A truncation that helps has shrunk the predictor. Shrinking it without choosing directions, W -> c W
# with the best scalar c, is the control any pruning claim must beat. The risk is a parabola in c, so
# three exact risks give its minimum.

# %%
with jax.enable_x64(True):
    for label, s2 in tests.items():
        test = IID(d, noise_var=s2)
        l0, l1, l2 = (float(theory.pgd_risk(test, n, c * W)) for c in (0.0, 1.0, 2.0))
        curvature, slope = (l2 - 2 * l1 + l0) / 2, (l1 - l0) - (l2 - 2 * l1 + l0) / 2
        c_best = -slope / (2 * curvature)
        scaled = l0 + slope * c_best + curvature * c_best**2
        best_truncation = min(curves[label][0])
        print(f"{label}: best truncation {best_truncation:.3f}, best scale c = {c_best:.2f}: {scaled:.3f}")

# %% [markdown]
# The scaled W is never worse than the best truncation: whatever pruning gains, a single scalar gains at
# least as much. Under a task covariance with unequal directions truncation does choose directions, and
# `theory.direction_gains` gives the exact change of dropping each one; the
# [pruning_phase](../gallery/pruning_phase.md) experiment draws where that helps.

# %% [markdown]
# ## What the multi-layer studies show, and what they do not
#
# The gallery's paper-B experiments train 4-layer linear transformers in the GD form (32 networks on two
# independent seed bases of 16) and decide each claim only where both bases agree; `python docs/verdicts.py`
# prints the table from the committed results, discussed in [the results](../results.md).
#
# - **(i) Pruning can improve ICL: supported, but not beyond the controls.** Under noisier test labels or
#   a shorter test context the joint search helps (about -4% and -51%), and scaling the pruned layer's
#   step does better on both bases ([pruning_search](../gallery/pruning_search.md)).
# - **(ii) Deep layers are more stable: the contrast is there, depth is not the cause.** Pruning a trained
#   layer to rank 1-2 deletes its gradient step; moving the same step from layer 1 to layer 4 changes
#   nothing measurable, while which step is deleted decides the harm
#   ([pruning_depth](../gallery/pruning_depth.md), [pruning_depth_step](../gallery/pruning_depth_step.md)).
# - **(iii) The trajectory bound explains the harm: contradicted on the training distribution** (it orders
#   the harm the wrong way), supported only under the shorter context
#   ([pruning_bound](../gallery/pruning_bound.md)).
#
# What this does **not** show: anything about the 6-billion-parameter language models of paper B. The
# linear setting isolates the mechanism (layers as gradient steps, truncation as shrinkage) and tests
# the paper's explanation of it; whether large models prune for the same reason is outside what a
# simulator of linear models can decide.
