"""``quantize`` (per layer; a ``QuantizedMethod``: RTN, GPTQ, GPTVQ): every target linear of the
block kept dense and quantised on the method's grid (integer levels or codebooks).

Reads the block's weights from the snapshot and, for a method that reads it (GPTQ), each linear's
input Gram: summed here on the inputs the blocks below give once quantised (``Method.propagates``:
the partitions then run in order, each handing its block's outputs to the next, as GPTQ's code and
llm-compressor calibrate), or capture's Grams of the dense model; quantises each linear in float64
and stores it as the assembled model will hold it — compressed-tensors' ``pack-quantized`` tensors
for an integer grid, packed indices, int8 codebooks and scales for GPTVQ (the method's
``stored_tensors``) — after checking that what is stored unpacks to exactly the quantised weights. The diagnostics record per linear the
relative weight error, the relative output error ``tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)`` under the Gram when
there is one, and the repairs (dead input columns, damping added; GPTVQ's codebook refinement).

The kind's share elsewhere: the allocation (no ranks: every target dense; the stored bytes and bits
per weight by ``accounting.quantized_memory_report``, checked against ``target.bits_per_weight``) and
the assembly (the architecture's own class, ``models.compressed``) are this stage's too.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from stagepipe.accounting import quantized_memory_report
from stagepipe.engine.stage import Context, Read, Work
from stagepipe.errors import ConfigError, StagepipeError
from stagepipe.methods import QuantizedMethod, make_method
from stagepipe.models import compressed, modeling_lowrank
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linear_shapes, block_linears, weight_matrix
from stagepipe.models.sources import DTYPES, resolve_device
from stagepipe.quantize import relative_output_error
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import (
    CALIBRATION,
    GROUPS,
    HIDDEN,
    MODEL_DIR,
    QUANTIZED,
    STATS,
    TOKENS,
    layer_index,
)
from stagepipe.stagekit.assembly import replaced_layer
from stagepipe.stagekit.base import PipelineStage, register
from stagepipe.stagekit.cost import CostInputs, Estimate
from stagepipe.stagekit.dense_kinds import StoredBytesAllocation
from stagepipe.stagekit.streams import SequentialStage, block_input_rows, running_grams, write_block_outputs


def propagates(method: Any) -> bool:
    """A quantising method whose statistics come from the quantised model's own inputs."""
    return isinstance(method, QuantizedMethod) and method.propagates()


@register
class QuantizeStage(StoredBytesAllocation, PipelineStage):
    name = "quantize"
    version = 1
    description = ("every target linear dense on an integer grid (RTN, GPTQ; packed as compressed-tensors) "
                   "or against codebooks (GPTVQ)")
    writes = {QUANTIZED: "per target linear: compressed-tensors' packed codes, float16 scales and shape; or GPTVQ's "
                         "packed indices, int8 codebooks and their float16 scales",
              HIDDEN: "with propagated inputs: the quantised block's outputs on them (the next block's inputs)"}
    assembly_payload = QUANTIZED

    @classmethod
    def joins(cls, choices) -> bool:
        return isinstance(choices.method, QuantizedMethod)

    @classmethod
    def needs(cls, choices) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {"snapshot": {MODEL_DIR}}
        if propagates(choices.method):
            return {**found, "tokenize": {TOKENS}, cls.name: {HIDDEN}}
        if choices.method.activation_stats:
            found["capture"] = {STATS, GROUPS}
        return found

    def handovers(self, ctx: Context, partition: str) -> set[str]:
        """With propagated inputs, the quantised block's outputs are the next partition's inputs."""
        return {HIDDEN} if propagates(ctx.plan.method) else set()

    def partitions(self, ctx: Context) -> list[str] | None:
        return artifacts.model_layers(ctx)

    @staticmethod
    def check(config: Any, model: Any | None) -> None:
        """Before anything runs: groups that divide every target's input size, and the grid's stored bits
        per weight (every overhead) within ``target.bits_per_weight``."""
        method = make_method(config.method)
        budget = config.target.bits_per_weight
        if not isinstance(method, QuantizedMethod) or model is None:
            return
        shapes = block_linear_shapes(model, config.target.modules)
        problem = method.shape_problem(shapes)
        if problem:
            raise ConfigError(problem)
        if budget is None:
            return
        stored = {name: method.linear_bytes(m, n) for name, (m, n) in shapes.items()}
        bits = quantized_memory_report(shapes, stored, budget).bits_per_weight  # the report's own accounting
        if bits > budget:
            raise ConfigError(f"target.bits_per_weight: {budget} is below what {config.method.name} with "
                              f"{method.grid_summary()} stores ({bits:.4f} with every overhead); raise it or use fewer "
                              "bits / larger groups")

    def reads(self, ctx: Context, partition: str) -> list[Read]:
        reads = [Read(artifacts.ref("snapshot"), MODEL_DIR)]
        index = layer_index(partition)
        if propagates(ctx.plan.method):
            below = [Read(artifacts.ref(self.name, index - 1), HIDDEN)] if index else []
            return [*reads, Read(artifacts.ref("tokenize", CALIBRATION), TOKENS), *below]
        if ctx.plan.method.activation_stats:
            reads += [Read(artifacts.ref("capture", partition), STATS), Read(artifacts.ref("capture", partition), GROUPS)]
        return reads

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        found = {"method": ctx.plan.method.key_options(), "modules": ctx.config.target.modules}
        if propagates(ctx.plan.method):
            found.update(batch_size=ctx.config.runtime.batch_size, activation_dtype=ctx.config.runtime.activation_dtype)
        return found

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        """Stored codes at the grid's bits; in RAM the block, one matrix and its Gram in float64 with
        GPTQ's Cholesky factor; FLOPs: the method's per matrix (``cost_flops64``: GPTQ's Cholesky, solve
        and error feedback; GPTVQ's k-means rounds too)."""
        s = c.shapes
        bits = c.method.nominal_bits()
        flops = sum(c.method.cost_flops64(m, n) for m, n in s.linears)
        walks = propagates(c.method)  # two block passes per layer (Grams, then outputs) and the outputs on disk
        return Estimate(cls.name, s.layers * (sum(m * n for m, n in s.linears) * bits / 8 + (c.hidden if walks else 0)),
                        s.block * c.weight_bytes + 4 * 8 * max(m * n + n * n for m, n in s.linears) + c.grams
                        + (c.batch_activations if walks else 0), 0,
                        "float64 Cholesky and column sweep of the largest matrix"
                        + ("; the quantised blocks' outputs, layer by layer" if walks else ""),
                        flops=s.layers * 2 * c.block_pass if walks else 0.0, flops64=s.layers * flops)

    @classmethod
    def adjust(cls, rows: dict[str, Estimate], c: CostInputs) -> dict[str, Estimate]:
        """With propagated inputs it walks the blocks like a sequential stage: under release, each block's
        outputs go once the next layer has read them."""
        return SequentialStage.adjust.__func__(cls, rows, c) if propagates(c.method) else rows

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        method = ctx.plan.method
        runner = BlockRunner(artifacts.model_dir(work.input("snapshot")), torch.device("cpu"), DTYPES[ctx.config.model.dtype])
        device = resolve_device(ctx.config.model.device)  # the quantiser's float64 sweeps; the block stays on the host
        block = runner.load_block(layer_index(work.partition))
        linears = block_linears(block, ctx.config.target.modules)
        if propagates(method):
            index = layer_index(work.partition)
            below = work.input(self.name, artifacts.layer_partition(index - 1)) if index else None
            windows = artifacts.read_windows(work.input("tokenize", CALIBRATION))
            inputs = functools.partial(block_input_rows, runner, windows, below, ctx.config.runtime.batch_size)
            grams = running_grams(runner, block, linears, inputs())
        elif method.activation_stats:
            grams = artifacts.read_input_stats(work.input("capture", work.partition)).gram
        else:
            grams = {}
        tensors: dict[str, torch.Tensor] = {}
        results, measured = {}, {}
        for name, module in linears.items():
            w = weight_matrix(module).detach().to(torch.float64)
            gram = grams[name].double() if name in grams else None
            quantized = method.quantize_linear(w.to(device), None if gram is None else gram.to(device)).cpu()
            if propagates(method):  # the next block's inputs come through this block as quantised
                module.weight.data.copy_(quantized.weight.reshape(module.weight.shape).to(module.weight.dtype))
            stored = quantized.tensors
            if not torch.equal(method.unpack_linear(stored, tuple(w.shape)), quantized.weight):
                raise StagepipeError(f"{work.partition}.{name}: the stored tensors do not decode to the quantised weights")
            tensors.update({f"{name}.{suffix}": t for suffix, t in stored.items()})
            delta = quantized.weight - w
            info: dict[str, Any] = {"weight_rel_err": float(torch.linalg.norm(delta) / torch.linalg.norm(w)),
                                    **quantized.repairs}
            if gram is not None:
                info["output_rel_err"] = relative_output_error(delta, gram, w)
            measured[name] = info
            results[name] = {"shape": list(w.shape), "stored_bytes": sum(t.numel() * t.element_size() for t in stored.values())}
        artifacts.write_factors(work.out, QUANTIZED, tensors)
        if propagates(method):
            write_block_outputs(work.out, runner, block, windows, inputs(), ctx.config.runtime)
        work.diagnostics["linears"] = measured
        return {"linears": results, "method": method.name}

    @classmethod
    def summarize(cls, manifests) -> dict[str, Any]:
        """Dead input columns GPTQ gave a unit diagonal (their weights kept and quantised), per matrix."""
        repairs = []
        for ref, manifest in sorted(manifests.items()):
            for name, item in manifest.diagnostics.get("linears", {}).items():
                if item.get("dead_columns"):
                    repairs.append({"matrix": f"{ref.partition}.{name}", "kind": "unit Hessian diagonal",
                                    "columns": item["dead_columns"]})
        return {"repairs": repairs}

    # ------------------------------------------------------------------ the kind's allocation
    @classmethod
    def allocation_slice(cls, ctx: Context) -> dict[str, Any]:
        return {"method": ctx.plan.method.quantization_options(), "bits_per_weight": ctx.config.target.bits_per_weight}

    @classmethod
    def allocation(cls, ctx: Context, work: Work, shapes: dict[str, tuple[int, int]], n_params: int) -> dict[str, Any]:
        """No ranks (every target dense); the bytes each target matrix stores, and the bits per weight."""
        memory = quantized_memory_report(shapes, cls.stored_by_matrix(ctx, work), ctx.config.target.bits_per_weight,
                                         ctx.plan.method.storage())
        return cls.write_dense_allocation(ctx, work, shapes, n_params, memory,
                                          {"quantization": ctx.plan.method.quantization_options()})

    # ------------------------------------------------------------------ and its assembly
    @classmethod
    def assembles(cls, choices) -> bool:
        return True

    @classmethod
    def layer_shard(cls, ctx: Context, work: Work, layer: int, tensors, ranks) -> dict[str, torch.Tensor]:
        """The block's tensors with each quantised linear's ``weight`` replaced by its packed tensors."""
        prefix = ctx.plan.layout.layer_prefix(layer)
        packed = artifacts.read_quantized(work.input(cls.name, artifacts.layer_partition(layer)))
        return replaced_layer(tensors, prefix, {key.rsplit(".", 1)[0] + ".weight" for key in packed}, packed)

    @classmethod
    def model_family(cls, ctx: Context, work: Work, ranks) -> tuple[Any, dict[str, Any]]:
        """Integer grids: the architecture's own class, ``ignore`` listing every linear the grid leaves
        alone (the head, non-targets); codebooks (GPTVQ): the low-rank family's ``VQLinear`` per target."""
        method = ctx.plan.method
        compensation = method.compensation()
        if method.storage() == "vq" or compensation is not None:
            shapes = block_linear_shapes(ctx.facts)
            specs = {name: {**method.layout_spec(*shapes[name]), **({"rank": min(compensation.rank, *shapes[name])} if compensation else {})}
                     for name in sorted(ranks)}
            return modeling_lowrank, {"lowrank_ranks": {}, ("lowrank_vq" if method.storage() == "vq" else "lowrank_grid"): specs}
        grid = method.grid()
        ignore = sorted({*block_linear_shapes(ctx.facts), "lm_head"} - set(ranks))
        return compressed, {"quantization_config": compressed.quantization_config(grid.bits, grid.group_size,
                                                                                   grid.symmetric, ignore)}
