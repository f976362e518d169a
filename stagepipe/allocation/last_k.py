"""ERC-SVD's partial-layer policy: leave the first N−k decoder blocks dense and compress the last k
at a kept fraction ``ρ_l`` with ``(1 − ρ_l) · P_last_k = (1 − ρ) · P_all`` (P: target parameters),
so the overall kept fraction is the target. ``k`` is given or the smallest with ``ρ_l ≥ min_kept``.
"""

from __future__ import annotations

from stagepipe.accounting import rank_for_fraction
from stagepipe.allocation.base import MatrixSpectrum, Policy, layer_of
from stagepipe.errors import StagepipeError


class LastK(Policy):
    name = "last_k"

    def __init__(self, align: int, last_k: int | None = None, min_kept: float = 0.1) -> None:
        super().__init__(align)
        self.last_k, self.min_kept = last_k, min_kept

    def allocate(self, spectra: list[MatrixSpectrum], kept_fraction: float) -> dict[str, int | None]:
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
