"""SVD-LLM: right metric ``X Xᵀ`` (input Gram), left identity.

The truncation loss then equals ``‖(W − Ŵ) X‖_F²`` exactly (algorithms notes §2.4). Whitening is by
eigen-decomposition with a relative floor rather than Cholesky + explicit inverse, so a
rank-deficient Gram is handled and recorded instead of failing.
"""

from stagepipe.methods.base import LayerStats, Method, MetricPair


class SVDLLM(Method):
    name = "svdllm"
    activation_stats = frozenset({"gram"})

    def metrics(self, linear: str, shape: tuple[int, int], stats: LayerStats) -> MetricPair:
        return MetricPair(None, stats.gram[linear])
