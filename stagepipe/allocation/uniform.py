"""Uniform: every matrix keeps the same fraction, ``r = floor(ρ·mn/(m+n))`` aligned down."""

from stagepipe.accounting import rank_for_fraction
from stagepipe.allocation.base import MatrixSpectrum, Policy


class Uniform(Policy):
    name = "uniform"

    def allocate(self, spectra: list[MatrixSpectrum], kept_fraction: float) -> dict[str, int | None]:
        return {s.name: rank_for_fraction(s.m, s.n, kept_fraction, self.align) for s in spectra}
