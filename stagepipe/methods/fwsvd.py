"""FWSVD: diagonal Fisher from squared *per-sequence* gradients.

``sides: input`` is Hsu et al.: ``B = diag(f)``, ``f_j = Σ_i E[G_ij²]``. ``sides: both`` adds the
output-side row sums ``A = diag(Σ_j E[G_ij²])`` (the diagonal special case of GFWSVD).
"""

from stagepipe.methods.base import Method


class FWSVD(Method):
    name = "fwsvd"

    def pair(self) -> tuple[str, str]:
        return ("fisher_diag" if self.cfg.sides == "both" else "identity"), "fisher_diag"
