"""Ranks **and** bit widths in one loss currency, under a byte budget (issue #33 item 3).

With ``method.quantize_factors`` every target is stored on an integer grid: its two factors at rank
``r`` or, kept dense, the matrix itself. This policy chooses, per matrix, one option ``(r, b)`` —
rank ``r`` (a multiple of ``align`` up to the stored rank) or dense, and a width ``b`` from
``bits`` — so that the stored bytes (``accounting.grid_target_bytes``, every scale and shape
counted) stay within ``target.bits_per_weight`` over the target matrices and the predicted loss is
least. The predicted loss of an option is in the weighted-SVD currency of the other policies:

    loss(r, b)     = κ · Σ_{i>r} σ̃ᵢ²  +  ε_f(b) · Σ_{i≤r} σ̃ᵢ²      (truncation + noise on what is kept)
    loss(dense, b) = ε_d(b) · Σ σ̃ᵢ²

where ``ε_f(b)`` and ``ε_d(b)`` are the matrix's measured relative errors on that grid, by the
quantiser ``quantize_factors`` runs (GPTQ), in the spectra's own metric pair (``error_metric:
method``; ``input_gram``: under the input Gram alone, the first model, which assumes the output-side
metric is isotropic): of the product of its
factors at the stored rank, and of the matrix itself (the ``grid_errors`` stage measures them;
``MatrixSpectrum.grid_errors``). So ``ε_d·Σσ̃²`` is exactly the weighted loss of the quantised matrix;
on factors the model takes the noise to be a fixed fraction of the energy kept.

``κ`` (``truncation_scale``, default 1: the one currency as it is) weighs truncation against
quantisation where the weighted loss misprices one of them: on Gemma-3 the K-FAC tail predicts 35×
less loss for truncating to 0.6 than GPTQ 3-bit costs, while the model's perplexity says truncation
is the worse of the two (docs/quantize). It is chosen on the validation split (``benchmarks/tune.py``),
never on the test split.

The choice is a multiple-choice knapsack, solved by its Lagrangian: for a price ``λ`` per byte
each matrix takes ``argmin loss + λ·bytes`` (the lower convex hull of its options); ``λ`` is
bisected to the cheapest price whose choices fit; then the bytes left are spent greedily on the
upgrade with the most loss saved per byte that still fits, until none does.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from stagepipe.accounting import grid_target_bytes, max_useful_rank
from stagepipe.allocation.base import MatrixSpectrum, Policy, PolicyConfig, register
from stagepipe.errors import StagepipeError
from stagepipe.quantize import Grid


class RankBitsConfig(PolicyConfig):
    policy: Literal["rank_bits"]
    bits: list[int] = Field([2, 3, 4, 8], min_length=1, description="bit widths a matrix may be stored at (2..8)")
    dense: bool = Field(True, description="a matrix may also be kept dense on the grid (no factors)")
    truncation_scale: float = Field(1.0, gt=0, description="κ: truncated σ̃² count κ times against measured "
                                    "quantisation loss (1: one currency; choose it on the validation split)")
    error_metric: Literal["method", "input_gram"] = Field(
        "method", description="ε in the method's own metric pair (ε_d·Σσ̃² is the weighted loss), or relative "
                              "output error under the input Gram alone (the first model)")

    @field_validator("bits")
    @classmethod
    def _widths(cls, value: list[int]) -> list[int]:
        if any(not 2 <= b <= 8 for b in value):
            raise ValueError(f"every width must be in 2..8, got {value}")
        return sorted(set(value))


@register
class RankBits(Policy):
    """Ranks and bit widths per matrix by one predicted loss under a byte budget (quantize_factors)."""

    name = "rank_bits"
    config = RankBitsConfig
    allocates_bits = True

    def __init__(self, align: int, bits: list[int], dense: bool, truncation_scale: float = 1.0) -> None:
        super().__init__(align)
        self.bits, self.dense, self.truncation_scale = bits, dense, truncation_scale
        self._details: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, cfg: Any, sensitivity=None) -> RankBits:
        return cls(cfg.align, list(cfg.bits), cfg.dense, cfg.truncation_scale)

    @classmethod
    def check_pipeline(cls, config: Any) -> None:
        qf = config.method.quantize_factors
        if qf is None:
            raise ValueError("allocation.policy: rank_bits chooses bit widths for the quantize_factors stage; "
                             "set method.quantize_factors")
        if config.target.bits_per_weight is None:
            raise ValueError("target.bits_per_weight: rank_bits spends a byte budget; set it (and no kept_fraction)")
        if config.target.kept_fraction != 1.0:
            raise ValueError("target.kept_fraction: rank_bits's budget is target.bits_per_weight; remove kept_fraction")
        if "bits" in qf.model_fields_set:
            raise ValueError("method.quantize_factors.bits: rank_bits chooses each matrix's width from "
                             "allocation.bits; remove it")

    def propose(self, spectra: list[MatrixSpectrum], kept_fraction: float) -> dict[str, int | None]:
        raise StagepipeError("rank_bits allocates under a byte budget: allocate_with_bits")

    def details(self) -> dict[str, Any] | None:
        return self._details

    def options(self, s: MatrixSpectrum, group_size: int | None) -> tuple[list[tuple[int | None, int]], torch.Tensor, torch.Tensor]:
        """Every ``(rank or None, bits)`` of one matrix with its predicted loss and stored bytes."""
        if s.grid_errors is None:
            raise StagepipeError(f"{s.name}: rank_bits needs the measured grid errors of every matrix")
        energy = s.sigma.double() ** 2
        total, head = float(energy.sum()), torch.cumsum(energy, 0)
        top = min(max_useful_rank(s.m, s.n, self.align), s.stored_rank or 0) // self.align * self.align
        choices: list[tuple[int | None, int]] = []
        loss, size = [], []
        for b in self.bits:
            grid = Grid(b, group_size, symmetric=True)
            factor_err, dense_err = s.grid_errors[b]
            for r in range(self.align, top + 1, self.align):
                kept = float(head[r - 1])
                choices.append((r, b))
                loss.append(self.truncation_scale * (total - kept) + factor_err * kept)
                size.append(grid_target_bytes(s.m, s.n, r, grid))
            if self.dense or top < self.align:  # a matrix with no useful rank is kept dense
                choices.append((None, b))
                loss.append(dense_err * total)
                size.append(grid_target_bytes(s.m, s.n, None, grid))
        return choices, torch.tensor(loss, dtype=torch.float64), torch.tensor(size, dtype=torch.float64)

    def allocate_with_bits(self, spectra: list[MatrixSpectrum], bits_per_weight: float,
                           group_size: int | None) -> tuple[dict[str, int | None], dict[str, int]]:
        """Ranks (``None``: dense) and widths of every matrix within ``bits_per_weight`` over the targets."""
        budget = bits_per_weight * sum(s.m * s.n for s in spectra) / 8
        tables = [self.options(s, group_size) for s in spectra]
        least = sum(float(t[2].min()) for t in tables)
        if least > budget:
            raise StagepipeError(f"target.bits_per_weight: {bits_per_weight} is below the least rank_bits can store "
                                 f"({8 * least / sum(s.m * s.n for s in spectra):.4f}: every matrix at rank "
                                 f"{self.align} and {min(self.bits)} bits)")
        pick = self._cheapest_fitting_price(tables, budget)
        spent = _total(tables, pick, SIZE)
        while True:  # spend what is left on the best loss saved per byte that fits
            best, best_rate = None, 0.0
            for j, (_, loss, size) in enumerate(tables):
                extra = size - size[pick[j]]
                saved = loss[pick[j]] - loss
                fits = (extra > 0) & (extra <= budget - spent) & (saved > 0)
                if bool(fits.any()):
                    rate = torch.where(fits, saved / extra.clamp(min=1), torch.tensor(-1.0, dtype=torch.float64))
                    k = int(rate.argmax())
                    if float(rate[k]) > best_rate:
                        best, best_rate = (j, k), float(rate[k])
            if best is None:
                break
            j, k = best
            spent += float(tables[j][2][k] - tables[j][2][pick[j]])
            pick[j] = k
        ranks = {s.name: t[0][i][0] for s, t, i in zip(spectra, tables, pick, strict=True)}
        widths = {s.name: t[0][i][1] for s, t, i in zip(spectra, tables, pick, strict=True)}
        loss = _total(tables, pick, LOSS)
        self._details = {"predicted_loss": loss, "budget_bytes": math.floor(budget), "stored_bytes": int(spent),
                         "matrices_per_width": {str(b): sum(1 for w in widths.values() if w == b) for b in self.bits},
                         "dense": sum(1 for r in ranks.values() if r is None)}
        return ranks, widths

    @staticmethod
    def _cheapest_fitting_price(tables: list, budget: float) -> list[int]:
        """Each matrix's ``argmin loss + λ·bytes`` at the smallest ``λ`` whose total fits ``budget``."""
        def choose(price: float) -> list[int]:
            return [int(torch.argmin(loss + price * size)) for _, loss, size in tables]

        def total(pick: list[int]) -> float:
            return _total(tables, pick, SIZE)

        low, high = 0.0, 1.0
        if total(choose(low)) <= budget:
            return choose(low)
        while total(choose(high)) > budget:
            high *= 2
            if high > 1e300:
                break
        for _ in range(200):
            mid = (low + high) / 2
            low, high = (low, mid) if total(choose(mid)) <= budget else (mid, high)
        pick = choose(high)
        if total(pick) > budget:  # only the very cheapest choice of each fits (the least loss among equal bytes)
            pick = [min(range(len(size)), key=lambda i, loss=loss, size=size: (float(size[i]), float(loss[i])))
                    for _, loss, size in tables]
        return pick


#: columns of an options table (``RankBits.options``): choices, predicted losses, stored bytes
LOSS, SIZE = 1, 2


def _total(tables: list, pick: list[int], column: int) -> float:
    """The sum over matrices of one column (``LOSS`` or ``SIZE``) at the picked options."""
    return sum(float(t[column][i]) for t, i in zip(tables, pick, strict=True))
