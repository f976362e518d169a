"""GFWSVD: left metric ``A`` and right metric ``B`` from the nearest Kronecker product of the
per-sequence empirical Fisher, ``F ≈ B ⊗ A`` (``stagepipe.kron``; algorithms notes §2.10).

The ``fisher`` stage has already symmetrised, sign-fixed, scale-normalised (tr A = m) and
PSD-floored the factors. A side that was unusable falls back *per side* — output side to the
token-level K-FAC factor ``E[δ δᵀ]``, input side to ``E[x xᵀ]`` — and the fallback is recorded in
the layer's manifest and the report. Never the identity.
"""

from typing import Any

from stagepipe.errors import MetricError
from stagepipe.methods.base import LayerStats, Method, MetricPair


class GFWSVD(Method):
    name = "gfwsvd"
    activation_stats = frozenset({"gram"})  # K-FAC warm start and input-side fallback
    needs_gradients = True

    def metrics(self, linear: str, shape: tuple[int, int], stats: LayerStats) -> MetricPair:
        factors = stats.fisher.get(linear)
        if factors is None:
            raise MetricError(f"{linear}: no Fisher factors were computed")
        notes: dict[str, Any] = {}
        left = factors.get("A")
        if left is None:
            left = factors["kfac_out"]
            notes["left_fallback"] = "K-FAC E[δδᵀ]: " + str(stats.fisher_info.get(linear, {}).get("A_unusable", "unusable"))
        right = factors.get("B")
        if right is None:
            right = stats.gram[linear] / stats.tokens[linear]
            notes["right_fallback"] = "E[xxᵀ]: " + str(stats.fisher_info.get(linear, {}).get("B_unusable", "unusable"))
        return MetricPair(left, right, notes)
