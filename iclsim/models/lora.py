"""Low-rank adaptation of a frozen base model (docs/theory.md §3.3, LoRA)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from iclsim import _validate as check
from iclsim import protocols
from iclsim.designs import GramPrompts, Prompts
from iclsim.protocols import Effective
if TYPE_CHECKING:
    from iclsim.models import Frozen
from iclsim.models._common import Params, _normal_init

__all__ = ["LoRA"]


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Low-rank adaptation of a frozen base model (docs/theory.md §3, LoRA): each target matrix becomes
    W_t + A_t B_t^T with A_t [m, r] random and B_t [k, r] zero at init, so training starts at the
    pretrained model. On attention's factors (targets Wq, Wk) the effective W moves by rank <= 2r;
    on PGD's W by rank <= r."""

    base: Any
    base_params: Frozen
    rank: int
    targets: tuple[str, ...]
    dtype: Any = jnp.float32

    def __post_init__(self):
        check.positive_int("rank", self.rank)
        check.float_dtype("dtype", self.dtype)
        missing = [t for t in self.targets if t not in self.base_params.tree]
        if missing or not self.targets:
            raise ValueError(f"targets must name matrices of the base model ({sorted(self.base_params.tree)}), "
                             f"got {self.targets!r}")
        for t in self.targets:
            if self.rank > min(self.base_params.tree[t].shape):
                raise ValueError(f"rank must be <= {min(self.base_params.tree[t].shape)} for {t}, got {self.rank}")

    @property
    def inert_padding(self) -> bool:
        return protocols.inert_padding(self.base)

    @property
    def apply_gram(self):
        """``apply`` on GramPrompts where the base model reads only the Gram matrix, else None."""
        return self.apply if protocols.reads_gram(self.base) else None

    def init(self, key) -> Params:
        shapes = {t: self.base_params.tree[t].shape for t in self.targets}
        A = _normal_init(key, self.dtype, **{t: ((m, self.rank), m**-0.5) for t, (m, _) in shapes.items()})
        return {t: {"A": A[t], "B": jnp.zeros((k, self.rank), self.dtype)} for t, (_, k) in shapes.items()}

    def merged(self, params: Params) -> Params:
        merged = dict(self.base_params.tree)
        for t in self.targets:
            merged[t] = merged[t] + params[t]["A"] @ params[t]["B"].T
        return merged

    def apply(self, params: Params, prompts: Prompts | GramPrompts) -> jax.Array:
        return protocols.predict(self.base, self.merged(params), prompts)

    def effective_pgd(self, params: Params, n: int) -> Effective:
        return self.base.effective_pgd(self.merged(params), n)
