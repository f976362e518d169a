"""Cost per stage: wall time, peak RSS (and peak GPU memory when present) of the real pipeline,
at two or more calibration sizes, so one sees how each stage scales with calibration tokens.

    python benchmarks/cost.py [--base pipelines/smollm2_demo.yaml] [--samples 16 32]
    python benchmarks/cost.py --compare --workspace workspace/cost_compare   # predicted vs measured
    python benchmarks/cost.py --compare --release --workspace workspace/cost_release   # with runtime.release_consumed
    python benchmarks/cost.py --compare --disk-budget 3.5 --n-samples 96 --workspace W --out D   # capture checkpoints

Prints a table and writes ``docs/cost.json`` and ``docs/cost.md``; ``--compare`` runs the base
pipeline stage by stage (a fresh process each) in the workspace and sets ``run --dry-run``'s predicted disk and
RAM per stage beside what the finished outputs occupy and the partitions' sampled peak RSS
(``docs/cost_prediction.md``/``.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import yaml

from stagepipe.config import parse_pipeline
from stagepipe.engine.gc import tree_size
from stagepipe.engine.stage import ALL, PartitionRef
from stagepipe.stagekit.plan import peak_disk
from stagepipe.stages import make_runner

ROOT = Path(__file__).resolve().parent.parent


def measure(base: dict, samples: int, workspace: Path) -> dict:
    data = dict(base, name=f"cost_{samples}", calibration={**base["calibration"], "n_samples": samples})
    config = parse_pipeline(data, f"cost n_samples={samples}", ROOT / "pipelines")
    runner = make_runner(config, workspace)
    started = time.time()
    runner.run(force=set(runner.stages))
    wall = time.time() - started
    report = json.loads((next(e for e in runner.states() if e.ref == PartitionRef("report", ALL)).state.output / "report.json").read_text())
    return {"n_samples": samples, "seq_len": config.calibration.seq_len, "tokens": samples * config.calibration.seq_len,
            "total_wall_s": wall, "stages": report["stages"], "method": config.method.name}


class DiskSampler:
    """The largest size of a directory tree, sampled every ``interval`` seconds in a thread."""

    def __init__(self, root: Path, interval: float = 1.0) -> None:
        self.root, self.interval = root, interval
        self.start = self.peak = self._size()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _size(self) -> int:
        try:
            return tree_size(self.root) if self.root.exists() else 0
        except FileNotFoundError:  # a file went while walking (a temp directory renamed, a payload released)
            return self.peak

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._size())

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._size())


def compare(base: dict, workspace: Path, out: Path, whole: bool = False) -> None:
    """Predicted (``--dry-run``'s estimate) vs measured disk and peak RSS per stage; ``whole``: one
    ``run`` of the whole pipeline instead of one process per stage (the order a user gets, in which
    the driver interleaves consumers with producers: what a disk budget's peak depends on)."""
    config = parse_pipeline(base, "cost --compare", ROOT / "pipelines")
    runner = make_runner(config, workspace)
    path = workspace / "pipeline.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    stages_dir = workspace / "stages"
    sampler = DiskSampler(stages_dir)
    wall: dict[str, float] = {}
    with sampler:
        if whole:
            started = time.time()
            subprocess.run([sys.executable, "-m", "stagepipe.cli", "run", str(path), "-w", str(workspace)],
                           check=True, capture_output=True)
            wall["all"] = time.time() - started
        for stage in [] if whole else runner.stages:  # one fresh process per stage: nothing left over from the one before
            started = time.time()
            subprocess.run([sys.executable, "-m", "stagepipe.cli", "run", str(path), "-w", str(workspace), "--only", stage],
                           check=True, capture_output=True)
            wall[stage] = time.time() - started
    disk: dict[str, float] = {}
    ram: dict[str, float] = {}
    for entry in runner.states():
        stage, manifest = entry.ref.stage, entry.state.manifest
        disk[stage] = disk.get(stage, 0) + tree_size(entry.state.output)
        start = manifest.telemetry.get("rss_at_start_mb", 0.0)
        ram[stage] = max(ram.get(stage, 0), (manifest.peak_rss_mb - start) * 2**20)
        if whole:  # partitions' own wall times (a restore's second run is not in its manifest: see the total)
            wall[stage] = wall.get(stage, 0.0) + manifest.wall_s
    predicted = list(runner.ctx.plan.rows)
    rows = [{"stage": e.stage, "disk_predicted": e.disk, "disk_measured": disk[e.stage], "ram_predicted": e.ram,
             "ram_measured": ram[e.stage], "wall_s": wall[e.stage], "note": e.note} for e in predicted]
    end, peak = peak_disk(predicted)
    workspace_row = {"end_predicted": end, "end_measured": tree_size(stages_dir) - sampler.start,
                     "peak_predicted": peak, "peak_measured": sampler.peak - sampler.start}
    mb = 2**20
    lines = [f"# Predicted vs measured per stage ({config.name}: {config.method.name}, "
             f"{config.calibration.n_samples} × {config.calibration.seq_len} tokens)", "",
             f"Generated by `python benchmarks/cost.py --compare{' --release' if config.runtime.release_consumed else ''}"
             f"{f' --disk-budget {config.runtime.disk_budget_gb:g}' if config.runtime.disk_budget_gb else ''}"
             f"{' --whole' if whole else ''}`. Measured disk: the finished outputs of the "
             "pipeline's current keys; measured RAM: the largest growth of sampled RSS over one partition (peak minus "
             "the RSS at its start), "
             + ("all stages in one `stagepipe run` (so a stage's process holds what earlier ones left)"
                if whole else "each stage run in a fresh process (`run --only STAGE`), so the process "
                "baseline (Python, torch: about 0.4 GB) is not counted and no memory is left over from the stage "
                "before") + ". Ratio = measured / predicted.", "",
             "| stage | disk predicted MB | disk measured MB | ratio | RAM predicted MB | RSS growth MB | ratio | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['disk_predicted'] / mb:.1f} | {r['disk_measured'] / mb:.1f} | "
                     f"{r['disk_measured'] / max(r['disk_predicted'], 1):.2f} | {r['ram_predicted'] / mb:.0f} | "
                     f"{r['ram_measured'] / mb:.0f} | {r['ram_measured'] / max(r['ram_predicted'], 1):.2f} | "
                     f"{r['wall_s']:.0f} |")
    w = workspace_row
    capture_note = next((r["note"] for r in rows if r["stage"] == "capture"), "")
    if whole:
        lines += ["", f"One `stagepipe run` of the whole pipeline: {wall['all']:.0f} s wall in all (RSS growth and wall per "
                      "stage from the partitions' manifests)."]
    lines += ["", f"Plan for capture: {capture_note}."]
    lines += ["", f"Workspace growth (sampled every second while the stages ran; release "
                  f"{config.runtime.releases}, disk budget {config.runtime.disk_budget_gb} GB): at the end {w['end_measured'] / mb:.1f} MB measured vs "
                  f"{w['end_predicted'] / mb:.1f} MB predicted, peak {w['peak_measured'] / mb:.1f} MB measured vs "
                  f"{w['peak_predicted'] / mb:.1f} MB predicted."]
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost_prediction.md").write_text("\n".join(lines) + "\n")
    (out / "cost_prediction.json").write_text(json.dumps({"pipeline": config.name, "rows": rows, "workspace": workspace_row,
                                                          "total_wall_s": wall.get("all", sum(wall.values())),
                                                          "whole_run": whole}, indent=1))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(ROOT / "pipelines" / "smollm2_demo.yaml"))
    parser.add_argument("--samples", nargs="+", type=int, default=[16, 32])
    parser.add_argument("--workspace", default=str(ROOT / "workspace" / "cost"))
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--compare", action="store_true", help="predicted vs measured disk and RAM per stage")
    parser.add_argument("--release", action="store_true", help="with runtime.release_consumed: true")
    parser.add_argument("--disk-budget", type=float, default=None, help="with runtime.disk_budget_gb (GB)")
    parser.add_argument("--n-samples", type=int, default=None, help="--compare: calibration windows instead of the base file's")
    parser.add_argument("--whole", action="store_true", help="--compare: one run of the whole pipeline, not one process per stage")
    args = parser.parse_args()
    base = yaml.safe_load(Path(args.base).read_text())
    if args.disk_budget is not None:
        base["runtime"] = {**base.get("runtime", {}), "disk_budget_gb": args.disk_budget}
    if args.n_samples is not None:
        base["calibration"] = {**base["calibration"], "n_samples": args.n_samples}
    if args.release:
        base["runtime"] = {**base.get("runtime", {}), "release_consumed": True}
    if args.compare:
        return compare(base, Path(args.workspace), Path(args.out), args.whole)
    runs = [measure(base, n, Path(args.workspace) / f"n{n}") for n in args.samples]
    env = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
           "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "model": base["model"]}
    (Path(args.out) / "cost.json").write_text(json.dumps({"env": env, "runs": runs}, indent=1))
    stages = list(runs[0]["stages"])
    header = "| stage | " + " | ".join(f"{r['tokens']} tok: wall s / peak RSS MB" for r in runs) + " |"
    lines = [f"# Cost per stage ({runs[0]['method']}, {env['threads']} threads, {env['cuda'] or 'CPU'})", "",
             "Generated by `python benchmarks/cost.py`.", "", header, "|---|" + "---|" * len(runs)]
    for stage in stages:
        cells = [f"{r['stages'][stage]['wall_s']:.1f} / {r['stages'][stage]['peak_rss_mb']:.0f}" for r in runs]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"{r['total_wall_s']:.1f}" for r in runs) + " |")
    (Path(args.out) / "cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
