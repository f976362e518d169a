"""``residual`` (per layer, independent; only for methods whose factors depend on the allocated
rank, i.e. ``post_allocation`` methods such as ``ressvd``): the method's own factors at each
matrix's allocated rank.

Per matrix the manifest records what the method reports (for ResSVD r₁/r₂, the stage-1 relative
error and the activation loss ``‖(W − Ŵ) X‖²/N``) beside the one-shot whitened optimum at the same
rank (``decompose``'s dropped σ² under the same input metric), so the cost of the heuristic is
visible, never hidden.
"""

from __future__ import annotations

from typing import Any

import torch

from stagepipe.engine.stage import Context, PartitionRef, Stage, Work
from stagepipe.linalg import MetricCache
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linears, weight_matrix
from stagepipe.models.sources import DTYPES
from stagepipe.stages import artifacts
from stagepipe.stages.artifacts import layer_index
from stagepipe.stages.requirements import needs


class ResidualStage(Stage):
    name = "residual"
    version = 2
    description = "rank-dependent factors (ResSVD) at the allocated ranks"

    def partitions(self, ctx: Context) -> list[str] | None:
        return artifacts.model_layers(ctx)

    def dependencies(self, ctx: Context, partition: str) -> list[PartitionRef]:
        return [artifacts.ref("snapshot"), artifacts.ref("capture", partition), artifacts.ref("decompose", partition),
                artifacts.ref("allocate")]

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        method = needs(ctx.config).method
        return {"method": method.key_options(), **method.rank_options(), "modules": ctx.config.target.modules}

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        method = needs(ctx.config).method
        runner = BlockRunner(artifacts.model_dir(work.input("snapshot")), torch.device("cpu"), DTYPES[ctx.config.model.dtype])
        index = layer_index(work.partition)
        linears = block_linears(runner.load_block(index), ctx.config.target.modules)
        ranks = artifacts.block_ranks(artifacts.read_ranks(work.input("allocate")), runner.layout.layer_prefix(index))
        stats = artifacts.read_input_stats(work.input("capture", work.partition))
        one_shot = artifacts.read_weighted_svd(work.input("decompose", work.partition), list(ranks))
        tensors: dict[str, torch.Tensor] = {}
        report: dict[str, Any] = {}
        factor = MetricCache(ctx.config.method.floor_rel, torch.device("cpu"))
        for name, rank in ranks.items():
            w = weight_matrix(linears[name]).detach().to(torch.float64)
            pair = method.metrics(name, tuple(w.shape), stats)
            right = factor(pair.right, f"{work.partition}.{name}.right")
            up, down, info = method.factors(w, right, rank)
            tensors[f"{name}.up"], tensors[f"{name}.down"] = up.float(), down.float()
            optimum = one_shot[name].dropped_energy(rank)
            report[name] = {"rank": rank, **info, "one_shot_loss": optimum,
                            "loss_over_one_shot": info["activation_loss"] / optimum if optimum > 0 else None}
        artifacts.write_factors(work.out, artifacts.RESIDUAL, tensors)
        work.diagnostics["linears"] = report  # losses and splits for the report; assemble reads the factors
        return {"ranks": {name: entry["rank"] for name, entry in report.items()}, **method.rank_options()}
