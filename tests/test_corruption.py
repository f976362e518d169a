"""Nothing corrupt is ever read: same-size damage to any finished file — a safetensors shard, a
zarr chunk, a JSON result, the manifest itself — is found by ``status`` (exit 1), and the next
``run`` redoes exactly that partition; the redo is bit-identical, so no downstream key moves
(early cutoff) and the assembled model is unchanged. A task also checks its inputs before it
reads them (a file damaged after the driver looked) and refuses to start."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from stagepipe.cli import main
from stagepipe.config import load_pipeline
from stagepipe.engine.stage import PartitionRef
from stagepipe.engine.task import Task, execute
from stagepipe.io.hashing import sha256_file
from stagepipe.stages import make_runner
from tests.conftest import started_partitions


def flip(path: Path, offset: int | None = None) -> None:
    """Change one byte in the middle of ``path`` (same size, so no size check can see it)."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def digit_in_manifest(path: Path) -> None:
    """Edit a number inside a manifest so that it still parses (a changed result, not garbage)."""
    text = path.read_text()
    at = text.index('"wall_s": ') + len('"wall_s": ')
    digit = next(i for i in range(at, at + 30) if text[i].isdigit() and text[i] != "0")
    path.write_text(text[:digit] + "0" + text[digit + 1:])


def tree(ws: Path) -> dict[str, str]:
    """Every finished output file (not the report, whose JSON holds timings), hashed."""
    return {str(p.relative_to(ws)): sha256_file(p) for p in sorted(ws.glob("stages/*/*/*/**/*"))
            if p.is_file() and "/report/" not in str(p) and p.name != "manifest.json"
            and not any(part.startswith(".") for part in p.relative_to(ws).parts)}


#: (partition, file inside its output, how it is damaged)
DAMAGE = [
    ("decompose@layer-001", "svd.safetensors", flip),
    ("capture@layer-000", "hidden.zarr/hidden/c/1/0/0", flip),
    ("capture@layer-001", "stats.zarr/gram.self_attn.q_proj/c/0/0", flip),
    ("tokenize@calibration", "tokens.zarr/input_ids/c/0/0", flip),
    ("allocate@all", "allocation.json", lambda p: flip(p, p.read_text().index('"ranks"') + 3)),
    ("evaluate@compressed", "results.json", lambda p: flip(p, p.read_text().index('"ppl"') + 9)),
    ("assemble@all", "model/layer-000.safetensors", flip),
    ("decompose@layer-000", "manifest.json", digit_in_manifest),
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    import yaml

    from tests.conftest import TINY

    tmp = tmp_path_factory.mktemp("corrupt")
    pipeline = tmp / "tiny.yaml"
    pipeline.write_text(yaml.safe_dump(TINY, sort_keys=False))
    ws = tmp / "ws"
    assert CliRunner().invoke(main, ["run", str(pipeline), "-w", str(ws)]).exit_code == 0
    return pipeline, ws, tree(ws)


def output_of(pipeline: Path, ws: Path, ref: str) -> Path:
    states = {e.ref: e.state for e in make_runner(load_pipeline(pipeline), ws).states()}
    return states[PartitionRef.parse(ref)].output


@pytest.mark.parametrize("ref,file,damage", DAMAGE, ids=[f"{r}:{f.split('/')[0]}" for r, f, _ in DAMAGE])
def test_same_size_damage_is_found_and_exactly_that_partition_is_redone(finished, ref: str, file: str, damage) -> None:
    pipeline, ws, before = finished
    target = output_of(pipeline, ws, ref) / file
    size = target.stat().st_size
    damage(target)
    assert target.stat().st_size == size
    status = CliRunner().invoke(main, ["status", str(pipeline), "-w", str(ws), "-v"])
    assert status.exit_code == 1 and f"{ref}" in status.output and "corrupt" in status.output, status.output
    line = next(li for li in status.output.splitlines() if li.strip().startswith(ref))
    assert "corrupt" in line and (file.split("/")[0] in line or file == "manifest.json"), line
    result = CliRunner().invoke(main, ["run", str(pipeline), "-w", str(ws), "-v"])
    assert result.exit_code == 0, result.output
    assert started_partitions(result) == [ref]  # nothing upstream, nothing downstream: same content, same keys
    assert tree(ws) == before  # bit-identical, the assembled model included
    assert CliRunner().invoke(main, ["status", str(pipeline), "-w", str(ws)]).exit_code == 0


def test_a_task_refuses_an_input_damaged_after_the_driver_looked(finished, tmp_path: Path) -> None:
    pipeline, ws, _ = finished
    runner = make_runner(load_pipeline(pipeline), ws)
    entry = next(e for e in runner.states() if str(e.ref) == "decompose@layer-000")
    stats = output_of(pipeline, ws, "capture@layer-000") / "stats.zarr" / "gram.self_attn.q_proj" / "c" / "0" / "0"
    original = stats.read_bytes()
    flip(stats)
    try:
        task = Task(workspace=str(ws), config=runner.config, facts=runner.ctx.facts, plan=runner.ctx.plan,
                    stage=runner.pipeline.stage("decompose"),
                    partition="layer-000", key="f" * 64, key_material=entry.material, inputs=entry.inputs, run_id="t")
        result = execute(task)
        assert not result.ok and result.corrupt_input == "capture@layer-000"
        assert "content hash differs" in result.error and "gram.self_attn.q_proj" in result.error
        assert not (ws / "stages" / "decompose" / "layer-000" / ("f" * 16)).exists()  # nothing committed
    finally:
        stats.write_bytes(original)
