"""Same bits with any thread count: what single-threaded LAPACK costs, and what it buys.

Runs the real ``decompose`` stage on layers of a pipeline whose statistics are already in the
workspace (nothing is committed), with torch at 1 and at 2 threads, once with LAPACK pinned to one
thread (``linalg.single_threaded``, the default) and once without; compares the bytes of the
weighted SVDs across thread counts and times the variants back to back (median ratio). Prints a
table and writes ``docs/reproducibility.json``.

    python benchmarks/reproducibility.py --pipeline pipelines/smollm2_demo.yaml --workspace workspace/smollm2_demo
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stagepipe import linalg
from stagepipe.config import load_pipeline
from stagepipe.engine.stage import PartitionRef, Work
from stagepipe.io.hashing import sha256_file
from stagepipe.stagekit import artifacts
from stagepipe.stages import make_runner

ROOT = Path(__file__).resolve().parent.parent


def run_once(runner, entry, threads: int, pinned: bool) -> tuple[float, str]:
    """(seconds, sha256 of svd.safetensors) of one unsaved decompose of ``entry``."""
    stage = runner.pipeline.stage(entry.ref.stage)
    inputs = {PartitionRef.parse(k): Path(v) for k, v in (entry.inputs or {}).items()}
    torch.set_num_threads(threads)
    linalg.PIN_THREADS = pinned
    try:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            stage.run(runner.ctx, Work(entry.ref.partition, Path(tmp), inputs, Path(tmp) / "s", Path(tmp) / "r"))
            return time.perf_counter() - started, sha256_file(Path(tmp) / artifacts.WEIGHTED_SVD)
    finally:
        linalg.PIN_THREADS = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=str(ROOT / "pipelines" / "smollm2_demo.yaml"))
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--layers", nargs="+", type=int, default=[0, 15, 29])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "docs" / "reproducibility.json"))
    args = parser.parse_args()
    runner = make_runner(load_pipeline(args.pipeline), Path(args.workspace))
    entries = {str(e.ref): e for e in runner.states()}
    rows = []
    for layer in args.layers:
        entry = entries[f"decompose@layer-{layer:03d}"]
        if entry.key is None:
            raise SystemExit(f"decompose@layer-{layer:03d}: its inputs are not done in {args.workspace}")
        times: dict[tuple[int, bool], list[float]] = {}
        hashes: dict[tuple[int, bool], set[str]] = {}
        for _ in range(args.repeats):  # back to back: every variant sees the same machine load
            for variant in ((2, False), (2, True), (1, False), (1, True)):
                seconds, digest = run_once(runner, entry, *variant)
                times.setdefault(variant, []).append(seconds)
                hashes.setdefault(variant, set()).add(digest)
        median = {v: statistics.median(t) for v, t in times.items()}
        row = {"layer": layer, **{f"{t}_threads_{'pinned' if p else 'free'}_s": s for (t, p), s in median.items()},
               "pinned_over_free_at_2_threads": median[(2, True)] / median[(2, False)],
               "same_bytes_1_vs_2_threads_pinned": hashes[(1, True)] == hashes[(2, True)],
               "same_bytes_1_vs_2_threads_free": hashes[(1, False)] == hashes[(2, False)]}
        rows.append(row)
        print(f"layer {layer:3d}: 2 threads free {median[(2, False)]:.2f} s, pinned {median[(2, True)]:.2f} s "
              f"(×{row['pinned_over_free_at_2_threads']:.2f}); 1 vs 2 threads same bytes: pinned "
              f"{row['same_bytes_1_vs_2_threads_pinned']}, free {row['same_bytes_1_vs_2_threads_free']}")
    env = {"torch": torch.__version__, "pipeline": args.pipeline, "repeats": args.repeats}
    Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
