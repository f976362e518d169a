"""Rank allocation policies (``allocation.policy``): spectra + target → ranks per matrix."""

from stagepipe.allocation.base import MatrixSpectrum, Policy
from stagepipe.allocation.global_greedy import GlobalGreedy
from stagepipe.allocation.uniform import Uniform

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Uniform, GlobalGreedy)}

__all__ = ["POLICIES", "MatrixSpectrum", "Policy"]
