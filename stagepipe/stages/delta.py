"""``delta`` (per layer; a ``DeltaMethod``: ImPart, DARE, low rank, BitDelta): each target matrix's
``Δ = W_model − W_base`` between the fine-tuned model (``snapshot``) and its base (``base``), compressed
within ``target.delta_ratio`` and stored as the method stores it (``delta.safetensors``).

Each matrix gets the same budget, ``floor(2mn / delta_ratio)`` bytes (the dense 16-bit delta over the
ratio); drop masks come from ``delta.mask_seed(seed, full name)``, so a resumed partition draws the
same bits. Before storing, the stage checks that the stored tensors decode to finite values and that
their bytes are the accounting's; the diagnostics record per matrix the relative error
``‖Δ̂ − Δ‖/‖Δ‖`` and the method's own facts (sparsity, rank, repairs). Every tensor that is not a
target matrix must be identical in the two models (layer 0's partition also checks the tensors outside
the blocks): a delta method compresses target matrices only, and says so rather than drop a difference.

The kind's share elsewhere: the allocation (no ranks; the stored bytes and the achieved ratio by
``accounting.delta_memory_report``) and the assembly (base + decoded delta in the architecture's own
class, ``models.dense``) are this stage's too. The compressed delta alone is this stage's outputs
(``stagepipe delta-export`` writes them as one directory that ``stagepipe delta-apply`` adds to the base).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter

from stagepipe.accounting import delta_memory_report
from stagepipe.config import PipelineConfig
from stagepipe.delta import mask_seed, tensor_bytes
from stagepipe.engine.stage import Context, Read, Work
from stagepipe.errors import ConfigError, InputError, StagepipeError
from stagepipe.io import safetensors_io
from stagepipe.io.hashing import sha256_file
from stagepipe.methods import DeltaMethod, make_method
from stagepipe.models import dense
from stagepipe.models.layout import block_linear_shapes
from stagepipe.models.sources import read_weights, weight_map
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import GROUPS, MODEL_DIR, STATS, layer_index
from stagepipe.stagekit.base import PipelineStage, register
from stagepipe.stagekit.cost import CostInputs, Estimate
from stagepipe.stagekit.dense_kinds import StoredBytesAllocation

DELTA = "delta.safetensors"
SEPARATOR = "::"  # a stored tensor's key: <block-relative linear>::<the method's tensor name>


def delta_budget(m: int, n: int, ratio: float) -> int:
    """Bytes one m×n matrix's stored delta may hold: the dense 16-bit delta over the ratio."""
    return math.floor(2 * m * n / ratio)


def check_identical(model_dir: Path, base_dir: Path, keys: list[str]) -> None:
    """Non-target tensors must be the base's: one ``InputError`` naming the first that differs."""
    ours, theirs = read_weights(model_dir, keys), read_weights(base_dir, keys)
    for key in keys:
        if ours[key].shape != theirs[key].shape or not torch.equal(ours[key], theirs[key]):
            raise InputError(f"model: {key} differs from the base's, and it is not a target matrix; delta methods "
                             "compress target.modules only (add it there, or fine-tune only those matrices)")


@register
class DeltaStage(StoredBytesAllocation, PipelineStage):
    name = "delta"
    version = 2  # 2: ImPart's budget search on the SVD it stores (one SVD, not svdvals beside it)
    description = "each target's model − base delta, compressed by a delta method (ImPart, DARE, low rank, BitDelta)"
    writes = {DELTA: "per target linear (as linear::tensor): the method's stored delta (sparse vectors, factors, or "
                     "signs and a scale)"}
    assembly_payload = DELTA

    @classmethod
    def joins(cls, choices) -> bool:
        return isinstance(choices.method, DeltaMethod)

    @classmethod
    def needs(cls, choices) -> dict[str, set[str]]:
        found = {"snapshot": {MODEL_DIR}, "base": {MODEL_DIR}}
        if choices.method.activation_stats:
            found["capture"] = {STATS, GROUPS}
        return found

    def partitions(self, ctx: Context) -> list[str] | None:
        return artifacts.model_layers(ctx)

    @staticmethod
    def check(config: Any, model: Any | None) -> None:
        """Before anything runs: a ratio the method can reach on every target matrix (BitDelta's is fixed)."""
        method = make_method(config.method)
        if not isinstance(method, DeltaMethod) or model is None:
            return
        for name, (m, n) in block_linear_shapes(model, config.target.modules).items():
            least = method.least_bytes(m, n)
            if least > delta_budget(m, n, config.target.delta_ratio):
                raise ConfigError(f"target.delta_ratio: {config.target.delta_ratio:g} is beyond {config.method.name}, which "
                                  f"stores at least {least} bytes for {name} ({m}×{n}): at most ratio "
                                  f"{2 * m * n / least:.3f}")

    def reads(self, ctx: Context, partition: str) -> list[Read]:
        reads = [Read(artifacts.ref("snapshot"), MODEL_DIR), Read(artifacts.ref("base"), MODEL_DIR)]
        if ctx.plan.method.activation_stats:
            reads += [Read(artifacts.ref("capture", partition), STATS), Read(artifacts.ref("capture", partition), GROUPS)]
        return reads

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        return {"method": ctx.plan.method.delta_options(), "modules": ctx.config.target.modules,
                "delta_ratio": ctx.config.target.delta_ratio}

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        """Stored bytes at the ratio; in RAM two copies of the block and one matrix's SVD in float64."""
        s = c.shapes
        ratio = c.config.target.delta_ratio or 1.0
        weights = sum(m * n for m, n in s.linears)
        return Estimate(cls.name, s.layers * 2 * weights / ratio, 2 * s.block * c.weight_bytes
                        + 8 * 4 * max(m * n for m, n in s.linears), 0, "float64 SVD of the largest delta",
                        flops64=s.layers * sum(10 * m * n * min(m, n) for m, n in s.linears))

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        method: DeltaMethod = ctx.plan.method
        model_dir, base_dir = artifacts.model_dir(work.input("snapshot")), artifacts.model_dir(work.input("base"))
        index = layer_index(work.partition)
        prefix = ctx.plan.layout.layer_prefix(index)
        targets = {name: shape for name, shape in block_linear_shapes(ctx.facts, ctx.config.target.modules).items()
                   if name.startswith(prefix)}
        wmap = weight_map(model_dir)
        weights = {f"{name}.weight" for name in targets}
        others = [k for k in wmap if k.startswith(prefix) and k not in weights]
        if index == 0:
            others += [k for k in wmap if not k.startswith(ctx.plan.layout.layers_path + ".")]
        check_identical(model_dir, base_dir, others)
        grams = (artifacts.read_input_stats(work.input("capture", work.partition)).gram
                 if method.activation_stats else {})
        ours, theirs = read_weights(model_dir, sorted(weights), wmap), read_weights(base_dir, sorted(weights))
        tensors: dict[str, torch.Tensor] = {}
        results, measured = {}, {}
        seed = getattr(method.cfg, "seed", 0)
        for name, (m, n) in sorted(targets.items()):
            local = name[len(prefix):]
            delta = ours[f"{name}.weight"].double() - theirs[f"{name}.weight"].double()
            budget = delta_budget(m, n, ctx.config.target.delta_ratio)
            gram = grams[local].double() if local in grams else None
            generator = torch.Generator().manual_seed(mask_seed(seed, name))
            try:
                stored, info = method.compress(delta, budget, generator, gram)
            except ValueError as exc:
                raise StagepipeError(f"{work.partition}.{local}: {exc}") from None
            decoded = method.decode(stored, (m, n))
            size = tensor_bytes(stored)
            if not bool(torch.isfinite(decoded).all()) or size > budget:
                raise StagepipeError(f"{work.partition}.{local}: the stored delta does not decode to finite values "
                                     f"within its budget ({size} bytes against {budget})")
            tensors.update({f"{local}{SEPARATOR}{suffix}": t for suffix, t in stored.items()})
            norm = float(torch.linalg.norm(delta))
            measured[local] = {"delta_rel_err": float(torch.linalg.norm(decoded - delta)) / norm if norm else 0.0,
                               "delta_norm": norm, **info}
            results[local] = {"shape": [m, n], "stored_bytes": size, "budget_bytes": budget}
        safetensors_io.write_atomic(work.out / DELTA, tensors)
        work.diagnostics["linears"] = measured
        return {"linears": results, "method": method.name}

    @classmethod
    def summarize(cls, manifests) -> dict[str, Any]:
        """Repairs a method recorded per matrix (the whitened metric's eigenvalue floor)."""
        repairs = [{"matrix": f"{ref.partition}.{name}", "kind": "input Gram floor", **item["repair"]}
                   for ref, manifest in sorted(manifests.items())
                   for name, item in manifest.diagnostics.get("linears", {}).items() if item.get("repair")]
        return {"repairs": repairs}

    # ------------------------------------------------------------------ the kind's allocation
    @classmethod
    def allocation_slice(cls, ctx: Context) -> dict[str, Any]:
        return {"method": ctx.plan.method.delta_options(), "delta_ratio": ctx.config.target.delta_ratio}

    @classmethod
    def allocation(cls, ctx: Context, work: Work, shapes: dict[str, tuple[int, int]], n_params: int) -> dict[str, Any]:
        """No ranks (every parameter kept); the stored delta's bytes and the achieved ratio."""
        memory = delta_memory_report(shapes, cls.stored_by_matrix(ctx, work), ctx.plan.method.name,
                                     ctx.config.target.delta_ratio)
        achieved = 1 / memory.kept_memory_over_target_matrices if memory.stored_bytes else math.inf
        return cls.write_dense_allocation(ctx, work, shapes, n_params, memory, {"delta": ctx.plan.method.delta_options()},
                                          delta_ratio={"requested": ctx.config.target.delta_ratio, "achieved": achieved})

    # ------------------------------------------------------------------ and its assembly
    @classmethod
    def assembles(cls, choices) -> bool:
        return True

    @classmethod
    def assembly_needs(cls, choices) -> dict[str, set[str]]:
        return {cls.name: {DELTA}, "base": {MODEL_DIR}}

    @classmethod
    def assembly_reads(cls, ctx: Context, layer: int) -> list[Read]:
        return [*super().assembly_reads(ctx, layer), Read(artifacts.ref("base"), MODEL_DIR)]

    @classmethod
    def layer_shard(cls, ctx: Context, work: Work, layer: int, tensors, ranks) -> dict[str, torch.Tensor]:
        """The block's tensors with each target's weight replaced by the base's plus the decoded delta."""
        prefix = ctx.plan.layout.layer_prefix(layer)
        stored = safetensors_io.read(work.input(cls.name, artifacts.layer_partition(layer)) / DELTA)
        base = read_weights(artifacts.model_dir(work.input("base")), delta_weight_keys(stored, prefix))
        return apply_layer_delta(ctx.plan.method, tensors, prefix, stored, base)

    @classmethod
    def model_family(cls, ctx: Context, work: Work, ranks) -> tuple[Any, dict[str, Any]]:
        return dense, {}


def delta_weight_keys(stored: dict[str, torch.Tensor], prefix: str) -> list[str]:
    """The full weight names of the linears a layer's stored delta holds."""
    return sorted({f"{prefix}{key.split(SEPARATOR)[0]}.weight" for key in stored})


def apply_layer_delta(method: DeltaMethod, tensors: dict[str, torch.Tensor], prefix: str,
                      stored: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (one layer, full names) with each linear that ``stored`` holds a delta for set to
    the base's weight (``base``, full names) plus the decoded delta, in the base weight's dtype."""
    out = dict(tensors)
    for key in delta_weight_keys(stored, prefix):
        local = key[len(prefix):].removesuffix(".weight")
        parts = {name.split(SEPARATOR)[1]: t for name, t in stored.items() if name.split(SEPARATOR)[0] == local}
        decoded = method.decode(parts, tuple(base[key].shape))
        out[key] = (base[key].double() + decoded).to(base[key].dtype)
    return out


# --------------------------------------------------------------------------- the delta as its own artifact
EXPORT_INDEX = "delta.json"


def export_delta(config: Any, outputs: dict[int, Path], prefixes: dict[int, str], out: Path) -> dict[str, Any]:
    """Write the finished ``delta`` partitions (``outputs``: layer → verified output directory) as one
    directory: a ``layer-XXX.safetensors`` per layer and ``delta.json`` (the method, the base it applies
    to, the layer prefixes, each file's sha256, the bytes). ``apply_delta`` adds it to the base."""
    if out.exists():
        raise InputError(f"{out}: exists; the export never overwrites (choose a new directory)")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    stored, files = 0, {}
    for layer, directory in sorted(outputs.items()):
        name = f"{artifacts.layer_partition(layer)}.safetensors"
        shutil.copyfile(directory / DELTA, partial / name)
        files[name] = sha256_file(partial / name)
        stored += tensor_bytes(safetensors_io.read(partial / name))
    index = {"method": config.method.model_dump(mode="json"), "base": config.base.model_dump(mode="json"),
             "delta_ratio": config.target.delta_ratio, "stored_bytes": stored, "sha256": files,
             "layers": {artifacts.layer_partition(i): prefixes[i] for i in sorted(outputs)}}
    (partial / EXPORT_INDEX).write_text(json.dumps(index, indent=1, sort_keys=True))
    partial.rename(out)  # complete or absent
    return index


def apply_delta(base_dir: Path, delta_dir: Path, out: Path) -> None:
    """``base_dir`` (a Hugging Face model directory) plus an exported delta (each file checked against its
    sha256 first), written to ``out``: each target weight the base's plus the decoded delta, every other
    file the base's. ``out`` appears complete or not at all."""
    if out.exists():
        raise InputError(f"{out}: exists; delta-apply never overwrites (choose a new directory)")
    index = json.loads((delta_dir / EXPORT_INDEX).read_text())
    for name, digest in index["sha256"].items():
        if sha256_file(delta_dir / name) != digest:
            raise InputError(f"{delta_dir / name}: content differs from the sha256 in {EXPORT_INDEX} (corrupt); re-export it")
    method = make_method(TypeAdapter(PipelineConfig.model_fields["method"].annotation).validate_python(index["method"]))
    wmap = weight_map(base_dir)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(base_dir, partial)
    changed: dict[str, dict[str, torch.Tensor]] = {}
    for partition, prefix in index["layers"].items():
        stored = safetensors_io.read(delta_dir / f"{partition}.safetensors")
        keys = [k for k in wmap if k.startswith(prefix)]
        layer_tensors = read_weights(base_dir, keys, wmap)
        layer = apply_layer_delta(method, layer_tensors, prefix, stored, layer_tensors)
        for key in keys:
            changed.setdefault(wmap[key], {})[key] = layer[key]
    for file, tensors in changed.items():
        safetensors_io.write_atomic(partial / file, {**safetensors_io.read(base_dir / file), **tensors})
    partial.rename(out)
