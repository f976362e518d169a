"""FWSVD: diagonal Fisher from squared *per-sequence* gradients.

``sides: input`` is Hsu et al.: ``B = diag(f)``, ``f_j = Σ_i E[G_ij²]``. ``sides: both`` adds the
output-side row sums ``A = diag(Σ_j E[G_ij²])`` (the diagonal special case of GFWSVD).
"""

from typing import Literal

from stagepipe.methods.base import GradientOptions, Method, register


class FWSVDConfig(GradientOptions):
    """Diagonal Fisher from squared per-sequence gradients: input side (Hsu et al.) or both sides."""

    name: Literal["fwsvd"]
    sides: Literal["input", "both"] = "input"


@register
class FWSVD(Method):
    """FWSVD: diagonal Fisher weights from squared per-sequence gradients."""

    name = "fwsvd"
    config = FWSVDConfig

    def pair(self) -> tuple[str, str]:
        return ("fisher_diag" if self.cfg.sides == "both" else "identity"), "fisher_diag"
