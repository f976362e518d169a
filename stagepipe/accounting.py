"""The single source of truth for ranks and parameter counts.

A rank-r factorisation of an m×n matrix stores ``r(m+n)`` weights against ``mn`` dense (biases are
unchanged and counted with "other" parameters). Every ratio stagepipe prints or stores is computed
here, *after* rank rounding, and always as a **kept** fraction.

Storage ``remap8`` (Dobi-SVD's "remapping", ``modeling_lowrank.RemappedLinear``) keeps the
``min(m,n)×r`` square part of both factors in 8 bits (one fp16 scale per component and factor)
and the rest of the longer factor in fp16: ``r(max(m,n) + 2)`` 16-bit words instead of ``r(m+n)``.
Its budget is a **memory** fraction of the dense 16-bit matrices (``memory_report``), printed
beside the parameter fraction, never in its place.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from stagepipe.quantize import Grid, stored_bytes

if TYPE_CHECKING:
    from torch import Tensor


def break_even_rank(m: int, n: int) -> float:
    """Rank at which a factorisation stores as many weights as the dense matrix."""
    return m * n / (m + n)


def max_useful_rank(m: int, n: int, align: int) -> int:
    """Largest multiple of ``align`` whose factorisation stores strictly fewer weights than dense."""
    rank = (math.ceil(break_even_rank(m, n)) - 1) // align * align
    return max(rank, 0)


def rank_for_fraction(m: int, n: int, kept: float, align: int) -> int | None:
    """``floor(kept·mn/(m+n))`` rounded down to ``align`` (at least ``align``).

    Returns ``None`` when no aligned rank below break-even exists: the matrix stays dense.
    """
    cap = max_useful_rank(m, n, align)
    if cap < align:
        return None
    rank = int(kept * break_even_rank(m, n)) // align * align
    return min(max(rank, align), cap)


def factored_params(m: int, n: int, rank: int | None) -> int:
    """Weights stored for one matrix: ``r(m+n)`` if factored (``rank`` not None), else ``mn``."""
    return m * n if rank is None else rank * (m + n)


@dataclass(frozen=True)
class FillItem:
    """One matrix offered to ``water_fill``: its shape and the gain of each of its components in the
    order they are bought (non-increasing: the weighted σ², or SoCo's learned value × cost)."""

    name: str
    m: int
    n: int
    gains: Tensor  # float64, one per component
    cap: int | None = None  # the most components it may keep factored (fewer offered than break-even)


def water_fill(items: Sequence[FillItem], budget: float, align: int) -> dict[str, int | None] | None:
    """Ranks (``None``: dense) that spend ``budget`` weights greedily by gain per weight.

    Every matrix starts at rank ``align`` (dense when no aligned rank is below break-even); steps of
    ``align`` components are bought in order of ``Σ gains / weights``; a matrix's last step turns it
    dense (all its remaining gain for the remaining ``mn − r(m+n)`` weights). A step that does not
    fit is skipped and ends that matrix; cheaper steps elsewhere may still fit. ``None`` when the
    budget is below rank ``align`` for every matrix. Shared by the
    ``global_greedy`` policy and SoCo's selection, so that SoCo without learning *is* that policy."""
    ranks: dict[str, int | None] = {}
    spent = 0
    def top(item: FillItem) -> int:
        useful = max_useful_rank(item.m, item.n, align)
        return useful if item.cap is None else min(useful, item.cap // align * align)

    for item in items:
        cap = top(item)
        ranks[item.name] = align if cap >= align else None
        spent += factored_params(item.m, item.n, ranks[item.name])
    if spent > budget:
        return None  # the budget is below rank ``align`` for every matrix
    by_name = {item.name: item for item in items}
    heap: list[tuple[float, int, str]] = []

    def push(name: str) -> None:
        item, rank = by_name[name], ranks[name]
        if rank is None:
            return
        if rank + align <= top(item):
            gain, cost = float(item.gains[rank : rank + align].sum()), align * (item.m + item.n)
        else:  # the next step is "keep it dense"
            gain, cost = float(item.gains[rank:].sum()), item.m * item.n - rank * (item.m + item.n)
        heapq.heappush(heap, (-gain / cost, len(heap), name))

    for name in ranks:
        push(name)
    while heap:
        _, _, name = heapq.heappop(heap)
        item, rank = by_name[name], ranks[name]
        assert rank is not None
        new = rank + align if rank + align <= top(item) else None
        cost = factored_params(item.m, item.n, new) - factored_params(item.m, item.n, rank)
        if spent + cost > budget:
            continue  # this step does not fit; smaller steps elsewhere may
        ranks[name], spent = new, spent + cost
        push(name)
    return ranks


#: how factored matrices are stored: ``16-bit`` (two factors) or ``remap8`` (square part in 8 bits)
STORAGES = ("16-bit", "remap8")  # (a quantising method's dense targets: "quantized", bytes as packed)


def rank_cost(m: int, n: int, storage: str = "16-bit") -> int:
    """16-bit words one more component costs: ``m+n`` for two 16-bit factors, ``max(m,n)+2`` remapped
    (two 8-bit halves of the square part, the longer factor's rest in fp16, two fp16 scales)."""
    if storage == "remap8":
        return max(m, n) + 2
    if storage == "16-bit":
        return m + n
    raise ValueError(f"unknown storage {storage!r}; expected one of {STORAGES}")


def max_stored_rank(m: int, n: int, storage: str = "16-bit") -> int:
    """Largest rank (at most ``min(m, n)``) that stores strictly fewer words than the dense matrix."""
    return min(min(m, n), (m * n - 1) // rank_cost(m, n, storage))


class MemoryReport(BaseModel):
    """Bytes of the target matrices as stored, against the same matrices dense in 16 bits, and the
    stored bits per weight (every overhead counted)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    storage: str
    requested_kept_memory: float | None
    dense_bytes_16bit: int
    stored_bytes: int
    kept_memory_over_target_matrices: float
    bits_per_weight: float


def _memory(shapes: Mapping[str, tuple[int, int]], stored: Mapping[str, int], storage: str,
            requested: float | None) -> MemoryReport:
    """The one memory accounting: ``stored`` bytes per target matrix against ``2mn`` each."""
    weights = sum(shapes[name][0] * shapes[name][1] for name in stored)
    total = sum(stored.values())
    return MemoryReport(storage=storage, requested_kept_memory=requested, dense_bytes_16bit=2 * weights,
                        stored_bytes=total, kept_memory_over_target_matrices=total / (2 * weights) if weights else 1.0,
                        bits_per_weight=8 * total / weights if weights else 16.0)


def memory_report(shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int | None], storage: str,
                  requested: float) -> MemoryReport:
    """Stored bytes of the target matrices under ``storage`` (a dense target: ``2mn``)."""
    stored = {name: 2 * (shapes[name][0] * shapes[name][1] if r is None else r * rank_cost(*shapes[name], storage))
              for name, r in ranks.items()}
    return _memory(shapes, stored, storage, requested)


def quantized_memory_report(shapes: Mapping[str, tuple[int, int]], stored: Mapping[str, int],
                            requested_bits: float | None, storage: str = "quantized") -> MemoryReport:
    """Quantised dense targets: ``stored`` = the bytes each one's stored tensors hold (the method's
    ``stored_bytes``: integer grids ``quantize.stored_bytes``, codebooks ``gptvq.stored_bytes``); the
    requested memory fraction is the requested bits per weight over 16."""
    return _memory(shapes, stored, storage, None if requested_bits is None else requested_bits / 16)


def delta_memory_report(shapes: Mapping[str, tuple[int, int]], stored: Mapping[str, int], method: str,
                        requested_ratio: float | None) -> MemoryReport:
    """A delta method (``delta``): ``stored`` = the bytes of each target's stored delta (``delta.tensor_bytes``)
    against the dense 16-bit delta; the delta compression ratio is ``1 / kept_memory_over_target_matrices``."""
    return _memory(shapes, stored, f"delta-{method}", None if requested_ratio is None else 1 / requested_ratio)


def grid_target_bytes(m: int, n: int, rank: int | None, grid: Grid) -> int:
    """Bytes of one target on an integer grid (``quantize_factors``): its two factors (``r × n`` and
    ``m × r``) when factored, the ``m × n`` matrix when kept dense, in ``quantize.stored_bytes``' layout."""
    return stored_bytes(m, n, grid) if rank is None else stored_bytes(rank, n, grid) + stored_bytes(m, rank, grid)


def factor_grid_memory_report(shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int | None], grid: Grid,
                              requested: float | None, bits: Mapping[str, int] | None = None) -> MemoryReport:
    """Every target on an integer grid (``quantize_factors``), at ``grid``'s width or, for the names in
    ``bits``, at the width a joint (rank, bits) allocation gave it (``grid_target_bytes``)."""
    bits = bits or {}
    stored = {name: grid_target_bytes(*shapes[name], r, replace(grid, bits=bits.get(name, grid.bits)))
              for name, r in ranks.items()}
    widths = sorted({bits.get(name, grid.bits) for name in ranks})
    label = "int" + "/".join(map(str, widths))
    return _memory(shapes, stored, f"{label}-g{grid.group_size or 'channel'}", requested)


class RatioReport(BaseModel):
    """Achieved kept fractions under the three accountings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requested_kept_fraction: float
    kept_over_target_matrices: float
    kept_over_block_linears: float
    kept_over_model: float
    n_factored: int
    n_dense_targets: int
    dense_params_model: int
    kept_params_model: int


def ratio_report(
    shapes: Mapping[str, tuple[int, int]],
    ranks: Mapping[str, int | None],
    model_params: int,
    requested: float,
) -> RatioReport:
    """Achieved kept fractions over the target matrices, all block linears and the whole model.

    ``shapes`` holds every linear weight inside the decoder blocks (``name → (m, n)``); ``ranks``
    holds the target matrices, ``None`` meaning "target left dense"; ``model_params`` counts the
    whole model once (tied embeddings once).
    """
    kept = {name: factored_params(*shapes[name], r) for name, r in ranks.items()}
    return kept_report(shapes, kept, sum(r is not None for r in ranks.values()), model_params, requested)


def kept_report(
    shapes: Mapping[str, tuple[int, int]],
    kept: Mapping[str, int],
    n_compressed: int,
    model_params: int,
    requested: float,
) -> RatioReport:
    """``ratio_report`` from the weights each target matrix keeps, however it is compressed: two
    factors (``factored_params``) or a smaller dense matrix (MoDeGPT: rows × columns kept)."""
    dense_targets = sum(shapes[n][0] * shapes[n][1] for n in kept)
    kept_targets = sum(kept.values())
    dense_blocks = sum(m * n for m, n in shapes.values())
    saved = dense_targets - kept_targets
    return RatioReport(
        requested_kept_fraction=requested,
        kept_over_target_matrices=kept_targets / dense_targets if dense_targets else 1.0,
        kept_over_block_linears=(dense_blocks - saved) / dense_blocks if dense_blocks else 1.0,
        kept_over_model=(model_params - saved) / model_params,
        n_factored=n_compressed,
        n_dense_targets=len(kept) - n_compressed,
        dense_params_model=model_params,
        kept_params_model=model_params - saved,
    )
