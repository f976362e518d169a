"""The delta kind: compresses ``W_model − W_base`` between a fine-tuned model and its base."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch

from stagepipe.methods.base.core import Method


class DeltaMethod(Method):
    """Compresses the difference ``Δ = W_model − W_base`` of each target matrix between a fine-tuned
    model and its base (``pipeline.base``): the ``delta`` stage, budget ``target.delta_ratio``."""

    budget = "delta_ratio"

    @abstractmethod
    def compress(self, delta: torch.Tensor, budget: int, generator: torch.Generator,
                 gram: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(stored tensors of at most ``budget`` bytes, diagnostics and repairs) for one float64 ``delta``."""

    @abstractmethod
    def decode(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """The float64 delta the stored tensors hold."""

    def least_bytes(self, m: int, n: int) -> int:
        """The fewest bytes it can store an m×n delta in (a budget below is refused before anything runs)."""
        return 0

    def delta_options(self) -> dict[str, Any]:
        """What shapes the stored delta (the ``delta`` stage's key)."""
        return self.cfg.model_dump(mode="json", exclude={"floor_rel", "svd_dtype", "refit", "quantize_factors"})

    def key_options(self) -> dict[str, Any]:
        return self.delta_options()

    def pair(self) -> tuple[str, str]:
        return "identity", "identity"

    @classmethod
    def check_pipeline(cls, config: Any, default_allocation: Any) -> None:
        if config.base is None:
            raise ValueError(f"base: {cls.name} compresses model − base; name the base model (base: {{source: …}})")
        if config.target.delta_ratio is None:
            raise ValueError(f"target.delta_ratio: {cls.name} needs its budget, the dense 16-bit delta's bytes over "
                             "the stored bytes (e.g. 32)")
        if config.target.kept_fraction != 1.0:
            raise ValueError(f"target.kept_fraction: {cls.name} keeps every parameter of the model (its budget is "
                             "target.delta_ratio); remove kept_fraction")
        if config.allocation != default_allocation:
            raise ValueError(f"allocation: {cls.name} spends target.delta_ratio on every matrix alike (no ranks); "
                             "remove the allocation block")
        if config.method.refit or config.method.quantize_factors is not None:
            raise ValueError(f"method: {cls.name} stores a delta, not factors to refit or quantise; remove refit / "
                             "quantize_factors")
