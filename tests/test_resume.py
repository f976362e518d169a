"""Crash/resume in a real subprocess: SIGKILL mid-decompose, then only unfinished work is redone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from stagepipe.cli import main
from stagepipe.io import manifest as manifest_io
from stagepipe.io.hashing import sha256_file


def stagepipe(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stagepipe.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}, **kwargs)


def manifests(ws: Path, stage: str) -> dict[str, manifest_io.Manifest]:
    out = {}
    for path in sorted((ws / "stages" / stage).glob("*/*/manifest.json")):
        out[path.parent.parent.name] = manifest_io.read(path.parent)
    return out


def final_shards(ws: Path) -> dict[str, str]:
    model = next((ws / "stages" / "assemble" / "all").glob("*/model"))
    return {p.name: sha256_file(p) for p in sorted(model.glob("*.safetensors"))}


def test_sigkill_mid_decompose_then_resume(write_pipeline, tmp_path: Path) -> None:
    pipeline = write_pipeline(model={"source": "tiny", "arch": "llama", "num_layers": 4, "hidden": 32,
                                     "intermediate": 64, "num_heads": 4, "num_kv_heads": 2})
    reference = tmp_path / "reference"
    ref = stagepipe("run", str(pipeline), "-w", str(reference))
    assert ref.wait(timeout=300) == 0, ref.stdout.read()

    ws = tmp_path / "crashed"
    proc = stagepipe("run", str(pipeline), "-w", str(ws), env={"STAGEPIPE_TEST_HANG_IN": "decompose@layer-001"})
    deadline = time.time() + 240
    while not list((ws / "stages" / "decompose" / "layer-001").glob(".running-*.json")):
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = manifests(ws, "decompose")
    assert "layer-001" not in before and 0 < len(before) < 4  # half done, nothing half-written trusted

    status = CliRunner().invoke(main, ["status", str(pipeline), "-w", str(ws), "-v"]).output
    assert "decompose@layer-001        incomplete  (crashed: pid" in status

    resume = stagepipe("run", str(pipeline), "-w", str(ws), "-v")
    output, _ = resume.communicate(timeout=300)
    assert resume.returncode == 0, output
    redone = {line.split()[1] for line in output.splitlines() if line.startswith("run ")}
    assert "decompose@layer-001" in redone
    assert not any(f"decompose@{p}" in redone for p in before)  # finished partitions untouched
    after = manifests(ws, "decompose")
    assert all(after[p].run_id == m.run_id for p, m in before.items())
    assert not list((ws / "stages").glob("*/*/.tmp-*"))
    assert final_shards(ws) == final_shards(reference)  # bit-identical to an uninterrupted run


def test_truncated_shard_is_reported_and_exactly_that_partition_redone(write_pipeline, tmp_path: Path) -> None:
    pipeline, ws = write_pipeline(), tmp_path / "ws"
    runner = CliRunner()
    assert runner.invoke(main, ["run", str(pipeline), "-w", str(ws)]).exit_code == 0
    shard = next((ws / "stages" / "decompose" / "layer-001").glob("*/svd.safetensors"))
    original = shard.read_bytes()
    shard.write_bytes(original[: len(original) // 2])
    result = runner.invoke(main, ["verify", str(pipeline), "-w", str(ws)])
    assert result.exit_code == 1 and "CORRUPT decompose@layer-001" in result.output
    status = runner.invoke(main, ["status", str(pipeline), "-w", str(ws)])
    assert status.exit_code == 1 and "1 corrupt partition(s), e.g. decompose@layer-001" in status.output
    result = runner.invoke(main, ["run", str(pipeline), "-w", str(ws), "-v"])
    redone = {line.split()[1] for line in result.output.splitlines() if line.startswith("run ")}
    assert result.exit_code == 0 and redone == {"decompose@layer-001"}  # nothing upstream, nothing downstream
    assert shard.read_bytes() == original  # same key, same content: downstream stays valid
    assert list((ws / "stages" / "decompose" / "layer-001").glob(".aside-*"))  # the damaged copy is kept aside


def test_identical_redo_cuts_off_early_and_report_key_is_stable(write_pipeline, tmp_path: Path) -> None:
    """``--force`` runs exactly the matching partitions again (new run ids, the old outputs kept
    aside); their outputs are byte-identical, so every downstream key stays (early cutoff), and
    evaluate's results hold no timing, so a re-evaluation keeps the report's key."""
    pipeline, ws = write_pipeline(), tmp_path / "ws"
    runner = CliRunner()
    assert runner.invoke(main, ["run", str(pipeline), "-w", str(ws)]).exit_code == 0
    keys_before = {p: m.key for p, m in manifests(ws, "report").items()}
    for forced, expected in (("decompose@layer-000", {"decompose@layer-000"}),
                             ("evaluate", {"evaluate@dense", "evaluate@compressed"})):
        stage, _, partition = forced.partition("@")
        before = {p: m.run_id for p, m in manifests(ws, stage).items() if not partition or p == partition}
        result = runner.invoke(main, ["run", str(pipeline), "-w", str(ws), "-v", "--force", forced])
        redone = {line.split()[1] for line in result.output.splitlines() if line.startswith("run ")}
        assert result.exit_code == 0 and redone == expected, redone
        after = manifests(ws, stage)
        assert all(after[p].run_id != run_id for p, run_id in before.items())  # they did run again
        assert all(list((ws / "stages" / stage / p).glob(".aside-*")) for p in before)  # the old ones kept aside
    assert {p: m.key for p, m in manifests(ws, "report").items()} == keys_before
    assert "nothing to do" in runner.invoke(main, ["run", str(pipeline), "-w", str(ws)]).output
