"""CLI behaviour: one-line config errors with exit code 2, --help without torch, the driver lock."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from stagepipe.cli import main
from stagepipe.engine.workspace import Workspace


@pytest.mark.parametrize("updates,expected", [
    ({"target": {"kept_fraction": -0.2}}, "target.kept_fraction: Input should be greater than 0"),
    ({"method": {"name": "svdllm", "floor": 1e-3}}, "method.floor: unknown key"),
    ({"model": {"source": "local", "path": "does/not/exist"}}, "model.path: no such directory"),
    ({"method": {"name": "magic"}}, "method.name: unknown value 'magic'"),
    ({"calibration": {"validation": {"text": {"source": "synthetic", "n_words": 3000, "seed": 0}}}},
     "calibration.validation.text is the calibration text"),
    ({"calibration": {"validation": {"text": {"source": "synthetic", "n_words": 2000, "seed": 1}}}},
     "is evaluation dataset 'syn'; never tune on the test split"),
    ({"calibration": {"text": {"source": "news_articles", "split": "train"},
                      "validation": {"text": {"source": "news_articles", "split": "validation", "validation_articles": 50}}}},
     "the same validation_articles and test_articles"),
    ({"calibration": {"validation": {"text": {"source": "news_articles", "split": "validation"}}}},
     "split 'validation' needs validation_articles > 0"),
])
def test_config_errors_are_one_line_exit_2(write_pipeline, updates, expected) -> None:
    path = write_pipeline(**updates)
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and expected in lines[0], result.output


def test_unknown_top_level_key_and_bad_yaml(write_pipeline, tmp_path: Path) -> None:
    typo = write_pipeline(evalution={"seq_len": 8})  # misspelt top-level block
    result = CliRunner().invoke(main, ["status", str(typo)])
    assert result.exit_code == 2 and result.output.strip() == (
        f"error: {typo}: evalution: unknown key (check the spelling; see docs/user-guide.md for the schema)")
    other_policy = write_pipeline(allocation={"policy": "uniform", "candidates": [0.5]})  # asvd_search's key
    result = CliRunner().invoke(main, ["status", str(other_policy)])
    assert result.exit_code == 2 and "allocation.candidates: unknown key" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n  model: [\n")
    result = CliRunner().invoke(main, ["status", str(bad)])
    assert result.exit_code == 2 and f"error: {bad}: line 2: not valid YAML" in result.output


def test_help_does_not_import_torch() -> None:
    code = "import sys; from stagepipe.cli import main; sys.argv=['stagepipe','--help'];\n" \
           "try: main()\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_second_driver_refuses(write_pipeline, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    with Workspace(ws).lock():
        result = CliRunner().invoke(main, ["run", str(write_pipeline()), "-w", str(ws)])
    assert result.exit_code == 3 and "another stagepipe driver holds this workspace" in result.output


def test_failure_reports_partition_host_and_resume_command(write_pipeline, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("STAGEPIPE_TEST_FAIL_IN", "decompose@layer-000")
    path = write_pipeline()
    result = CliRunner().invoke(main, ["run", str(path), "-w", str(tmp_path / "ws")])
    assert result.exit_code == 1
    assert "decompose@layer-000 failed on" in result.output and f"resume with: stagepipe run {path}" in result.output


def test_operating_system_errors_are_one_line(write_pipeline, tmp_path: Path) -> None:
    """A workspace that cannot be created (here: below a regular file; likewise a read-only
    mount) is reported with its path in one line, not a traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = CliRunner().invoke(main, ["run", str(write_pipeline()), "-w", str(blocker / "ws")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and str(blocker) in lines[0]


def test_methods_command_lists_the_registries() -> None:
    from stagepipe.allocation import POLICIES
    from stagepipe.methods import METHODS

    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0
    listed = {line.split()[0] for line in result.output.splitlines() if line.startswith("  ")}
    assert listed == set(METHODS) | set(POLICIES)


def test_unusable_inputs_are_one_line_exit_2_and_nothing_runs(write_pipeline, tmp_path: Path) -> None:
    """A GGUF package without its file and a text file that is not UTF-8 fail before any stage runs,
    in one line naming the pipeline file, the key and the file."""
    binary = tmp_path / "corpus.txt"
    binary.write_bytes(b"fine words \xff\xfe not text")
    cases = [
        (write_pipeline("gg", model={"source": "gguf", "package": "stagepipe", "file": "missing.gguf"}),
         "model.file: 'missing.gguf' not found in"),
        (write_pipeline("tx", calibration={"text": {"source": "text_file", "path": str(binary)}}),
         f"calibration.text: {binary}: not UTF-8 text (byte 0xff near offset 11)"),
    ]
    for path, expected in cases:
        ws = tmp_path / f"ws-{path.stem}"
        result = CliRunner().invoke(main, ["run", str(path), "-w", str(ws)])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert lines[0].startswith(f"error: {path}: ") and expected in lines[0], lines[0]
        assert not list(ws.glob("stages/*/*/*/manifest.json"))
