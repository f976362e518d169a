"""``allocate``: ranks for every target matrix from the weighted spectra and the target.

Also the one place the achieved kept fractions are computed (after rank rounding), by
``stagepipe.accounting.ratio_report``: over the target matrices, all block linears and the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from stagepipe.accounting import ratio_report
from stagepipe.allocation import ASVDSearch, Candidate, MatrixSpectrum, make_policy
from stagepipe.engine.stage import ALL, Context, PartitionRef, Stage, layer_index
from stagepipe.io import manifest as manifest_io
from stagepipe.io import safetensors_io
from stagepipe.models.layout import block_linear_shapes, layout_for
from stagepipe.stages.decompose import FACTORS
from stagepipe.stages.sensitivity import TABLE, searching

ALLOCATION = "allocation.json"


def block_ranks(ranks: dict[str, int | None], prefix: str) -> dict[str, int]:
    """The factored linears of one block (full names under ``prefix``), keyed relative to the block."""
    return {full[len(prefix):]: r for full, r in ranks.items() if full.startswith(prefix) and r is not None}


def layer_ranks(allocate_dir: Path, prefix: str) -> dict[str, int]:
    """Allocated ranks of one block's factored linears, read from ``allocate``'s output."""
    return block_ranks(json.loads((allocate_dir / ALLOCATION).read_text())["ranks"], prefix)


class AllocateStage(Stage):
    name = "allocate"
    version = 1
    description = "ranks per matrix and achieved kept fractions"

    def dependencies(self, ctx: Context, partition: str) -> list[PartitionRef]:
        layers = ctx.layer_partitions() or []
        deps = [PartitionRef("snapshot", ALL)] + [PartitionRef("decompose", p) for p in layers]
        if searching(ctx):
            deps += [PartitionRef("sensitivity", p) for p in layers]
        return deps

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        return {"kept_fraction": ctx.config.target.kept_fraction, "allocation": ctx.config.allocation.model_dump()}

    def run(self, ctx: Context, partition: str, out: Path, inputs: dict[PartitionRef, Path]) -> dict[str, Any]:
        snapshot = inputs[PartitionRef("snapshot", ALL)]
        config = AutoConfig.from_pretrained(snapshot / "model")
        layout = layout_for(config.model_type)
        spectra = []
        for ref, directory in sorted(inputs.items()):
            if ref.stage != "decompose":
                continue
            prefix = layout.layer_prefix(layer_index(ref.partition))
            info = manifest_io.read(directory).info["linears"]
            sigmas = safetensors_io.read(directory / FACTORS, [f"{n}.sigma" for n in info])
            for name, item in sorted(info.items()):
                m, n = item["shape"]
                spectra.append(MatrixSpectrum(prefix + name, m, n, sigmas[f"{name}.sigma"]))
        sensitivity = [Candidate(matrix, entry["kept"], entry["rank"], entry["ppl"])
                       for ref, directory in sorted(inputs.items()) if ref.stage == "sensitivity"
                       for matrix, entries in json.loads((directory / TABLE).read_text())["matrices"].items()
                       for entry in entries]
        policy = make_policy(ctx.config.allocation, sensitivity)
        ranks = policy.allocate(spectra, ctx.config.target.kept_fraction)
        n_params = manifest_io.read(snapshot).info["n_params"]
        report = ratio_report(block_linear_shapes(config), ranks, n_params, ctx.config.target.kept_fraction)
        dropped = {s.name: float((s.sigma[ranks[s.name]:] ** 2).sum()) if ranks[s.name] is not None else 0.0
                   for s in spectra}
        search = {"threshold": policy.threshold, "pairs": len(policy.pairs)} if isinstance(policy, ASVDSearch) else None
        (out / ALLOCATION).write_text(json.dumps({"ranks": ranks, "dropped_energy": dropped, "ratios": report.model_dump(),
                                                  "search": search}, indent=1, sort_keys=True))
        return {"ratios": report.model_dump(), "policy": policy.name, "search": search,
                "dense_targets": sorted(n for n, r in ranks.items() if r is None)}
