"""``allocate``: ranks for every target matrix from the weighted spectra and the target.

The configured policy (``stagepipe.allocation``) allocates from decompose's spectra (and, for a
policy that reads them, the sensitivity table or ``grid_errors``' measured quantisation errors), unless a method kind's stage replaces the policy
(``PipelineStage.allocates``: a learned method's trained ranks, a structured method's inner
dimensions); then that stage's ``allocation`` runs here on what it reads. Also the one place the
achieved kept fractions are computed (after rank rounding), by ``accounting.ratio_report``: over
the target matrices, all block linears and the model; with a storage other than 16-bit factors
(Dobi-SVD's remapping) also the memory fraction (``accounting.memory_report``) under ``ratios.memory``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from stagepipe.accounting import ratio_report
from stagepipe.allocation import Candidate, MatrixSpectrum, make_policy
from stagepipe.engine.stage import Context, Read, Work
from stagepipe.models.layout import block_linear_shapes
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import (
    ALLOCATION,
    GRID_ERRORS,
    MODEL_DIR,
    SENSITIVITY,
    WEIGHTED_SVD,
    layer_index,
)
from stagepipe.stagekit.base import STAGES, PipelineStage, register
from stagepipe.stagekit.cost import CostInputs, Estimate
from stagepipe.stagekit.plan import allocator_of


@register
class AllocateStage(PipelineStage):
    name = "allocate"
    version = 2
    description = "ranks per matrix and achieved kept fractions"
    writes = {ALLOCATION: "ranks per matrix (or inner dimensions per block), dropped weighted energy, achieved fractions"}

    @classmethod
    def needs(cls, choices) -> dict[str, set[str]]:
        allocator = allocator_of(choices)
        if allocator is not None:
            return {"snapshot": {MODEL_DIR}, **STAGES[allocator].allocation_needs(choices)}
        found = {"snapshot": {MODEL_DIR}, "decompose": {WEIGHTED_SVD}}
        if choices.policy.allocates_bits:  # each matrix's measured error on the grid at every width
            found["grid_errors"] = {GRID_ERRORS}
        return {**found, "sensitivity": {SENSITIVITY}} if choices.policy.needs_sensitivity else found

    def reads(self, ctx: Context, partition: str) -> list[Read]:
        reads = [Read(artifacts.ref("snapshot"), MODEL_DIR)]  # its config; the parameter count in its results
        if ctx.plan.allocator is not None:
            return reads + ctx.plan.stage_class(ctx.plan.allocator).allocation_reads(ctx)
        layers = artifacts.model_layers(ctx) or []
        reads += [Read(artifacts.ref("decompose", p), WEIGHTED_SVD) for p in layers]
        if ctx.plan.policy.needs_sensitivity:
            reads += [Read(artifacts.ref("sensitivity", p), SENSITIVITY) for p in layers]
        if ctx.plan.policy.allocates_bits:
            reads += [Read(artifacts.ref("grid_errors", p), GRID_ERRORS) for p in layers]
        return reads

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        slice_ = {"kept_fraction": ctx.config.target.kept_fraction, "allocation": ctx.config.allocation.model_dump()}
        if ctx.plan.allocator is not None:
            slice_.update(ctx.plan.stage_class(ctx.plan.allocator).allocation_slice(ctx))
        if ctx.plan.policy.allocates_bits:  # a byte budget on the quantize_factors grid
            slice_.update(bits_per_weight=ctx.config.target.bits_per_weight,
                          group_size=ctx.config.method.quantize_factors.group_size)
        storage = ctx.plan.method.storage()
        if storage != "16-bit":  # keyed only when set: 16-bit outputs keep their keys
            slice_["storage"] = storage
        return slice_

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        """The spectra (float64 σ of every target) in RAM."""
        s = c.shapes
        return Estimate(cls.name, 1e6, 1e7 + s.layers * sum(min(m, n) for m, n in s.linears) * 8, 0)

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        shapes = block_linear_shapes(ctx.facts)
        n_params = artifacts.read_results(work.input("snapshot"))["n_params"]
        if ctx.plan.allocator is not None:
            return ctx.plan.stage_class(ctx.plan.allocator).allocation(ctx, work, shapes, n_params)
        spectra, measured = [], {}
        sensitivity: list[Candidate] | None = [] if ctx.plan.policy.needs_sensitivity else None
        for ref, directory in sorted(work.inputs.items()):
            if ref.stage == "decompose":
                prefix = ctx.plan.layout.layer_prefix(layer_index(ref.partition))
                spectra += [MatrixSpectrum(prefix + name, m, n, sigma)
                            for name, (m, n, sigma) in artifacts.read_spectra(directory).items()]
            elif ref.stage == "grid_errors":
                prefix = ctx.plan.layout.layer_prefix(layer_index(ref.partition))
                metric = ctx.config.allocation.error_metric
                measured.update({prefix + name: m for name, m in artifacts.read_grid_errors(directory, metric).items()})
            elif ref.stage == "sensitivity":
                sensitivity += [Candidate(matrix, entry["kept"], entry["rank"], entry["ppl"])
                                for matrix, entries in artifacts.read_sensitivity(directory).items() for entry in entries]
        policy = make_policy(ctx.config.allocation, sensitivity)
        bits = None
        if policy.allocates_bits:
            spectra = [replace(s, stored_rank=measured[s.name][0], grid_errors=measured[s.name][1]) for s in spectra]
            qf = ctx.config.method.quantize_factors
            ranks, bits = policy.allocate_with_bits(spectra, ctx.config.target.bits_per_weight, qf.group_size)
        else:
            ranks = policy.allocate(spectra, ctx.config.target.kept_fraction)
        report = ratio_report(shapes, ranks, n_params, ctx.config.target.kept_fraction)
        dropped = {s.name: float((s.sigma[ranks[s.name]:] ** 2).sum()) if ranks[s.name] is not None else 0.0
                   for s in spectra}
        details = policy.details()
        artifacts.write_allocation(work.out, ranks, dropped, report.model_dump(), details, bits=bits)
        return {"ratios": report.model_dump(), "policy": policy.name, "search": details,
                "dense_targets": sorted(n for n, r in ranks.items() if r is None)}

    @classmethod
    def summarize(cls, manifests) -> dict[str, Any]:
        """The achieved fractions, the matrices left dense and what the policy decided beyond the ranks."""
        (manifest,) = manifests.values()
        info = manifest.info
        return {"ratios": info["ratios"], "dense_targets": info["dense_targets"], "search": info.get("search")}

    @classmethod
    def plot(cls, report: dict[str, Any], outputs: dict, out: Path, plt: Any) -> list[str]:
        """The allocated rank per layer and matrix type, beside each layer's cumulative weighted σ²."""
        ranks = artifacts.read_ranks(outputs[artifacts.ref(cls.name)])
        if not any(r is not None for r in ranks.values()):  # structured dimensions (its stage plots them), or no ranks
            return []
        by_type: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for name, rank in ranks.items():
            parts = name.split(".")
            layer = next(int(p) for p in parts if p.isdigit())
            by_type[parts[-1]].append((layer, rank if rank is not None else -1))
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
        for kind, points in sorted(by_type.items()):
            points.sort()
            ax1.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=kind)
        ax1.set(title="allocated rank per layer (-1 = dense)", xlabel="layer", ylabel="rank")
        ax1.legend(fontsize=7)
        for ref, path in sorted(outputs.items()):
            if ref.stage != "decompose":
                continue
            for key, (_, _, value) in artifacts.read_spectra(path).items():
                energy = (value.double() ** 2).cumsum(0) / (value.double() ** 2).sum()
                ax2.plot(energy.numpy(), alpha=0.3, color="C0" if "mlp" in key else "C1")
        ax2.set(title="cumulative weighted σ² (blue mlp, orange attention)", xlabel="rank", ylabel="fraction kept")
        return [artifacts.save_figure(fig, out / artifacts.PLOTS["ranks"], plt)]
