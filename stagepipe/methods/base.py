"""A method is a pair of metrics: how its left (output-side) and right (input-side) weighting
matrices are built from the statistics that ``capture`` and ``fisher`` stored.

``decompose`` factorises both metrics (float64, relative eigenvalue floor) and calls the one core
``weighted_svd``; a method never touches the SVD itself.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class LayerStats:
    """Statistics of one decoder block, keyed by linear name (relative to the block)."""

    gram: dict[str, torch.Tensor] = field(default_factory=dict)  # input Gram Σ x xᵀ (n×n), shared per input
    tokens: dict[str, int] = field(default_factory=dict)  # tokens behind each Gram
    fisher: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # per-linear gradient statistics
    fisher_info: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class MetricPair:
    left: torch.Tensor | None  # m×m (or m-vector), None = identity
    right: torch.Tensor | None  # n×n (or n-vector), None = identity
    notes: dict[str, Any] = field(default_factory=dict)  # fallbacks and provenance, for the manifest


class Method(ABC):
    name: ClassVar[str]
    activation_stats: ClassVar[frozenset[str]] = frozenset()  # "gram"
    needs_gradients: ClassVar[bool] = False

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def metrics(self, linear: str, shape: tuple[int, int], stats: LayerStats) -> MetricPair:
        return MetricPair(None, None)
