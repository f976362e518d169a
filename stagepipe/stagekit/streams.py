"""Block inputs, batch by batch, and the two input streams of a sequential stage.

Per-layer stages never hold more than one block: block i runs on its inputs read back from disk —
the embeddings for block 0, else block i−1's outputs as ``capture`` stored them (the dense model)
or as a sequential stage (``refit``, ``anchor``) stored them (the compressed model's running
inputs). ``Streams`` walks both in lockstep for a sequential stage, and gives the dense block's
outputs (capture's outputs of the same block) as targets; ``SequentialStage`` is what such a
stage declares alike (a partition per layer, its running inputs handed to the next partition,
its factors the layers' final form).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from stagepipe.engine.stage import Context, Read, Work
from stagepipe.io import zarr_io
from stagepipe.models.blocks import BlockRunner
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import HIDDEN, layer_partition, ref
from stagepipe.stagekit.base import PipelineStage
from stagepipe.stagekit.cost import CostInputs, Estimate
from stagepipe.stagekit.shards import add_gram


def block_input_rows(runner: BlockRunner, ids: torch.Tensor, below: Path | None, batch: int,
                     offset: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, inputs of a block) per batch of windows ``ids`` = rows ``offset:offset+len(ids)`` of
    the calibration (one shard): the embeddings when ``below`` is ``None`` (block 0), else the stored
    outputs of the block below (an output directory holding ``HIDDEN``); ``start`` counts rows of
    the whole set."""
    runner.prepare(ids)
    if below is None:
        for start in range(0, len(ids), batch):
            yield offset + start, runner.embed(ids[start : start + batch])
        return
    array = artifacts.open_hidden(below)
    for start in range(offset, offset + len(ids), batch):
        yield start, zarr_io.read_rows(array, start, min(start + batch, offset + len(ids)))


@torch.no_grad()
def running_grams(runner: BlockRunner, block: torch.nn.Module, linears: dict[str, torch.nn.Module],
                  batches: Iterable[tuple[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``Σ x xᵀ`` (float64) of each linear's inputs while ``block`` runs on ``batches`` (summed the way
    capture sums them, ``shards.add_gram``; linears that share an input sum it each)."""
    grams: dict[str, torch.Tensor] = {}
    handles = [module.register_forward_pre_hook(lambda m, args, n=name: add_gram(grams, n, args[0]))
               for name, module in linears.items()]
    try:
        for _, hidden in batches:
            runner.run_block(block, hidden)
    finally:
        for handle in handles:
            handle.remove()
    return grams


@torch.no_grad()
def write_block_outputs(out: Path, runner: BlockRunner, block: torch.nn.Module, ids: torch.Tensor,
                        inputs: Iterator[tuple[int, torch.Tensor]], runtime: Any) -> None:
    """Run ``block`` on ``inputs`` (row offset, hidden states) and store its outputs in ``out`` as the next
    block's inputs (``HIDDEN``: one row per calibration window of ``ids``)."""
    array = artifacts.create_hidden(out, (*ids.shape, int(runner.config.hidden_size)), runtime.activation_dtype,
                                    runtime.batch_size)
    for start, hidden in inputs:
        artifacts.write_rows(array, start, runner.run_block(block, hidden))


def stream_reads(stage: str, index: int, targets: bool = False) -> list[Read]:
    """What a sequential stage's partition of block ``index`` reads of the two streams: capture's
    and its own outputs of the block below (none for block 0: the embeddings), and with ``targets``
    capture's outputs of this block."""
    reads = [] if index == 0 else [Read(ref("capture", index - 1), HIDDEN), Read(ref(stage, index - 1), HIDDEN)]
    return reads + ([Read(ref("capture", index), HIDDEN)] if targets else [])


class Streams:
    """The calibration windows of block ``index``, batch by batch: the dense model's inputs, the
    compressed model's running inputs (``stage``'s outputs of the block below) and, on demand, the
    dense block's outputs (the targets)."""

    def __init__(self, runner: BlockRunner, index: int, ids: torch.Tensor, work: Work, batch: int, stage: str) -> None:
        self.runner, self.index, self.ids, self.batch = runner, index, ids, batch
        below = None if index == 0 else layer_partition(index - 1)
        self._dense = None if below is None else work.input("capture", below)
        self._running = None if below is None else work.input(stage, below)
        self._targets_dir = work.inputs.get(ref("capture", index))
        self.hidden_shape = (len(ids), ids.shape[1], int(runner.config.hidden_size))

    def dense(self, batch: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        return block_input_rows(self.runner, self.ids, self._dense, batch or self.batch)

    def running(self, batch: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        return block_input_rows(self.runner, self.ids, self._running, batch or self.batch)

    def pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(dense inputs, running inputs) of each batch."""
        for (_, dense), (_, running) in zip(self.dense(), self.running(), strict=True):
            yield dense, running

    def target(self, start: int, batch: int | None = None) -> torch.Tensor:
        """The dense block's outputs of rows ``start:start+batch`` (float32, on the runner's device)."""
        if not hasattr(self, "_targets"):
            self._targets: Any = artifacts.open_hidden(self._targets_dir)
        stop = start + (batch or self.batch)
        return artifacts.read_rows(self._targets, start, stop).to(self.runner.device, torch.float32)

    @torch.no_grad()
    def write_outputs(self, block: torch.nn.Module, out: Path, dtype: str) -> Any:
        """Run ``block`` on the running inputs and store its outputs in ``out`` (the next block's running inputs)."""
        array = artifacts.create_hidden(out, self.hidden_shape, dtype, self.batch)
        for start, hidden in self.running():
            artifacts.write_rows(array, start, self.runner.run_block(block, hidden))
        return array


class SequentialStage(PipelineStage):
    """A stage that walks the blocks up on the compressed model's running inputs (``anchor``,
    ``refit``): one partition per layer, each storing its block's outputs (``HIDDEN``) for the next
    partition, which is their only reader, and its factors (``assembly_payload``) as the layers'
    final form."""

    def partitions(self, ctx: Context) -> list[str] | None:
        return artifacts.model_layers(ctx)

    def handovers(self, ctx: Context, partition: str) -> set[str]:
        """The stored block outputs are a hand-over to the next partition, which reads them."""
        return {HIDDEN}

    @classmethod
    def adjust(cls, rows: dict[str, Estimate], c: CostInputs) -> dict[str, Estimate]:
        """With release on, its stored block outputs go once the next layer has read them."""
        if not c.config.runtime.releases:
            return rows
        row = rows[cls.name]
        return {**rows, cls.name: replace(row, disk=row.disk - (c.shapes.layers - 1) * c.hidden, transient=c.hidden)}

    @classmethod
    def assembles(cls, choices: Any) -> bool:
        return True

    @classmethod
    def layer_factors(cls, ctx: Context, work: Work, layer: int, ranks: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        assert cls.assembly_payload is not None
        return artifacts.read_factors(work.input(cls.name, layer_partition(layer)), cls.assembly_payload)
