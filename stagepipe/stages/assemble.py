"""``assemble``: the compressed model as a Hugging Face directory.

Writes one safetensors shard per decoder block, a shard for the rest, the index, ``config.json``
with the family's fields and ``auto_map`` to the family's self-contained modeling file (copied
beside it), and the tokenizer; before finishing it checks on a meta-device instance that the
checkpoint has exactly the keys the class expects.

Each block's shard is the final form of the layer as the stage that gives it (``Plan.assembler``)
makes it: decompose's weighted SVD truncated at the allocated ranks, or a method kind's own
factors (rank_factors, anchor, refit, a learned method's train), or a structured method's smaller
block (structure), a quantising method's packed linears (quantize) — ``PipelineStage.layer_shard``;
the family (``modeling_lowrank``, ``modeling_structured``, or ``compressed``: the architecture's own
class with a compressed-tensors ``quantization_config``) is that stage's ``model_family``. This stage
knows none of them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from stagepipe.engine.stage import Context, Read, Work
from stagepipe.errors import StagepipeError
from stagepipe.io import safetensors_io
from stagepipe.models.sources import read_weights, weight_map
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import ALLOCATION, MODEL_CONFIG, MODEL_DIR, MODEL_INDEX, REST_SHARD
from stagepipe.stagekit.base import STAGES, PipelineStage, register
from stagepipe.stagekit.cost import CostInputs, Estimate
from stagepipe.stagekit.plan import assembler_of


@register
class AssembleStage(PipelineStage):
    name = "assemble"
    version = 2
    description = "write the compressed model as a from_pretrained-loadable directory"
    writes = {MODEL_DIR: "the compressed model: a shard per block, the rest, index, config.json, modeling file, tokenizer"}

    @classmethod
    def needs(cls, choices) -> dict[str, set[str]]:
        source = STAGES[assembler_of(choices)]
        return {"snapshot": {MODEL_DIR}, "allocate": {ALLOCATION}, **source.assembly_needs(choices)}

    def reads(self, ctx: Context, partition: str) -> list[Read]:
        source = ctx.plan.stage_class(ctx.plan.assembler)
        layers = range(artifacts.num_layers(ctx)) if ctx.facts is not None else ()
        per_layer = [read for layer in layers for read in source.assembly_reads(ctx, layer)]
        return [Read(artifacts.ref("snapshot"), MODEL_DIR), Read(artifacts.ref("allocate"), ALLOCATION),
                *dict.fromkeys(per_layer)]

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        storage = ctx.plan.method.storage()
        return {"storage": storage} if storage != "16-bit" else {}  # 16-bit outputs keep their keys

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        s = c.shapes
        return Estimate(cls.name, s.params * c.weight_bytes * c.config.target.kept_fraction, c.rest_load + 2 * s.block * c.weight_bytes, 0)

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        snapshot = artifacts.model_dir(work.input("snapshot"))
        config = AutoConfig.from_pretrained(snapshot)
        source = ctx.plan.stage_class(ctx.plan.assembler)
        ranks = artifacts.read_ranks(work.input("allocate"))
        module, extra = source.model_family(ctx, work, ranks)
        native = getattr(module, "NATIVE", False)  # the architecture's own class (compressed-tensors)
        if not native and config.model_type not in module.CLASSES:
            raise StagepipeError(f"no {module.FAMILY} class for architecture {config.model_type!r}")
        layout = ctx.plan.layout
        wmap = weight_map(snapshot)
        target = artifacts.model_dir(work.out)
        target.mkdir()
        index: dict[str, str] = {}
        total = 0
        for i in range(int(config.num_hidden_layers)):
            prefix = layout.layer_prefix(i)
            tensors = read_weights(snapshot, [k for k in wmap if k.startswith(prefix)], wmap)
            shard = source.layer_shard(ctx, work, i, tensors, ranks)
            name = artifacts.layer_shard_name(i)
            safetensors_io.write_atomic(target / name, shard)
            index.update(dict.fromkeys(shard, name))
            total += sum(t.numel() * t.element_size() for t in shard.values())
        rest = read_weights(snapshot, [k for k in wmap if not k.startswith(layout.layers_path + ".")], wmap)
        safetensors_io.write_atomic(target / REST_SHARD, rest)
        index.update(dict.fromkeys(rest, REST_SHARD))
        total += sum(t.numel() * t.element_size() for t in rest.values())
        (target / MODEL_INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}, indent=1))
        if native:
            module.write_config(snapshot, target, extra)
        else:
            self._write_config(snapshot, target, config.model_type, module, extra)
        for item in snapshot.iterdir():
            if item.name.startswith(artifacts.TOKENIZER_FILES):
                shutil.copy(item, target / item.name)
        self._check_keys(target, set(index), module)
        factored = extra.get("lowrank_ranks", {})
        return {"n_factored": len(factored), "bytes": total,
                **({"structured_layers": extra["structured_layers"]} if "structured_layers" in extra else {})}

    @staticmethod
    def _write_config(snapshot: Path, target: Path, model_type: str, module: Any, extra: dict[str, Any]) -> None:
        """The snapshot's ``config.json`` as ``<family>_<model_type>`` with the family's fields
        (``extra``) and ``auto_map`` to its modeling file, copied beside it."""
        file = Path(module.__file__)
        config_name, model_name = module.CLASSES[model_type]
        data = json.loads((snapshot / MODEL_CONFIG).read_text())
        data.update({
            "model_type": f"{module.FAMILY}_{model_type}",
            "architectures": [model_name],
            **extra,
            "auto_map": {"AutoConfig": f"{file.stem}.{config_name}", "AutoModelForCausalLM": f"{file.stem}.{model_name}"},
        })
        (target / MODEL_CONFIG).write_text(json.dumps(data, indent=1, sort_keys=True))
        shutil.copy(file, target / file.name)

    @staticmethod
    def _check_keys(target: Path, written: set[str], module: Any) -> None:
        """Zero missing / unexpected keys against the written family's class, checked on the meta device."""
        if getattr(module, "NATIVE", False):
            AssembleStage._compare_keys(module.expected_keys(target), written)
            return
        data = json.loads((target / MODEL_CONFIG).read_text())
        base = data["model_type"].removeprefix(f"{module.FAMILY}_")
        config_name, model_name = module.CLASSES[base]
        fields = {k: v for k, v in data.items() if k not in {"auto_map", "architectures", "model_type"}}
        config = getattr(module, config_name)(**fields)
        with torch.device("meta"):
            model = getattr(module, model_name)(config)
        expected = set(model.state_dict())
        if getattr(config, "tie_word_embeddings", False):
            expected -= {k for k in expected if k.endswith("lm_head.weight")}
        AssembleStage._compare_keys(expected, written)

    @staticmethod
    def _compare_keys(expected: set[str], written: set[str]) -> None:
        missing, unexpected = expected - written, written - expected
        if missing or unexpected:
            raise StagepipeError(f"assembled checkpoint keys differ: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
