"""``capture`` (per layer, in order): run decoder block i on its cached inputs, accumulate input
statistics of its linears, and store its outputs as the inputs of block i+1.

Statistics are accumulated in float64 once per *distinct input*: linears fed the very same tensor
(q/k/v; gate/up) share one Gram ``Σ x xᵀ``, found by tensor identity rather than by name, so any
architecture groups correctly. Inputs come from the *original* model (parallel statistics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from stagepipe.engine.stage import Context, PartitionRef, Read, Work
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linears
from stagepipe.models.sources import DTYPES, resolve_device
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import (
    CALIBRATION,
    GROUPS,
    HIDDEN,
    MODEL_DIR,
    STATS,
    TOKENS,
    layer_index,
    layer_partition,
)
from stagepipe.stagekit.base import PipelineStage, register
from stagepipe.stagekit.cost import CostInputs, Estimate
from stagepipe.stagekit.plan import checkpoints, later_hidden_readers, recomputed_captures
from stagepipe.stagekit.shards import (
    add_gram,
    add_in_shard_order,
    shard_label,
    shard_ranges,
    sharded,
    with_shards,
)
from stagepipe.stagekit.streams import block_input_rows


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


@register
class CaptureStage(PipelineStage):
    name = "capture"
    version = 3
    description = "block-by-block forward: input Grams per distinct input + next block inputs"
    writes = {HIDDEN: "the block's outputs over the calibration windows (the next block's inputs)",
              STATS: "input statistics per distinct input: Gram, Σ|x|, max|x| (float64 sums)",
              GROUPS: "linear → the first linear fed the same input tensor"}

    @classmethod
    def needs(cls, choices) -> dict[str, set[str]]:
        return {"snapshot": {MODEL_DIR}, "tokenize": {TOKENS}, "capture": {HIDDEN}}

    def partitions(self, ctx: Context) -> list[str] | None:
        return artifacts.model_layers(ctx)

    def reads(self, ctx: Context, partition: str) -> list[Read]:
        reads = [Read(artifacts.ref("snapshot"), MODEL_DIR), Read(artifacts.ref("tokenize", CALIBRATION), TOKENS)]
        index = layer_index(partition)
        return reads + ([Read(artifacts.ref("capture", index - 1), HIDDEN)] if index > 0 else [])

    def handovers(self, ctx: Context, partition: str) -> set[str]:
        """The stored block outputs are a hand-over to the partitions that read them; under a disk
        budget the input statistics too (to this layer's decompose and the other readers)."""
        budget = ctx.config.runtime.disk_budget_gb is not None and ctx.plan.capture_stats
        return {HIDDEN, STATS} if budget else {HIDDEN}

    def early_release(self, ctx: Context, partition: str) -> dict[str, list[PartitionRef]]:
        """Under a disk budget, block outputs of layers that are not checkpoints go once the next
        block's capture is done; a later stage that reads them restores them (``Plan.interval``)."""
        index, layers = layer_index(partition), artifacts.num_layers(ctx)
        if index == layers - 1 or ctx.config.runtime.disk_budget_gb is None or index in checkpoints(layers, ctx.plan.interval):
            return {}
        return {HIDDEN: [artifacts.ref(self.name, index + 1)]}

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        slice_ = {"stats": sorted(ctx.plan.capture_stats), "modules": ctx.config.target.modules,
                  "batch_size": ctx.config.runtime.batch_size, "activation_dtype": ctx.config.runtime.activation_dtype}
        return with_shards(slice_, ctx)

    def fans_out(self, ctx: Context, partition: str) -> bool:
        return sharded(ctx)

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        s, layers = c.shapes, c.shapes.layers
        captured_grams = c.grams if "gram" in c.plan.capture_stats else 0.0  # else fisher's (``Plan.gram_in_fisher``)
        work = c.block_pass * (layers + recomputed_captures(c.plan, layers, c.plan.interval))
        gram_flops = 2 * c.tokens * (3 * s.d**2 + s.ff**2) if "gram" in c.plan.capture_stats else 0
        return Estimate(cls.name, layers * (c.hidden + captured_grams),
                        c.rest_load + s.block * c.weight_bytes + c.batch_activations + captured_grams,
                        c.gpu(s.block * c.weight_bytes + c.batch_activations + captured_grams),
                        f"{layers} × block inputs {c.hidden / 2**20:.0f} MB", flops=work,
                        flops64=(layers + recomputed_captures(c.plan, layers, c.plan.interval)) * gram_flops)

    @classmethod
    def adjust(cls, rows: dict[str, Estimate], c: CostInputs) -> dict[str, Estimate]:
        """With release on, the stored block outputs live until the last stage that reads them: all
        at once if a later stage does and the interval is 1, else the checkpoints plus one restored
        segment of ``interval − 1``; two at a time if no later stage reads them; the last layer's
        stays. Under a disk budget the Grams go once the layer's decompose is done (two at a time;
        all of them until fisher, which needs every block's inputs first, when fisher runs)."""
        config, plan, layers, hidden = c.config, c.plan, c.shapes.layers, c.hidden
        row = rows[cls.name]
        if config.runtime.releases:
            later = later_hidden_readers(plan)
            until = later[-1] if later else None
            kept = len(checkpoints(layers, plan.interval))
            live = min(kept + plan.interval - 1, layers - 1)
            note = f" (released after {until or 'the next block'})"
            if until and plan.interval > 1:
                note = (f"; block outputs kept every {plan.interval} layers ({kept} + the last), "
                        f"{recomputed_captures(plan, layers, plan.interval)} layer captures recomputed for {', '.join(later)}")
            row = replace(row, disk=row.disk - (layers - 1) * hidden, transient=live * hidden if until else hidden,
                          until=until, note=row.note + note)
        grams = c.grams if "gram" in plan.capture_stats else 0.0
        readers = plan.readers(cls.name, STATS)
        per_layer = plan.joined("allocate") and all(plan.stages.index(r) < plan.stages.index("allocate") for r in readers)
        if config.runtime.disk_budget_gb is not None and plan.joined("decompose") and grams and readers and per_layer:
            # every reader runs layer by layer before the allocation (consumers first); one that runs
            # after it (anchor, structure, rank_factors) holds every layer's statistics until then
            live, until = (layers, "fisher") if plan.joined("fisher") else (2, readers[-1])
            row = replace(row, disk=row.disk - layers * grams, extra=((live * grams, until),),
                          note=row.note + f"; Grams released after decompose ({live} at a time)")
        if config.runtime.shards > 1:  # same bytes; the work of a layer splits over the shards' workers
            row = replace(row, note=row.note + f"; {config.runtime.shards} shards per layer (time ÷ shards on as many workers)")
        return {**rows, cls.name: row}

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        """One job per shard of the windows (``runtime.shards``; one job without shards): each runs
        the block on its rows and writes them into this partition's block outputs; the statistics
        are summed here in shard order (float64), so where the jobs ran never changes a bit."""
        index = layer_index(work.partition)
        batch = ctx.config.runtime.batch_size
        tokens_dir = work.input("tokenize", CALIBRATION)
        ids = artifacts.read_windows(tokens_dir)
        wanted = ctx.plan.capture_stats
        artifacts.create_hidden(work.out, (len(ids), ids.shape[1], int(ctx.facts.hidden_size)),
                                ctx.config.runtime.activation_dtype, batch)
        ranges = shard_ranges(len(ids), batch, ctx.config.runtime.shards)
        jobs = [CaptureJob(snapshot=artifacts.model_dir(work.input("snapshot")), tokens=tokens_dir,
                           below=None if index == 0 else work.input("capture", layer_partition(index - 1)), out=work.out,
                           index=index, rows=rows, device=ctx.config.model.device, dtype=ctx.config.model.dtype,
                           modules=ctx.config.target.modules, batch=batch, wanted=wanted)
                for rows in ranges]
        parts = work.fan_out.map(capture_shard, jobs, [shard_label(self.name, work.partition, i) for i in range(len(jobs))])
        groups = parts[0].groups
        if any(part.groups != groups for part in parts):
            raise RuntimeError(f"capture@{work.partition}: shards found different input groups")
        stats = add_in_shard_order([part.stats for part in parts])
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
        for start, hidden in block_input_rows(runner, ids, job.below, job.batch, offset=lo):
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
        add_gram(stats, f"gram.{group}", x)
    if "abs" in wanted:
        absolute = flat.abs().to(torch.float64)
        stats[f"abs_sum.{group}"] = stats.get(f"abs_sum.{group}", 0) + absolute.sum(0)
        batch_max = absolute.max(0).values
        stats[f"abs_max.{group}"] = torch.maximum(stats[f"abs_max.{group}"], batch_max) if f"abs_max.{group}" in stats else batch_max
