"""Low-rank compensation of quantisation error, in the project's loss metrics (issue #33).

``W ≈ Q + U D``: quantise ``W`` to ``Q``, then take the rank-``r`` weighted SVD of the error
``E = W − Q`` under the layer's metrics ``(P, Q_x)`` (``linalg.weighted_svd``). With identity metrics
this is LoRC (a plain SVD of ``E``); with the input Gram's root on the right it is EoRA (the error
in the activation eigenspace); with the K-FAC output factor on the left as well it is the loss the
project's weighted SVD minimises everywhere else. The compensation's loss is exactly the dropped
weighted energy of ``E`` (``WeightedSVD.dropped_energy``), which the tests check.

``rounds > 1`` alternates as CALDERA does — ``Q ← quant(W − U D)``, ``(U, D) ← rank-r weighted SVD
of (W − Q)`` — and keeps the round with the lowest weighted loss, so it is never worse than one
round (LoRC / EoRA), its starting point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from stagepipe.linalg import MetricRoot, weighted_loss, weighted_svd
from stagepipe.quantize import Quantized


@dataclass
class Compensated:
    quantized: Quantized
    up: torch.Tensor     # m × r
    down: torch.Tensor   # r × n
    losses: list[float]  # weighted loss ‖Pᵀ (W − Q − U D) Q_x‖² after each round
    best_round: int

    @property
    def weight(self) -> torch.Tensor:
        return self.quantized.weight + self.up @ self.down


def compensate(w: torch.Tensor, quantize: Callable[[torch.Tensor], Quantized], rank: int,
               left: MetricRoot | None = None, right: MetricRoot | None = None, rounds: int = 1) -> Compensated:
    """``W ≈ quant + rank-r weighted low rank of its error``, alternated ``rounds`` times (best kept)."""
    if rounds < 1 or rank < 0:
        raise ValueError(f"rounds {rounds} and rank {rank}: at least one round and a rank ≥ 0")
    w = w.double()
    best: Compensated | None = None
    losses: list[float] = []
    low_rank = torch.zeros_like(w)
    for round_index in range(rounds):
        quantized = quantize(w - low_rank)
        error = weighted_svd(w - quantized.weight, left, right)
        up, down = error.factors(rank)
        low_rank = up @ down
        losses.append(weighted_loss(w - quantized.weight - low_rank, left, right))
        if best is None or losses[-1] < min(losses[:-1]):
            best = Compensated(quantized, up, down, losses, round_index)
    assert best is not None  # rounds ≥ 1; its losses are the list every round appended to
    return best
