"""Which rows of a results table are this commit's numbers: per row, its partitions' state under the
current code (``done`` = the key the code computes now matches the finished partition on disk).

A row whose every partition is ``done`` under ``HEAD`` would be reproduced as it stands by a re-run
(its keys hash the stage versions, config slices and upstream digests), so its numbers are the
current code's whatever commit it was made at. Any other state means the partition the current code
asks for is not in this workspace: ``stale`` (a finished partition of the same name under another
key exists — older code's, or another row's that shares the partition name; the reason names the
config keys that differ from it), ``missing`` (none), ``waiting`` (an upstream partition is not
done). Re-running those rows is what "every row on the final code" costs. Runs nothing (reads
manifests only).

    python benchmarks/freshness.py --base pipelines/methods/aasvd.yaml --out docs/headline \\
        --workspace workspace/headline --tasks lambada arc_easy arc_challenge hellaswag piqa winogrande openbookqa \\
        --task-limit 50
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import yaml
from quality import grid_config  # benchmarks/quality.py (this directory)

from stagepipe.stages import make_runner


def row_freshness(base: dict, entry: str, kept: float, workspace: Path) -> dict:
    """A row's partitions counted by state under the current code, and its first partition that is
    not ``done`` (with the engine's reason: which key input changed, or what it waits for)."""
    states = make_runner(grid_config(base, entry, kept), workspace).states()
    counts = Counter(e.state.status for e in states)
    first = next((e for e in states if e.state.status != "done"), None)
    return {"row": f"{entry}@{kept}", "partitions": len(states), **counts,
            "first_not_done": None if first is None else f"{first.ref} {first.state.status}: {first.state.reason}"}


def freshness_lines(results: dict, base: dict, workspace: Path) -> list[str]:
    """One markdown line per row of ``results`` (quality.py's results.json) and a summary line."""
    lines = ["| row | made at | partitions | done under HEAD | first not done |", "|---|---|---|---|---|"]
    current = 0
    for row in results["rows"]:
        fresh = row_freshness(base, row["method"], row["kept_requested"], workspace)
        current += fresh.get("done", 0) == fresh["partitions"]
        lines.append(f"| {fresh['row']} | {row.get('commit', results.get('commit', '?'))} | {fresh['partitions']} | "
                     f"{fresh.get('done', 0)} | {fresh['first_not_done'] or '—'} |")
    return lines + ["", f"{current} of {len(results['rows'])} rows are done under HEAD in {workspace}."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the base file the table was made from")
    parser.add_argument("--out", required=True, help="the directory holding results.json")
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--tasks", nargs="+", default=[], help="zero-shot tasks the rows scored (as they ran)")
    parser.add_argument("--task-limit", type=int, default=None)
    args = parser.parse_args()
    base = yaml.safe_load(Path(args.base).read_text())
    if args.tasks:
        base["evaluation"] = {**base["evaluation"], "tasks": args.tasks,
                              **({"task_limit": args.task_limit} if args.task_limit else {})}
    results = json.loads((Path(args.out) / "results.json").read_text())
    if Path(results["base"]).name != Path(args.base).name:
        raise SystemExit(f"--base: {Path(args.out) / 'results.json'} was made from {results['base']}, not {args.base}")
    print("\n".join(freshness_lines(results, base, Path(args.workspace))))


if __name__ == "__main__":
    main()
