"""Methods by ``method.name``: each a pair of named metrics (see ``metrics.py`` and docs/methods.md)."""

from typing import Any

from stagepipe.methods.asvd import ASVD
from stagepipe.methods.base import LayerStats, Method, MetricPair
from stagepipe.methods.fwsvd import FWSVD
from stagepipe.methods.gfwsvd import GFWSVD
from stagepipe.methods.kfac_svd import KFACSVD
from stagepipe.methods.mixed import Mixed
from stagepipe.methods.ressvd import ResSVD
from stagepipe.methods.svd import SVD
from stagepipe.methods.svdllm import SVDLLM, SVDLLMV2

METHODS: dict[str, type[Method]] = {m.name: m for m in (SVD, SVDLLM, SVDLLMV2, ASVD, ResSVD, FWSVD, KFACSVD, GFWSVD, Mixed)}


def make_method(cfg: Any) -> Method:
    return METHODS[cfg.name](cfg)


__all__ = ["METHODS", "LayerStats", "Method", "MetricPair", "make_method"]
