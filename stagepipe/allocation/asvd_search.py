"""ASVD's sensitivity-based truncation-rank search (algorithms notes §2.3), on achieved counts.

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

from dataclasses import dataclass

from stagepipe.accounting import factored_params
from stagepipe.allocation.base import MatrixSpectrum, Policy
from stagepipe.errors import StagepipeError


@dataclass(frozen=True)
class Candidate:
    matrix: str  # full module name
    kept: float  # the candidate kept fraction ρ
    rank: int  # its aligned rank
    ppl: float  # calibration perplexity with only this matrix truncated


class ASVDSearch(Policy):
    name = "asvd_search"

    def __init__(self, align: int, candidates: list[Candidate] | None = None) -> None:
        super().__init__(align)
        # most harmful first; equal perplexities: the smaller ρ first (harsher), then by name
        self.pairs = sorted(candidates or [], key=lambda c: (-c.ppl, c.kept, c.matrix))
        self.threshold: int | None = None

    def ranks_at(self, threshold: int, spectra: list[MatrixSpectrum]) -> dict[str, int | None]:
        """Ranks when the pairs ``[threshold:]`` are allowed: each matrix's smallest allowed ρ."""
        ranks: dict[str, int | None] = {s.name: None for s in spectra}
        chosen: dict[str, Candidate] = {}
        for pair in self.pairs[threshold:]:
            if pair.matrix in ranks and (pair.matrix not in chosen or pair.kept < chosen[pair.matrix].kept):
                chosen[pair.matrix] = pair
        ranks.update({name: pair.rank for name, pair in chosen.items()})
        return ranks

    def allocate(self, spectra: list[MatrixSpectrum], kept_fraction: float) -> dict[str, int | None]:
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
