"""``report``: one JSON with everything a reader needs, and PNG plots.

Per stage wall time and peak memory (from every manifest), and each stage's own part
(``PipelineStage.summarize``): evaluate's perplexities, allocate's achieved fractions and search,
every metric repair (eigenvalue floors) and every fallback the stages recorded, per matrix, a
rank-dependent method's splits, a learned method's training summary; and each stage's plots
(``PipelineStage.plot``) beside a bar chart of the perplexities.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stagepipe.engine.stage import Context, PartitionRef, Read, Work
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import CALIBRATION, PLOTS, REPORT
from stagepipe.stagekit.base import STAGES, PipelineStage, register
from stagepipe.stagekit.cost import CostInputs, Estimate


def collect(ctx: Context, inputs: Mapping[PartitionRef, Path]) -> dict[str, Any]:
    manifests = {ref: artifacts.read_manifest(path) for ref, path in inputs.items()}
    stages: dict[str, dict[str, float]] = defaultdict(lambda: {"wall_s": 0.0, "peak_rss_mb": 0.0, "partitions": 0})
    by_stage: dict[str, dict[PartitionRef, Any]] = defaultdict(dict)
    for ref, manifest in sorted(manifests.items()):
        entry = stages[ref.stage]
        entry["wall_s"] += manifest.wall_s
        entry["peak_rss_mb"] = max(entry["peak_rss_mb"], manifest.peak_rss_mb)
        entry["partitions"] += 1
        if manifest.peak_gpu_mb is not None:
            entry["peak_gpu_mb"] = max(entry.get("peak_gpu_mb", 0.0), manifest.peak_gpu_mb)
        by_stage[ref.stage][ref] = manifest
    report: dict[str, Any] = {
        "pipeline": ctx.config.name, "method": ctx.config.method.name, "policy": ctx.config.allocation.policy,
        "model": ctx.config.model.model_dump(mode="json"), "stages": dict(stages), "repairs": [], "fallbacks": [],
        "calibration": manifests[artifacts.ref("tokenize", CALIBRATION)].info,
    }
    for stage in ctx.plan.stages:  # in execution order: repairs and fallbacks concatenate in that order
        if stage == ReportStage.name:
            continue
        for key, value in STAGES[stage].summarize(by_stage[stage]).items():
            if key in ("repairs", "fallbacks"):
                report[key] = report[key] + value
            elif key == "ratios" and key in report:  # a later stage adds an accounting (quantize_factors' memory)
                report[key] = {**report[key], **value}
            else:
                report[key] = value
    return report


def plot(ctx: Context, report: dict[str, Any], inputs: Mapping[PartitionRef, Path], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = [name for stage in ctx.plan.stages if hasattr(STAGES[stage], "plot")
            for name in STAGES[stage].plot(report, inputs, out, plt)]
    ppl = report.get("perplexity")
    if ppl:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = sorted({d for v in ppl.values() for d in v})
        bounds = report.get("perplexity_interval", {})
        for i, model in enumerate(sorted(ppl)):
            heights = [ppl[model].get(d, 0) for d in names]
            spans = [bounds.get(model, {}).get(d, [h, h]) for d, h in zip(names, heights, strict=True)]
            errors = [[h - lo if math.isfinite(hi) else 0.0 for h, (lo, hi) in zip(heights, spans, strict=True)],
                      [hi - h if math.isfinite(hi) else 0.0 for h, (_, hi) in zip(heights, spans, strict=True)]]
            ax.bar([j + 0.4 * i for j in range(len(names))], heights, width=0.4, label=model, yerr=errors, capsize=3)
        ax.set_xticks([j + 0.2 for j in range(len(names))], names)
        memory = report["ratios"].get("memory")
        kept = (f"memory {memory['kept_memory_over_target_matrices']:.3f}" if memory
                else f"kept {report['ratios']['kept_over_target_matrices']:.3f}")
        ax.set(title=f"perplexity ({report['method']}, {kept})", ylabel="PPL (95 % interval)")
        ax.legend()
        made.append(artifacts.save_figure(fig, out / PLOTS["perplexity"], plt))
    return made


@register
class ReportStage(PipelineStage):
    """Reads every partition of every other stage of the pipeline."""

    name = "report"
    version = 10
    reads_everything = True
    description = "report.json + PNG plots"
    writes = {REPORT: "everything a reader needs in one JSON", **{name: f"plot: {kind}" for kind, name in PLOTS.items()}}

    @classmethod
    def joins(cls, choices) -> bool:
        return True

    def reads(self, ctx: Context, partition: str) -> list[Read]:
        found = []
        for name in ctx.plan.stages:
            if name != self.name:
                found += [Read(PartitionRef(name, p)) for p in STAGES[name]().partitions(ctx) or []]
        return found

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        return {"name": ctx.config.name}

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        return Estimate(cls.name, 1e6, 3e7, 0, "report.json + plots")

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        report = collect(ctx, work.inputs)
        # the compressed model directory, relative to the workspace (equal keys → equal reports anywhere)
        report["model_dir"] = os.path.relpath(artifacts.model_dir(work.input("assemble")), ctx.workspace)
        report["plots"] = plot(ctx, report, work.inputs, work.out)
        (work.out / REPORT).write_text(json.dumps(report, indent=1, sort_keys=True))
        return {"perplexity": report["perplexity"], "perplexity_interval": report["perplexity_interval"],
                "compressed_over_dense": report.get("compressed_over_dense", {}),
                "ratios": report["ratios"], "model_dir": report["model_dir"],
                **{part: report[part] for part in ("zeroshot", "gain_retained") if part in report}}
