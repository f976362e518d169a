"""``capture`` (per layer, in order): run decoder block i on its cached inputs, accumulate input
statistics of its linears, and store its outputs as the inputs of block i+1.

Statistics are accumulated in float64 once per *distinct input*: linears fed the very same tensor
(q/k/v; gate/up) share one Gram ``Σ x xᵀ``, found by tensor identity rather than by name, so any
architecture groups correctly. Inputs come from the *original* model (parallel statistics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stagepipe.engine.stage import Context, PartitionRef, Stage, Work
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linears
from stagepipe.models.sources import DTYPES, resolve_device
from stagepipe.stages import artifacts
from stagepipe.stages.artifacts import CALIBRATION, layer_index, layer_partition
from stagepipe.stages.estimate import capture_interval, checkpoints
from stagepipe.stages.requirements import needs


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
    version = 2
    description = "block-by-block forward: input Grams per distinct input + next block inputs"

    def partitions(self, ctx: Context) -> list[str] | None:
        return artifacts.model_layers(ctx)

    def dependencies(self, ctx: Context, partition: str) -> list[PartitionRef]:
        deps = [artifacts.ref("snapshot"), artifacts.ref("tokenize", CALIBRATION)]
        index = layer_index(partition)
        if index > 0:
            deps.append(artifacts.ref("capture", index - 1))
        return deps

    def transient(self, ctx: Context, partition: str) -> dict[str, list[PartitionRef]]:
        """The stored block outputs are a hand-over to the partitions that read them; under a disk
        budget the input statistics too (to this layer's decompose and the other readers)."""
        statistics = artifacts.statistics_handover(self.name, ctx, partition) if needs(ctx.config).capture_stats else {}
        return {**artifacts.hidden_handover(self.name, ctx, partition), **statistics}

    def early_release(self, ctx: Context, partition: str) -> dict[str, list[PartitionRef]]:
        """Under a disk budget, block outputs of layers that are not checkpoints go once the next
        block's capture is done; a later stage that reads them restores them (``estimate.capture_interval``)."""
        index, layers = layer_index(partition), int(ctx.model.num_hidden_layers)
        if index == layers - 1 or ctx.config.runtime.disk_budget_gb is None:
            return {}
        memo = (id(ctx.config), id(ctx.model))
        if getattr(self, "_interval", (None, 1))[0] != memo:
            self._interval = (memo, capture_interval(ctx.config, ctx.model))
        if index in checkpoints(layers, self._interval[1]):
            return {}
        return {artifacts.HIDDEN: [artifacts.ref(self.name, index + 1)]}

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        slice_ = {"stats": sorted(needs(ctx.config).capture_stats), "modules": ctx.config.target.modules,
                  "batch_size": ctx.config.runtime.batch_size, "activation_dtype": ctx.config.runtime.activation_dtype}
        return artifacts.with_shards(slice_, ctx)

    def fans_out(self, ctx: Context, partition: str) -> bool:
        return artifacts.sharded(ctx)

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        """One job per shard of the windows (``runtime.shards``; one job without shards): each runs
        the block on its rows and writes them into this partition's block outputs; the statistics
        are summed here in shard order (float64), so where the jobs ran never changes a bit."""
        index = layer_index(work.partition)
        batch = ctx.config.runtime.batch_size
        tokens_dir = work.input("tokenize", CALIBRATION)
        ids = artifacts.read_windows(tokens_dir)
        wanted = needs(ctx.config).capture_stats
        artifacts.create_hidden(work.out, (len(ids), ids.shape[1], int(ctx.model.hidden_size)),
                                ctx.config.runtime.activation_dtype, batch)
        ranges = artifacts.shard_ranges(len(ids), batch, ctx.config.runtime.shards)
        jobs = [CaptureJob(snapshot=artifacts.model_dir(work.input("snapshot")), tokens=tokens_dir,
                           below=None if index == 0 else work.input("capture", layer_partition(index - 1)), out=work.out,
                           index=index, rows=rows, device=ctx.config.model.device, dtype=ctx.config.model.dtype,
                           modules=ctx.config.target.modules, batch=batch, wanted=wanted)
                for rows in ranges]
        parts = work.fan_out.map(capture_shard, jobs, [artifacts.shard_label(self.name, work.partition, i)
                                                       for i in range(len(jobs))])
        groups = parts[0].groups
        if any(part.groups != groups for part in parts):
            raise RuntimeError(f"capture@{work.partition}: shards found different input groups")
        stats = artifacts.add_in_shard_order([part.stats for part in parts])
        tokens = sum(part.tokens for part in parts)
        artifacts.write_input_stats(work.out, stats if wanted else {}, tokens, groups)
        results = {"tokens": tokens, "groups": groups, "distinct_inputs": len(set(groups.values()))}
        if "influence" in wanted:  # shard order, like the statistics
            results["influence"] = 1.0 - sum(part.cosine for part in parts) / tokens
        return results


@dataclass(frozen=True)
class CaptureJob:
    """One shard of one layer's capture: everything a worker needs, as paths and plain values."""

    snapshot: Path
    tokens: Path
    below: Path | None  # capture output of the block below (None: block 0 starts from the embeddings)
    out: Path  # the partition's temp directory, where the block-output array already exists
    index: int
    rows: tuple[int, int]
    device: str
    dtype: str
    modules: Any  # target.modules (None: every linear of the block)
    batch: int
    wanted: frozenset[str]


@dataclass
class CapturePart:
    stats: dict[str, torch.Tensor]
    tokens: int
    cosine: float  # Σ over the shard's tokens of cos(block input, block output), exactly rounded
    groups: dict[str, str]


def capture_shard(job: CaptureJob) -> CapturePart:
    """Run block ``job.index`` on rows ``job.rows``: write its outputs there, return this shard's
    statistics as float64 sums (not yet divided by the token count)."""
    lo, hi = job.rows
    runner = BlockRunner(job.snapshot, resolve_device(job.device), DTYPES[job.dtype])
    ids = artifacts.read_windows(job.tokens)[lo:hi]
    block = runner.load_block(job.index)
    linears = block_linears(block, job.modules)
    hidden_out = artifacts.open_hidden(job.out, writable=True)
    groups: dict[str, str] | None = None
    stats: dict[str, torch.Tensor] = {}
    tokens = 0
    cosines: list[float] = []
    handles = []
    try:
        for start, hidden in artifacts.block_input_rows(runner, ids, job.below, job.batch, offset=lo):
            if groups is None:
                groups = input_groups(block, linears, runner, hidden.to(runner.device))
                for name in sorted(set(groups.values())):
                    handles.append(linears[name].register_forward_pre_hook(
                        lambda mod, args, name=name: _accumulate(stats, name, args[0], job.wanted)))
            with torch.no_grad():
                output = runner.run_block(block, hidden)
            artifacts.write_rows(hidden_out, start, output)
            if "influence" in job.wanted:  # block influence: how far the block turns its input (MoDeGPT)
                cosines += torch.nn.functional.cosine_similarity(hidden.to(output.device).float(), output.float(),
                                                                 dim=-1).flatten().tolist()
            tokens += output.shape[0] * output.shape[1]
    finally:
        for h in handles:
            h.remove()
    assert groups is not None  # every shard holds at least one batch (artifacts.shard_ranges)
    # one cosine per token (a reduction over the hidden size alone), added exactly: the same float
    # whatever the thread count, which a parallel tensor sum is not (the influence is in the key)
    return CapturePart({k: v.cpu() for k, v in stats.items()}, tokens, math.fsum(cosines), groups)



def _accumulate(stats: dict[str, torch.Tensor], group: str, x: torch.Tensor, wanted: frozenset[str]) -> None:
    """Add one batch of a group's inputs: Gram in float64, per-channel Σ|x| and max|x|."""
    flat = x.detach().reshape(-1, x.shape[-1])
    if "gram" in wanted:
        artifacts.add_gram(stats, f"gram.{group}", x)
    if "abs" in wanted:
        absolute = flat.abs().to(torch.float64)
        stats[f"abs_sum.{group}"] = stats.get(f"abs_sum.{group}", 0) + absolute.sum(0)
        batch_max = absolute.max(0).values
        stats[f"abs_max.{group}"] = torch.maximum(stats[f"abs_max.{group}"], batch_max) if f"abs_max.{group}" in stats else batch_max
