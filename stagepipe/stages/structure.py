"""``structure`` (per layer, independent; only for ``structured`` methods such as ``modegpt``): the
block's smaller dense matrices at the inner dimensions ``allocate`` chose.

Reads the block's weights from the snapshot and its input Grams from ``capture`` (the attention
input for Q·K and V·O, the MLP intermediate for the MLP), runs ``structured.compress_block`` in
float64 and stores the reduced tensors in the model's dtype. The manifest records per type what
was kept and what it cost: the MLP's dropped output energy ``‖W_d h − W_d' h_S‖²`` over the
calibration tokens, the kept share of the Q·K pair scores, V·O's dropped weighted σ², and any
eigenvalue floor the attention Gram needed.
"""

from __future__ import annotations

from typing import Any

import torch

from stagepipe.engine.stage import Context, PartitionRef, Stage, Work
from stagepipe.errors import StagepipeError
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.sources import DTYPES
from stagepipe.stages import artifacts
from stagepipe.stages.artifacts import layer_index
from stagepipe.stages.requirements import needs
from stagepipe.structured import BLOCK_LINEARS, BlockDims, block_geometry, compress_block

#: architectures whose blocks ``structured.compress_block`` understands (SwiGLU MLP, RoPE, no biases)
SUPPORTED = {"llama", "mistral"}


class StructureStage(Stage):
    name = "structure"
    version = 1
    description = "smaller dense block matrices (MoDeGPT) at the allocated inner dimensions"

    def partitions(self, ctx: Context) -> list[str] | None:
        return artifacts.model_layers(ctx)

    def dependencies(self, ctx: Context, partition: str) -> list[PartitionRef]:
        return [artifacts.ref("snapshot"), artifacts.ref("capture", partition), artifacts.ref("allocate")]

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        return {"method": needs(ctx.config).method.key_options()}

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        cfg = ctx.config.method
        runner = BlockRunner(artifacts.model_dir(work.input("snapshot")), torch.device("cpu"), DTYPES[ctx.config.model.dtype])
        config = runner.config
        if config.model_type not in SUPPORTED or getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise StagepipeError(f"method.name: {cfg.name} supports bias-free {sorted(SUPPORTED)} blocks, "
                                 f"not {config.model_type!r}")
        index = layer_index(work.partition)
        block = runner.load_block(index)
        weights = dict(block.state_dict())
        missing = [n for n in BLOCK_LINEARS if f"{n}.weight" not in weights]
        if missing:
            raise StagepipeError(f"block {index} has no {missing[0]}: not a Llama-family block")
        stats = artifacts.read_input_stats(work.input("capture", work.partition))
        dims = BlockDims(**artifacts.read_structure_dims(work.input("allocate"))[index])
        geometry = block_geometry(config)
        tensors, info = compress_block(weights, stats.gram["self_attn.q_proj"], stats.gram["mlp.down_proj"],
                                       geometry.heads, dims, cfg.ridge_rel, cfg.floor_rel)
        dtype = weights["mlp.down_proj.weight"].dtype
        stored = {k: (v if k.endswith("rope_index") else v.to(dtype)).contiguous() for k, v in tensors.items()}
        artifacts.write_factors(work.out, artifacts.STRUCTURE, stored)
        work.diagnostics.update(info)  # what each part kept and cost, and any repair: the report prints them
        return {"dims": dims.as_dict()}
