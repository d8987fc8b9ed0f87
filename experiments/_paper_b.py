"""Paper B's linear setting, shared by the paper-B studies (pruning_depth, pruning_search, pruning_bound,
pruning_anisotropic, trajectory's deepest networks): the recipe of the L-layer GD-form linear transformers,
the two independent seed bases every verdict is computed on, the test settings, the prompt streams, and
what each layer holds (its GD step). Every study passes these settings explicitly, so that the cache
shares the trained networks between studies (same recipe, same seeds: the same networks)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from iclsim import IID, models, sweeps, train
from iclsim.train import TrainConfig

SEEDS_PER_BASE = 16


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The networks every paper-B study trains: d = 5, n = 20, 4 layers, training noise 0.1, library
    defaults (Adam, batch 512, lr 1e-2), ``steps`` steps, ``seeds`` seeds per base. A study's settings
    subclass this one (or ``Study``), so the same recipe gives the same cache keys: the same networks."""

    dim: int = 5
    n: int = 20
    layers: int = 4
    noise_var: float = 0.1
    steps: int = 4000
    seeds: int = SEEDS_PER_BASE


@dataclasses.dataclass(frozen=True)
class Study(Recipe):
    """The recipe and the shifted test settings the pruning studies score on (``test_settings``): noisier
    test labels (``test_noise_var``), a shorter test context (``test_n``)."""

    test_noise_var: float = 4.0
    test_n: int = 10


# the quick changes every paper-B study makes (dataclasses.replace(settings, **QUICK, ...))
QUICK = {"layers": 2, "seeds": 3, "steps": 500}
# two independent seed bases: base A is seed .. seed + k - 1, base B seed + 1000 .. seed + 1000 + k - 1
BASE_OFFSETS = {"A": 0, "B": 1000}

# fold_in(PRNGKey(network seed), stream): each network's own prompt sets, far from the training streams.
# Offsets 1-10 (+ L) are taken by the earlier studies (pruning_depth 1, trajectory 2 and 10 + L, pruning_search
# 3-5, pruning_one_layer 6); the studies built on this module use 20 and up.
VALIDATION_STREAM = sweeps.TEST_STREAM - 20
TEST_STREAM = sweeps.TEST_STREAM - 21
NULL_STREAM = sweeps.TEST_STREAM - 22


def seed_bases(seed: int, per_base: int) -> dict[str, list[int]]:
    """The two independent seed bases {"A": [...], "B": [...]} of ``per_base`` seeds each. A verdict is
    'supported' or 'contradicted' only where both bases agree (``quality.across_bases``)."""
    if isinstance(per_base, bool) or not isinstance(per_base, int) or not 1 <= per_base <= 1000:
        raise ValueError(f"seeds per base must be an integer in [1, 1000] (more would overlap the bases), got {per_base}")
    return {name: [seed + offset + k for k in range(per_base)] for name, offset in BASE_OFFSETS.items()}


def test_settings(s) -> dict:
    """The test distributions every trained network is scored on: label -> (design, context length)."""
    d = s.dim
    return {"matched": (IID(d, noise_var=s.noise_var), s.n),
            "noisier test labels": (IID(d, noise_var=s.test_noise_var), s.n),
            "shorter context": (IID(d, noise_var=s.noise_var), s.test_n)}


def train_networks(s, seeds, context, design=None):
    """(model, params with a leading seed axis, training design): the GD-form L-layer transformers of the
    recipe trained on ``design`` (default: the isotropic IID design of the recipe), one per seed."""
    d, L = s.dim, s.layers
    model = models.LinearTransformer(d, L)
    design = IID(d, noise_var=s.noise_var) if design is None else design
    context.progress(f"  training (or loading) {len(seeds)} {L}-layer linear transformers (GD form), {s.steps} steps")
    fitted = train.fit_sweep(model, design, [s.n], seeds, TrainConfig(steps=s.steps), cache=context.cache)
    return model, jax.tree_util.tree_map(lambda a: a[0, 0], fitted.params), design


def layer_steps(model, params) -> np.ndarray:
    """[seeds, L] the GD step each layer holds, tr(Gamma_l) / d (Gamma_l near a multiple of I on isotropic
    data: the step size of L-step GD that the layer implements)."""
    seeds = jax.tree_util.tree_leaves(params)[0].shape[0]
    return np.stack([np.trace(np.asarray(model.preconditioners(jax.tree_util.tree_map(lambda a: a[i], params)),
                                         np.float64), axis1=1, axis2=2) / model.dim for i in range(seeds)])


def step_order(steps: np.ndarray) -> np.ndarray:
    """[seeds, L] the rank of each layer's step among the network's steps (1 = shortest): which step a
    layer holds, the mechanism the pruning harm follows."""
    return np.argsort(np.argsort(np.asarray(steps), axis=-1), axis=-1) + 1
