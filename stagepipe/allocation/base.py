"""What a policy sees: each target matrix's shape and full weighted spectrum."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class MatrixSpectrum:
    name: str  # full module name, e.g. model.layers.3.mlp.up_proj
    m: int
    n: int
    sigma: torch.Tensor  # weighted singular values, descending


class Policy(ABC):
    name: ClassVar[str]

    def __init__(self, align: int) -> None:
        self.align = align

    @abstractmethod
    def allocate(self, spectra: list[MatrixSpectrum], kept_fraction: float) -> dict[str, int | None]:
        """Rank per matrix (``None``: leave dense), each a multiple of ``align`` below break-even."""


def layer_of(name: str) -> int:
    """Decoder block index of a full module name (its first integer component)."""
    return next(int(part) for part in name.split(".") if part.isdigit())
