"""Named metric builders: each returns a metric (matrix, vector = diagonal, or None = identity) and
notes for the manifest. Methods are pairs of these; ``mixed`` lets a pipeline pick any pair.

Left metrics act on the output side (m), right metrics on the input side (n).
"""

from __future__ import annotations

from typing import Any

import torch

from stagepipe.errors import MetricError
from stagepipe.methods.base import LayerStats

Built = tuple[torch.Tensor | None, dict[str, Any]]


def _fisher(stats: LayerStats, linear: str, kind: str) -> torch.Tensor | None:
    return stats.fisher.get(linear, {}).get(kind)


def _need(value: torch.Tensor | None, what: str, linear: str) -> torch.Tensor:
    if value is None:
        raise MetricError(f"{linear}: statistic {what!r} was not computed")
    return value


def identity(stats: LayerStats, linear: str, **_: Any) -> Built:
    return None, {}


def gram(stats: LayerStats, linear: str, **_: Any) -> Built:
    """``E[x xᵀ]`` (the SVD-LLM input metric, normalised per token)."""
    return _need(stats.gram.get(linear), "gram", linear) / stats.tokens[linear], {}


def kfac_out(stats: LayerStats, linear: str, **_: Any) -> Built:
    """Token-level ``E[δ δᵀ]`` of the output gradients."""
    return _need(_fisher(stats, linear, "kfac_out"), "kfac_out", linear), {}


def fisher_diag_left(stats: LayerStats, linear: str, **_: Any) -> Built:
    """Row sums of the diagonal Fisher: ``Σ_j E[G_ij²]`` (two-sided FWSVD, output side)."""
    return _need(_fisher(stats, linear, "grad_sq"), "grad_sq", linear).sum(1), {}


def fisher_diag_right(stats: LayerStats, linear: str, **_: Any) -> Built:
    """Column sums of the diagonal Fisher: ``f_j = Σ_i E[G_ij²]`` (FWSVD, Hsu et al.)."""
    return _need(_fisher(stats, linear, "grad_sq"), "grad_sq", linear).sum(0), {}


def nkp_left(stats: LayerStats, linear: str, **_: Any) -> Built:
    """Output factor ``A`` of ``F ≈ B ⊗ A``; unusable → K-FAC ``E[δδᵀ]``, recorded."""
    value = _fisher(stats, linear, "A")
    if value is not None:
        return value, {}
    reason = stats.fisher_info.get(linear, {}).get("A_unusable", "unusable")
    return kfac_out(stats, linear)[0], {"left_fallback": f"K-FAC E[δδᵀ] ({reason})"}


def nkp_right(stats: LayerStats, linear: str, **_: Any) -> Built:
    """Input factor ``B`` of ``F ≈ B ⊗ A``; unusable → ``E[xxᵀ]``, recorded."""
    value = _fisher(stats, linear, "B")
    if value is not None:
        return value, {}
    reason = stats.fisher_info.get(linear, {}).get("B_unusable", "unusable")
    return gram(stats, linear)[0], {"right_fallback": f"E[xxᵀ] ({reason})"}


def act_mean(stats: LayerStats, linear: str, alpha: float = 0.5, **_: Any) -> Built:
    """ASVD: ``diag(s^{2α})`` with ``s`` the mean ``|x|`` per input channel (so ``Q = diag(s^α)``)."""
    s = _need(stats.abs_sum.get(linear), "abs", linear) / stats.tokens[linear]
    return s ** (2 * alpha), {}


def act_max(stats: LayerStats, linear: str, alpha: float = 0.5, **_: Any) -> Built:
    s = _need(stats.abs_max.get(linear), "abs", linear)
    return s ** (2 * alpha), {}


LEFT = {"identity": identity, "fisher_nkp": nkp_left, "kfac_out": kfac_out, "fisher_diag": fisher_diag_left}
RIGHT = {"identity": identity, "gram": gram, "fisher_nkp": nkp_right, "fisher_diag": fisher_diag_right,
         "act_mean": act_mean, "act_max": act_max}
#: statistics each named metric needs: (activation stats, gradient stats)
NEEDS = {
    "identity": (set(), set()), "gram": ({"gram"}, set()), "kfac_out": (set(), {"kfac_out"}),
    "fisher_diag": (set(), {"grad_sq"}), "fisher_nkp": ({"gram"}, {"nkp", "kfac_out"}),
    "act_mean": ({"abs"}, set()), "act_max": ({"abs"}, set()),
}


def shrink(metric: torch.Tensor, amount: float) -> torch.Tensor:
    """``(1−λ) M + λ (tr M / n) I``: scale-aware shrinkage (a matrix's own mean eigenvalue)."""
    if amount == 0:
        return metric
    n = metric.shape[0]
    return (1 - amount) * metric + amount * (torch.trace(metric) / n) * torch.eye(n, dtype=metric.dtype)
