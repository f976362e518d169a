"""ASVD: input-channel scaling ``Q = diag(s^α)``, ``s`` = mean or max ``|x|`` per channel.

An exact SVD (ASVD's code uses a randomised ``svd_lowrank``), and no random-layer fallback on
failure: a zero-activity channel is handled by the relative eigenvalue floor and recorded.
"""

from stagepipe.methods.base import Method


class ASVD(Method):
    name = "asvd"

    def pair(self) -> tuple[str, str]:
        return "identity", "act_mean" if self.cfg.scale == "mean" else "act_max"
