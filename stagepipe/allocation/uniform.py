"""Uniform: every matrix keeps the same fraction, ``r = floor(ρ·mn/(m+n))`` aligned down; the
budget that rounding leaves is then spent on the matrices whose next step keeps the most weighted
σ² per parameter (``spend_budget``)."""

from typing import Literal

from stagepipe.accounting import rank_for_fraction
from stagepipe.allocation.base import MatrixSpectrum, Policy, PolicyConfig, register


class UniformConfig(PolicyConfig):
    policy: Literal["uniform"]


@register
class Uniform(Policy):
    """Every matrix keeps the same fraction of its parameters."""

    name = "uniform"
    config = UniformConfig

    def propose(self, spectra: list[MatrixSpectrum], kept_fraction: float) -> dict[str, int | None]:
        return {s.name: rank_for_fraction(s.m, s.n, kept_fraction, self.align) for s in spectra}
