"""Methods by ``method.name``. Adding one = a small module defining its metric pair (see docs)."""

from typing import Any

from stagepipe.methods.base import LayerStats, Method, MetricPair
from stagepipe.methods.gfwsvd import GFWSVD
from stagepipe.methods.svd import SVD
from stagepipe.methods.svdllm import SVDLLM

METHODS: dict[str, type[Method]] = {m.name: m for m in (SVD, SVDLLM, GFWSVD)}


def make_method(cfg: Any) -> Method:
    return METHODS[cfg.name](cfg)


__all__ = ["METHODS", "LayerStats", "Method", "MetricPair", "make_method"]
