"""ImPart (ACL 2025, arXiv 2504.13237; implemented from the paper, its code has no licence): the SVD of
the delta with each singular vector sparsified at a rate set by its singular value's importance.

``p_i = γ (1 − (s_i/s_max)^C)`` for the kept components, the weakest share ``β`` dropped whole, the
survivors of ``u_i`` and ``v_i`` rescaled so the sparse delta is unbiased for the truncated one
(``stagepipe.delta``). The overall sparsity ``α`` is the smallest that fits the byte budget (the
paper's ``α = 1 − 1/CR`` counts parameters and no indices); ``beta`` and ``exponent`` are the paper's
two hyperparameters, chosen on validation text (``docs/delta``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from stagepipe.delta import impart_for_budget, pack_sparse, sides, two_sided, unpack_sparse
from stagepipe.methods.base import DeltaMethod, MethodConfig, register


class ImPartConfig(MethodConfig):
    name: Literal["impart"]
    beta: float = Field(0.5, ge=0, lt=1, description="share of the weakest singular components dropped whole (β)")
    exponent: float = Field(1.0, gt=0, description="C in p_i = γ (1 − (s_i/s_max)^C)")
    seed: int = Field(0, description="seed of the drop masks (with each matrix's name)")


@register
class ImPart(DeltaMethod):
    """ImPart: SVD of the delta, singular vectors sparsified by importance (ACL 2025)."""

    name = "impart"
    config = ImPartConfig

    def compress(self, delta: torch.Tensor, budget: int, generator: torch.Generator,
                 gram: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        factors = impart_for_budget(delta, budget, self.cfg.beta, self.cfg.exponent, generator)
        stored = two_sided(pack_sparse(factors.up.T.contiguous(), "impart up"), pack_sparse(factors.down, "impart down"))
        kept = factors.rates < 1
        return stored, {"alpha": factors.alpha, "components": int(kept.sum()),
                         "mean_kept_rate": float(factors.rates[kept].mean()) if bool(kept.any()) else None}

    def decode(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        up, down = sides(tensors)
        up, down = unpack_sparse(up, shape[0]), unpack_sparse(down, shape[1])
        return up.T @ down
