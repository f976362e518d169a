"""DARE (Yu et al. 2024, "Language models are Super Mario"): drop each entry of the delta at random and
rescale the survivors by ``1/(1 − p)`` — unbiased, blind to which entries matter.

Here every row keeps the same count (``stagepipe.delta.sparsify``, exact counts: still unbiased) at the
smallest drop rate whose stored rows (values and their bitmap or indices) fit the byte budget.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from stagepipe.delta import dare, dare_rate_for_budget, pack_sparse, unpack_sparse
from stagepipe.methods.base import DeltaMethod, MethodConfig, register


class DAREConfig(MethodConfig):
    name: Literal["dare"]
    seed: int = Field(0, description="seed of the drop masks (with each matrix's name)")


@register
class DARE(DeltaMethod):
    """DARE: random drop and rescale of the delta's entries."""

    name = "dare"
    config = DAREConfig

    def compress(self, delta: torch.Tensor, budget: int, generator: torch.Generator,
                 gram: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        rate = dare_rate_for_budget(*delta.shape, budget)
        return pack_sparse(dare(delta, rate, generator), "dare"), {"drop_rate": rate}

    def decode(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        return unpack_sparse(tensors, shape[1])
