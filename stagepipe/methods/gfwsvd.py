"""GFWSVD: left metric ``A`` and right metric ``B`` from the nearest Kronecker product of the
per-sequence empirical Fisher, ``F ≈ B ⊗ A`` (``stagepipe.kron``; docs/methods.md).

The ``fisher`` stage has already symmetrised, sign-fixed, scale-normalised (tr A = m) and
PSD-floored the factors. A side that was unusable falls back *per side* — output side to the
token-level K-FAC factor ``E[δ δᵀ]``, input side to ``E[x xᵀ]`` — and the fallback is recorded in
the layer's manifest and the report. Never the identity.
"""

from typing import Literal

from stagepipe.methods.base import GradientOptions, Method, register


class GFWSVDConfig(GradientOptions):
    name: Literal["gfwsvd"]


@register
class GFWSVD(Method):
    """GFWSVD: both Kronecker factors of the per-sequence Fisher, F ≈ B ⊗ A."""

    name = "gfwsvd"
    config = GFWSVDConfig
    left = "fisher_nkp"
    right = "fisher_nkp"
