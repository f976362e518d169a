"""``allocate``: ranks for every target matrix from the weighted spectra and the target.

Also the one place the achieved kept fractions are computed (after rank rounding), by
``stagepipe.accounting.ratio_report``: over the target matrices, all block linears and the model;
with a storage other than 16-bit factors (Dobi-SVD's remapping) also the memory fraction
(``accounting.memory_report``) under ``ratios.memory``.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig

from stagepipe.accounting import kept_report, memory_report, ratio_report
from stagepipe.allocation import Candidate, MatrixSpectrum, make_policy
from stagepipe.engine.stage import Context, PartitionRef, Stage, Work
from stagepipe.models.layout import block_linear_shapes, layout_for
from stagepipe.stages import artifacts
from stagepipe.stages.artifacts import layer_index
from stagepipe.stages.requirements import needs
from stagepipe.structured import block_geometry, spend_structured_budget


class AllocateStage(Stage):
    name = "allocate"
    version = 2
    description = "ranks per matrix and achieved kept fractions"

    def dependencies(self, ctx: Context, partition: str) -> list[PartitionRef]:
        layers = artifacts.model_layers(ctx) or []
        if needs(ctx.config).structure:  # per-layer fractions from the block influence capture measured
            return [artifacts.ref("snapshot")] + [artifacts.ref("capture", p) for p in layers]
        if needs(ctx.config).learned:  # the ranks the train stage learned
            return [artifacts.ref("snapshot"), artifacts.ref("train")]
        deps = [artifacts.ref("snapshot")] + [artifacts.ref("decompose", p) for p in layers]
        if needs(ctx.config).sensitivity:
            deps += [artifacts.ref("sensitivity", p) for p in layers]
        return deps

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        slice_ = {"kept_fraction": ctx.config.target.kept_fraction, "allocation": ctx.config.allocation.model_dump()}
        method = needs(ctx.config).method
        if method.structured:
            slice_["method"] = method.allocation_options()
        if method.storage() != "16-bit":  # keyed only when set: 16-bit outputs keep their keys
            slice_["storage"] = method.storage()
        return slice_

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        snapshot = work.input("snapshot")
        config = AutoConfig.from_pretrained(artifacts.model_dir(snapshot))
        if needs(ctx.config).structure:
            return self._structured(ctx, work, config)
        if needs(ctx.config).learned:
            return self._learned(ctx, work, config)
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

    @staticmethod
    def _learned(ctx: Context, work: Work, config: Any) -> dict[str, Any]:
        """A learned method's ranks as trained (no policy), accounted like every other."""
        ranks = artifacts.read_learned_ranks(work.input("train"))
        n_params = artifacts.read_results(work.input("snapshot"))["n_params"]
        shapes = block_linear_shapes(config)
        kept = ctx.config.target.kept_fraction
        ratios = ratio_report(shapes, ranks, n_params, kept).model_dump()
        storage = needs(ctx.config).method.storage()
        if storage != "16-bit":
            ratios["memory"] = memory_report(shapes, ranks, storage, kept).model_dump()
        details = {"learned_by": needs(ctx.config).method.name}
        artifacts.write_allocation(work.out, ranks, {}, ratios, details)
        return {"ratios": ratios, "policy": "learned", "search": details, "dense_targets": []}

    @staticmethod
    def _structured(ctx: Context, work: Work, config: Any) -> dict[str, Any]:
        """Inner dimensions per block: the method's per-layer kept fractions, rounded (intermediate
        sizes to ``align``, whole RoPE pairs, value dims), then the budget spent exactly."""
        method = needs(ctx.config).method
        captures = sorted((layer_index(r.partition), d) for r, d in work.inputs.items() if r.stage == "capture")
        influence = [float(artifacts.read_results(d)["influence"]) for _, d in captures]
        kept = ctx.config.target.kept_fraction
        fractions = method.layer_kept(influence, kept)
        shapes = block_linear_shapes(config)
        geometry = block_geometry(config)
        dims = spend_structured_budget(geometry, fractions, kept, ctx.config.allocation.align)
        layout = layout_for(config.model_type)
        kept_params = {}
        for i, block_dims in enumerate(dims):
            prefix = layout.layer_prefix(i)
            kept_params.update({prefix + name: rows * cols for name, (rows, cols) in geometry.shapes(block_dims).items()})
        n_params = artifacts.read_results(work.input("snapshot"))["n_params"]
        report = kept_report(shapes, kept_params, sum(1 for n in kept_params if kept_params[n] < shapes[n][0] * shapes[n][1]),
                             n_params, kept)
        details = {"influence": influence, "layer_kept": fractions,
                   "dims": [d.as_dict() for d in dims], **method.allocation_options()}
        artifacts.write_allocation(work.out, {}, {}, report.model_dump(), details, dims=[d.as_dict() for d in dims])
        return {"ratios": report.model_dump(), "policy": method.cfg.layer_allocation, "search": details, "dense_targets": []}
