"""Methods by ``method.name``: each a pair of metrics (see ``metrics.py`` and docs/methods.md).

Every module of this package except ``base`` and ``metrics`` defines one method (or a family) and
registers it with ``@register``; importing the package imports them all, so adding a method is
adding one module.
"""

import importlib
import pkgutil

from stagepipe.methods.base import (
    METHODS,
    DeltaMethod,
    GradientOptions,
    LayerStats,
    LearnedMethod,
    Method,
    MethodConfig,
    MetricPair,
    QuantizedMethod,
    RankDependentMethod,
    SequentialMethod,
    StructuredMethod,
    register,
)

_SUPPORT = {"base", "metrics"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SUPPORT:
        importlib.import_module(f"{__name__}.{_module.name}")


def make_method(cfg: MethodConfig) -> Method:
    return METHODS[cfg.name](cfg)


__all__ = ["METHODS", "DeltaMethod", "GradientOptions", "LayerStats", "LearnedMethod", "Method", "MethodConfig", "MetricPair", "QuantizedMethod",
           "RankDependentMethod", "SequentialMethod", "StructuredMethod", "make_method", "register"]
