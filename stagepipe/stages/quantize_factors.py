"""``quantize_factors`` (per layer, in order; ``method.quantize_factors``): the final form of every
target on a symmetric integer grid — both factors of each factored linear, and each target the
allocation keeps dense (issue #33 item 4b: low-rank factors quantised, as SVD-LLM + GPTQ and
Dobi-SVD's remapping do at 8 bits).

It takes the factors of the stage that would otherwise be each layer's final form (decompose's at
the allocated ranks, or refit's, anchor's, a learned method's; with their trained norm weights),
installs them in block i and walks the blocks as GPTQ's code does: block i's input Grams are summed
on the inputs the compressed *and quantised* blocks below give (this stage's own outputs of block
i−1; the embeddings for block 0), with block i itself compressed but not yet quantised. A factored
linear ``W ≈ U D`` quantises ``D`` (``r × n``) with the Hessian ``H = Σ x xᵀ`` and then ``U``
(``m × r``) with ``D_q H D_qᵀ`` — the Gram of its input ``D_q x``, exactly, with no second pass; a
dense-kept target is quantised with ``H``. GPTQ (damped, float64) or round-to-nearest; each tensor is
stored in compressed-tensors' ``pack-quantized`` layout (checked to unpack to exactly the quantised
weights) and the assembled model loads through ``modeling_lowrank`` (``GridLinear`` factors). The
allocation is the method's own (ranks at 16-bit costs); the bytes actually stored are this stage's
(``accounting.factor_grid_memory_report``, under ``ratios.memory``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from stagepipe.accounting import factor_grid_memory_report
from stagepipe.engine.stage import Context, Read, Work
from stagepipe.errors import StagepipeError
from stagepipe.models import modeling_lowrank
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linears, weight_matrix
from stagepipe.models.modeling_lowrank import install_factors
from stagepipe.models.sources import DTYPES, resolve_device
from stagepipe.quantize import Grid, dequantize_stored, relative_output_error, stored_tensors
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import (
    ALLOCATION,
    CALIBRATION,
    HIDDEN,
    MODEL_DIR,
    QUANTIZED_FACTORS,
    TOKENS,
    layer_index,
)
from stagepipe.stagekit.assembly import replaced_layer
from stagepipe.stagekit.base import STAGES, register
from stagepipe.stagekit.cost import CostInputs, Estimate
from stagepipe.stagekit.plan import source_of
from stagepipe.stagekit.streams import SequentialStage, block_input_rows, running_grams, write_block_outputs


def _grid(ctx: Context) -> Grid:
    return ctx.config.method.quantize_factors.grid()


@register
class QuantizeFactorsStage(SequentialStage):
    name = "quantize_factors"
    version = 1
    description = "the final factors (and dense-kept targets) on an integer grid, on the quantised model's own inputs"
    writes = {QUANTIZED_FACTORS: "per target: compressed-tensors' packed codes, float16 scales and shape of each "
                                 "factor (down, up) or of the dense matrix",
              HIDDEN: "the quantised block's outputs on its inputs (the next block's inputs)"}
    assembly_payload = QUANTIZED_FACTORS
    on_final_form = True

    @classmethod
    def joins(cls, choices) -> bool:
        return choices.config.method.quantize_factors is not None

    @classmethod
    def assembles(cls, choices) -> bool:
        return True

    @classmethod
    def needs(cls, choices) -> dict[str, set[str]]:
        source = source_of(choices, cls.name)
        return {"snapshot": {MODEL_DIR}, "tokenize": {TOKENS}, "allocate": {ALLOCATION}, cls.name: {HIDDEN},
                source: {STAGES[source].assembly_payload}}

    @classmethod
    def assembly_needs(cls, choices) -> dict[str, set[str]]:
        """Its packed tensors, and what the source's assembly reads (its trained norm weights)."""
        needs = {cls.name: {QUANTIZED_FACTORS}}
        for stage, payloads in STAGES[source_of(choices, cls.name)].assembly_needs(choices).items():
            needs[stage] = needs.get(stage, set()) | set(payloads)
        return needs

    def reads(self, ctx: Context, partition: str) -> list[Read]:
        index = layer_index(partition)
        source = STAGES[source_of(ctx.plan.choices, QuantizeFactorsStage.name)]
        below = [Read(artifacts.ref(self.name, index - 1), HIDDEN)] if index else []
        return [Read(artifacts.ref("snapshot"), MODEL_DIR), Read(artifacts.ref("tokenize", CALIBRATION), TOKENS),
                Read(artifacts.ref("allocate"), ALLOCATION), *source.assembly_reads(ctx, index), *below]

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        return {"grid": ctx.config.method.quantize_factors.model_dump(), "modules": ctx.config.target.modules,
                "batch_size": ctx.config.runtime.batch_size, "activation_dtype": ctx.config.runtime.activation_dtype}

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        """Two block passes per layer (Grams, then outputs); GPTQ's Cholesky and sweep per matrix (bounded
        by the dense matrices')."""
        s = c.shapes
        bits = c.config.method.quantize_factors.bits
        return Estimate(cls.name, s.layers * (sum(m * n for m, n in s.linears) * bits / 8 + c.hidden),
                        s.block * c.weight_bytes * 2 + 4 * 8 * max(m * n + n * n for m, n in s.linears) + c.grams
                        + c.batch_activations, 0, "block, its Grams and one matrix's GPTQ in float64; block outputs",
                        flops=s.layers * 2 * c.block_pass, flops64=s.layers * sum(n**3 + 2 * m * n * n for m, n in s.linears))

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        index = layer_index(work.partition)
        options = ctx.config.method.quantize_factors
        grid = _grid(ctx)
        runner = BlockRunner(artifacts.model_dir(work.input("snapshot")), torch.device("cpu"), DTYPES[ctx.config.model.dtype])
        device = resolve_device(ctx.config.model.device)
        prefix = runner.layout.layer_prefix(index)
        ranks = artifacts.block_ranks(artifacts.read_ranks(work.input("allocate")), prefix)
        widths = artifacts.read_bits(work.input("allocate"))  # rank_bits: each matrix's own width
        source = STAGES[source_of(ctx.plan.choices, QuantizeFactorsStage.name)]
        block = runner.load_block(index)
        targets = {name: weight_matrix(m).detach().double() for name, m in block_linears(block, ctx.config.target.modules).items()}
        with torch.no_grad():
            for name, value in source.layer_params(ctx, work, index).items():
                block.get_submodule(name.rsplit(".", 1)[0]).get_parameter(name.rsplit(".", 1)[1]).copy_(value)
        factors = source.layer_factors(ctx, work, index, ranks) if ranks else {}
        for name, (up, down) in factors.items():
            install_factors(block, name, up, down)
        modules = {name: block.get_submodule(name) for name in targets}
        below = work.input(self.name, artifacts.layer_partition(index - 1)) if index else None
        windows = artifacts.read_windows(work.input("tokenize", CALIBRATION))
        inputs = functools.partial(block_input_rows, runner, windows, below, ctx.config.runtime.batch_size)
        grams = running_grams(runner, block, modules, inputs())

        def quantize(w: torch.Tensor, h: torch.Tensor, bits: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
            result = options.quantize(w.to(device), h.to(device), bits).cpu()  # the sweep on the model's device
            stored = stored_tensors(result)
            if not torch.equal(dequantize_stored(stored, result.grid), result.weight):
                raise StagepipeError(f"{work.partition}: the packed tensors do not unpack to the quantised weights")
            return result.weight, stored, result.repairs

        tensors: dict[str, torch.Tensor] = {}
        measured: dict[str, Any] = {}
        for name, module in modules.items():
            h = grams[name].double()
            bits = widths.get(prefix + name, grid.bits)
            if name in factors:
                up, down = (f.double() for f in factors[name])
                down_q, down_stored, down_repairs = quantize(down, h, bits)
                up_q, up_stored, up_repairs = quantize(up, down_q @ h @ down_q.T, bits)
                tensors.update({f"{name}.down.{k}": t for k, t in down_stored.items()})
                tensors.update({f"{name}.up.{k}": t for k, t in up_stored.items()})
                with torch.no_grad():
                    module.down.weight.copy_(down_q.to(module.down.weight.dtype))
                    module.up.weight.copy_(up_q.to(module.up.weight.dtype))
                before, after = up @ down, up_q @ down_q
                info: dict[str, Any] = {"rank": ranks[name], "down": down_repairs, "up": up_repairs}
            else:
                w = targets[name]
                after, stored, repairs = quantize(w, h, bits)
                tensors.update({f"{name}.{k}": t for k, t in stored.items()})
                with torch.no_grad():
                    module.weight.copy_(after.reshape(module.weight.shape).to(module.weight.dtype))
                before, info = w, {"rank": None, **repairs}
            w = targets[name]
            info["quantization_rel_err"] = relative_output_error(after - before, h, w)
            info["output_rel_err"] = relative_output_error(after - w, h, w)
            info["bits"] = bits
            measured[name] = info
        artifacts.write_factors(work.out, QUANTIZED_FACTORS, tensors)
        write_block_outputs(work.out, runner, block, windows, inputs(), ctx.config.runtime)
        work.diagnostics["linears"] = measured
        return {"linears": {n: {"rank": m["rank"], "shape": list(targets[n].shape),
                                **({"bits": m["bits"]} if widths else {})} for n, m in measured.items()},
                "grid": {"bits": grid.bits, "group_size": grid.group_size}}

    @classmethod
    def summarize(cls, manifests) -> dict[str, Any]:
        """The stored bytes of every target on the grid (``ratios.memory``, by
        ``accounting.factor_grid_memory_report``) and the dead input columns GPTQ gave a unit diagonal."""
        repairs = []
        shapes: dict[str, tuple[int, int]] = {}
        ranks: dict[str, int | None] = {}
        widths: dict[str, int] = {}
        grid = None
        for ref, manifest in sorted(manifests.items()):
            grid = Grid(manifest.info["grid"]["bits"], manifest.info["grid"]["group_size"], symmetric=True)
            for name, item in manifest.info["linears"].items():
                shapes[f"{ref.partition}.{name}"] = tuple(item["shape"])
                ranks[f"{ref.partition}.{name}"] = item["rank"]
                if "bits" in item:
                    widths[f"{ref.partition}.{name}"] = item["bits"]
            for name, item in manifest.diagnostics.get("linears", {}).items():
                for part in ("down", "up", None):
                    found = item.get(part, {}) if part else item
                    if found.get("dead_columns"):
                        repairs.append({"matrix": f"{ref.partition}.{name}" + (f".{part}" if part else ""),
                                        "kind": "unit Hessian diagonal", "columns": found["dead_columns"]})
        if grid is None:
            return {"repairs": repairs}
        memory = factor_grid_memory_report(shapes, ranks, grid, None, widths)
        return {"repairs": repairs, "ratios": {"memory": memory.model_dump()}}

    # ------------------------------------------------------------------ its assembly
    @classmethod
    def layer_shard(cls, ctx: Context, work: Work, layer: int, tensors, ranks) -> dict[str, torch.Tensor]:
        """The block's tensors with each target's weight replaced by its packed tensors (a factored one's
        bias moved to ``up``) and the source's trained norm weights over the originals."""
        prefix = ctx.plan.layout.layer_prefix(layer)
        packed = artifacts.read_quantized(work.input(cls.name, artifacts.layer_partition(layer)), QUANTIZED_FACTORS)
        params = STAGES[source_of(ctx.plan.choices, QuantizeFactorsStage.name)].layer_params(ctx, work, layer)
        tensors = {**tensors, **{prefix + k: v.to(tensors[prefix + k].dtype) for k, v in params.items()}}
        factored = artifacts.block_ranks(ranks, prefix)
        targets = {key.rsplit(".", 1)[0] for key in packed if not key.rsplit(".", 1)[0].endswith((".down", ".up"))}
        moved = {f"{n}.up.bias": tensors[f"{prefix}{n}.bias"] for n in factored if f"{prefix}{n}.bias" in tensors}
        replaced = {f"{n}.weight" for n in [*factored, *targets]} | {f"{n}.bias" for n in factored}
        return replaced_layer(tensors, prefix, replaced, {**packed, **moved})

    @classmethod
    def assembly_reads(cls, ctx: Context, layer: int) -> list[Read]:
        source = STAGES[source_of(ctx.plan.choices, QuantizeFactorsStage.name)]
        return [*super().assembly_reads(ctx, layer), *source.assembly_reads(ctx, layer)]

    @classmethod
    def model_family(cls, ctx: Context, work: Work, ranks) -> tuple[Any, dict[str, Any]]:
        """The low-rank family with ``GridLinear`` factors, and ``GridLinear`` for the dense-kept targets."""
        options = ctx.config.method.quantize_factors
        grid = {"bits": options.bits, "group_size": options.group_size}
        widths = artifacts.read_bits(work.input("allocate"))
        factored = dict(sorted((n, r) for n, r in ranks.items() if r is not None))
        dense = {n: {**grid, "bits": widths.get(n, options.bits)} for n, r in sorted(ranks.items()) if r is None}
        own = {n: widths[n] for n in factored if n in widths}
        return modeling_lowrank, {"lowrank_ranks": factored, "lowrank_factor_grid": grid,
                                  **({"lowrank_factor_bits": own} if own else {}), **({"lowrank_grid": dense} if dense else {})}

