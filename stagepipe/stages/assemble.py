"""``assemble``: the compressed model as a Hugging Face directory.

Writes one safetensors shard per decoder block (targets replaced by ``<name>.down.weight`` /
``<name>.up.weight`` / ``<name>.up.bias`` truncated to the allocated rank; everything else copied),
a shard for the rest, ``model.safetensors.index.json``, ``config.json`` with the ranks and
``auto_map`` to the bundled ``modeling_lowrank.py``, and the tokenizer. Before finishing it checks
on a meta-device instance that the checkpoint has exactly the keys the class expects.

With remapping (``Method.storage() == "remap8"``) a factored linear is written as
``modeling_lowrank.remap_factors`` encodes it (int8 square parts, fp16 scales and rest, the
original ``<name>.bias``) and listed in ``config.lowrank_remapped``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from stagepipe.engine.stage import Context, PartitionRef, Stage, Work
from stagepipe.errors import StagepipeError
from stagepipe.io import safetensors_io
from stagepipe.models import modeling_lowrank, modeling_structured
from stagepipe.models.layout import layout_for
from stagepipe.models.sources import weight_map
from stagepipe.stages import artifacts
from stagepipe.stages.artifacts import layer_index
from stagepipe.stages.requirements import needs

#: model family (the ``<family>_`` prefix of the written ``model_type``) → its self-contained modeling
#: file and that file's ``{base model_type: (config class name, model class name)}``
FAMILIES = {"lowrank": (modeling_lowrank, modeling_lowrank.LOWRANK_CLASSES),
            "structured": (modeling_structured, modeling_structured.STRUCTURED_CLASSES)}


class AssembleStage(Stage):
    name = "assemble"
    version = 2
    description = "write the low-rank model as a from_pretrained-loadable directory"

    def dependencies(self, ctx: Context, partition: str) -> list[PartitionRef]:
        layers = artifacts.model_layers(ctx) or []
        need = needs(ctx.config)
        if need.structure:
            return [artifacts.ref("snapshot"), artifacts.ref("allocate")] + [artifacts.ref("structure", p) for p in layers]
        deps = [artifacts.ref("snapshot"), artifacts.ref("allocate")] + [artifacts.ref("decompose", p) for p in layers]
        if need.residual:
            deps += [artifacts.ref("residual", p) for p in layers]
        if need.anchor:
            deps += [artifacts.ref("anchor", p) for p in layers]
        if need.refit:
            deps += [artifacts.ref("refit", p) for p in layers]
        if need.learned_factors:
            deps.append(artifacts.ref("train"))
        return deps

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        storage = needs(ctx.config).method.storage()
        return {"storage": storage} if storage != "16-bit" else {}  # 16-bit outputs keep their keys

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        snapshot = artifacts.model_dir(work.input("snapshot"))
        config = AutoConfig.from_pretrained(snapshot)
        structured = needs(ctx.config).structure
        remap = needs(ctx.config).method.storage() == "remap8"
        family = "structured" if structured else "lowrank"
        if config.model_type not in FAMILIES[family][1]:
            raise StagepipeError(f"no {family} class for architecture {config.model_type!r}")
        layout = layout_for(config.model_type)
        ranks = artifacts.read_ranks(work.input("allocate"))
        factored = {n: r for n, r in ranks.items() if r is not None}
        dims = artifacts.read_structure_dims(work.input("allocate")) if structured else None
        wmap = weight_map(snapshot)
        target = artifacts.model_dir(work.out)
        target.mkdir()
        index: dict[str, str] = {}
        total = 0
        by_layer = {stage: {layer_index(r.partition): d for r, d in work.inputs.items() if r.stage == stage}
                    for stage in ("decompose", "residual", "anchor", "refit", "structure")}
        trained = work.inputs.get(artifacts.ref("train")) if needs(ctx.config).learned_factors else None
        files: dict[str, list[str]] = {}
        for key, file in wmap.items():
            files.setdefault(file, []).append(key)
        for i in range(int(config.num_hidden_layers)):
            prefix = layout.layer_prefix(i)
            layer_keys = [k for k in wmap if k.startswith(prefix)]
            if structured:
                shard = self._structured_shard(snapshot, wmap, layer_keys, prefix, by_layer["structure"][i])
            else:
                sources = (by_layer["decompose"][i], by_layer["residual"].get(i), by_layer["anchor"].get(i),
                           by_layer["refit"].get(i))
                learned = artifacts.read_learned(trained, i) if trained is not None else None
                shard = self._layer_shard(snapshot, wmap, layer_keys, prefix, sources, factored, learned, remap)
            name = f"layer-{i:03d}.safetensors"
            safetensors_io.write_atomic(target / name, shard)
            index.update(dict.fromkeys(shard, name))
            total += sum(t.numel() * t.element_size() for t in shard.values())
        rest_keys = [k for k in wmap if not k.startswith(layout.layers_path + ".")]
        rest = {}
        for key in rest_keys:
            rest.update(safetensors_io.read(snapshot / wmap[key], [key]))
        safetensors_io.write_atomic(target / "rest.safetensors", rest)
        index.update(dict.fromkeys(rest, "rest.safetensors"))
        total += sum(t.numel() * t.element_size() for t in rest.values())
        (target / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}, indent=1))
        extra = {"structured_layers": dims} if structured else {"lowrank_ranks": dict(sorted(factored.items()))}
        if remap:
            extra["lowrank_remapped"] = sorted(factored)
        self._write_config(snapshot, target, config.model_type, family, extra)
        for item in snapshot.iterdir():
            if item.name.startswith(("tokenizer", "special_tokens", "generation_config", "vocab", "merges")):
                shutil.copy(item, target / item.name)
        self._check_keys(target, set(index))
        return {"n_factored": len(factored), "bytes": total, **({"structured_layers": dims} if structured else {})}

    @staticmethod
    def _layer_shard(snapshot: Path, wmap: dict[str, str], keys: list[str], prefix: str,
                     sources: tuple[Path, Path | None, Path | None, Path | None],
                     factored: dict[str, int],
                     learned: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                     remap: bool = False) -> dict[str, torch.Tensor]:
        """Block tensors with each factored linear replaced by its final factors: ``train``'s or
        ``anchor``'s where they ran (with the norm weights its refinement trained), else
        ``decompose``'s (or ``residual``'s) at the rank, with ``refit``'s up factors; remapped
        (8-bit square part) when ``remap``."""
        decomposed, residual, anchored, refitted = sources
        tensors: dict[str, torch.Tensor] = {}
        for key in keys:
            tensors.update(safetensors_io.read(snapshot / wmap[key], [key]))
        ranks = artifacts.block_ranks(factored, prefix)
        if not ranks:
            return tensors
        if learned is not None:
            factors = learned
        elif anchored is not None:
            factors = artifacts.read_anchored(anchored)
            for local, value in artifacts.read_anchored_params(anchored).items():  # refined norms
                tensors[prefix + local] = value.to(tensors[prefix + local].dtype)
        else:
            factors = artifacts.allocated_factors(decomposed, residual, ranks)
        updates = artifacts.read_refit(refitted) if refitted is not None else {}
        for local, (up, down) in factors.items():
            full = prefix + local
            weight = tensors.pop(f"{full}.weight")
            up = updates[local] if updates else up
            if remap:  # the bias keeps its name: RemappedLinear.bias
                tensors.update({f"{full}.{key}": t for key, t in modeling_lowrank.remap_factors(up, down).items()})
                continue
            tensors[f"{full}.up.weight"] = up.to(weight.dtype)
            tensors[f"{full}.down.weight"] = down.to(weight.dtype)
            if f"{full}.bias" in tensors:
                tensors[f"{full}.up.bias"] = tensors.pop(f"{full}.bias")
        return tensors

    @staticmethod
    def _structured_shard(snapshot: Path, wmap: dict[str, str], keys: list[str], prefix: str,
                          structure: Path) -> dict[str, torch.Tensor]:
        """Block tensors with the rewritten linears (and ``rope_index``) from ``structure``."""
        reduced = artifacts.read_structure(structure)
        tensors: dict[str, torch.Tensor] = {}
        for key in keys:
            if key[len(prefix):] not in reduced:
                tensors.update(safetensors_io.read(snapshot / wmap[key], [key]))
        tensors.update({prefix + local: t for local, t in reduced.items()})
        return tensors

    @staticmethod
    def _write_config(snapshot: Path, target: Path, model_type: str, family: str, extra: dict[str, Any]) -> None:
        """The snapshot's ``config.json`` as ``<family>_<model_type>`` with the family's fields
        (``extra``) and ``auto_map`` to its modeling file, copied beside it."""
        module, classes = FAMILIES[family]
        file = Path(module.__file__)
        config_name, model_name = classes[model_type]
        data = json.loads((snapshot / "config.json").read_text())
        data.update({
            "model_type": f"{family}_{model_type}",
            "architectures": [model_name],
            **extra,
            "auto_map": {"AutoConfig": f"{file.stem}.{config_name}", "AutoModelForCausalLM": f"{file.stem}.{model_name}"},
        })
        (target / "config.json").write_text(json.dumps(data, indent=1, sort_keys=True))
        shutil.copy(file, target / file.name)

    @staticmethod
    def _check_keys(target: Path, written: set[str]) -> None:
        """Zero missing / unexpected keys against the written family's class, checked on the meta device."""
        data = json.loads((target / "config.json").read_text())
        family, _, base = data["model_type"].partition("_")
        module, classes = FAMILIES[family]
        config_name, model_name = classes[base]
        fields = {k: v for k, v in data.items() if k not in {"auto_map", "architectures", "model_type"}}
        config = getattr(module, config_name)(**fields)
        with torch.device("meta"):
            model = getattr(module, model_name)(config)
        expected = set(model.state_dict())
        if getattr(config, "tie_word_embeddings", False):
            expected -= {k for k in expected if k.endswith("lm_head.weight")}
        missing, unexpected = expected - written, written - expected
        if missing or unexpected:
            raise StagepipeError(f"assembled checkpoint keys differ: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
