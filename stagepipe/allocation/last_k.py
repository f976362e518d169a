"""ERC-SVD's partial-layer policy: leave the first N−k decoder blocks dense and compress the last k
at a kept fraction ``ρ_l`` with ``(1 − ρ_l) · P_last_k = (1 − ρ) · P_all`` (P: target parameters),
so the overall kept fraction is the target. ``k`` is given or the smallest with ``ρ_l ≥ min_kept``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from stagepipe.accounting import rank_for_fraction
from stagepipe.allocation.base import Candidate, MatrixSpectrum, Policy, PolicyConfig, layer_of, register
from stagepipe.errors import StagepipeError


class LastKConfig(PolicyConfig):
    policy: Literal["last_k"]
    last_k: int | None = Field(None, ge=1, description="blocks to compress (default: smallest feasible)")
    min_kept: float = Field(0.1, gt=0, lt=1, description="smallest kept fraction of a compressed block")


@register
class LastK(Policy):
    """ERC-SVD: leave the first blocks dense, compress the last k harder."""

    name = "last_k"
    config = LastKConfig

    def __init__(self, align: int, last_k: int | None = None, min_kept: float = 0.1) -> None:
        super().__init__(align)
        self.last_k, self.min_kept = last_k, min_kept

    @classmethod
    def from_config(cls, cfg: Any, sensitivity: list[Candidate] | None = None) -> LastK:
        return cls(cfg.align, cfg.last_k, cfg.min_kept)

    def propose(self, spectra: list[MatrixSpectrum], kept_fraction: float) -> dict[str, int | None]:
        layers = sorted({layer_of(s.name) for s in spectra})
        total = sum(s.m * s.n for s in spectra)
        candidates = [self.last_k] if self.last_k else range(1, len(layers) + 1)
        for k in candidates:
            chosen = set(layers[-k:])
            part = sum(s.m * s.n for s in spectra if layer_of(s.name) in chosen)
            kept_last = 1.0 - (1.0 - kept_fraction) * total / part
            if kept_last >= self.min_kept:
                return {s.name: rank_for_fraction(s.m, s.n, kept_last, self.align) if layer_of(s.name) in chosen else None
                        for s in spectra}
        raise StagepipeError(f"last_k: no k ≤ {len(layers)} reaches kept fraction {kept_fraction} with min_kept {self.min_kept}")
