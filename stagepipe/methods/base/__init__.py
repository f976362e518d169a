"""A method is a pair of metrics: how its left (output-side) and right (input-side) weighting
matrices are built from the statistics that ``capture`` and ``fisher`` stored.

``decompose`` factorises both metrics (float64, relative eigenvalue floor) and calls the one core
``weighted_svd``; a method never touches the SVD itself.

A method is one module: its config model (a subclass of ``MethodConfig`` whose ``name`` is a
``Literal``) and its ``Method`` subclass decorated with ``@register``. The pipeline schema and
the CLI's list are built from ``METHODS``; stages ask the method object what it needs
(``activation_stats``, ``gradient_stats``), never its name.

**Kinds.** A method that is more than a metric pair subclasses the base of its kind; the stage
that serves that kind joins the pipeline for it (``stagepipe/stages``: it says so itself) and
brings what the kind needs — its own step, its share of allocation or assembly, its cost:

- ``RankDependentMethod``: factors that depend on the allocated rank (ResSVD) — ``rank_factors``;
- ``SequentialMethod``: factors fitted layer by layer on the compressed model's inputs (AA-SVD) — ``anchor``;
- ``StructuredMethod``: smaller dense matrices instead of two factors (MoDeGPT) — ``structure``;
- ``LearnedMethod``: ranks learned on the whole model (SoCo, Dobi-SVD) — ``train``, with the
  method's trainer (``stages/train/<method>.py``);
- ``QuantizedMethod``: every target linear kept dense and quantised — on an integer grid (RTN, GPTQ;
  stored as compressed-tensors) or against codebooks (GPTVQ; stored for ``modeling_lowrank.VQLinear``)
  — ``quantize``; the budget is bytes (``target.bits_per_weight``), not ranks.
"""


from stagepipe.methods.base.core import (
    METHODS,
    FactorGridOptions,
    GradientOptions,
    LayerStats,
    LearnedMethod,
    Method,
    MethodConfig,
    MetricPair,
    RankDependentMethod,
    SequentialMethod,
    StructuredMethod,
    register,
)
from stagepipe.methods.base.delta import DeltaMethod
from stagepipe.methods.base.quantized import (
    LOWRANK_SUFFIXES,
    CompensationOptions,
    QuantizedLinear,
    QuantizedMethod,
)

__all__ = ["LOWRANK_SUFFIXES", "METHODS", "CompensationOptions", "DeltaMethod", "FactorGridOptions", "GradientOptions",
           "LayerStats", "LearnedMethod", "Method", "MethodConfig", "MetricPair", "QuantizedLinear", "QuantizedMethod",
           "RankDependentMethod", "SequentialMethod", "StructuredMethod", "register"]
