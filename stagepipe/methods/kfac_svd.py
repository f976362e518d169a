"""KFAC-SVD: token-level K-FAC factors, left ``E[δ δᵀ]``, right ``E[x xᵀ]``, optional shrinkage
``(1−λ) M + λ (tr M / n) I`` of both (recorded in the manifest)."""

from typing import Literal

from pydantic import Field

from stagepipe.methods.base import GradientOptions, LayerStats, Method, MetricPair, register
from stagepipe.methods.metrics import shrink


class KFACSVDConfig(GradientOptions):
    """Token-level K-FAC factors: left E[δδᵀ], right E[xxᵀ], optional shrinkage toward the trace."""

    name: Literal["kfac_svd"]
    shrinkage: float = Field(0.0, ge=0, lt=1)


@register
class KFACSVD(Method):
    """K-FAC-SVD: output-gradient factor E[δδᵀ] × input Gram E[xxᵀ]."""

    name = "kfac_svd"
    config = KFACSVDConfig
    left = "kfac_out"
    right = "gram"

    def key_options(self) -> dict:
        return {**super().key_options(), "shrinkage": self.cfg.shrinkage}

    def metrics(self, linear: str, shape: tuple[int, int], stats: LayerStats) -> MetricPair:
        pair = super().metrics(linear, shape, stats)
        amount = self.cfg.shrinkage
        if amount:
            pair.notes["shrinkage"] = amount
        return MetricPair(shrink(pair.left, amount), shrink(pair.right, amount), pair.notes)
