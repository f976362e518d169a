"""``grid_errors`` (per layer, independent; joined when the allocation policy chooses bit widths,
``rank_bits``): each target's measured relative errors on ``quantize_factors``' grid at every width the
policy may pick — of its factors' product at the stored rank and of the dense matrix.

The quantiser is the one ``quantize_factors`` runs (GPTQ or round-to-nearest, its group size and
damping): ``down`` under the input Gram ``H``, then ``up`` under ``D_q H D_qᵀ``, the dense matrix under
``H``. Each error is measured twice, from the same quantised weights (the GPTQ sweeps are the cost,
a metric is cheap): in the spectra's own currency (``method``) — the method's metric pair, rooted as
``decompose`` roots it (``MetricCache``, the same floor) — so ``ε·Σσ̃²`` of a dense option *is* its
weighted loss ``‖Pᵀ E Q‖²`` (for K-FAC the output-gradient factor enters too: measuring under ``H``
alone priced quantisation ×1.2–4 high on Gemma-3's attention, docs/quantize); and as the relative
output error under ``H`` alone (``input_gram``: ``tr(E H Eᵀ)/tr(W H Wᵀ)``, the first model).
``allocation.error_metric`` picks one.

Its key holds the grid and the widths but neither the byte budget, the policy's truncation scale nor
its error metric: rows at several budgets, or a validation search over the scale, share one
measurement. One decoder layer in memory; layers are independent (``--executor ray`` spreads them).
"""

from __future__ import annotations

from typing import Any

import torch

from stagepipe.engine.stage import Context, Read, Work
from stagepipe.errors import ConfigError, StagepipeError
from stagepipe.linalg import MetricCache, weighted_relative_error
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linears, weight_matrix
from stagepipe.models.sources import DTYPES
from stagepipe.quantize import relative_output_error
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import ERROR_METRICS, GRID_ERRORS, MODEL_DIR, WEIGHTED_SVD, layer_index
from stagepipe.stagekit.base import PipelineStage, register
from stagepipe.stagekit.cost import CostInputs, Estimate


@register
class GridErrorsStage(PipelineStage):
    name = "grid_errors"
    version = 1
    description = "each target's relative error on the factor grid at every width (factors, dense), in its metric"
    writes = {GRID_ERRORS: "per linear: the stored rank measured at; per width the relative errors (factors, dense)"}
    #: reads the input Grams from whichever of capture and fisher recorded them (``read_layer_stats``)
    takes_grams_from_fisher = True

    @classmethod
    def needs(cls, choices) -> dict[str, set[str]]:
        return {"snapshot": {MODEL_DIR}, "decompose": {WEIGHTED_SVD}, **artifacts.layer_stats_needs(choices.method)}

    @staticmethod
    def check(config: Any, model: Any | None) -> None:
        """Before anything runs: the errors are measured under the input Grams; a method must record them."""
        from stagepipe.methods import make_method

        if "gram" not in make_method(config.method).activation_stats:
            raise ConfigError(f"allocation.policy: {config.allocation.policy} measures each matrix's quantisation error "
                              f"under its input Gram; {config.method.name} records none (svdllm, kfac_svd, gfwsvd do)")

    def partitions(self, ctx: Context) -> list[str] | None:
        return artifacts.model_layers(ctx)

    def reads(self, ctx: Context, partition: str) -> list[Read]:
        return [Read(artifacts.ref("snapshot"), MODEL_DIR), Read(artifacts.ref("decompose", partition), WEIGHTED_SVD),
                *artifacts.layer_stats_reads(ctx.plan, partition)]

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        grid = ctx.config.method.quantize_factors.model_dump(exclude={"bits"})  # each width is measured
        return {"grid": grid, "widths": list(ctx.config.allocation.bits), "modules": ctx.config.target.modules,
                "metrics": list(ERROR_METRICS)}

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        """One block, its Grams and one matrix's GPTQ in float64 in RAM; three GPTQ sweeps (down, up,
        dense) per matrix and width."""
        s = c.shapes
        widths = len(c.config.allocation.bits)
        return Estimate(cls.name, 1e4 * s.layers,
                        s.block * c.weight_bytes + c.grams + 4 * 8 * max(m * n + n * n for m, n in s.linears), 0,
                        "GPTQ of every matrix at every width (rank_bits' error model)",
                        flops64=s.layers * widths * sum(3 * (n**3 + 2 * m * n * n) for m, n in s.linears))

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        options, method = ctx.config.method.quantize_factors, ctx.plan.method
        index = layer_index(work.partition)
        runner = BlockRunner(artifacts.model_dir(work.input("snapshot")), torch.device("cpu"), DTYPES[ctx.config.model.dtype])
        linears = block_linears(runner.load_block(index), ctx.config.target.modules)
        found = artifacts.read_weighted_svd(work.input("decompose", work.partition), list(linears))
        stats = artifacts.read_layer_stats(work.inputs.get(artifacts.ref("capture", work.partition)),
                                           work.inputs.get(artifacts.ref("fisher", work.partition)))
        roots = MetricCache(ctx.config.method.floor_rel, torch.device("cpu"))
        measured = {}
        for name, module in linears.items():
            if name not in stats.gram:
                raise StagepipeError(f"{work.partition}.{name}: the grid error is measured under the input Gram, "
                                     "which this method's statistics do not hold")
            w, h, result = weight_matrix(module).detach().double(), stats.gram[name].double(), found[name]
            pair = method.metrics(name, tuple(w.shape), stats)
            where = f"{work.partition}.{name}"
            left, right = roots(pair.left, f"{where}.left"), roots(pair.right, f"{where}.right")
            up, down = result.factors(result.left.shape[1])
            product = up @ down
            errors: dict[str, dict[int, tuple[float, float]]] = {metric: {} for metric in ERROR_METRICS}
            for b in ctx.config.allocation.bits:
                down_q = options.quantize(down, h, b).weight
                up_q = options.quantize(up, down_q @ h @ down_q.T, b).weight
                factors_error, dense_error = up_q @ down_q - product, options.quantize(w, h, b).weight - w
                errors["method"][b] = (weighted_relative_error(factors_error, product, left, right),
                                       weighted_relative_error(dense_error, w, left, right))
                errors["input_gram"][b] = (relative_output_error(factors_error, h, product),
                                           relative_output_error(dense_error, h, w))
            measured[name] = (result.left.shape[1], errors)
        artifacts.write_grid_errors(work.out, measured)
        return {"linears": sorted(measured), "widths": list(ctx.config.allocation.bits)}
