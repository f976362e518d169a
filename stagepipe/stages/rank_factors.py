"""``rank_factors`` (per layer, independent; a ``RankDependentMethod`` such as ResSVD): the method's
own factors at each matrix's allocated rank, which are then each layer's final form.

Per matrix the diagnostics record what the method reports (for ResSVD r₁/r₂, the stage-1
relative error and the activation loss ``‖(W − Ŵ) X‖²/N``) beside the one-shot whitened optimum at
the same rank (``decompose``'s dropped σ² under the same input metric), so the cost of the
heuristic is visible, never hidden.
"""

from __future__ import annotations

from typing import Any

import torch

from stagepipe.engine.stage import Context, Read, Work
from stagepipe.linalg import MetricCache
from stagepipe.methods import RankDependentMethod
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linears, weight_matrix
from stagepipe.models.sources import DTYPES
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import (
    ALLOCATION,
    GROUPS,
    MODEL_DIR,
    RANK_FACTORS,
    STATS,
    WEIGHTED_SVD,
    layer_index,
)
from stagepipe.stagekit.base import PipelineStage, register
from stagepipe.stagekit.cost import CostInputs, Estimate


@register
class RankFactorsStage(PipelineStage):
    name = "rank_factors"
    version = 2
    description = "rank-dependent factors (ResSVD) at the allocated ranks"
    writes = {RANK_FACTORS: "per factored linear: up and down at its allocated rank"}
    assembly_payload = RANK_FACTORS

    @classmethod
    def joins(cls, choices) -> bool:
        return isinstance(choices.method, RankDependentMethod)

    @classmethod
    def needs(cls, choices) -> dict[str, set[str]]:
        return {"snapshot": {MODEL_DIR}, "capture": {STATS, GROUPS}, "decompose": {WEIGHTED_SVD}, "allocate": {ALLOCATION}}

    def partitions(self, ctx: Context) -> list[str] | None:
        return artifacts.model_layers(ctx)

    def reads(self, ctx: Context, partition: str) -> list[Read]:
        return [Read(artifacts.ref("snapshot"), MODEL_DIR), Read(artifacts.ref("capture", partition), STATS),
                Read(artifacts.ref("capture", partition), GROUPS), Read(artifacts.ref("decompose", partition), WEIGHTED_SVD),
                Read(artifacts.ref("allocate"), ALLOCATION)]

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        method = ctx.plan.method
        return {"method": method.key_options(), **method.rank_options(), "modules": ctx.config.target.modules}

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        s = c.shapes
        svd_ram = 8 * 8 * max(s.ff, s.d) ** 2
        rank_bytes = sum(m * n * c.config.target.kept_fraction * 4 for m, n in s.linears)
        return Estimate(cls.name, s.layers * rank_bytes, c.model_ram + svd_ram, c.gpu(svd_ram),
                        "two SVDs per matrix at the allocated rank")

    @classmethod
    def assembles(cls, choices) -> bool:
        return True

    @classmethod
    def layer_factors(cls, ctx: Context, work: Work, layer: int, ranks):
        return artifacts.read_factors(work.input(cls.name, artifacts.layer_partition(layer)), RANK_FACTORS)

    @classmethod
    def summarize(cls, manifests) -> dict[str, Any]:
        """Each matrix's rank split and its activation loss relative to the one-shot optimum."""
        found = {f"{ref.partition}.{name}": {k: item[k] for k in ("r1", "r2", "loss_over_one_shot")}
                 for ref, manifest in sorted(manifests.items()) for name, item in manifest.diagnostics.get("linears", {}).items()}
        return {"rank_factors": found}

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        method = ctx.plan.method
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
        artifacts.write_factors(work.out, RANK_FACTORS, tensors)
        work.diagnostics["linears"] = report  # losses and splits for the report; assemble reads the factors
        return {"ranks": {name: entry["rank"] for name, entry in report.items()}, **method.rank_options()}
