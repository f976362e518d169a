"""BitDelta (Liu et al. 2024): the delta's signs, one bit each, times one scale per matrix (the mean
``|Δ|``, which minimises the Frobenius error of a sign matrix). Its ratio is fixed near 16 (the
scale's two bytes are counted): a budget it cannot meet is refused before anything runs, a looser
one is reported at the ratio it achieves. The paper's scale distillation is not run.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from stagepipe.delta import bitdelta, bitdelta_bytes
from stagepipe.methods.base import DeltaMethod, MethodConfig, register
from stagepipe.quantize import pack, unpack


class BitDeltaConfig(MethodConfig):
    name: Literal["bitdelta"]


@register
class BitDelta(DeltaMethod):
    """BitDelta: sign of the delta and one scale per matrix."""

    name = "bitdelta"
    config = BitDeltaConfig

    def least_bytes(self, m: int, n: int) -> int:
        return bitdelta_bytes(m, n)

    def compress(self, delta: torch.Tensor, budget: int, generator: torch.Generator,
                 gram: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if bitdelta_bytes(*delta.shape) > budget:
            raise ValueError(f"bitdelta stores {bitdelta_bytes(*delta.shape)} bytes for a {tuple(delta.shape)} delta, "
                             f"over the budget of {budget}")
        signed = bitdelta(delta)
        scale = delta.double().abs().mean()
        return {"signs": pack((signed > 0).to(torch.int64).reshape(-1), 1),
                "scale": scale.reshape(1).to(torch.float16)}, {"scale": float(scale)}

    def decode(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        positive = unpack(tensors["signs"], 1, shape[0] * shape[1]).reshape(shape).bool()
        scale = tensors["scale"].to(torch.float64)
        return torch.where(positive, scale, -scale)
