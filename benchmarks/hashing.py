"""What checking content hashes costs, per stage, on a finished workspace.

    python benchmarks/hashing.py pipelines/smollm2_demo.yaml [--workspace W] [--out docs/hashing]

For every stage: the bytes of its finished outputs, the stage's own wall time (from the manifests),
the time to hash every file once (what a commit always did, and what a look pays for a file whose
stamp does not vouch for it), and the time of a stamped look (``Workspace.state``, what ``status``,
every driver round and every task's input check pay: one ``stat`` per file). Prints a table and
writes ``hashing.json`` and ``hashing.md``. The page cache is warm for both (the outputs were
just read by the look before): the hash column is CPU, not disk, bound.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from stagepipe.config import load_pipeline
from stagepipe.io import manifest as manifest_io
from stagepipe.io.hashing import sha256_file
from stagepipe.stages import make_runner


def measure(pipeline: Path, workspace: Path | None) -> list[dict]:
    config = load_pipeline(pipeline)
    runner = make_runner(config, workspace or Path("workspace") / config.name, str(pipeline))
    entries = [e for e in runner.states() if e.state.status == "done"]
    rows: dict[str, dict] = defaultdict(lambda: {"partitions": 0, "bytes": 0, "wall_s": 0.0, "hash_s": 0.0, "look_s": 0.0})
    for entry in entries:
        row = rows[entry.ref.stage]
        manifest = entry.state.manifest
        present = [r for r in manifest.files if (entry.state.output / r.path).is_file()]
        row["partitions"] += 1
        row["bytes"] += sum(r.size for r in present)
        row["wall_s"] += manifest.wall_s
        started = time.perf_counter()
        for record in present:
            sha256_file(entry.state.output / record.path)
        row["hash_s"] += time.perf_counter() - started
        started = time.perf_counter()
        problems = manifest_io.verify(entry.state.output, manifest, missing_ok=True)
        row["look_s"] += time.perf_counter() - started
        assert not problems, problems
    return [{"stage": stage, **row, "hash_share": row["hash_s"] / row["wall_s"] if row["wall_s"] else 0.0}
            for stage, row in rows.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", type=Path)
    parser.add_argument("--workspace", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/hashing"))
    args = parser.parse_args()
    rows = measure(args.pipeline, args.workspace)
    lines = ["| stage | partitions | MB | stage wall s | hash all s | hash / wall | stamped look ms |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['partitions']} | {r['bytes'] / 2**20:.1f} | {r['wall_s']:.1f} | "
                     f"{r['hash_s']:.3f} | {100 * r['hash_share']:.2f} % | {1000 * r['look_s']:.1f} |")
    total = {k: sum(r[k] for r in rows) for k in ("bytes", "wall_s", "hash_s", "look_s")}
    lines.append(f"| all | {sum(r['partitions'] for r in rows)} | {total['bytes'] / 2**20:.1f} | {total['wall_s']:.1f} | "
                 f"{total['hash_s']:.3f} | {100 * total['hash_s'] / total['wall_s']:.2f} % | {1000 * total['look_s']:.1f} |")
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hashing.json").write_text(json.dumps({"pipeline": str(args.pipeline), "rows": rows}, indent=1))
    (args.out / "hashing.md").write_text(f"# Hashing cost: {args.pipeline}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
