"""ImPart-Qt (ACL 2025, from the paper): ImPart's sparse singular vectors with their kept entries quantised
by a masked GPTQ — 8 bits for the first 2 components, 3 for the next 32, 2 for the rest — at the
sparsity whose stored bytes fit the budget (the paper searches it too).

``down`` (components × inputs) is quantised under the input Gram ``H`` (capture's, on the fine-tuned
model), ``up`` under ``D_q H D_qᵀ``; only kept entries get codes and the error feedback never fills a
dropped one (``stagepipe.delta.masked_gptq``). One float16 scale per component and factor (GPTQ's
symmetric grid, fitted on the kept entries before the sweep). Bytes: the codes, where they are, the
scales and each vector's count, format and bits (``delta.quantized_vector_bytes``, equal to the files).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from stagepipe.delta import BitSchedule, impart_qt_for_budget, sides, unpack_quantized_sparse
from stagepipe.methods.base import DeltaMethod, MethodConfig, register


class ImPartQtConfig(MethodConfig):
    name: Literal["impart_qt"]
    beta: float = Field(0.0, ge=0, lt=1, description="share of the weakest singular components dropped whole (β)")
    exponent: float = Field(1.0, gt=0, description="C in p_i = γ (1 − (s_i/s_max)^C)")
    bits: list[int] = Field([8, 3, 2], min_length=1, description="bits of the kept components, in singular-value order")
    counts: list[int] = Field([2, 32], description="components at each of bits[:-1]; the rest at bits[-1]")
    damp: float = Field(0.01, ge=0, description="added to each Hessian's diagonal, relative to its mean")
    seed: int = Field(0, description="seed of the drop masks (with each matrix's name)")


@register
class ImPartQt(DeltaMethod):
    """ImPart-Qt: ImPart's sparse singular vectors quantised by masked GPTQ at 8/3/2 bits."""

    name = "impart_qt"
    config = ImPartQtConfig

    def pair(self) -> tuple[str, str]:
        return "identity", "gram"  # GPTQ's Hessian: the input Gram

    def compress(self, delta: torch.Tensor, budget: int, generator: torch.Generator,
                 gram: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if gram is None:
            raise ValueError("impart_qt needs the input Gram (capture's statistics)")
        schedule = BitSchedule(tuple(self.cfg.bits), tuple(self.cfg.counts))
        found = impart_qt_for_budget(delta, gram / max(float(torch.diag(gram).mean()), 1e-30), budget, self.cfg.beta,
                                     self.cfg.exponent, schedule, self.cfg.damp, generator)
        return found.tensors, {"alpha": found.alpha, "components": found.components}

    def decode(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        up, down = sides(tensors)
        return unpack_quantized_sparse(up, shape[0]).T @ unpack_quantized_sparse(down, shape[1])
