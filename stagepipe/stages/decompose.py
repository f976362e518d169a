"""``decompose`` (per layer, independent): the full weighted SVD of every target linear.

Builds the method's metric pair from the stored statistics, factorises both metrics in float64
with a relative eigenvalue floor (the repair is recorded per matrix), and stores the full weighted
spectrum with the un-whitened factors up to the largest rank any later stage can ask for
(``Method.stored_rank``: below break-even, or a learned method's candidates), so ``allocate`` can
pick any rank without redoing an SVD. Each layer checks that its full-rank factors reproduce ``W``
before they are cut.
"""

from __future__ import annotations

from typing import Any

import torch

from stagepipe.engine.stage import Context, PartitionRef, Stage, Work
from stagepipe.linalg import MetricCache, weighted_svd
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linears, weight_matrix
from stagepipe.models.sources import DTYPES, resolve_device
from stagepipe.stages import artifacts
from stagepipe.stages.artifacts import layer_index
from stagepipe.stages.requirements import needs


class DecomposeStage(Stage):
    name = "decompose"
    version = 3
    description = "full weighted SVD per target linear (spectrum + the factors later stages can read)"

    def partitions(self, ctx: Context) -> list[str] | None:
        return artifacts.model_layers(ctx)

    def dependencies(self, ctx: Context, partition: str) -> list[PartitionRef]:
        need = needs(ctx.config)
        deps = [artifacts.ref("snapshot")]
        if need.method.activation_stats:
            deps.append(artifacts.ref("capture", partition))
        if need.fisher:
            deps.append(artifacts.ref("fisher", partition))
        return deps

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        method = needs(ctx.config).method
        return {"method": method.key_options(), "stored": method.stored_options(), "modules": ctx.config.target.modules}

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        method = needs(ctx.config).method
        index = layer_index(work.partition)
        device = resolve_device(ctx.config.model.device)
        runner = BlockRunner(artifacts.model_dir(work.input("snapshot")), torch.device("cpu"), DTYPES[ctx.config.model.dtype])
        block = runner.load_block(index)
        linears = block_linears(block, ctx.config.target.modules)
        stats = artifacts.read_layer_stats(work.input("capture", work.partition) if method.activation_stats else None,
                                           work.input("fisher", work.partition) if method.needs_gradients else None)
        factor = MetricCache(ctx.config.method.floor_rel, device)
        results = {}
        shapes: dict[str, Any] = {}
        measured: dict[str, Any] = {}
        for name, module in linears.items():
            w = weight_matrix(module).detach().to(device, torch.float64)
            pair = method.metrics(name, tuple(w.shape), stats)
            where = f"{work.partition}.{name}"
            left, right = factor(pair.left, f"{where}.left"), factor(pair.right, f"{where}.right")
            result = weighted_svd(w, left, right, getattr(torch, ctx.config.method.svd_dtype))
            full = result.reconstruct(len(result.sigma))
            results[name] = result
            shapes[name] = {"shape": list(w.shape)}
            measured[name] = {
                "full_rank_rel_err": float(torch.linalg.norm(full - w) / torch.linalg.norm(w)),
                "left": left.repair if left else {"kind": "identity"},
                "right": right.repair if right else {"kind": "identity"},
                **pair.notes,
            }
        stored = {name: method.stored_rank(r.left.shape[0], r.right.shape[1]) for name, r in results.items()}
        artifacts.write_weighted_svd(work.out, results, stored)
        work.telemetry["metric_factorisations"] = factor.computed
        work.diagnostics["linears"] = measured  # repairs and checks: the report prints them, nothing computes with them
        return {"linears": shapes, "method": method.name}
