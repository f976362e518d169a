"""What the stages of the kinds that keep every target matrix's shape share (``quantize``: a grid or
codebooks; ``delta``: a compressed fine-tuning delta): no ranks to allocate, and an allocation that is
the bytes each layer partition's results record per target (``linears.<name>.stored_bytes``)."""

from __future__ import annotations

from typing import Any

from stagepipe.accounting import MemoryReport, ratio_report
from stagepipe.engine.stage import Context, Read, Work
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import layer_index


class StoredBytesAllocation:
    """Mixed into such a stage (before ``PipelineStage``): it allocates, reading every layer partition's results."""

    name: str

    @classmethod
    def allocates(cls, choices) -> bool:
        return True

    @classmethod
    def allocation_needs(cls, choices) -> dict[str, set[str]]:
        return {cls.name: set()}  # each layer's stored bytes, in its results

    @classmethod
    def allocation_reads(cls, ctx: Context) -> list[Read]:
        return [Read(artifacts.ref(cls.name, p)) for p in artifacts.model_layers(ctx) or []]

    @classmethod
    def stored_by_matrix(cls, ctx: Context, work: Work) -> dict[str, int]:
        """Full matrix name → the bytes its layer partition stored for it."""
        stored: dict[str, int] = {}
        for ref, directory in sorted(work.inputs.items()):
            if ref.stage == cls.name:
                prefix = ctx.plan.layout.layer_prefix(layer_index(ref.partition))
                stored.update({prefix + n: item["stored_bytes"] for n, item in artifacts.read_results(directory)["linears"].items()})
        return stored

    @classmethod
    def write_dense_allocation(cls, ctx: Context, work: Work, shapes: dict[str, tuple[int, int]], n_params: int,
                               memory: MemoryReport, details: dict[str, Any], **ratios: Any) -> dict[str, Any]:
        """``allocation.json`` with every target dense (no ranks), the memory report and ``ratios`` beside the
        parameter fractions; allocate's results."""
        ranks: dict[str, int | None] = dict.fromkeys(cls.stored_by_matrix(ctx, work))
        report = {**ratio_report(shapes, ranks, n_params, 1.0).model_dump(), "memory": memory.model_dump(), **ratios}
        artifacts.write_allocation(work.out, ranks, dict.fromkeys(ranks, 0.0), report, details)
        return {"ratios": report, "policy": ctx.config.method.name, "search": details, "dense_targets": sorted(ranks)}
