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

from stagepipe.engine.stage import Context, Read, Work
from stagepipe.linalg import MetricCache, weighted_svd
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linears, weight_matrix
from stagepipe.models.sources import DTYPES, resolve_device
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import MODEL_DIR, WEIGHTED_SVD, layer_index
from stagepipe.stagekit.base import PipelineStage, register
from stagepipe.stagekit.cost import CostInputs, Estimate


@register
class DecomposeStage(PipelineStage):
    name = "decompose"
    version = 4
    description = "full weighted SVD per target linear (spectrum + the factors later stages can read)"
    writes = {WEIGHTED_SVD: "per linear: the full weighted spectrum σ and un-whitened factors up to the stored rank"}
    #: reads the input Grams from whichever of capture and fisher recorded them (``read_layer_stats``)
    takes_grams_from_fisher = True
    assembly_payload = WEIGHTED_SVD

    @classmethod
    def needs(cls, choices) -> dict[str, set[str]]:
        return {"snapshot": {MODEL_DIR}, **artifacts.layer_stats_needs(choices.method)}

    @classmethod
    def assembles(cls, choices) -> bool:
        """The default final form of a layer: its weighted SVD truncated at the allocated ranks."""
        return True

    def partitions(self, ctx: Context) -> list[str] | None:
        return artifacts.model_layers(ctx)

    def reads(self, ctx: Context, partition: str) -> list[Read]:
        return [Read(artifacts.ref("snapshot"), MODEL_DIR), *artifacts.layer_stats_reads(ctx.plan, partition)]

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        method = ctx.plan.method
        return {"method": method.key_options(), "stored": method.stored_options(), "modules": ctx.config.target.modules}

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        """Stored factors and σ; in RAM the block, the float64 eigh + SVD of the largest matrix, the
        Grams and the factors. FLOPs (float64): each metric's eigen-decomposition (≈9n³ a side), the
        whitening products and one SVD per linear."""
        s, method = c.shapes, c.method
        svd_ram = 8 * 8 * max(s.ff, s.d) ** 2
        factors = sum((m + n) * min(m, n) for m, n in s.linears) * 8  # one block's full float64 factors
        flops64 = sum(9 * (m**3 + n**3) + 4 * m * n * (m + n) + 14 * m * n * min(m, n) for m, n in s.linears)
        return Estimate(cls.name, s.layers * sum((m + n) * method.stored_rank(m, n) * 4 + min(m, n) * 8 for m, n in s.linears),
                        s.block * c.weight_bytes + svd_ram + 3 * c.grams + 3 * factors, c.gpu(svd_ram),
                        "float64 eigh + SVD of the largest matrix", flops64=s.layers * flops64)

    @classmethod
    def layer_factors(cls, ctx: Context, work: Work, layer: int, ranks):
        return artifacts.truncated_factors(work.input(cls.name, artifacts.layer_partition(layer)), ranks)

    @classmethod
    def summarize(cls, manifests) -> dict[str, Any]:
        """Every metric repair (eigenvalue floor) and every fallback to another metric, per matrix."""
        repairs, fallbacks = [], []
        for ref, manifest in sorted(manifests.items()):
            for name, item in manifest.diagnostics.get("linears", {}).items():
                for side in ("left", "right"):
                    if item[side].get("n_floored"):
                        repairs.append({"matrix": f"{ref.partition}.{name}", "side": side, **item[side]})
                for key in ("left_fallback", "right_fallback"):
                    if key in item:
                        fallbacks.append({"matrix": f"{ref.partition}.{name}", "side": key.split("_")[0], "to": item[key]})
        return {"repairs": repairs, "fallbacks": fallbacks}

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        method = ctx.plan.method
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
