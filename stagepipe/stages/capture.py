"""``capture`` (per layer, in order): run decoder block i on its cached inputs, accumulate input
statistics of its linears, and store its outputs as the inputs of block i+1.

Statistics are accumulated in float64 once per *distinct input*: linears fed the very same tensor
(q/k/v; gate/up) share one Gram ``Σ x xᵀ``, found by tensor identity rather than by name, so any
architecture groups correctly. Inputs come from the *original* model (parallel statistics).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from stagepipe.engine.stage import ALL, Context, PartitionRef, Stage, layer_index, layer_partition
from stagepipe.io import zarr_io
from stagepipe.methods import LayerStats, make_method
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linears
from stagepipe.models.sources import DTYPES, resolve_device
from stagepipe.stages.tokenize import CALIBRATION

HIDDEN = "hidden.zarr"


def needs_capture(ctx: Context) -> bool:
    method = make_method(ctx.config.method)
    searching = ctx.config.allocation.policy == "asvd_search"  # sensitivity starts from stored block inputs
    return bool(method.activation_stats) or method.needs_gradients or ctx.config.method.refit or searching


def calibration_ids(inputs: dict[PartitionRef, Path]) -> torch.Tensor:
    return torch.from_numpy(zarr_io.read(inputs[PartitionRef("tokenize", CALIBRATION)] / "tokens.zarr", "input_ids"))


def block_inputs(runner: BlockRunner, index: int, ids: torch.Tensor, inputs: dict[PartitionRef, Path], batch: int,
                 stage: str = "capture"):
    """Yield (start, hidden inputs of block ``index``) per batch of calibration windows: the
    embeddings for block 0, else block ``index-1``'s outputs as written by ``stage`` (``capture``:
    the original model; ``refit``: the compressed model's running inputs)."""
    runner.prepare(ids)
    if index == 0:
        for start in range(0, len(ids), batch):
            yield start, runner.embed(ids[start : start + batch])
        return
    array = zarr_io.open_array(inputs[PartitionRef(stage, layer_partition(index - 1))] / HIDDEN, "hidden")
    for start in range(0, len(ids), batch):
        yield start, zarr_io.read_rows(array, start, start + batch)


def input_groups(block: torch.nn.Module, linears: dict[str, torch.nn.Module], runner: BlockRunner,
                 hidden: torch.Tensor) -> dict[str, str]:
    """Map each linear to the first linear that receives the identical input tensor.

    The probe keeps every input tensor alive, so identity cannot be confused by a freed tensor's
    address being reused.
    """
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(n, args[0]))
               for n, m in linears.items()]
    try:
        with torch.no_grad():
            runner.run_block(block, hidden[:1])
    finally:
        for h in handles:
            h.remove()
    groups: dict[str, str] = {}
    for name in linears:
        groups[name] = next((g for g in dict.fromkeys(groups.values()) if seen[g] is seen[name]), name)
    return groups


class CaptureStage(Stage):
    name = "capture"
    version = 1
    description = "block-by-block forward: input Grams per distinct input + next block inputs"

    def partitions(self, ctx: Context) -> list[str] | None:
        return ctx.layer_partitions()

    def dependencies(self, ctx: Context, partition: str) -> list[PartitionRef]:
        deps = [PartitionRef("snapshot", ALL), PartitionRef("tokenize", CALIBRATION)]
        index = layer_index(partition)
        if index > 0:
            deps.append(PartitionRef("capture", layer_partition(index - 1)))
        return deps

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        method = make_method(ctx.config.method)
        return {"stats": sorted(method.activation_stats), "needed": needs_capture(ctx),
                "modules": ctx.config.target.modules, "batch_size": ctx.config.runtime.batch_size,
                "activation_dtype": ctx.config.runtime.activation_dtype}

    def skip_reason(self, ctx: Context, partition: str) -> str | None:
        if not needs_capture(ctx):
            return f"method {ctx.config.method.name} uses no calibration statistics"
        return None

    def run(self, ctx: Context, partition: str, out: Path, inputs: dict[PartitionRef, Path]) -> dict[str, Any]:
        index = layer_index(partition)
        device = resolve_device(ctx.config.model.device)
        runner = BlockRunner(inputs[PartitionRef("snapshot", ALL)] / "model", device, DTYPES[ctx.config.model.dtype])
        ids = calibration_ids(inputs)
        block = runner.load_block(index)
        linears = block_linears(block, ctx.config.target.modules)
        batch = ctx.config.runtime.batch_size
        wanted = make_method(ctx.config.method).activation_stats
        hidden_out = zarr_io.create_array(out / HIDDEN, "hidden", (len(ids), ids.shape[1], runner.config.hidden_size),
                                          ctx.config.runtime.activation_dtype, batch)
        groups: dict[str, str] | None = None
        stats: dict[str, torch.Tensor] = {}
        tokens = 0
        handles = []
        for start, hidden in block_inputs(runner, index, ids, inputs, batch):
            if groups is None:
                groups = input_groups(block, linears, runner, hidden.to(device))
                for name in sorted(set(groups.values())):
                    handles.append(linears[name].register_forward_pre_hook(
                        lambda mod, args, name=name: _accumulate(stats, name, args[0], wanted)))
            with torch.no_grad():
                output = runner.run_block(block, hidden)
            zarr_io.write_rows(hidden_out, start, output)
            tokens += output.shape[0] * output.shape[1]
        for h in handles:
            h.remove()
        if wanted:
            zarr_io.write_atomic(out / "stats.zarr", {k: v.cpu() for k, v in stats.items()}, attrs={"tokens": tokens})
        (out / "groups.json").write_text(json.dumps(groups, indent=1, sort_keys=True))
        return {"tokens": tokens, "groups": groups, "distinct_inputs": len(set(groups.values()))}


def _accumulate(stats: dict[str, torch.Tensor], group: str, x: torch.Tensor, wanted: frozenset[str]) -> None:
    """Add one batch of a group's inputs: Gram in float64, per-channel Σ|x| and max|x|."""
    flat = x.detach().reshape(-1, x.shape[-1])
    if "gram" in wanted:
        term = flat.to(torch.float64)
        stats[f"gram.{group}"] = stats.get(f"gram.{group}", 0) + term.T @ term
    if "abs" in wanted:
        absolute = flat.abs().to(torch.float64)
        stats[f"abs_sum.{group}"] = stats.get(f"abs_sum.{group}", 0) + absolute.sum(0)
        batch_max = absolute.max(0).values
        stats[f"abs_max.{group}"] = torch.maximum(stats[f"abs_max.{group}"], batch_max) if f"abs_max.{group}" in stats else batch_max


def load_input_stats(capture_dir: Path) -> LayerStats:
    """Input statistics of one block, keyed by every linear (shared tensors for shared inputs)."""
    groups = json.loads((capture_dir / "groups.json").read_text())
    stats = LayerStats()
    if not (capture_dir / "stats.zarr").exists():
        return stats
    tokens = int(zarr_io.attrs(capture_dir / "stats.zarr")["tokens"])
    arrays = {k: torch.from_numpy(v) for k, v in zarr_io.read(capture_dir / "stats.zarr").items()}
    for name, group in groups.items():
        stats.tokens[name] = tokens
        for kind, target in (("gram", stats.gram), ("abs_sum", stats.abs_sum), ("abs_max", stats.abs_max)):
            if f"{kind}.{group}" in arrays:
                target[name] = arrays[f"{kind}.{group}"]
    return stats
