"""Low-rank delta: the truncated SVD of the delta at the rank the byte budget buys (float16 factors),
plain (the baseline of the ImPart and Delta-CoMe papers) or whitened by the fine-tuned model's input
Gram ``E[x xᵀ]`` — the rank-r delta that changes the layer's outputs least on the calibration text
(SVD-LLM's objective applied to ``Δ``; its truncation loss is the sum of the dropped whitened σ²).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from stagepipe.delta import VALUE_BYTES, low_rank_bytes
from stagepipe.linalg import factor_metric, weighted_svd
from stagepipe.methods.base import DeltaMethod, MethodConfig, register


class DeltaLowRankConfig(MethodConfig):
    name: Literal["delta_lowrank"]
    metric: Literal["plain", "whitened"] = Field("plain", description="plain SVD of Δ, or weighted by the input Gram")


@register
class DeltaLowRank(DeltaMethod):
    """Low-rank delta: truncated SVD of the delta, plain or whitened by the input Gram."""

    name = "delta_lowrank"
    config = DeltaLowRankConfig

    def pair(self) -> tuple[str, str]:
        return ("identity", "gram") if self.cfg.metric == "whitened" else ("identity", "identity")

    def delta_options(self) -> dict[str, Any]:
        return {"name": self.name, "metric": self.cfg.metric,
                **({"floor_rel": self.cfg.floor_rel} if self.cfg.metric == "whitened" else {})}

    def compress(self, delta: torch.Tensor, budget: int, generator: torch.Generator,
                 gram: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        m, n = delta.shape
        rank = min(budget // (VALUE_BYTES * (m + n)), m, n)
        right = factor_metric(gram, self.cfg.floor_rel, "input Gram") if self.cfg.metric == "whitened" else None
        svd = weighted_svd(delta, None, right)
        up = svd.left[:, :rank] * svd.sigma[:rank]
        info: dict[str, Any] = {"rank": rank, "dropped_energy": svd.dropped_energy(rank)}
        if right is not None and right.repair.get("n_floored"):
            info["repair"] = right.repair  # the Gram's eigenvalue floor, printed in the report
        assert low_rank_bytes(m, n, rank) <= budget
        return {"up": up.to(torch.float16), "down": svd.right[:rank].to(torch.float16)}, info

    def decode(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        return tensors["up"].to(torch.float64) @ tensors["down"].to(torch.float64)
