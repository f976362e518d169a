"""``structure`` (per layer, independent; a ``StructuredMethod`` such as MoDeGPT): the block's smaller
dense matrices at the inner dimensions ``allocate`` chose, instead of two factors per linear.

Reads the block's weights from the snapshot and its input Grams from ``capture`` (the attention
input for Q·K and V·O, the MLP intermediate for the MLP), runs ``structured.compress_block`` in
float64 and stores the reduced tensors in the model's dtype. The diagnostics record per type
what was kept and what it cost: the MLP's dropped output energy ``‖W_d h − W_d' h_S‖²`` over the
calibration tokens, the kept share of the Q·K pair scores, V·O's dropped weighted σ², and any
eigenvalue floor the attention Gram needed.

The kind's share elsewhere: the allocation (per-layer kept fractions from each block's influence
``1 − cos``, measured by capture, rounded to inner dimensions with the budget spent) and the
assembly (these blocks in ``modeling_structured``'s classes) are this stage's too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stagepipe.accounting import kept_report
from stagepipe.engine.stage import Context, Read, Work
from stagepipe.errors import ConfigError, StagepipeError
from stagepipe.methods import StructuredMethod
from stagepipe.models import modeling_structured
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.sources import DTYPES
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import ALLOCATION, GROUPS, MODEL_DIR, STATS, STRUCTURED_BLOCK, layer_index
from stagepipe.stagekit.assembly import replaced_layer
from stagepipe.stagekit.base import PipelineStage, register
from stagepipe.stagekit.cost import CostInputs, Estimate
from stagepipe.structured import (
    BLOCK_LINEARS,
    BlockDims,
    compress_block,
    spend_structured_budget,
    structured_block_of,
)

#: architectures whose blocks ``structured.compress_block`` understands (SwiGLU MLP, RoPE, no biases)
SUPPORTED = {"llama", "mistral"}


@register
class StructureStage(PipelineStage):
    name = "structure"
    version = 2
    description = "smaller dense block matrices (MoDeGPT) at the allocated inner dimensions"
    writes = {STRUCTURED_BLOCK: "the block's smaller q/k/v/o/gate/up/down weights and the kept RoPE coordinates"}
    assembly_payload = STRUCTURED_BLOCK

    @classmethod
    def joins(cls, choices) -> bool:
        return isinstance(choices.method, StructuredMethod)

    @classmethod
    def needs(cls, choices) -> dict[str, set[str]]:
        return {"snapshot": {MODEL_DIR}, "capture": {STATS, GROUPS}, "allocate": {ALLOCATION}}

    def partitions(self, ctx: Context) -> list[str] | None:
        return artifacts.model_layers(ctx)

    @staticmethod
    def check(config: Any, model: Any | None) -> None:
        """Before anything runs: the structured modeling code must have a class for the architecture."""
        if model is not None and model.model_type not in modeling_structured.CLASSES:
            raise ConfigError(f"method: {config.method.name} has no structured model class for {model.model_type!r}; "
                              f"supported: {', '.join(sorted(modeling_structured.CLASSES))}")

    def reads(self, ctx: Context, partition: str) -> list[Read]:
        return [Read(artifacts.ref("snapshot"), MODEL_DIR), Read(artifacts.ref("capture", partition), STATS),
                Read(artifacts.ref("capture", partition), GROUPS), Read(artifacts.ref("allocate"), ALLOCATION)]

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        return {"method": ctx.plan.method.key_options()}

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        """The block in the runner and its state dict, its weights in float64, the reduced block in
        float64 and as stored, the Grams, and the eigen-decomposition of the MLP intermediate Gram
        (input, symmetrised copy, eigenvectors, workspace); no embeddings."""
        s = c.shapes
        return Estimate(cls.name, s.block * c.weight_bytes * c.config.target.kept_fraction * s.layers,
                        c.grams + 2 * s.block * c.weight_bytes + 3 * s.block * 8 + 4 * s.ff * s.ff * 8, 0,
                        "float64 eigh of the MLP Gram, SVD per KV group")

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
        geometry = structured_block_of(config)
        tensors, info = compress_block(weights, stats.gram["self_attn.q_proj"], stats.gram["mlp.down_proj"],
                                       geometry.heads, dims, cfg.ridge_rel, cfg.floor_rel)
        dtype = weights["mlp.down_proj.weight"].dtype
        stored = {k: (v if k.endswith("rope_index") else v.to(dtype)).contiguous() for k, v in tensors.items()}
        artifacts.write_factors(work.out, STRUCTURED_BLOCK, stored)
        work.diagnostics.update(info)  # what each part kept and cost, and any repair: the report prints them
        return {"dims": dims.as_dict()}

    @classmethod
    def summarize(cls, manifests) -> dict[str, Any]:
        """V·O's metric floors and any MLP solve short of full rank, per layer."""
        repairs = []
        for ref, manifest in sorted(manifests.items()):
            vo_repair = manifest.diagnostics["vo"].get("metric_repair") or {}
            if vo_repair.get("n_floored"):
                repairs.append({"matrix": f"{ref.partition}.self_attn.v_proj·o_proj", "side": "right", **vo_repair})
            mlp = manifest.diagnostics["mlp"]
            if mlp["css_rank"] < mlp["kept_neurons"]:
                repairs.append({"matrix": f"{ref.partition}.mlp.down_proj", "kind": "minimum-norm solve",
                                "rank": mlp["css_rank"], "of": mlp["kept_neurons"]})
        return {"repairs": repairs}

    @classmethod
    def plot(cls, report: dict[str, Any], outputs: dict, out: Path, plt: Any) -> list[str]:
        """Kept fraction and block influence per layer, inner dimensions per layer."""
        search = report["search"]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
        layers = range(len(search["layer_kept"]))
        ax1.plot(layers, search["layer_kept"], marker="o", label="kept fraction")
        ax1.plot(layers, search["influence"], marker="x", label="block influence 1 − cos")
        ax1.set(title="per-layer allocation", xlabel="layer")
        ax1.legend(fontsize=7)
        for key in ("intermediate_size", "qk_dim", "vo_dim"):
            values = [d[key] for d in search["dims"]]
            ax2.plot(layers, [v / max(values) for v in values], marker="o", label=f"{key} (max {max(values)})")
        ax2.set(title="inner dimensions (relative to their largest)", xlabel="layer")
        ax2.legend(fontsize=7)
        return [artifacts.save_figure(fig, out / artifacts.PLOTS["structure"], plt)]

    # ------------------------------------------------------------------ the kind's allocation
    @classmethod
    def allocates(cls, choices) -> bool:
        return True

    @classmethod
    def allocation_needs(cls, choices) -> dict[str, set[str]]:
        return {"capture": set()}  # each block's influence, in capture's results

    @classmethod
    def allocation_reads(cls, ctx: Context) -> list[Read]:
        return [Read(artifacts.ref("capture", p)) for p in artifacts.model_layers(ctx) or []]

    @classmethod
    def allocation_slice(cls, ctx: Context) -> dict[str, Any]:
        return {"method": ctx.plan.method.allocation_options()}

    @classmethod
    def allocation(cls, ctx: Context, work: Work, shapes: dict[str, tuple[int, int]], n_params: int) -> dict[str, Any]:
        """Inner dimensions per block: the method's per-layer kept fractions, rounded (intermediate
        sizes to ``align``, whole RoPE pairs, value dims), then the budget spent exactly."""
        method = ctx.plan.method
        captures = sorted((layer_index(r.partition), d) for r, d in work.inputs.items() if r.stage == "capture")
        influence = [float(artifacts.read_results(d)["influence"]) for _, d in captures]
        kept = ctx.config.target.kept_fraction
        fractions = method.layer_kept(influence, kept)
        geometry = structured_block_of(ctx.facts)
        dims = spend_structured_budget(geometry, fractions, kept, ctx.config.allocation.align)
        kept_params = {}
        for i, block_dims in enumerate(dims):
            prefix = ctx.plan.layout.layer_prefix(i)
            kept_params.update({prefix + name: rows * cols for name, (rows, cols) in geometry.shapes(block_dims).items()})
        report = kept_report(shapes, kept_params, sum(1 for n in kept_params if kept_params[n] < shapes[n][0] * shapes[n][1]),
                             n_params, kept)
        details = {"influence": influence, "layer_kept": fractions,
                   "dims": [d.as_dict() for d in dims], **method.allocation_options()}
        artifacts.write_allocation(work.out, {}, {}, report.model_dump(), details, dims=[d.as_dict() for d in dims])
        return {"ratios": report.model_dump(), "policy": method.cfg.layer_allocation, "search": details, "dense_targets": []}

    # ------------------------------------------------------------------ and its assembly
    @classmethod
    def assembles(cls, choices) -> bool:
        return True

    @classmethod
    def layer_shard(cls, ctx: Context, work: Work, layer: int, tensors, ranks) -> dict[str, torch.Tensor]:
        """The block's tensors with the rewritten linears (and ``rope_index``) in place."""
        prefix = ctx.plan.layout.layer_prefix(layer)
        reduced = artifacts.read_structured_block(work.input(cls.name, artifacts.layer_partition(layer)))
        return replaced_layer(tensors, prefix, set(reduced), reduced)

    @classmethod
    def model_family(cls, ctx: Context, work: Work, ranks) -> tuple[Any, dict[str, Any]]:
        return modeling_structured, {"structured_layers": artifacts.read_structure_dims(work.input("allocate"))}
