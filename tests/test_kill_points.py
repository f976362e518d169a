"""Kill -9 at drawn points of real runs, resume, and compare with an uninterrupted run.

An uninterrupted reference run records every arrival at a kill point (``stagepipe.faults``). A
seeded draw then picks arrivals — first one of each kind of point the pipeline reaches, then at
random — and the pipeline runs once per draw with that kill armed, each run resuming the previous
one's wreck. **Every drawn kill must fire**: a resumed run need not pass a point again (a sweep it
resumed past), so a draw that does not fire is re-made from the arrivals of the run that just
completed instead (the workspace is put back first). Every partition's key and content digest,
and ``report.json`` less its timings, must equal the reference: a crash anywhere costs time, never
a different result. Each case declares the points it must fire, and together the cases fire every
point the code places (``faults.POINTS``).

The cases cover the stages that keep state inside a partition (GFWSVD's sweeps, AA-SVD's
refinement epochs, SoCo's training), release and restore under a disk budget, the sensitivity
search, and sharded capture/fisher on Ray, where the kill takes a worker (a lost node) and Ray runs
the task again.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from stagepipe import faults
from stagepipe.io import manifest as manifest_io
from tests.conftest import TINY, merge

SEED = int(os.environ.get("STAGEPIPE_FUZZ_SEED", "20261202"))
ROOT = Path(__file__).resolve().parent.parent
Arrival = tuple[str, str]  # (point, where)


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


def arrivals(trace: Path) -> list[Arrival]:
    return [tuple(line.split("\t")) for line in trace.read_text().splitlines()] if trace.exists() else []


def armed(trace: list[Arrival], index: int) -> dict[str, str]:
    """The environment that kills at ``trace[index]``: its point, where, and how many arrivals of
    the same (point, where) before it to let pass."""
    point, where = trace[index]
    skip = sum(1 for a in trace[:index] if a == (point, where))
    return {"STAGEPIPE_TEST_KILL_AT": f"{point}@{where}", "STAGEPIPE_TEST_KILL_SKIP": str(skip)}


def pick(trace: list[Arrival], rng: random.Random, point: str) -> int:
    """A random arrival of ``point`` in ``trace`` (of any point if it has none)."""
    found = [i for i in range(len(trace)) if trace[i][0] == point]
    return rng.choice(found) if found else rng.randrange(len(trace))


def fuzz(pipeline: Path, tmp_path: Path, kills: int, seed: int, covers: set[str]) -> Counter:
    """Run ``kills`` drawn kills in sequence (each must fire; the kinds in ``covers`` drawn first),
    then to the end; the result must equal an uninterrupted run. Returns how often each point fired."""
    reference, trace = tmp_path / "reference", tmp_path / "reference.tsv"
    done = run(pipeline, reference, {"STAGEPIPE_TEST_TRACE": str(trace)})
    assert done.returncode == 0, done.stdout + done.stderr
    first = arrivals(trace)
    if "disk_budget_gb" in pipeline.read_text():  # the budget makes capture run again for its readers
        commits = Counter(where for point, where in first if point == "after-rename" and where.startswith("capture@"))
        assert max(commits.values()) > 1, commits
    rng = random.Random(seed)
    kinds = sorted({point for point, _ in first}, key=faults.POINTS.index)
    rng.shuffle(kinds)
    kinds.sort(key=lambda point: point not in covers)  # the kinds this case must fire first
    wanted = [*kinds, *[None] * kills][:kills]  # then one of each other kind, then anything
    drawn: set[int] = set()
    for point in wanted:  # distinct arrivals, killed in run order: each wreck resumes towards the next
        choices = [i for i in range(len(first)) if (point is None or first[i][0] == point) and i not in drawn]
        drawn.add(rng.choice(choices or [i for i in range(len(first)) if i not in drawn]))
    ws, backup = tmp_path / "killed", tmp_path / "backup"
    fired: Counter = Counter()
    for index in sorted(drawn):
        point = first[index][0]
        if ws.exists():
            shutil.copytree(ws, backup, symlinks=True)
        own = tmp_path / f"draw-{sum(fired.values())}.tsv"
        result = run(pipeline, ws, {**armed(first, index), "STAGEPIPE_TEST_TRACE": str(own)})
        if result.returncode != -9:  # not reached again on the resumed run: redraw from its own arrivals
            assert result.returncode == 0, result.stdout + result.stderr
            shutil.rmtree(ws)
            if backup.exists():
                backup.rename(ws)
            resumed = arrivals(own)
            if not resumed:  # the wreck was one marker short of finished: start a fresh run instead
                shutil.rmtree(ws)
                resumed = first
            redo = pick(resumed, rng, point)
            result = run(pipeline, ws, armed(resumed, redo))
            assert result.returncode == -9, f"redrawn kill {resumed[redo]} did not fire: {result.stderr[-2000:]}"
            point = resumed[redo][0]
        shutil.rmtree(backup, ignore_errors=True)
        fired[point] += 1
    final = run(pipeline, ws, {})
    assert final.returncode == 0, final.stdout + final.stderr
    assert outputs(ws) == outputs(reference)
    assert report(ws) == report(reference)
    assert not [p for p in ws.glob("stages/*/*/.*") if p.name.startswith((".tmp-", ".scratch-", ".resume-"))]
    print(f"seed {seed}: {dict(fired)} fired of {len(first)} arrivals")
    return fired


BUDGET_MODEL = {"source": "tiny", "arch": "llama", "num_layers": 4, "hidden": 32, "intermediate": 64, "num_heads": 4,
                "num_kv_heads": 2}
#: (updates to the tiny pipeline, kills, the points the case must fire)
CASES = {
    "gfwsvd-refit": ({"method": {"name": "gfwsvd", "mode": "stored", "max_sweeps": 3, "tol": 1e-12, "refit": True},
                      "allocation": {"policy": "global_greedy", "align": 4}}, 8,
                     {"zarr-rows-written", "zarr-group-written", "safetensors-written", "sweep-saved", "after-run",
                      "manifest-written", "before-rename", "after-rename"}),
    # a budget (4.3 MB) that the plan meets with block outputs kept every 2 layers (4.05 MB; keeping
    # all: 4.55 MB): anchor restores the released ones by running capture again, and kills land there
    "aasvd-refine-budget": ({"method": {"name": "aasvd", "refine_epochs": 2}, "model": BUDGET_MODEL,
                             "calibration": {"n_samples": 32, "seq_len": 128, "text": {"n_words": 20000}},
                             "allocation": {"policy": "uniform", "align": 4},
                             "runtime": {"batch_size": 2, "threads": 1, "disk_budget_gb": 0.0042}}, 4, {"refine-saved"}),
    "soco-train": ({"method": {"name": "soco", "explore_epochs": 1, "refine_epochs": 1, "sparsify_epochs": 1,
                               "tune_epochs": 1, "batch": 2, "checkpoint_every": 1}}, 3, {"train-saved"}),
    "ressvd-search": ({"method": {"name": "ressvd", "split": 0.5},
                       "allocation": {"policy": "asvd_search", "candidates": [0.5, 0.8], "sensitivity_windows": 2,
                                      "align": 4}}, 3, set()),
}


def pipeline_file(tmp: Path, name: str, updates: dict) -> Path:
    data = merge(TINY, {"name": name, **updates})
    if updates["method"]["name"] == "soco":
        del data["allocation"]  # a learned method allocates itself
    path = tmp / f"{name}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_resume_after_kills_at_drawn_points_equals_uninterrupted(tmp_path: Path, case: str) -> None:
    updates, kills, covers = CASES[case]
    fired = fuzz(pipeline_file(tmp_path, f"kill_{case.replace('-', '_')}", updates), tmp_path, kills,
                 SEED + sum(map(ord, case)), covers)
    assert sum(fired.values()) == kills  # every drawn kill fired
    assert covers <= set(fired), f"{case} never fired {sorted(covers - set(fired))}"


def test_the_cases_fire_every_point_the_code_places() -> None:
    """The union of the cases' points (each asserted to fire) is every point placed in the code,
    and the code places no point that ``faults.POINTS`` does not name."""
    placed = set()
    for path in (ROOT / "stagepipe").rglob("*.py"):
        # a point is placed by ``kill_point("…")`` or handed to the one resumable Adam, which arrives at it
        placed |= set(re.findall(r'(?:kill_point\(|ResumableAdam\(.*?)"([a-z]+(?:-[a-z]+)+)"', path.read_text()))
    assert placed == set(faults.POINTS)
    covered = set().union(*(covers for _, _, covers in CASES.values())) | RAY_COVERS
    assert covered == set(faults.POINTS), sorted(set(faults.POINTS) - covered)


# --------------------------------------------------------------------------- sharded capture/fisher on Ray
#: the points the Ray case fires: inside shard jobs and partition tasks, on workers
RAY_COVERS = {"zarr-rows-written", "before-rename"}


@pytest.mark.ray
def test_killed_ray_workers_inside_sharded_capture_and_fisher_leave_the_result_unchanged(tmp_path: Path,
                                                                                          monkeypatch) -> None:
    """Ray runs a task again when its worker dies (a lost node): kills drawn inside shard jobs and
    partition tasks of a sharded GFWSVD run, one worker each (``STAGEPIPE_TEST_KILL_ONCE``), leave
    every key and content digest equal to the in-process run."""
    import ray

    from stagepipe.config import load_pipeline
    from stagepipe.engine.executors import RayExecutor
    from stagepipe.stages import make_runner

    pipeline = pipeline_file(tmp_path, "kill_ray", {
        "method": {"name": "gfwsvd", "mode": "streaming", "max_sweeps": 2}, "runtime": {"shards": 2, "threads": 1},
        "executor": {"kind": "ray", "max_retries": 2}})
    config = load_pipeline(pipeline)
    reference = tmp_path / "reference"
    make_runner(config, reference).run()
    plan, trace = tmp_path / "plan.json", tmp_path / "trace.tsv"
    monkeypatch.setenv("STAGEPIPE_TEST_KILL_PLAN", str(plan))
    monkeypatch.setenv("STAGEPIPE_TEST_TRACE", str(trace))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # workers inherit the variables
    try:
        make_runner(config, tmp_path / "traced").run(executor=RayExecutor(config.executor))
        seen = [a for a in arrivals(trace) if a[0] in RAY_COVERS and a[1].startswith(("capture@", "fisher@"))]
        rng = random.Random(SEED)
        draws = [rng.choice([a for a in seen if a[0] == point and (point != "zarr-rows-written" or "#shard-1" in a[1])])
                 for point in sorted(RAY_COVERS)]
        for i, (point, where) in enumerate(draws):
            marker = tmp_path / f"fired-{i}"
            plan.write_text(json.dumps({"at": f"{point}@{where}", "once": str(marker)}))
            ws = tmp_path / f"killed-{i}"
            results = make_runner(config, ws).run(executor=RayExecutor(config.executor))
            assert marker.exists(), f"{point}@{where} did not fire"
            assert all(r.ok for r in results)
            assert outputs(ws) == outputs(reference), (point, where)
    finally:
        ray.shutdown()
