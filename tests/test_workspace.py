"""The workspace's commit protocol: states, atomic commit, scratch and resume directories, the lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stagepipe.engine.stage import PartitionRef
from stagepipe.engine.workspace import Workspace
from stagepipe.errors import WorkspaceBusyError
from stagepipe.io import json_io
from stagepipe.io import manifest as manifest_io

REF = PartitionRef("decompose", "layer-000")
KEY = "ab" * 32


def finish(ws: Workspace, tmp: Path, content: bytes = b"data", key: str = KEY) -> None:
    (tmp / "out.bin").write_bytes(content)
    manifest_io.write_atomic(tmp, manifest_io.Manifest(
        stage=REF.stage, partition=REF.partition, stage_version=1, key=key, key_material={}, files=manifest_io.record_files(tmp),
        run_id="r", host="h", pid=os.getpid(), started_at=0, finished_at=1, wall_s=1, peak_rss_mb=1))


def test_begin_commit_end_moves_through_the_states(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    assert ws.state(REF, KEY).status == "missing"
    tmp = ws.begin(REF, KEY, "run1")
    assert ws.state(REF, KEY).status == "running"  # this live process holds the marker
    assert ws.scratch_dir(tmp).is_dir() and tmp.name.startswith(".tmp-") and ws.scratch_dir(tmp).name.startswith(".scratch-")
    ws.resume_dir(REF, KEY).mkdir()
    finish(ws, tmp)
    final = ws.commit(REF, KEY, tmp)
    ws.end(REF, KEY, tmp, committed=True)
    state = ws.state(REF, KEY)
    assert state.status == "done" and state.output == final and (final / "out.bin").read_bytes() == b"data"
    assert sorted(p.name for p in ws.partition_dir(REF).iterdir()) == [KEY[:16]]  # marker, scratch, resume gone


def test_failure_keeps_the_resume_directory_and_drops_the_rest(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    tmp = ws.begin(REF, KEY, "run1")
    ws.resume_dir(REF, KEY).mkdir()
    ws.end(REF, KEY, tmp, committed=False)
    assert sorted(p.name for p in ws.partition_dir(REF).iterdir()) == [f".resume-{KEY[:16]}"]


def test_a_dead_owner_means_incomplete_and_a_corrupt_output_is_reported(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    ws.begin(REF, KEY, "run1")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    marker = json_io.read(ws.marker(REF, KEY))
    json_io.write_atomic(ws.marker(REF, KEY), {**marker, "pid": int(dead.stdout), "create_time": 0.0})
    assert ws.state(REF, KEY).status == "incomplete" and "crashed: pid" in ws.state(REF, KEY).reason
    tmp = ws.begin(REF, KEY, "run2")  # the redo clears the dead run's temp directories
    assert len(list(ws.partition_dir(REF).glob(".tmp-*"))) == 1
    finish(ws, tmp, key="cd" * 32)  # a manifest for another key
    ws.commit(REF, KEY, tmp)
    assert ws.state(REF, KEY).status == "corrupt"


def test_commit_keeps_a_valid_output_unless_replacing_and_never_deletes(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    first = ws.begin(REF, KEY, "r1")
    finish(ws, first, b"first")
    ws.commit(REF, KEY, first)
    duplicate = ws.begin(REF, KEY, "r2")
    finish(ws, duplicate, b"second")
    final = ws.commit(REF, KEY, duplicate)  # a duplicated task finished second: the first stays
    assert (final / "out.bin").read_bytes() == b"first" and not duplicate.exists()
    forced = ws.begin(REF, KEY, "r3")
    finish(ws, forced, b"forced")
    ws.commit(REF, KEY, forced, replace=True)
    assert (final / "out.bin").read_bytes() == b"forced"
    aside = list(ws.partition_dir(REF).glob(".aside-*"))
    assert len(aside) == 1 and (aside[0] / "out.bin").read_bytes() == b"first"


def test_previous_manifest_explains_staleness(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    tmp = ws.begin(REF, KEY, "r1")
    finish(ws, tmp)
    ws.commit(REF, KEY, tmp)
    assert ws.state(REF, "ef" * 32).status == "missing"
    assert ws.previous_manifest(REF).key == KEY


def test_one_driver_per_workspace(tmp_path: Path) -> None:
    with Workspace(tmp_path).lock(), pytest.raises(WorkspaceBusyError, match="another stagepipe driver"):
        Workspace(tmp_path).lock().__enter__()
    with Workspace(tmp_path).lock():  # released after the first driver ends
        pass
