"""The single source of truth for ranks and parameter counts.

A rank-r factorisation of an m×n matrix stores ``r(m+n)`` weights against ``mn`` dense (biases are
unchanged and counted with "other" parameters). Every ratio stagepipe prints or stores is computed
here, *after* rank rounding, and always as a **kept** fraction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict


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
