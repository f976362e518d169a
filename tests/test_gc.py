"""``stagepipe gc``: frees superseded keys, outputs moved aside and dead runs' leftovers; never an
output that a given pipeline still uses. Also the user-facing bits of #16 that go with it:
``status`` shows the workspace size, the summary names the model directory, model files are 0644."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from click.testing import CliRunner

from stagepipe.cli import main
from stagepipe.engine.gc import tree_size


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_gc_frees_superseded_outputs_and_keeps_what_a_pipeline_uses(write_pipeline, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    old = write_pipeline("old", target={"kept_fraction": 0.8})
    new = write_pipeline("new", target={"kept_fraction": 0.5})
    assert cli("run", str(old), "-w", str(ws))[0] == 0
    code, output = cli("run", str(new), "-w", str(ws))
    assert code == 0 and f"model: {ws}" in output  # the summary names the compressed model directory
    leftover = ws / "stages" / "decompose" / "layer-000" / ".tmp-0123456789abcdef-deadbeef"
    leftover.mkdir()
    (leftover / "partial.bin").write_bytes(b"x" * 1000)

    code, listing = cli("gc", str(old), str(new), "-w", str(ws))  # both pipelines: only the dead run's temp dir
    assert code == 0 and "1 item(s)" in listing and "left by a dead run" in listing

    before = tree_size(ws / "stages")
    code, listing = cli("gc", str(new), "-w", str(ws))
    superseded = [line for line in listing.splitlines() if "superseded key" in line]
    stages = {line.split()[2].split("/")[1] for line in superseded}
    assert code == 0 and stages == {"allocate", "assemble", "evaluate", "report"}  # 0.8's own outputs only
    assert tree_size(ws / "stages") == before  # listing deletes nothing

    code, output = cli("gc", str(new), "-w", str(ws), "--yes")
    assert code == 0 and "freed" in output and tree_size(ws / "stages") < before
    assert not leftover.exists()
    code, output = cli("run", str(new), "-w", str(ws))
    assert code == 0 and "nothing to do" in output  # everything the new pipeline uses survived
    code, output = cli("status", str(old), "-w", str(ws))
    assert code == 0 and "allocate     1 stale" in output and f"workspace {ws}:" in output  # 0.8 is gone


def test_model_files_are_readable_by_others(write_pipeline, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    assert cli("run", str(write_pipeline()), "-w", str(ws))[0] == 0
    shards = list((ws / "stages" / "assemble" / "all").glob("*/model/*.safetensors"))
    umask = os.umask(0)
    os.umask(umask)
    assert shards and all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask for p in shards)
