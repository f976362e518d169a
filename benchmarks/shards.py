"""Wall time of capture + fisher split into shards, on 1 vs 2 Ray workers of one CPU each.

    python benchmarks/shards.py [--base pipelines/smollm2_gfwsvd.yaml] [--shards 2] [--workers 1 2]
                                [--baseline] --workspace workspace/shards --out docs/shards

Snapshot and tokenize run once in process; then, per worker count, a fresh workspace gets copies of
them and capture + fisher run under the Ray executor on a local Ray of that many CPUs (one CPU and
one torch thread per job). ``--baseline`` adds the same two stages in process with one shard and
one thread. Prints the wall times, each shard's summed job time per stage (so the scaling can be
read: with two workers the stage's wall time approaches the slower shard's), and whether the
outputs of every run with the same shard count have the same content digests. Each run's workspace
is deleted once measured. Writes ``<out>/shards.json`` and ``<out>/shards.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import defaultdict
from pathlib import Path

import yaml

from stagepipe.config import parse_pipeline
from stagepipe.io import manifest as manifest_io
from stagepipe.stages import make_runner

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("capture", "fisher")


def config_for(base: dict, shards: int, ray: bool):
    data = {**base, "name": f"{base['name']}_shards{shards}",
            "runtime": {**base.get("runtime", {}), "shards": shards, "threads": 1},
            "executor": {"kind": "ray" if ray else "local", "num_cpus_per_task": 1}}
    return parse_pipeline(data, f"shards={shards}", ROOT / "pipelines")


def measured(ws: Path) -> dict:
    """Per stage: summed partition wall time, and summed job time per shard; content digests."""
    per_stage: dict[str, dict] = {s: {"partitions_s": 0.0, "shards_s": defaultdict(float), "other_jobs_s": 0.0, "jobs": 0}
                                  for s in STAGES}
    digests = {}
    for path in sorted(ws.glob("stages/*/*/*/manifest.json")):
        manifest = manifest_io.read(path.parent)
        if manifest.stage not in STAGES:
            continue
        digests[f"{manifest.stage}@{manifest.partition}"] = manifest.content_digest()
        row = per_stage[manifest.stage]
        row["partitions_s"] += manifest.wall_s
        for job in manifest.telemetry.get("jobs", []):
            kind = job["job"].rsplit("#", 1)[1]  # shard-<i>, or clean-<linear> (fisher's clean-up jobs under Ray)
            if kind.startswith("shard-"):
                row["shards_s"][kind] += job["wall_s"]
            else:
                row["other_jobs_s"] += job["wall_s"]
            row["jobs"] += 1
    for row in per_stage.values():
        row["shards_s"] = dict(sorted(row["shards_s"].items()))
    return {"stages": per_stage, "digests": digests}


def run_case(config, prep: Path, ws: Path, workers: int | None) -> dict:
    if ws.exists():
        shutil.rmtree(ws)
    (ws / "stages").mkdir(parents=True)
    for stage in ("snapshot", "tokenize"):
        shutil.copytree(prep / "stages" / stage, ws / "stages" / stage)
    executor = None
    if workers is not None:
        import ray

        from stagepipe.engine.executors import KEEP_IDLE_WORKERS, RayExecutor

        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, _system_config=KEEP_IDLE_WORKERS)
        executor = RayExecutor(config.executor)
    try:
        started = time.time()
        make_runner(config, ws).run(executor=executor, only=set(STAGES))
        wall = time.time() - started
    finally:
        if workers is not None:
            ray.shutdown()
    found = measured(ws)
    shutil.rmtree(ws)  # ~6 GB per SmolLM2 GFWSVD run (Kronecker factors): only the measurements are kept
    return {"workers": workers, "shards": config.runtime.shards, "wall_s": wall, **found}


def table(rows: list[dict]) -> str:
    lines = ["| run | shards | capture+fisher wall (s) | capture partitions (s) | fisher partitions (s) | "
             "job time per shard, capture (s) | job time per shard, fisher (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "in process, 1 thread" if r["workers"] is None else f"Ray, {r['workers']} worker(s) × 1 CPU"
        shard_s = {s: " / ".join(f"{v:.1f}" for v in r["stages"][s]["shards_s"].values()) or "—" for s in STAGES}
        if r["stages"]["fisher"]["other_jobs_s"]:
            shard_s["fisher"] += f" (+ clean-up jobs {r['stages']['fisher']['other_jobs_s']:.1f})"
        lines.append(f"| {name} | {r['shards']} | {r['wall_s']:.1f} | {r['stages']['capture']['partitions_s']:.1f} | "
                     f"{r['stages']['fisher']['partitions_s']:.1f} | {shard_s['capture']} | {shard_s['fisher']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(ROOT / "pipelines" / "smollm2_gfwsvd.yaml"))
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--baseline", action="store_true", help="also run in process with one shard and one thread")
    parser.add_argument("--workspace", default=str(ROOT / "workspace" / "shards"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "shards"))
    args = parser.parse_args()
    base = yaml.safe_load(Path(args.base).read_text())
    root, out = Path(args.workspace), Path(args.out)
    prep = root / "prep"
    make_runner(config_for(base, 1, ray=False), prep).run(only={"snapshot", "tokenize"})
    rows = []
    if args.baseline:
        rows.append(run_case(config_for(base, 1, ray=False), prep, root / "baseline", None))
    for workers in args.workers:
        rows.append(run_case(config_for(base, args.shards, ray=True), prep, root / f"ray{workers}", workers))
        print(table(rows), flush=True)
    sharded = [r["digests"] for r in rows if r["shards"] == args.shards]
    identical = all(d == sharded[0] for d in sharded)
    text = (f"{table(rows)}\n\nOutputs of the {args.shards}-shard runs: "
            f"{'identical content digests' if identical else 'DIFFERENT content digests'} "
            f"({len(sharded[0])} partitions of capture and fisher).\n")
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shards.json").write_text(json.dumps({"base": args.base, "rows": [{k: v for k, v in r.items() if k != "digests"}
                                                                           for r in rows], "identical": identical}, indent=1))
    (out / "shards.md").write_text(text)


if __name__ == "__main__":
    main()
