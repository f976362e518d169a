"""Shards of the calibration windows (``runtime.shards``) and their ordered reduction.

``capture`` and ``fisher`` split a partition's windows into contiguous shards of whole batches and
hand one job per shard to ``Work.fan_out``; each job returns float64 sums, which the partition adds
in shard order and divides once. The partition stays the unit of keys, commit and release; the
result depends on the number of shards (keyed when > 1), never on where the jobs ran.
"""

from __future__ import annotations

from typing import Any

import torch


def sharded(ctx: Any) -> bool:
    """Whether capture and fisher split their windows (``runtime.shards`` > 1): their partitions
    then fan out (``Stage.fans_out``) and the shard count enters their keys."""
    return ctx.config.runtime.shards > 1


def with_shards(config_slice: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """A sharded stage's config slice: ``runtime.shards`` enters the key only when it is > 1 (the
    sums associate differently), so runs without shards keep their keys."""
    return {**config_slice, "shards": ctx.config.runtime.shards} if sharded(ctx) else config_slice


def shard_label(stage: str, partition: str, shard: int) -> str:
    """A shard job's name (telemetry, kill points, test hooks): ``stage@partition#shard-i``."""
    return f"{stage}@{partition}#shard-{shard}"


def shard_ranges(n_windows: int, batch: int, shards: int) -> list[tuple[int, int]]:
    """``runtime.shards`` contiguous window ranges of whole batches, as even as batches allow.

    Whole batches keep every batch (and so every float32 product) what it is without shards, and
    make each shard's rows whole chunks of the per-layer arrays, so shards never write one chunk.
    """
    n_batches = -(-n_windows // batch)
    if shards > n_batches:
        raise ValueError(f"runtime.shards: {shards} shards need at least {shards} batches; {n_windows} windows "
                         f"in batches of runtime.batch_size {batch} make {n_batches}")
    base, extra = divmod(n_batches, shards)
    ranges, start = [], 0
    for shard in range(shards):
        stop = min(n_windows, start + (base + (shard < extra)) * batch)
        ranges.append((start, stop))
        start = stop
    return ranges


def add_in_shard_order(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Shards' float64 sums added in shard order (one shard: its sums, untouched); capture's
    per-channel maxima (``abs_max.*``) take the maximum instead."""
    total = dict(parts[0])
    for part in parts[1:]:
        for key, value in part.items():
            total[key] = torch.maximum(total[key], value) if key.startswith("abs_max.") else total[key] + value
    return total


def add_gram(sums: dict[str, torch.Tensor], key: str, x: torch.Tensor) -> None:
    """Add one batch's ``Σ x xᵀ`` (float64, from the inputs as the block computed them) to ``sums[key]``:
    the one way capture and fisher sum an input Gram, so either one's Grams are the same floats."""
    term = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    sums[key] = sums[key] + term.T @ term if key in sums else 0 + term.T @ term
