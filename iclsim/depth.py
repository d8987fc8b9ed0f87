"""Depth against step in L-layer GD-form transformers (paper B's claim (ii); docs/theory.md §6.3, §8): what
each layer holds and what pruning it deletes. Layer l of the GD form applies w <- w + Gamma_l (b - S w) with
Gamma_l = -w_v Wq Wk^T, so a layer *is* a (preconditioned) GD step. This module scores arbitrary networks per
seed on paired prompts (controls that are not edits of the trained weights: the re-tuned GD oracle, permuted
layer orders), builds GD-form networks from step sizes, measures what SVD truncation of (Wq, Wk) keeps of
Gamma_l, gives the exact best scalar of a layer's update from three paired risks, and decomposes a
position x step table of pruning harms into a depth effect and a step effect."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from iclsim import pruning

__all__ = ["evaluate_networks", "gd_network", "permute_layers", "kept_overlap", "kept_trace_ratio",
           "ScaleFit", "best_scale", "Decomposition", "decompose"]


def evaluate_networks(model, networks: Sequence[Sequence], design, n: int, keys, num_prompts: int):
    """Risk and SE [seeds, k] of ``networks[s][j]`` (params of ``model``; every seed the same count k), the
    networks of seed s all on seed s's prompts (``keys`` [seeds, 2] uint32, e.g. ``sweeps.stream_keys``):
    their differences are paired, and the networks need not be edits of one set of weights (the GD oracle,
    a permuted layer order). One vmapped program, as ``pruning.evaluate_candidates``, which gives the same
    prompts for the same keys and the same number of networks."""
    if len(networks) == 0 or any(len(row) != len(networks[0]) or len(row) == 0 for row in networks):
        raise ValueError("networks must be a non-empty list (one per seed) of non-empty lists of equal length, "
                         f"got lengths {[len(row) for row in networks]}")
    seeds, k = len(networks), len(networks[0])
    rows = np.asarray(keys)
    if rows.shape != (seeds, 2) or rows.dtype != np.uint32:
        raise ValueError(f"keys must be one key per seed, shape ({seeds}, 2) uint32; got shape {rows.shape}, "
                         f"dtype {rows.dtype}")
    # stacked on the host: jnp.stack of thousands of operands compiles one concatenation per operand count; np.stack does not compile
    stacked = jax.tree_util.tree_map(lambda *a: np.stack([np.asarray(x) for x in a]).reshape((seeds, k) + np.shape(a[0])),
                                     *[p for row in networks for p in row])
    return pruning.evaluate_networks(model, stacked, design, n, rows, num_prompts)


def gd_network(step_sizes, dim: int, dtype=jnp.float32) -> dict:
    """Params of the GD-form transformer (``models.LinearTransformer(dim, L)``) that runs L steps of GD
    w_{l+1} = w_l + gamma_l X^T (y - X w_l) / n in the given order: Wq_l = Wk_l = sqrt(gamma_l) I, w_v = -1,
    so Gamma_l = gamma_l I. Steps must be >= 0 (a negative step has no real square root)."""
    steps = np.asarray(step_sizes, np.float64)
    if steps.ndim != 1 or steps.size == 0 or not np.all(np.isfinite(steps)) or np.any(steps < 0):
        raise ValueError(f"step_sizes must be a non-empty 1-D array of finite numbers >= 0, got {step_sizes!r}")
    return pruning.multistep_gd_params(dim, steps, dtype)


def permute_layers(params, order: Sequence[int]) -> dict:
    """The network whose position p holds original layer ``order[p]`` (0-based): the same steps in another
    order. For scalar steps (Gamma_l = gamma_l I) the function is the same for every order (the factors
    I - gamma_l S commute); for trained layers it is not exactly."""
    layers = list(params["layers"])
    if sorted(int(i) for i in order) != list(range(len(layers))):
        raise ValueError(f"order must be a permutation of 0..{len(layers) - 1}, got {list(order)!r}")
    return {**params, "layers": [layers[int(i)] for i in order]}


def _right_subspace(W, rank: int) -> np.ndarray:
    """Projection on the top-``rank`` right singular vectors of W: SVD truncation keeps W P."""
    _, _, Vt = np.linalg.svd(np.asarray(W, np.float64))
    V = Vt[:rank].T
    return V @ V.T


def kept_overlap(Wq, Wk, rank: int) -> float:
    """tr(P_q P_k) / rank, P_q, P_k the projections on the top-``rank`` right singular subspaces of Wq and Wk:
    SVD truncation keeps Wq P_q (Wk P_k)^T = Wq P_q P_k Wk^T, so this is the share of the kept directions
    the two factors agree on (1: the same subspace; two independent uniformly random subspaces of R^d: rank / d
    on average)."""
    d = np.shape(Wq)[1]
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= d:
        raise ValueError(f"rank must be an integer in [1, {d}], got {rank!r}")
    return float(np.trace(_right_subspace(Wq, rank) @ _right_subspace(Wk, rank)) / rank)


def kept_trace_ratio(Wq, Wk, rank: int) -> float:
    """tr(Wq_k Wk_k^T) / tr(Wq Wk^T), Wq_k, Wk_k the rank-``rank`` SVD truncations: the share of the layer's
    step tr(Gamma_l) / d that the pruned layer keeps (w_v cancels)."""
    Wq, Wk = np.asarray(Wq, np.float64), np.asarray(Wk, np.float64)
    kept_overlap(Wq, Wk, rank)  # checks the rank
    pruned = Wq @ _right_subspace(Wq, rank) @ _right_subspace(Wk, rank) @ Wk.T  # (Wq P_q)(Wk P_k)^T
    return float(np.trace(pruned) / np.trace(Wq @ Wk.T))


class ScaleFit(NamedTuple):
    """The risk R(c) = r0 + b c + a c^2 of a network whose layer's update is multiplied by c, and its minimiser."""

    a: np.ndarray
    b: np.ndarray
    r0: np.ndarray
    best: np.ndarray  # c* = -b / (2 a)

    def risk(self, c):
        """R(c) on the prompts the fit was made on (exact there: the same quadratic)."""
        return self.r0 + self.b * c + self.a * np.asarray(c) ** 2


def best_scale(r0, r1, r2) -> ScaleFit:
    """The exact best scalar of one layer's update from the risks on one prompt set with the update deleted
    (c = 0), kept (c = 1) and doubled (c = 2). In the GD form the prediction is affine in the scale c of one
    layer's update (w_{l+1} = w_l + c Gamma_l (b - S w_l), and the later layers are affine in w_{l+1}), so the
    empirical risk on fixed prompts is exactly the parabola through the three points: a = (r2 - 2 r1 + r0) / 2,
    b = r1 - r0 - a, c* = -b / (2 a) (a > 0 unless the layer's update is 0 on every prompt: ValueError)."""
    r0, r1, r2 = (np.asarray(x, np.float64) for x in (r0, r1, r2))
    a = (r2 - 2 * r1 + r0) / 2
    if not np.all(a > 0):
        raise ValueError("the risks at c = 0, 1, 2 must lie on a convex parabola (r2 - 2 r1 + r0 > 0); got a "
                         f"curvature {a.min():.3g}")
    b = r1 - r0 - a
    return ScaleFit(a, b, r0, -b / (2 * a))


class Decomposition(NamedTuple):
    """A position x step table H [L, L] of harms (row p: the layer at position p + 1 pruned; column r: the
    pruned layer holds the r + 1-th shortest step) as mu + a_p + b_r + e_pr (balanced two-way main effects).
    depth = a_1 - a_L (shallow minus deep, same steps), step = b_1 - b_L (shortest minus longest step, same
    positions); any contrast H[0, i] - H[L-1, j] = depth + (b_i - b_j) + (e_0i - e_(L-1)j) exactly."""

    mean: float
    position: np.ndarray     # a_p [L]
    step: np.ndarray         # b_r [L]
    interaction: np.ndarray  # e_pr [L, L]
    depth_effect: float      # a_1 - a_L
    step_effect: float       # b_1 - b_L

    def contrast(self, first_step: int, last_step: int) -> tuple[float, float, float]:
        """(depth, step part, interaction part) of H[0, first_step] - H[L-1, last_step]: their sum is the
        contrast (first_step, last_step: 0-based step ranks of the layers at positions 1 and L)."""
        e = self.interaction
        return (self.depth_effect, float(self.step[first_step] - self.step[last_step]),
                float(e[0, first_step] - e[-1, last_step]))


def decompose(table) -> Decomposition:
    """The two-way decomposition of a position x step table of harms (``Decomposition``)."""
    H = np.asarray(table, np.float64)
    if H.ndim != 2 or H.shape[0] != H.shape[1] or H.shape[0] < 2 or not np.all(np.isfinite(H)):
        raise ValueError(f"table must be a finite square [L, L] array with L >= 2, got shape {H.shape}")
    mu = float(H.mean())
    a, b = H.mean(axis=1) - mu, H.mean(axis=0) - mu
    e = H - mu - a[:, None] - b[None, :]
    return Decomposition(mu, a, b, e, float(a[0] - a[-1]), float(b[0] - b[-1]))
