"""Decompose speed: one layer's weighted SVDs with and without sharing metric factorisations.

Runs the real ``decompose`` stage on layers of a pipeline whose capture (and fisher) outputs are
already in the workspace, alternating the two variants back to back so both see the same machine
load, and prints the median ratio. Writes ``docs/decompose_speed.json``.

    python benchmarks/decompose.py --pipeline pipelines/smollm2_demo.yaml --workspace workspace/quality_grid
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stagepipe.config import load_pipeline
from stagepipe.engine.stage import PartitionRef, Work
from stagepipe.linalg import MetricCache
from stagepipe.stages import make_runner

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=str(ROOT / "pipelines" / "smollm2_demo.yaml"))
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--layers", nargs="+", type=int, default=[0, 10, 20])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "decompose_speed.json"))
    args = parser.parse_args()
    runner = make_runner(load_pipeline(args.pipeline), Path(args.workspace))
    entries = {str(e.ref): e for e in runner.states()}
    rows = []
    for layer in args.layers:
        entry = entries[f"decompose@layer-{layer:03d}"]
        if entry.key is None:
            raise SystemExit(f"decompose@layer-{layer:03d}: its inputs are not done in {args.workspace}")
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for reuse in (False, True):
                MetricCache.reuse = reuse
                started = time.perf_counter()
                run_unsaved(runner, entry)
                times[reuse].append(time.perf_counter() - started)
        MetricCache.reuse = True
        before, after = statistics.median(times[False]), statistics.median(times[True])
        rows.append({"layer": layer, "each_metric_s": before, "shared_s": after, "ratio": after / before})
        print(f"layer {layer:3d}: factorise every metric {before:6.2f} s, each distinct once {after:6.2f} s, "
              f"ratio {after / before:.3f}")
    env = {"threads": torch.get_num_threads(), "torch": torch.__version__, "pipeline": args.pipeline}
    Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1))


def run_unsaved(runner, entry) -> None:
    """Run ``entry``'s stage on its partition from its finished inputs into a temporary directory
    (nothing is committed to the workspace): the stage's own work, without the engine's."""
    stage = runner.pipeline.stage(entry.ref.stage)
    inputs = {PartitionRef.parse(k): Path(v) for k, v in (entry.inputs or {}).items()}
    with tempfile.TemporaryDirectory() as tmp:
        stage.run(runner.ctx, Work(entry.ref.partition, Path(tmp), inputs, Path(tmp) / "s", Path(tmp) / "r"))


if __name__ == "__main__":
    main()
