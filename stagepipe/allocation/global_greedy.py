"""Global greedy water-filling on dropped weighted σ² per parameter.

With Fisher-weighted metrics (GFWSVD, K-FAC) σ̃² are predicted loss increases in the same units for
every matrix, so spending the parameter budget where ``Σσ̃² gained / parameters spent`` is largest
is principled (docs/methods.md). Every matrix starts at rank ``align``; steps of
``align`` components are bought greedily; the last step of a matrix turns it dense (all its
remaining σ̃² for the remaining ``mn − r(m+n)`` parameters; ``accounting.water_fill``, which
SoCo's selection shares). The budget is
``kept_fraction × Σ mn`` over the target matrices.
"""

from __future__ import annotations

from typing import Literal

from stagepipe.accounting import FillItem, water_fill
from stagepipe.allocation.base import MatrixSpectrum, Policy, PolicyConfig, register
from stagepipe.errors import StagepipeError


class GlobalGreedyConfig(PolicyConfig):
    policy: Literal["global_greedy"]


@register
class GlobalGreedy(Policy):
    """Water-filling on dropped weighted σ² per parameter across all matrices."""

    name = "global_greedy"
    config = GlobalGreedyConfig

    def propose(self, spectra: list[MatrixSpectrum], kept_fraction: float) -> dict[str, int | None]:
        budget = kept_fraction * sum(s.m * s.n for s in spectra)
        items = [FillItem(s.name, s.m, s.n, s.sigma.double() ** 2) for s in spectra]
        ranks = water_fill(items, budget, self.align)
        if ranks is None:
            raise StagepipeError(f"kept_fraction {kept_fraction} is below the minimum rank {self.align} for every matrix")
        return ranks
