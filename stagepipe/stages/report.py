"""``report``: one JSON with everything a reader needs, and PNG plots.

Perplexities (dense and compressed), achieved kept fractions, per-stage wall time and peak memory
(from the manifests), every metric repair (eigenvalue floors) and every fallback, per matrix; for
ResSVD each matrix's rank split and its activation loss relative to the one-shot optimum, for
``asvd_search`` the search's threshold, for a learned method (SoCo, Dobi-SVD) the training's
summary and a plot of its loss and kept fraction per step.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stagepipe.engine.stage import Context, PartitionRef, Stage, Work
from stagepipe.stages import artifacts
from stagepipe.stages.artifacts import CALIBRATION


def collect(ctx: Context, inputs: Mapping[PartitionRef, Path]) -> dict[str, Any]:
    manifests = {ref: artifacts.read_manifest(path) for ref, path in inputs.items()}
    stages: dict[str, dict[str, float]] = defaultdict(lambda: {"wall_s": 0.0, "peak_rss_mb": 0.0, "partitions": 0})
    repairs, fallbacks, residual = [], [], {}
    for ref, manifest in sorted(manifests.items()):
        entry = stages[ref.stage]
        entry["wall_s"] += manifest.wall_s
        entry["peak_rss_mb"] = max(entry["peak_rss_mb"], manifest.peak_rss_mb)
        entry["partitions"] += 1
        if manifest.peak_gpu_mb is not None:
            entry["peak_gpu_mb"] = max(entry.get("peak_gpu_mb", 0.0), manifest.peak_gpu_mb)
        if ref.stage in ("decompose", "anchor"):  # anchor: the floor of each shifted-input Gram
            for name, item in manifest.diagnostics.get("linears", {}).items():
                for side in ("left", "right"):
                    if item[side].get("n_floored"):
                        repairs.append({"matrix": f"{ref.partition}.{name}", "side": side, **item[side]})
                for key in ("left_fallback", "right_fallback") if ref.stage == "decompose" else ():
                    if key in item:
                        fallbacks.append({"matrix": f"{ref.partition}.{name}", "side": key.split("_")[0], "to": item[key]})
        if ref.stage == "fisher":  # the Kronecker factors' own floor (or official α) before any metric is built
            for name, item in manifest.diagnostics.get("linears", {}).items():
                for side in ("A", "B"):
                    repair = item.get(side) or {}
                    if repair.get("n_floored") or repair.get("alpha"):
                        repairs.append({"matrix": f"{ref.partition}.{name}", "side": f"kronecker {side}", **repair})
        if ref.stage == "structure":
            vo_repair = manifest.diagnostics["vo"].get("metric_repair") or {}
            if vo_repair.get("n_floored"):
                repairs.append({"matrix": f"{ref.partition}.self_attn.v_proj·o_proj", "side": "right", **vo_repair})
            mlp = manifest.diagnostics["mlp"]
            if mlp["css_rank"] < mlp["kept_neurons"]:
                repairs.append({"matrix": f"{ref.partition}.mlp.down_proj", "kind": "minimum-norm solve",
                                "rank": mlp["css_rank"], "of": mlp["kept_neurons"]})
        if ref.stage == "residual":
            residual.update({f"{ref.partition}.{name}": {k: item[k] for k in ("r1", "r2", "loss_over_one_shot")}
                             for name, item in manifest.diagnostics.get("linears", {}).items()})
    evaluations = {ref.partition: manifests[ref].info for ref in manifests if ref.stage == "evaluate"}
    train = manifests.get(artifacts.ref("train"))
    training = None if train is None else {"steps": train.info["steps"],
                                           **{k: v for k, v in train.diagnostics.items() if k != "gammas"}}
    allocation = manifests[artifacts.ref("allocate")].info
    return {
        "pipeline": ctx.config.name, "method": ctx.config.method.name, "policy": ctx.config.allocation.policy,
        "model": ctx.config.model.model_dump(mode="json"), "ratios": allocation["ratios"],
        "dense_targets": allocation["dense_targets"], "search": allocation.get("search"), "residual": residual,
        "perplexity": {p: {d: r["ppl"] for d, r in info["datasets"].items()} for p, info in evaluations.items()},
        "evaluation": evaluations, "stages": dict(stages), "repairs": repairs, "fallbacks": fallbacks,
        "calibration": manifests[artifacts.ref("tokenize", CALIBRATION)].info, "training": training,
    }


def plot(report: dict[str, Any], inputs: Mapping[PartitionRef, Path], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if report["search"] and "layer_kept" in report["search"]:
        made.append(_plot_structure(report["search"], out, plt))
    else:
        made.append(_plot_ranks(inputs, out, plt))
    if artifacts.ref("train") in inputs:
        made.append(_plot_training(artifacts.read_history(inputs[artifacts.ref("train")]), out, plt))
    ppl = report["perplexity"]
    if ppl:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = sorted({d for v in ppl.values() for d in v})
        for i, model in enumerate(sorted(ppl)):
            ax.bar([j + 0.4 * i for j in range(len(names))], [ppl[model].get(d, 0) for d in names], width=0.4, label=model)
        ax.set_xticks([j + 0.2 for j in range(len(names))], names)
        memory = report["ratios"].get("memory")
        kept = (f"memory {memory['kept_memory_over_target_matrices']:.3f}" if memory
                else f"kept {report['ratios']['kept_over_target_matrices']:.3f}")
        ax.set(title=f"perplexity ({report['method']}, {kept})", ylabel="PPL")
        ax.legend()
        made.append(_saved(fig, out / "perplexity.png", plt))
    return made


def _plot_ranks(inputs: Mapping[PartitionRef, Path], out: Path, plt: Any) -> str:
    ranks = artifacts.read_ranks(inputs[artifacts.ref("allocate")])
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
    for ref, path in sorted(inputs.items()):
        if ref.stage != "decompose":
            continue
        for key, (_, _, value) in artifacts.read_spectra(path).items():
            energy = (value.double() ** 2).cumsum(0) / (value.double() ** 2).sum()
            ax2.plot(energy.numpy(), alpha=0.3, color="C0" if "mlp" in key else "C1")
    ax2.set(title="cumulative weighted σ² (blue mlp, orange attention)", xlabel="rank", ylabel="fraction kept")
    return _saved(fig, out / "ranks_spectra.png", plt)


def _saved(fig: Any, path: Path, plt: Any) -> str:
    """Lay out, write (100 dpi) and close a figure; its file name."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _plot_training(history: list[dict[str, Any]], out: Path, plt: Any) -> str:
    """A learned method: its loss and soft (and hard) kept fraction per training step."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    steps = [h["step"] for h in history]
    ax1.plot(steps, [h["loss"] for h in history], lw=0.8)
    ax1.set(title="training loss per step", xlabel="step", ylabel="loss")
    ax2.plot(steps, [h["kept_soft"] for h in history], label="soft kept fraction")
    if history and "kept_hard" in history[0]:
        ax2.plot(steps, [h["kept_hard"] for h in history], label="components alive")
    ax2.set(title="kept fraction of the target parameters", xlabel="step")
    ax2.legend(fontsize=7)
    return _saved(fig, out / "training.png", plt)


def _plot_structure(search: dict[str, Any], out: Path, plt: Any) -> str:
    """A structured method: kept fraction and block influence per layer, inner dims per layer."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    layers = range(len(search["layer_kept"]))
    ax1.plot(layers, search["layer_kept"], marker="o", label="kept fraction")
    ax1.plot(layers, search["influence"], marker="x", label="block influence 1 − cos")
    ax1.set(title="per-layer allocation", xlabel="layer")
    ax1.legend(fontsize=7)
    for key in ("intermediate_size", "qk_dim", "vo_dim"):
        values = [d[key] for d in search["dims"]]
        ax2.plot(layers, [v / max(values) for v in values], marker="o", label=f"{key} (max {max(values)})")
    ax2.set(title="inner dimensions (relative to their largest)", xlabel="layer")
    ax2.legend(fontsize=7)
    return _saved(fig, out / "structure.png", plt)


class ReportStage(Stage):
    """Reads every partition of the stages it is built with (the rest of the pipeline)."""

    name = "report"
    version = 4
    description = "report.json + PNG plots"

    def __init__(self, upstream: Sequence[Stage] = ()) -> None:
        self.upstream = tuple(upstream)

    def dependencies(self, ctx: Context, partition: str) -> list[PartitionRef]:
        return [PartitionRef(stage.name, p) for stage in self.upstream for p in stage.partitions(ctx) or []]

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        return {"name": ctx.config.name}

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        report = collect(ctx, work.inputs)
        # the compressed model directory, relative to the workspace (equal keys → equal reports anywhere)
        report["model_dir"] = os.path.relpath(artifacts.model_dir(work.input("assemble")), ctx.workspace)
        report["plots"] = plot(report, work.inputs, work.out)
        (work.out / artifacts.REPORT).write_text(json.dumps(report, indent=1, sort_keys=True))
        return {"perplexity": report["perplexity"], "ratios": report["ratios"], "model_dir": report["model_dir"]}
