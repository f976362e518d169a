"""Dobi-SVD (Wang et al., arXiv 2502.02723): learned truncation positions on the *activations*.

Each target linear gets one trained kept fraction ``g``: rank ``g·k`` (``k = min(m, n)``). In
training, the activations ``A = X Wᵀ`` of every ``t``-token window are truncated softly at
``γ = g·min(t, k)`` of their components (the official code's window units, defined for every
shape: ``models/truncation.py``), ``U diag(σ ⊙ T(γ)) Vᵀ`` with
``T_i = ½ tanh(β(γ − i)) + ½``, through an SVD whose backward pass stays finite for
near-degenerate spectra (``models/truncation.py``); only the ``g`` train, on the KL to the dense
model (or the text's next-token loss), and after every step they are projected back onto the
parameter budget (``project_to_budget``), so the budget holds exactly throughout instead of
through a penalty weight (the paper: ``λ·|size(γ)/size − target|``, λ = 150–200).

**Weight update.** Dobi-SVD then projects each weight onto the top-``k`` principal directions of
its output activations over the calibration windows, ``W' = V_k V_kᵀ W`` (incremental PCA over
per-window singular vectors in the official code). The exact PCA of the stacked activations is the
top eigenvectors of ``Σ Aᵀ A = W (Σ XᵀX) Wᵀ``, and ``V_k V_kᵀ W`` is exactly SVD-LLM's rank-``k``
factorisation (whitening by the same input Gram; tested against an explicit PCA). So the pair is
SVD-LLM's (``decompose`` is shared with ``svdllm``), ``capture``'s Gram is the incremental,
exact accumulation, and ``assemble`` truncates its factors at the learned ranks.

**Remapping** (``remap: true``, the paper's mixed-precision storage): the ``min(m,n)×k`` square
part of both factors in 8 bits, the longer factor's rest in fp16 (``modeling_lowrank.RemappedLinear``),
``k(max(m,n) + 2)`` 16-bit words instead of ``k(m+n)``. Then ``target.kept_fraction`` is a
**memory** fraction of the dense 16-bit target matrices: training and rounding spend it under that
size model (ranks up to nearly ``min(m,n)``), and the report prints it beside the parameter
fraction, which can exceed 1. Evaluation runs the 8-bit model as stored.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field

from stagepipe.methods.base import LearnedMethod, MethodConfig, register


class DobiSVDConfig(MethodConfig):
    """Learned activation-truncation positions (Dobi-SVD), weights from the exact activation PCA."""

    name: Literal["dobi_svd"]
    objective: Literal["kl", "nll"] = Field("kl", description="KL(dense ‖ truncated) of the next-token "
                                                               "distributions, or the text's next-token loss")
    epochs: int = Field(1, ge=1, description="passes over the calibration windows")
    lr: float = Field(0.01, gt=0, description="Adam learning rate of each g = γ/k (Adam, cosine to lr/10)")
    beta: float = Field(10.0, gt=0, description="sharpness of the mask ½ tanh(β(γ − i)) + ½ (the paper: 10)")
    svd_gap: float = Field(1e-3, gt=0, description="relative gap of σ² below which the SVD backward uses the series")
    svd_terms: int = Field(10, ge=1, description="terms of the series (the paper: 10)")
    batch: int = Field(1, ge=1, description="calibration windows per step")
    checkpoint_every: int = Field(8, ge=1)
    gradient_checkpointing: bool = False
    seed: int = 0
    guard: bool = Field(True, description="keep the uniform start's ranks unless the learned ones give a lower "
                                          "validation perplexity outside the noise (false: the paper's training alone)")
    remap: bool = Field(False, description="store the square part of the factors in 8 bits (the paper's remapping); "
                                           "target.kept_fraction is then a memory fraction of the dense 16-bit matrices")


@register
class DobiSVD(LearnedMethod):
    """Dobi-SVD: learned truncation positions on the activations, SVD-LLM's factors at those ranks."""

    name = "dobi_svd"
    config = DobiSVDConfig
    right = "gram"  # the weight update is the exact activation PCA: SVD-LLM's factors (module docstring)

    def training_options(self) -> dict[str, Any]:
        names = ("objective", "epochs", "lr", "beta", "svd_gap", "svd_terms", "batch", "seed", "guard")
        options = {name: getattr(self.cfg, name) for name in names}
        options["mask_position"] = "g·min(t, k)"  # window units (issue #31); g·k before, dead past the window
        if self.cfg.remap:  # keyed only when set: runs without remapping keep their keys
            options["storage"] = self.storage()
        return options

    def storage(self) -> str:
        return "remap8" if self.cfg.remap else "16-bit"


def project_to_budget(fractions: torch.Tensor, weights: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                      budget: float) -> torch.Tensor:
    """``clamp(g − θ·w, low, high)`` with θ (either sign) solved by bisection so that ``Σ w·g`` equals
    ``budget``: the weighted Euclidean projection of ``g`` onto the budget inside the box (float64)."""
    g, w = fractions.double(), weights.double()
    lo, hi = low.double(), high.double()

    def spent(theta: float) -> float:
        return float((w * (g - theta * w).clamp(lo, hi)).sum())

    bound = float(((g - lo).abs().max() + (hi - g).abs().max()) / w.min()) + 1.0
    left, right = -bound, bound  # spent(left) is the box's maximum, spent(right) its minimum
    for _ in range(100):
        mid = (left + right) / 2
        left, right = (mid, right) if spent(mid) > budget else (left, mid)
    return (g - right * w).clamp(lo, hi)


def round_to_budget(gammas: list[float], costs: list[int], caps: list[int], budget: float) -> list[int]:
    """Integer ranks from the learned positions: ``floor(γ)`` (at least 1, at most the cap), then
    one more component for the largest fractional parts while it fits, so no skipped step would fit."""
    ranks = [min(max(1, math.floor(g)), cap) for g, cap in zip(gammas, caps, strict=True)]
    spent = sum(r * c for r, c in zip(ranks, costs, strict=True))
    while spent > budget and any(r > 1 for r in ranks):  # floor(γ) ≥ 1 can overshoot a tiny budget
        j = max((j for j, r in enumerate(ranks) if r > 1), key=lambda j: costs[j] - (gammas[j] - ranks[j]))
        ranks[j] -= 1
        spent -= costs[j]
    order = sorted(range(len(gammas)), key=lambda j: (-(gammas[j] - math.floor(gammas[j])), j))
    for j in order:
        if ranks[j] < caps[j] and spent + costs[j] <= budget:
            ranks[j] += 1
            spent += costs[j]
    return ranks
