"""Kill -9 at randomly drawn points of a real run, resume, and compare with an uninterrupted run.

An uninterrupted reference run records every arrival at a kill point (``stagepipe.faults``):
after a stage's work, between manifest and rename, after the rename, inside safetensors and zarr
writes (temp file complete, final name absent; some chunks of an array written), after each
GFWSVD sweep checkpoint. A seeded draw picks arrivals in run order; the pipeline is run once per
draw with that kill armed (each run resumes the previous one's wreck) and once more to the end.
Every partition's key and content digest, and ``report.json`` less its timings, must equal the
reference: a crash anywhere costs time, never a different result.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from stagepipe.io import manifest as manifest_io

SEED = int(os.environ.get("STAGEPIPE_FUZZ_SEED", "20261125"))


def run(pipeline: Path, ws: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stagepipe.cli", "run", str(pipeline), "-w", str(ws)],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=600)


def outputs(ws: Path) -> dict[str, tuple[str, str]]:
    """Key and content digest of every finished partition (the report's content holds timings)."""
    found = {}
    for path in sorted(ws.glob("stages/*/*/*/manifest.json")):
        manifest = manifest_io.read(path.parent)
        found[f"{manifest.stage}@{manifest.partition}"] = (manifest.key, "" if manifest.stage == "report" else
                                                          manifest.content_digest())
    return found


def report(ws: Path) -> dict:
    data = json.loads(next(ws.glob("stages/report/all/*/report.json")).read_text())
    data.pop("stages")  # wall time and peak memory per stage
    return data


def fuzz(pipeline: Path, tmp_path: Path, kills: int, seed: int) -> tuple[int, Counter]:
    trace = tmp_path / "trace.tsv"
    reference = tmp_path / "reference"
    done = run(pipeline, reference, {"STAGEPIPE_TEST_TRACE": str(trace)})
    assert done.returncode == 0, done.stdout + done.stderr
    arrivals = [tuple(line.split("\t")) for line in trace.read_text().splitlines()]
    drawn = sorted(random.Random(seed).sample(range(len(arrivals)), min(kills, len(arrivals))))
    ws = tmp_path / "killed"
    killed: Counter = Counter()
    for index in drawn:
        point, where = arrivals[index]
        skip = sum(1 for a in arrivals[:index] if a == (point, where))  # its n-th arrival in that partition
        result = run(pipeline, ws, {"STAGEPIPE_TEST_KILL_AT": f"{point}@{where}", "STAGEPIPE_TEST_KILL_SKIP": str(skip)})
        if result.returncode == -9:
            killed[point] += 1
        else:  # a resumed partition may not pass the point again (e.g. a sweep it resumed past)
            assert result.returncode == 0, result.stdout + result.stderr
    final = run(pipeline, ws, {})
    assert final.returncode == 0, final.stdout + final.stderr
    assert outputs(ws) == outputs(reference)
    assert report(ws) == report(reference)
    assert not [p for p in ws.glob("stages/*/*/.*") if p.name.startswith((".tmp-", ".scratch-", ".resume-"))]
    print(f"seed {seed}: {sum(killed.values())} kills of {len(drawn)} drawn from {len(arrivals)} arrivals: {dict(killed)}")
    return sum(killed.values()), killed


@pytest.mark.parametrize("method,allocation,kills", [
    ({"name": "gfwsvd", "mode": "stored", "max_sweeps": 3, "tol": 1e-12, "refit": True}, {"policy": "global_greedy"}, 12),
    ({"name": "ressvd", "split": 0.5}, {"policy": "asvd_search", "candidates": [0.5, 0.8], "sensitivity_windows": 2}, 6),
], ids=["gfwsvd-refit", "ressvd-search"])
def test_resume_after_kill_at_random_points_equals_uninterrupted(write_pipeline, tmp_path: Path, method, allocation,
                                                                 kills) -> None:
    pipeline = write_pipeline(f"kill_{method['name']}", method=method, allocation={**allocation, "align": 4})
    total, _ = fuzz(pipeline, tmp_path, kills, SEED + kills)
    assert total >= kills // 2  # most drawn points are reached again on the resumed runs
