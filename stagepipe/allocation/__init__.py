"""Rank allocation policies (``allocation.policy``): spectra + target → ranks per matrix."""

from stagepipe.allocation.base import MatrixSpectrum, Policy
from stagepipe.allocation.global_greedy import GlobalGreedy
from stagepipe.allocation.last_k import LastK
from stagepipe.allocation.svdllm_v2 import SVDLLMV2
from stagepipe.allocation.uniform import Uniform

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Uniform, GlobalGreedy, SVDLLMV2, LastK)}


def make_policy(cfg) -> Policy:
    """The configured policy (``cfg`` is the pipeline's ``allocation`` block)."""
    if cfg.policy == "last_k":
        return LastK(cfg.align, cfg.last_k, cfg.min_kept)
    return POLICIES[cfg.policy](cfg.align)


__all__ = ["POLICIES", "MatrixSpectrum", "Policy", "make_policy"]
