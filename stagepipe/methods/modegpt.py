"""MoDeGPT (Lin et al., ICLR 2025, arXiv 2408.09632): structured compression to a smaller dense
model. Not a metric pair: the ``structure`` stage shrinks the inner dimension of each module pair
(``stagepipe.structured``: Nyström for the MLP, CR for Q·K, weighted SVD for V·O) from the input
Grams that ``capture`` stores, and ``assemble`` writes a model whose blocks have smaller
intermediate sizes and head dimensions (``models/modeling_structured.py``).

Per-layer kept fractions: ``layer_allocation: block_influence`` (the paper) turns each block's
influence ``1 − cos(x_in, x_out)`` (mean over calibration tokens, measured by ``capture``) into
sparsities ``φ_ℓ ∝ exp(−BI_ℓ/ε)`` that average to the target, capped at ``1 − min_layer_kept``
(water-filling: the cap's excess goes to the other layers in the same proportions);
``uniform`` keeps the same fraction everywhere. ``ε`` (``temperature``) and ``ridge_rel`` are
hyperparameters to choose on the validation split (``benchmarks/tune.py``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from stagepipe.errors import StagepipeError
from stagepipe.methods.base import MethodConfig, StructuredMethod, register


class MoDeGPTConfig(MethodConfig):
    """Smaller dense matrices: Nyström MLP, CR Q·K, SVD V·O; per-layer sparsity from block influence."""

    name: Literal["modegpt"]
    ridge_rel: float = Field(1e-2, gt=0, description="ridge λ of the MLP leverage scores, relative to trace(C)/n")
    layer_allocation: Literal["block_influence", "uniform"] = Field(
        "block_influence", description="per-layer kept fractions: the paper's softmax over block influence, or uniform")
    temperature: float = Field(0.1, gt=0, description="ε of the block-influence softmax φ ∝ exp(−BI/ε)")
    min_layer_kept: float = Field(0.1, gt=0, le=1, description="no block keeps less than this fraction")

    @model_validator(mode="after")
    def _no_refit(self) -> MoDeGPTConfig:
        if self.refit:
            raise ValueError("method.refit: modegpt's matrices are not two factors; remove refit")
        return self


@register
class MoDeGPT(StructuredMethod):
    """MoDeGPT: smaller dense blocks (Nyström MLP, CR Q·K, SVD V·O), no extra factor."""

    name = "modegpt"
    config = MoDeGPTConfig

    @property
    def activation_stats(self) -> frozenset[str]:
        return frozenset({"gram", "influence"})

    def key_options(self) -> dict[str, Any]:
        """What shapes the ``structure`` stage's matrices beyond the per-layer dimensions."""
        return {"ridge_rel": self.cfg.ridge_rel, "floor_rel": self.cfg.floor_rel}

    def allocation_options(self) -> dict[str, Any]:
        cfg = self.cfg
        options: dict[str, Any] = {"layer_allocation": cfg.layer_allocation, "min_layer_kept": cfg.min_layer_kept}
        if cfg.layer_allocation == "block_influence":
            options["temperature"] = cfg.temperature
        return options

    def layer_kept(self, influence: list[float], kept: float) -> list[float]:
        """Per-layer kept fractions averaging ``kept``; ``influence[ℓ]`` is block ℓ's ``1 − cos``."""
        n = len(influence)
        cap = 1.0 - self.cfg.min_layer_kept
        total = n * (1.0 - kept)  # Σ_ℓ φ_ℓ
        if total > n * cap + 1e-12:
            raise StagepipeError(f"target.kept_fraction {kept} is below method.min_layer_kept {self.cfg.min_layer_kept}")
        if self.cfg.layer_allocation == "uniform":
            return [kept] * n
        low = min(influence)
        weights = [math.exp(-(s - low) / self.cfg.temperature) for s in influence]

        def spent(scale: float) -> float:
            return sum(min(cap, scale * w) for w in weights)

        lo, hi = 0.0, total / min(weights) + 1.0
        for _ in range(200):  # bisection on the scale: Σ min(cap, c·w_ℓ) = total
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if spent(mid) < total else (lo, mid)
        return [1.0 - min(cap, hi * w) for w in weights]
