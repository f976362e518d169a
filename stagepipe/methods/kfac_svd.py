"""KFAC-SVD: token-level K-FAC factors, left ``E[δ δᵀ]``, right ``E[x xᵀ]``, optional shrinkage
``(1−λ) M + λ (tr M / n) I`` of both (recorded in the manifest)."""

from stagepipe.methods.base import LayerStats, Method, MetricPair
from stagepipe.methods.metrics import shrink


class KFACSVD(Method):
    name = "kfac_svd"
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
