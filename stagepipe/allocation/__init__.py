"""Rank allocation policies (``allocation.policy``): spectra + target → ranks per matrix."""

from stagepipe.allocation.asvd_search import ASVDSearch, Candidate
from stagepipe.allocation.base import MatrixSpectrum, Policy
from stagepipe.allocation.global_greedy import GlobalGreedy
from stagepipe.allocation.last_k import LastK
from stagepipe.allocation.svdllm_v2 import SVDLLMV2
from stagepipe.allocation.uniform import Uniform

#: policies that need nothing but the weighted spectra
POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Uniform, GlobalGreedy, SVDLLMV2, LastK)}


def make_policy(cfg, sensitivity: list[Candidate] | None = None) -> Policy:
    """The configured policy (``cfg`` is the pipeline's ``allocation`` block; ``sensitivity`` the
    ``sensitivity`` stage's table, which ``asvd_search`` needs)."""
    if cfg.policy == "last_k":
        return LastK(cfg.align, cfg.last_k, cfg.min_kept)
    if cfg.policy == "asvd_search":
        if sensitivity is None:
            raise ValueError("asvd_search needs the sensitivity table")
        return ASVDSearch(cfg.align, sensitivity)
    return POLICIES[cfg.policy](cfg.align)


__all__ = ["POLICIES", "ASVDSearch", "Candidate", "MatrixSpectrum", "Policy", "make_policy"]
