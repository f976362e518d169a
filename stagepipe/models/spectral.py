"""A whole causal LM whose target linears carry trainable per-component scores (learned methods).

``SpectralLinear`` computes ``y = left · diag(σ ⊙ max(0, d) ⊙ mask) · right · x + b`` from a weighted SVD
(``left`` m×k, ``right`` k×n) with scores ``d`` (float32, trainable) and a 0/1 ``mask`` of pruned
components; in ``dense`` mode it computes the original ``W x + b`` instead, so the same model object
gives the teacher's logits without a second copy of the network. Modules are swapped on the model
*instance*; no Hugging Face class is touched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from stagepipe.models.layout import swap_modules, weight_matrix


class SpectralLinear(nn.Module):
    """A linear as its weighted SVD with one learned score per component (and the dense weight)."""

    def __init__(self, linear: nn.Module, left: torch.Tensor, sigma: torch.Tensor, right: torch.Tensor) -> None:
        super().__init__()
        dtype = weight_matrix(linear).dtype
        self.register_buffer("weight", weight_matrix(linear).detach().clone(), persistent=False)
        self.register_buffer("left", left.to(dtype).contiguous(), persistent=False)
        self.register_buffer("right", right.to(dtype).contiguous(), persistent=False)
        exact = torch.float64 if dtype == torch.float64 else torch.float32  # scores: float32, or float64 for a float64 model
        self.register_buffer("sigma", sigma.to(exact), persistent=False)
        self.register_buffer("mask", torch.ones_like(self.sigma), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.scores = nn.Parameter(torch.ones_like(self.sigma))
        self.dense = False  # the teacher: the original W
        self.kept_dense = False  # the selection keeps this matrix dense: W + left·diag(σ(max(0, d)·mask − 1))·right

    @property
    def components(self) -> int:
        return int(self.sigma.numel())

    def gains(self) -> torch.Tensor:
        """``σ ⊙ max(0, d) ⊙ mask`` (float32): the effective singular values (a score the penalty
        pushed below zero keeps its value for ranking, and counts as zero here)."""
        return self.sigma * self.scores.clamp(min=0) * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return nn.functional.linear(x, self.weight, self.bias)
        if self.kept_dense:  # W plus what the scores changed: the components not offered stay in W
            inner = nn.functional.linear(x, self.right) * (self.gains() - self.sigma).to(x.dtype)
            return nn.functional.linear(x, self.weight, self.bias) + nn.functional.linear(inner, self.left)
        inner = nn.functional.linear(x, self.right) * self.gains().to(x.dtype)
        return nn.functional.linear(inner, self.left, self.bias)


def install(model: nn.Module, svds: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, SpectralLinear]:
    """Swap each named linear (full name → ``(left, σ, right)``) for a ``SpectralLinear``; every other
    parameter of the model is frozen."""
    return swap_modules(model, svds, lambda name, old: SpectralLinear(old, *svds[name]))


@contextmanager
def dense_mode(modules: Mapping[str, nn.Module]) -> Iterator[None]:
    """Every swapped module (``SpectralLinear``, ``TruncatedLinear``) computes its original dense
    linear while inside the block: the KL teacher, from the same model object."""
    for module in modules.values():
        module.dense = True
    try:
        yield
    finally:
        for module in modules.values():
            module.dense = False
