"""``allocate``: ranks for every target matrix from the weighted spectra and the target.

Also the one place the achieved kept fractions are computed (after rank rounding), by
``stagepipe.accounting.ratio_report``: over the target matrices, all block linears and the model.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig

from stagepipe.accounting import ratio_report
from stagepipe.allocation import Candidate, MatrixSpectrum, make_policy
from stagepipe.engine.stage import Context, PartitionRef, Stage, Work
from stagepipe.models.layout import block_linear_shapes, layout_for
from stagepipe.stages import artifacts
from stagepipe.stages.artifacts import layer_index
from stagepipe.stages.requirements import needs


class AllocateStage(Stage):
    name = "allocate"
    version = 2
    description = "ranks per matrix and achieved kept fractions"

    def dependencies(self, ctx: Context, partition: str) -> list[PartitionRef]:
        layers = artifacts.model_layers(ctx) or []
        deps = [artifacts.ref("snapshot")] + [artifacts.ref("decompose", p) for p in layers]
        if needs(ctx.config).sensitivity:
            deps += [artifacts.ref("sensitivity", p) for p in layers]
        return deps

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        return {"kept_fraction": ctx.config.target.kept_fraction, "allocation": ctx.config.allocation.model_dump()}

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        snapshot = work.input("snapshot")
        config = AutoConfig.from_pretrained(artifacts.model_dir(snapshot))
        layout = layout_for(config.model_type)
        spectra = []
        sensitivity: list[Candidate] | None = [] if needs(ctx.config).sensitivity else None
        for ref, directory in sorted(work.inputs.items()):
            if ref.stage == "decompose":
                prefix = layout.layer_prefix(layer_index(ref.partition))
                spectra += [MatrixSpectrum(prefix + name, m, n, sigma)
                            for name, (m, n, sigma) in artifacts.read_spectra(directory).items()]
            elif ref.stage == "sensitivity":
                sensitivity += [Candidate(matrix, entry["kept"], entry["rank"], entry["ppl"])
                                for matrix, entries in artifacts.read_sensitivity(directory).items() for entry in entries]
        policy = make_policy(ctx.config.allocation, sensitivity)
        ranks = policy.allocate(spectra, ctx.config.target.kept_fraction)
        n_params = artifacts.read_results(snapshot)["n_params"]
        report = ratio_report(block_linear_shapes(config), ranks, n_params, ctx.config.target.kept_fraction)
        dropped = {s.name: float((s.sigma[ranks[s.name]:] ** 2).sum()) if ranks[s.name] is not None else 0.0
                   for s in spectra}
        details = policy.details()
        artifacts.write_allocation(work.out, ranks, dropped, report.model_dump(), details)
        return {"ratios": report.model_dump(), "policy": policy.name, "search": details,
                "dense_targets": sorted(n for n, r in ranks.items() if r is None)}
