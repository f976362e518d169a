"""SVD-LLM V2's heterogeneous allocation, made scale-safe.

For each matrix, ``L_w = sqrt(Σ dropped σ²)`` at the uniform rank of the target. Within a group of
the same matrix type (all ``q_proj``, all ``down_proj``, …) the removed fraction is distributed as
``R_w = |G| · R · score_w / Σ_G score``, so the group mean stays ``R`` and matrices that would lose
more get compressed less. The paper's ``score = 1/log(L)`` changes sign at ``L = 1`` and so depends
on the metric's scale; here ``score = 1/log(e + L/mean_G(L))`` — positive, decreasing in ``L`` and
invariant to rescaling a group's losses.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Literal

from stagepipe.accounting import rank_for_fraction
from stagepipe.allocation.base import MatrixSpectrum, Policy, PolicyConfig, register


class SVDLLMV2Config(PolicyConfig):
    policy: Literal["svdllm_v2"]


@register
class SVDLLMV2(Policy):
    """SVD-LLM V2: within a matrix type, lossier matrices keep more (scale-safe score)."""

    name = "svdllm_v2"
    config = SVDLLMV2Config

    def propose(self, spectra: list[MatrixSpectrum], kept_fraction: float) -> dict[str, int | None]:
        groups: dict[str, list[MatrixSpectrum]] = defaultdict(list)
        for s in spectra:
            groups[s.name.rsplit(".", 1)[-1]].append(s)
        ranks: dict[str, int | None] = {}
        removed = 1.0 - kept_fraction
        for members in groups.values():
            losses = []
            for s in members:
                r = rank_for_fraction(s.m, s.n, kept_fraction, self.align)
                losses.append(math.sqrt(float((s.sigma[r or len(s.sigma):].double() ** 2).sum())))
            mean = sum(losses) / len(losses) or 1.0
            scores = [1.0 / math.log(math.e + loss / mean) for loss in losses]
            total = sum(scores)
            for s, score in zip(members, scores, strict=True):
                share = min(1.0, len(members) * removed * score / total)
                ranks[s.name] = rank_for_fraction(s.m, s.n, max(1.0 - share, 1e-9), self.align)
        return ranks
