"""What a policy sees (each target matrix's shape and full weighted spectrum), the policy base
class, and the registry.

A policy is one module: its config model (a subclass of ``PolicyConfig`` whose ``policy`` is a
``Literal``) and its ``Policy`` subclass decorated with ``@register``. Stages ask the policy
class what it needs (``needs_sensitivity``), never its name.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field

from stagepipe.accounting import factored_params, max_useful_rank
from stagepipe.errors import StagepipeError
from stagepipe.schema import Strict, registrar


@dataclass(frozen=True)
class MatrixSpectrum:
    name: str  # full module name, e.g. model.layers.3.mlp.up_proj
    m: int
    n: int
    sigma: torch.Tensor  # weighted singular values, descending
    #: factors stored up to this rank (``decompose``); set for a policy that allocates bits
    stored_rank: int | None = None
    #: bits → (relative error of the factors' product, of the dense matrix) on that grid (``allocate``)
    grid_errors: Mapping[int, tuple[float, float]] | None = None


@dataclass(frozen=True)
class Candidate:
    """One row of the ``sensitivity`` table: a matrix truncated to a candidate kept fraction."""

    matrix: str  # full module name
    kept: float  # the candidate kept fraction ρ
    rank: int  # its aligned rank
    ppl: float  # calibration perplexity with only this matrix truncated


class PolicyConfig(Strict):
    """Options every policy has."""

    policy: str
    align: int = Field(8, ge=1, description="every rank is a multiple of this")


class Policy(ABC):
    name: ClassVar[str]
    config: ClassVar[type[PolicyConfig]]
    #: the policy reads the ``sensitivity`` stage's table (so that stage is part of the pipeline)
    needs_sensitivity: ClassVar[bool] = False
    #: the policy chooses a bit width per matrix too (``allocate_with_bits``, a byte budget)
    allocates_bits: ClassVar[bool] = False

    def __init__(self, align: int) -> None:
        self.align = align

    @classmethod
    def from_config(cls, cfg: Any, sensitivity: list[Candidate] | None = None) -> Policy:
        return cls(cfg.align)

    @classmethod
    def check_pipeline(cls, config: Any) -> None:
        """Refuse, with one ``ValueError`` line naming the key, a pipeline this policy cannot serve."""
        return None

    def allocate_with_bits(self, spectra: list[MatrixSpectrum], bits_per_weight: float,
                           group_size: int | None) -> tuple[dict[str, int | None], dict[str, int]]:
        """Ranks and bit widths per matrix within ``bits_per_weight`` (policies with ``allocates_bits``)."""
        raise NotImplementedError(f"{self.name} does not allocate bit widths")

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]

    def details(self) -> dict[str, Any] | None:
        """What the last ``allocate`` decided beyond the ranks (for the report), if anything."""
        return None

    @abstractmethod
    def propose(self, spectra: list[MatrixSpectrum], kept_fraction: float) -> dict[str, int | None]:
        """The policy's own ranks (``None``: leave dense), multiples of ``align`` below break-even."""

    def allocate(self, spectra: list[MatrixSpectrum], kept_fraction: float) -> dict[str, int | None]:
        """The policy's ranks, then the budget spent exactly (``spend_budget``): never above the
        target, and no further aligned step of a factored matrix would fit."""
        return spend_budget(self.propose(spectra, kept_fraction), spectra, kept_fraction, self.align)


def spend_budget(ranks: dict[str, int | None], spectra: list[MatrixSpectrum], kept_fraction: float,
                 align: int) -> dict[str, int | None]:
    """Bring the kept parameters of ``ranks`` to the largest total ≤ ``kept_fraction`` that aligned
    steps of the factored matrices can reach, greedily by weighted σ² per parameter.

    Rounding every rank down to ``align`` leaves up to one step per matrix unspent (1.8 points of
    parameters on SmolLM2 at 0.8, worth 8 % perplexity); a policy that overshoots (a capped share)
    would break the target. Over budget, the steps that drop the least σ² per parameter are taken
    back; under budget, the steps that keep the most σ² per parameter are bought while they fit.
    Dense matrices stay dense; no rank leaves ``[align, max_useful_rank]``.
    """
    ranks = dict(ranks)
    by_name = {s.name: s for s in spectra}
    budget = kept_fraction * sum(s.m * s.n for s in spectra)
    spent = sum(factored_params(s.m, s.n, ranks[s.name]) for s in spectra)

    def energy(s: MatrixSpectrum, low: int, high: int) -> float:
        return float((s.sigma[low:high].double() ** 2).sum()) / (align * (s.m + s.n))

    while spent > budget + 1e-9:
        shrinkable = [(energy(s, ranks[s.name] - align, ranks[s.name]), s.name) for s in spectra
                      if ranks[s.name] is not None and ranks[s.name] - align >= align]
        if not shrinkable:
            raise StagepipeError(f"kept fraction {kept_fraction} is out of reach: every factored matrix is at rank "
                                 f"{align} and {spent / budget * kept_fraction:.4f} is kept")
        _, name = min(shrinkable)
        ranks[name] -= align
        spent -= align * (by_name[name].m + by_name[name].n)
    heap = [(-energy(s, ranks[s.name], ranks[s.name] + align), s.name) for s in spectra
            if ranks[s.name] is not None and ranks[s.name] + align <= max_useful_rank(s.m, s.n, align)]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        s = by_name[name]
        cost = align * (s.m + s.n)
        if spent + cost > budget + 1e-9:
            continue  # this step does not fit; a cheaper one elsewhere may
        ranks[name] += align
        spent += cost
        if ranks[name] + align <= max_useful_rank(s.m, s.n, align):
            heapq.heappush(heap, (-energy(s, ranks[name], ranks[name] + align), name))
    return ranks


def layer_of(name: str) -> int:
    """Decoder block index of a full module name (its first integer component)."""
    return next(int(part) for part in name.split(".") if part.isdigit())


POLICIES: dict[str, type[Policy]] = {}
#: the policy of a pipeline whose ``allocation`` block names none
DEFAULT_POLICY = "uniform"


#: class decorator: add a policy to ``POLICIES`` under its config's ``policy`` literal
register = registrar(POLICIES, "policy")
