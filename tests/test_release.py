"""``runtime.release_consumed``: fisher's boundary gradients go once the layer below is done, the
outputs stay done with unchanged digests, and a reader that must run again gets its payload back
(the producer chain re-runs, bit-identical on CPU); capture's stored block outputs likewise."""

from __future__ import annotations

from pathlib import Path

from stagepipe.engine.stage import PartitionRef
from stagepipe.stagekit import artifacts
from tests.conftest import cli_run, partition_states, started_partitions

KFAC = {"method": {"name": "kfac_svd"}, "model": {"source": "tiny", "arch": "llama", "num_layers": 3, "hidden": 32,
                                                  "intermediate": 64, "num_heads": 4, "num_kv_heads": 2}}


def _digests(states: dict) -> dict:
    return {ref: e.state.manifest.content_digest() for ref, e in states.items() if e.state.status == "done"}


def test_released_gradients_keep_outputs_done_and_come_back_when_needed(write_pipeline, tmp_path: Path) -> None:
    keep = write_pipeline("keep", **KFAC)
    release = write_pipeline("release", **KFAC, runtime={"release_consumed": True})
    assert cli_run(keep, tmp_path / "keep").returncode == 0
    ws = tmp_path / "release"
    first = cli_run(release, ws)
    assert first.returncode == 0, first.stderr
    states = partition_states(release, ws)
    fisher = [ref for ref in states if ref.stage == "fisher"]
    assert {ref.partition for ref in fisher} == {"head", "layer-002", "layer-001", "layer-000"}
    for ref in fisher:  # every hand-over gradient is gone; layer-000 never writes one
        assert states[ref].state.status == "done"
        assert not (states[ref].state.output / artifacts.GRAD).exists()
        assert states[ref].state.released == ((artifacts.GRAD,) if ref.partition != "layer-000" else ())
    # same digests as keeping everything (the report names its pipeline): release changes what is
    # on disk, not the results
    kept = _digests(partition_states(keep, tmp_path / "keep"))
    assert {r: d for r, d in _digests(states).items() if r.stage != "report"} == {r: d for r, d in kept.items() if r.stage != "report"}
    assert started_partitions(cli_run(release, ws)) == []  # nothing to do

    # the lowest fisher output is damaged: its reader chain is restored from the head down
    (states[PartitionRef("fisher", "layer-000")].state.output / artifacts.FISHER).unlink()
    again = cli_run(release, ws)
    assert again.returncode == 0, again.stderr
    reruns = started_partitions(again)
    assert {r for r in reruns if r.startswith("fisher@")} == {"fisher@head", "fisher@layer-002", "fisher@layer-001",
                                                             "fisher@layer-000"}, again.stderr
    # the block inputs fisher reads were released too (capture's hand-over): restored from layer 0;
    # nothing downstream runs (early cutoff)
    assert {r for r in reruns if not r.startswith("fisher@")} == {"capture@layer-000", "capture@layer-001",
                                                                 "capture@layer-002"}, again.stderr
    restored = partition_states(release, ws)
    assert _digests(restored) == _digests(states)
    assert all(restored[ref].state.released == states[ref].state.released for ref in fisher)


def test_a_crash_inside_a_restore_redoes_only_that_partition(write_pipeline, tmp_path: Path) -> None:
    release = write_pipeline("release", **KFAC, runtime={"release_consumed": True})
    ws = tmp_path / "ws"
    assert cli_run(release, ws).returncode == 0
    states = partition_states(release, ws)
    (states[PartitionRef("fisher", "layer-001")].state.output / artifacts.FISHER).unlink()
    killed = cli_run(release, ws, STAGEPIPE_TEST_KILL_AT="manifest-written@fisher@layer-001")
    assert killed.returncode == -9
    resumed = cli_run(release, ws)
    assert resumed.returncode == 0, resumed.stderr
    assert started_partitions(resumed) == ["fisher@layer-001"], resumed.stderr
    assert _digests(partition_states(release, ws)) == _digests(states)


def test_capture_outputs_come_back_for_a_changed_reader(write_pipeline, tmp_path: Path) -> None:
    """AA-SVD reads capture's block outputs (dense inputs and targets): released after its run, they
    are restored when a changed option re-runs anchor, and the result equals a run that kept them."""
    tiny = {"method": {"name": "aasvd", "refine_epochs": 1, "refine_lr": 1e-3}, "target": {"kept_fraction": 0.5}}
    release = write_pipeline("release", **tiny, runtime={"release_consumed": True})
    ws = tmp_path / "ws"
    assert cli_run(release, ws).returncode == 0
    states = partition_states(release, ws)
    for partition in ("layer-000", "layer-001"):
        assert states[PartitionRef("capture", partition)].state.released == (artifacts.HIDDEN,)
    assert states[PartitionRef("anchor", "layer-000")].state.released == (artifacts.HIDDEN,)
    assert states[PartitionRef("anchor", "layer-001")].state.released == ()  # nothing reads the last one
    changed = {**tiny, "method": {**tiny["method"], "refine_lr": 3e-4}}
    release = write_pipeline("release", **changed, runtime={"release_consumed": True})
    again = cli_run(release, ws)
    assert again.returncode == 0, again.stderr
    assert {"capture@layer-000", "capture@layer-001", "anchor@layer-000", "anchor@layer-001"} <= set(started_partitions(again))
    keep = write_pipeline("keep", **changed)
    assert cli_run(keep, tmp_path / "keep").returncode == 0
    kept = _digests(partition_states(keep, tmp_path / "keep"))
    assert ({r: d for r, d in _digests(partition_states(release, ws)).items() if r.stage != "report"}
            == {r: d for r, d in kept.items() if r.stage != "report"})


def test_a_half_deleted_payload_is_a_dead_run_leftover(tmp_path: Path) -> None:
    from stagepipe.engine.workspace import Workspace

    output = tmp_path / "stages" / "fisher" / "layer-001" / "0123456789abcdef"
    (output / "grad.zarr").mkdir(parents=True)
    (output / "grad.zarr" / "chunk").write_bytes(b"x")
    (output / "manifest.json").write_text("{}")
    ws = Workspace(tmp_path)
    ws.release(output, "grad.zarr")
    assert not (output / "grad.zarr").exists() and not list(output.glob(".released-*"))
    (output / ".released-grad.zarr-abc123").mkdir()  # as a crash between rename and delete leaves it
    assert ws.dead_run_leftovers() == [output / ".released-grad.zarr-abc123"]
    ws.clean_dead_runs()
    assert sorted(p.name for p in output.iterdir()) == ["manifest.json"]
