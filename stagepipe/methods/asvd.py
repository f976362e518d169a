"""ASVD: input-channel scaling ``Q = diag(s^α)``, ``s`` = mean or max ``|x|`` per channel.

An exact SVD (ASVD's code uses a randomised ``svd_lowrank``), and no random-layer fallback on
failure: a zero-activity channel is handled by the relative eigenvalue floor and recorded.
"""

from typing import Literal

from pydantic import Field

from stagepipe.methods.base import Method, MethodConfig, register


class ASVDConfig(MethodConfig):
    name: Literal["asvd"]
    alpha: float = Field(0.5, gt=0, le=2)
    scale: Literal["mean", "max"] = "mean"


@register
class ASVD(Method):
    """ASVD: activation-aware channel scaling diag(s^α) on the input side."""

    name = "asvd"
    config = ASVDConfig

    def pair(self) -> tuple[str, str]:
        return "identity", "act_mean" if self.cfg.scale == "mean" else "act_max"
