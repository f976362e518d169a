"""ASVD's sensitivity-based truncation-rank search (docs/methods.md), on achieved counts.

Input: the ``sensitivity`` table — for each matrix and candidate kept fraction ρ, the calibration
perplexity with only that matrix truncated to ρ's aligned rank. All (matrix, ρ) pairs are sorted by
perplexity, most harmful first. For a threshold index ``t`` the pairs at or after ``t`` are
*allowed*, and each matrix takes its smallest allowed ρ (no allowed pair: dense). Raising ``t``
allows fewer pairs, so the kept fraction only grows; the search returns the **largest** ``t`` whose
kept fraction is at most the target, i.e. the fewest, least harmful truncations that meet it.

Unlike the official code, the kept fraction is counted from the aligned ranks by
``stagepipe.accounting`` (not from the nominal ρ), the result is the bisection's converged bound
(not the last probed midpoint), and an unreachable target is an error, not a silent overshoot.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from stagepipe.accounting import factored_params
from stagepipe.allocation.base import Candidate, MatrixSpectrum, Policy, PolicyConfig, register
from stagepipe.errors import StagepipeError


class ASVDSearchConfig(PolicyConfig):
    policy: Literal["asvd_search"]
    candidates: list[float] = Field(
        [0.4, 0.5, 0.6, 0.7, 0.8, 0.9], min_length=1,
        description="kept fractions tried per matrix (ASVD's param_ratio candidates)")
    sensitivity_windows: int | None = Field(
        None, ge=1, description="calibration windows per sensitivity perplexity (default all)")
    sensitivity_memory_gb: float = Field(
        2.0, gt=0, description="hidden states held at once (candidates propagated together)")

    @field_validator("candidates")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(not 0 < c < 1 for c in value):
            raise ValueError(f"every candidate must be a kept fraction in (0, 1), got {value}")
        return sorted(set(value))


@register
class ASVDSearch(Policy):
    """ASVD's search: truncate the matrices whose calibration perplexity suffers least."""

    name = "asvd_search"
    config = ASVDSearchConfig
    needs_sensitivity = True

    def __init__(self, align: int, candidates: list[Candidate] | None = None) -> None:
        super().__init__(align)
        # most harmful first; equal perplexities: the smaller ρ first (harsher), then by name
        self.pairs = sorted(candidates or [], key=lambda c: (-c.ppl, c.kept, c.matrix))
        self.threshold: int | None = None

    @classmethod
    def from_config(cls, cfg: Any, sensitivity: list[Candidate] | None = None) -> ASVDSearch:
        if sensitivity is None:
            raise StagepipeError("asvd_search needs the sensitivity stage's table")
        return cls(cfg.align, sensitivity)

    def details(self) -> dict[str, Any] | None:
        return {"threshold": self.threshold, "pairs": len(self.pairs)}

    def ranks_at(self, threshold: int, spectra: list[MatrixSpectrum]) -> dict[str, int | None]:
        """Ranks when the pairs ``[threshold:]`` are allowed: each matrix's smallest allowed ρ."""
        ranks: dict[str, int | None] = {s.name: None for s in spectra}
        chosen: dict[str, Candidate] = {}
        for pair in self.pairs[threshold:]:
            if pair.matrix in ranks and (pair.matrix not in chosen or pair.kept < chosen[pair.matrix].kept):
                chosen[pair.matrix] = pair
        ranks.update({name: pair.rank for name, pair in chosen.items()})
        return ranks

    def propose(self, spectra: list[MatrixSpectrum], kept_fraction: float) -> dict[str, int | None]:
        total = sum(s.m * s.n for s in spectra)

        def kept(threshold: int) -> float:
            ranks = self.ranks_at(threshold, spectra)
            return sum(factored_params(s.m, s.n, ranks[s.name]) for s in spectra) / total

        if kept(0) > kept_fraction:
            raise StagepipeError(
                f"asvd_search: kept fraction {kept_fraction} is out of reach; every matrix at its smallest candidate keeps "
                f"{kept(0):.4f} (add smaller allocation.candidates)")
        low, high = 0, len(self.pairs)  # invariant: kept(low) ≤ target
        while low < high:
            mid = (low + high + 1) // 2
            if kept(mid) <= kept_fraction:
                low = mid
            else:
                high = mid - 1
        self.threshold = low
        return self.ranks_at(low, spectra)
