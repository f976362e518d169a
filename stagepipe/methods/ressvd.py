"""ResSVD / ERC-SVD residual compensation (Bai et al.; docs/methods.md).

For an allocated rank ``r`` split as ``r₁ = round(split·r)`` and ``r₂ = r − r₁``:

1. ``W₁ = SVD_{r₁}(W)`` — plain SVD, weight fidelity;
2. ``R = W − W₁`` and ``R₂`` = the SVD-LLM whitened rank-``r₂`` truncation of ``R`` (right metric
   ``E[x xᵀ]``), activation fidelity;
3. ``Ŵ = W₁ + R₂``, stored as one concatenated factor pair ``[up₁, up₂] · [down₁; down₂]`` of rank
   ``r``, so it costs what any rank-``r`` factorisation costs.

Under one fixed norm two-stage truncation cannot beat the one-shot optimum (Eckart–Young): measured
by ``‖(W − Ŵ) X‖²`` ResSVD is never better than SVD-LLM at the same rank. Any gain comes from mixing
the two norms, so the ``rank_factors`` stage records both losses per matrix. ``split = 0`` is SVD-LLM,
``split = 1`` is plain SVD.

The factors depend on the allocated rank, so they are computed after ``allocate`` (the
``rank_factors`` stage); ``decompose`` computes the one-shot whitened spectrum (the pair
identity × ``gram``), which is what the spectrum-based allocation policies see.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from stagepipe.linalg import MetricRoot, weighted_loss, weighted_svd
from stagepipe.methods.base import MethodConfig, RankDependentMethod, register


class ResSVDConfig(MethodConfig):
    """ERC-SVD residual compensation: plain SVD at rank r₁ = round(split·r), then the SVD-LLM
    whitened SVD of the residual at r₂ = r − r₁; one concatenated rank-r factor pair."""

    name: Literal["ressvd"]
    split: float = Field(0.5, ge=0, le=1, description="share of each matrix's rank given to the plain-SVD stage")


@register
class ResSVD(RankDependentMethod):
    """ResSVD (ERC-SVD): plain SVD, then the whitened SVD of the residual, at the allocated rank."""

    name = "ressvd"
    config = ResSVDConfig
    right = "gram"

    def rank_options(self) -> dict[str, Any]:
        return {"split": self.cfg.split}

    def factors(self, w: torch.Tensor, right: MetricRoot | None, rank: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """(up, down, info) of the two-stage approximation at ``rank``."""
        return residual_factors(w, right, rank, self.cfg.split)


def stage_ranks(rank: int, split: float) -> tuple[int, int]:
    """(r₁, r₂) with ``r₁ = round(split·rank)`` (half-up) and ``r₁ + r₂ = rank``."""
    first = min(rank, max(0, int(split * rank + 0.5)))
    return first, rank - first


def residual_factors(w: torch.Tensor, right: MetricRoot | None, rank: int,
                     split: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(up m×r, down r×n, info) of the two-stage approximation, in float64."""
    w64 = w.detach().to(torch.float64)
    first_rank, second_rank = stage_ranks(rank, split)
    up1, down1 = weighted_svd(w64, None, None).factors(first_rank)
    residual = w64 - up1 @ down1
    up2, down2 = weighted_svd(residual, None, right).factors(second_rank)
    up, down = torch.cat([up1, up2], dim=1), torch.cat([down1, down2], dim=0)
    info = {
        "r1": first_rank, "r2": second_rank,
        "stage1_rel_err": float(torch.linalg.norm(residual) / torch.linalg.norm(w64)),
        "activation_loss": weighted_loss(w64 - up @ down, None, right),
    }
    return up, down, info
