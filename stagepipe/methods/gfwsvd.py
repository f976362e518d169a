"""GFWSVD: left metric ``A`` and right metric ``B`` from the nearest Kronecker product of the
per-sequence empirical Fisher, ``F ≈ B ⊗ A`` (``stagepipe.kron``; algorithms notes §2.10).

The ``fisher`` stage has already symmetrised, sign-fixed, scale-normalised (tr A = m) and
PSD-floored the factors. A side that was unusable falls back *per side* — output side to the
token-level K-FAC factor ``E[δ δᵀ]``, input side to ``E[x xᵀ]`` — and the fallback is recorded in
the layer's manifest and the report. Never the identity.
"""

from stagepipe.methods.base import Method


class GFWSVD(Method):
    name = "gfwsvd"
    left = "fisher_nkp"
    right = "fisher_nkp"
