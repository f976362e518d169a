"""``runtime.disk_budget_gb``: capture keeps its block outputs only at every k-th layer (k from the
plan), later readers restore the others by running the segment again from the nearest checkpoint;
each layer's statistics go once its decompose is done (run first); the results are bit-identical
to keeping everything, and a crash inside a recompute redoes only that partition."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from stagepipe.config import load_pipeline
from stagepipe.engine.release import releasable
from stagepipe.engine.runner import Entry
from stagepipe.engine.stage import PartitionRef
from stagepipe.engine.workspace import PartitionState
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.plan import checkpoints, estimate, make_plan, peak_disk
from stagepipe.stages import discover
from tests.conftest import TINY, cli_run, merge, partition_states, started_partitions

MODEL = {"source": "tiny", "arch": "llama", "num_layers": 6, "hidden": 32, "intermediate": 64, "num_heads": 4,
         "num_kv_heads": 2}
# enough calibration tokens that the stored block outputs, not the small fixed files, set the peak
KFAC = {"method": {"name": "kfac_svd"}, "model": MODEL,
        "calibration": {"n_samples": 32, "seq_len": 128, "text": {"n_words": 20000}}}


def _digests(states: dict) -> dict:
    return {r: e.state.manifest.content_digest() for r, e in states.items() if e.state.status == "done" and r.stage != "report"}


def _budget_for_interval_2(write_pipeline) -> float:
    """A budget (GB) that the tiny plan meets with checkpoints every 2 layers but not keeping all."""
    probe = load_pipeline(write_pipeline("probe", **KFAC, runtime={"disk_budget_gb": 1.0}))
    plan = make_plan(probe, discover(probe, {}))
    peaks = {k: peak_disk(estimate(plan, k))[1] for k in (1, 2)}
    assert peaks[2] < peaks[1]
    return peaks[2] / 2**30


def test_the_plan_picks_the_least_recompute_that_fits(write_pipeline) -> None:
    budget = _budget_for_interval_2(write_pipeline)
    config = load_pipeline(write_pipeline("fit", **KFAC, runtime={"disk_budget_gb": budget}))
    model = discover(config, {})
    assert make_plan(config, model).interval == 2
    roomy = load_pipeline(write_pipeline("roomy", **KFAC, runtime={"disk_budget_gb": 100.0}))
    assert make_plan(roomy, model).interval == 1  # keeping everything fits: nothing is recomputed
    assert checkpoints(6, 2) == [1, 3] and checkpoints(6, 1) == [0, 1, 2, 3, 4] and checkpoints(32, 8) == [7, 15, 23]


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory) -> tuple[Path, Path, Any]:
    """(pipeline, workspace, ``run -v`` result) of the tiny K-FAC-SVD pipeline under a budget that
    the plan meets with checkpoints every 2 layers."""
    tmp = tmp_path_factory.mktemp("retention")

    def write(name: str, **updates: Any) -> Path:
        data = merge(TINY, {**KFAC, **updates})
        data["name"] = name
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    pipeline = write("budget", runtime={"disk_budget_gb": _budget_for_interval_2(write)})
    result = cli_run(pipeline, tmp / "budget")
    assert result.returncode == 0, result.stderr
    return pipeline, tmp / "budget", result


def test_checkpointed_capture_gives_identical_results_and_recomputes_each_segment_once(budget_run, write_pipeline,
                                                                                      tmp_path: Path) -> None:
    budget, ws, result = budget_run
    keep = write_pipeline("keep", **KFAC)
    assert cli_run(keep, tmp_path / "keep").returncode == 0
    started = started_partitions(result)
    # layers 1 and 3 are checkpoints (and 5, the last): fisher restores the outputs of 4, 2 and 0,
    # each once, by running that capture again from the checkpoint below
    captures = [r for r in started if r.startswith("capture@")]
    assert sorted(captures) == sorted([f"capture@layer-{i:03d}" for i in range(6)] + ["capture@layer-000",
                                                                                      "capture@layer-002",
                                                                                      "capture@layer-004"])
    assert "restores a released payload" in result.stderr
    # consumers first: a layer's decompose runs as soon as its statistics are there, and frees them
    assert started.index("decompose@layer-005") < started.index("fisher@layer-004")
    states = partition_states(budget, ws)
    for ref, entry in states.items():
        if ref.stage == "capture":  # K-FAC-SVD's Grams come from fisher: capture stores none
            assert artifacts.HIDDEN in entry.state.released and not (entry.state.output / artifacts.STATS).exists()
        if ref.stage == "fisher" and ref.partition != "head":
            assert artifacts.FISHER in entry.state.released
    assert _digests(states) == _digests(partition_states(keep, tmp_path / "keep"))
    assert not list((ws / "stages").glob("*/*/.aside-*"))  # a restore's same-key predecessor is not kept aside
    assert started_partitions(cli_run(budget, ws)) == []  # done: nothing to restore


def test_a_crash_inside_a_recompute_redoes_only_that_partition(budget_run, tmp_path: Path) -> None:
    """SIGKILL while capture@layer-002 runs again to restore its block outputs for fisher: the
    resumed run starts with that restore and then runs exactly what the uninterrupted run ran after
    it — nothing finished before the crash runs again — and ends with the same outputs."""
    budget, reference, uninterrupted = budget_run
    ws = tmp_path / "ws"
    # the first arrival (the first pass) passes; the second is capture@layer-002 restoring its output for fisher
    killed = cli_run(budget, ws, STAGEPIPE_TEST_KILL_AT="manifest-written@capture@layer-002", STAGEPIPE_TEST_KILL_SKIP="1")
    assert killed.returncode == -9, killed.stderr  # the kill fired, inside the restore
    before = started_partitions(uninterrupted)
    restore = [i for i, ref in enumerate(before) if ref == "capture@layer-002"][1]
    assert started_partitions(killed) == before[: restore + 1]
    resumed = cli_run(budget, ws)
    assert resumed.returncode == 0, resumed.stderr
    assert started_partitions(resumed) == before[restore:]  # the restore again, then the rest: nothing twice
    assert _digests(partition_states(budget, ws)) == _digests(partition_states(budget, reference))


def _entry(name: str, part: int, status: str = "done", readers: tuple = (), early: tuple | None = None) -> Entry:
    ref = PartitionRef(name, f"layer-{part:03d}")
    early_map = {"h": list(early)} if early is not None else {}
    return Entry(ref, PartitionState(status), transient={"h": list(readers)}, early=early_map)


@pytest.mark.parametrize("restored", [False, True])
def test_early_release_waits_for_its_chain_and_for_a_started_stage_after_a_restore(restored: bool) -> None:
    nxt, later = PartitionRef("capture", "layer-002"), PartitionRef("fisher", "layer-002")
    producer = _entry("capture", 1, readers=(nxt, later), early=(nxt,))
    chain = _entry("capture", 2)
    reader = _entry("fisher", 2, status="waiting")
    head = Entry(PartitionRef("fisher", "head"), PartitionState("done"))
    entries = [producer, chain, reader] + ([head] if restored else [])
    by_ref = {e.ref: e for e in entries}
    restored_set = {producer.ref} if restored else set()
    found = releasable(entries, by_ref, set(), restored_set)
    # first pass: goes once the next capture is done; a restored one stays for the started fisher stage
    assert (found == [(producer, "h")]) is not restored
    assert releasable(entries, by_ref, {later}, restored_set) == []  # a demanded reader always keeps it


def test_sharded_capture_and_fisher_restore_the_same_bytes_under_a_budget(write_pipeline, tmp_path: Path) -> None:
    """``runtime.shards`` with checkpointed capture: a restore re-runs a sharded partition (its jobs)
    and commits the bytes of the sharded run that keeps everything."""
    budget = _budget_for_interval_2(write_pipeline)
    keep = write_pipeline("keep_sharded", **KFAC, runtime={"shards": 2})
    tight = write_pipeline("tight_sharded", **KFAC, runtime={"shards": 2, "disk_budget_gb": budget})
    assert cli_run(keep, tmp_path / "keep").returncode == 0
    result = cli_run(tight, tmp_path / "tight")
    assert result.returncode == 0, result.stderr
    captures = [r for r in started_partitions(result) if r.startswith("capture@")]
    assert len(captures) == 6 + 3  # layers 0, 2 and 4 restored once each, as without shards
    assert _digests(partition_states(tight, tmp_path / "tight")) == _digests(partition_states(keep, tmp_path / "keep"))
