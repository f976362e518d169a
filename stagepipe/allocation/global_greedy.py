"""Global greedy water-filling on dropped weighted σ² per parameter.

With Fisher-weighted metrics (GFWSVD, K-FAC) σ̃² are predicted loss increases in the same units for
every matrix, so spending the parameter budget where ``Σσ̃² gained / parameters spent`` is largest
is principled (docs/methods.md). Every matrix starts at rank ``align``; steps of
``align`` components are bought greedily; the last step of a matrix turns it dense (all its
remaining σ̃² for the remaining ``mn − r(m+n)`` parameters). The budget is
``kept_fraction × Σ mn`` over the target matrices.
"""

from __future__ import annotations

import heapq
from typing import Literal

from stagepipe.accounting import factored_params, max_useful_rank
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
        align = self.align
        budget = kept_fraction * sum(s.m * s.n for s in spectra)
        ranks: dict[str, int | None] = {}
        energy = {s.name: (s.sigma.double() ** 2) for s in spectra}
        spent = 0
        for s in spectra:
            cap = max_useful_rank(s.m, s.n, align)
            ranks[s.name] = align if cap >= align else None
            spent += factored_params(s.m, s.n, ranks[s.name])
        if spent > budget:
            raise StagepipeError(f"kept_fraction {kept_fraction} is below the minimum rank {align} for every matrix")
        heap: list[tuple[float, int, str]] = []
        by_name = {s.name: s for s in spectra}

        def push(name: str) -> None:
            s, rank = by_name[name], ranks[name]
            if rank is None:
                return
            cap = max_useful_rank(s.m, s.n, align)
            if rank + align <= cap:
                gain = float(energy[name][rank : rank + align].sum())
                cost = align * (s.m + s.n)
            else:  # the next step is "keep it dense"
                gain = float(energy[name][rank:].sum())
                cost = s.m * s.n - rank * (s.m + s.n)
            heapq.heappush(heap, (-gain / cost, len(heap), name))

        for name in ranks:
            push(name)
        while heap:
            _, _, name = heapq.heappop(heap)
            s, rank = by_name[name], ranks[name]
            cap = max_useful_rank(s.m, s.n, align)
            new = rank + align if rank + align <= cap else None
            cost = factored_params(s.m, s.n, new) - factored_params(s.m, s.n, rank)
            if spent + cost > budget:
                continue  # this step does not fit; smaller steps elsewhere may
            ranks[name], spent = new, spent + cost
            push(name)
        return ranks
