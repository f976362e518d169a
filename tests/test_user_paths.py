"""What a user runs, run here: the README's commands through the installed console script,
``--dry-run`` on every bundled pipeline, the executor and selector options and their errors, ``gc``
on a workspace two pipelines share, and the model and text sources beyond their error paths."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from stagepipe.cli import main
from stagepipe.config import load_pipeline
from stagepipe.engine.stage import ALL, PartitionRef
from stagepipe.io.hashing import sha256_file
from stagepipe.stagekit import artifacts
from stagepipe.stages import build_pipeline, make_runner
from tests.conftest import runnable_bundled

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def outputs(pipeline: Path, ws: Path) -> dict[PartitionRef, Path]:
    return {e.ref: e.state.output for e in make_runner(load_pipeline(pipeline), ws).states()}


# --------------------------------------------------------------------------- the README
def readme_commands() -> list[str]:
    """Every line of the README's fenced ``bash`` blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_the_readme_shows_the_setup_commands_and_ci_runs_the_test_command() -> None:
    commands = readme_commands()
    demo = next(c for c in commands if "stagepipe run" in c and "smollm2_demo" in c)
    tests = next(c for c in commands if "pytest" in c)
    assert demo == "bash scripts/setup.sh && .venv/bin/stagepipe run pipelines/smollm2_demo.yaml"
    assert tests == "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh" in ci and ".venv/bin/python -m pytest -q" in ci
    assert (ROOT / "pipelines" / "smollm2_demo.yaml").is_file()


def test_the_readme_plumbing_command_runs_through_the_console_script(tmp_path: Path) -> None:
    """The README's tiny-model command, executed as written from a directory laid out like the
    checkout (its ``.venv`` and ``pipelines``): the default workspace ``workspace/<name>``, a
    summary, a clean ``status`` and ``verify``, and a second run that has nothing to do."""
    command = next(c for c in readme_commands() if c.endswith("stagepipe run pipelines/tiny_demo.yaml"))
    assert command == ".venv/bin/stagepipe run pipelines/tiny_demo.yaml"
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "pipelines").symlink_to(ROOT / "pipelines")

    def sh(line: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True, timeout=600)

    done = sh(command)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "perplexity compressed synthetic-test=" in done.stdout
    ws = tmp_path / "workspace" / "tiny_demo"
    assert (ws / "pipeline.json").is_file() and list(ws.glob("stages/assemble/all/*/model/config.json"))
    status = sh(".venv/bin/stagepipe status pipelines/tiny_demo.yaml")
    assert status.returncode == 0 and "corrupt" not in status.stdout and "report       1 done" in status.stdout
    verify = sh(".venv/bin/stagepipe verify pipelines/tiny_demo.yaml")
    assert verify.returncode == 0 and re.search(r"verified \d+ partition\(s\), 0 corrupt", verify.stdout), verify.stdout
    again = sh(command)
    assert again.returncode == 0 and "nothing to do" in again.stdout


# --------------------------------------------------------------------------- --dry-run
BUNDLED = sorted((ROOT / "pipelines").rglob("*.yaml"))


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_every_bundled_pipeline_plans_without_loading_a_model(path: Path, tmp_path: Path, monkeypatch) -> None:
    """``--dry-run`` prints a plan row for exactly the stages the pipeline runs and the workspace's
    size, from the model's config alone (a hub model's from its ``shape_hint``: no network, no
    weights), and writes nothing."""
    import transformers

    path = runnable_bundled(path, tmp_path)  # before loading is refused: a script's model dir made here if absent

    def refuse(*_, **__):
        raise AssertionError("a dry run loaded model weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr("stagepipe.models.sources.load_model", refuse)
    ws = tmp_path / "ws"
    code, output = cli("run", str(path), "--dry-run", "-w", str(ws))
    assert code == 0, output
    rows = [line.split()[0] for line in output.split("\nstage ")[1].splitlines()[1:] if line and not line.startswith(
        ("time:", "workspace:", "disk budget"))]
    assert rows == build_pipeline(load_pipeline(path)).names
    assert re.search(r"workspace: [\d.]+ [MG]B at the end, [\d.]+ [MG]B at its peak", output)
    assert not ws.exists()  # planned, not run


# --------------------------------------------------------------------------- executor and selectors
def test_executor_options_and_their_errors(write_pipeline, tmp_path: Path) -> None:
    pipeline = write_pipeline(executor={"kind": "ray"})
    code, output = cli("run", str(pipeline), "-w", str(tmp_path / "a"), "--executor", "ray", "--ray-address",
                       "127.0.0.1:1")
    assert code == 1 and output.strip().splitlines() == [
        "error: Ray address '127.0.0.1:1': nothing answers there (Connection refused); start a cluster "
        "(ray start --head) or pass --ray-address auto"]
    code, output = cli("run", str(pipeline), "-w", str(tmp_path / "b"), "--executor", "local", "-v")
    assert code == 0 and "perplexity compressed" in output  # the override runs the Ray pipeline in process
    nodes = {json.loads((p.parent / "manifest.json").read_text())["host"] for p in (tmp_path / "b").glob("stages/*/*/*/manifest.json")}
    assert len(nodes) == 1
    code, output = cli("run", str(pipeline), "-w", str(tmp_path / "c"), "--executor", "slurm")
    assert code == 2 and "Invalid value for '--executor'" in output


def test_selector_errors_are_one_line(write_pipeline, tmp_path: Path) -> None:
    pipeline, ws = write_pipeline(), tmp_path / "ws"
    for args, message in (
        (["--force", "decompse"], "unknown stage 'decompse' in 'decompse'; this pipeline's stages: snapshot, tokenize"),
        (["--only", "decompose"], "decompose@layer-000 cannot run: its upstream is not done; run without --only first"),
    ):
        code, output = cli("run", str(pipeline), "-w", str(ws), *args)
        lines = output.strip().splitlines()
        assert code == 1 and len(lines) == 1 and message in lines[0], output
    assert cli("run", str(pipeline), "-w", str(ws))[0] == 0
    code, output = cli("run", str(pipeline), "-w", str(ws), "--force", "decompose@layer-009")
    assert code == 1 and "unknown partition 'decompose@layer-009'; decompose has layer-000, layer-001" in output


def test_gc_on_a_workspace_two_pipelines_share(write_pipeline, tmp_path: Path) -> None:
    """SVD-LLM and ASVD in one workspace share the snapshot and tokens; gc for one lists the other's
    own outputs, gc for both lists nothing, and deleting for one leaves it runnable as it was."""
    ws = tmp_path / "ws"
    svdllm, asvd = write_pipeline("svdllm"), write_pipeline("asvd", method={"name": "asvd"})
    for pipeline in (svdllm, asvd):
        assert cli("run", str(pipeline), "-w", str(ws))[0] == 0
    code, both = cli("gc", str(svdllm), str(asvd), "-w", str(ws))
    assert code == 0 and "0 item(s)" in both
    code, listing = cli("gc", str(svdllm), "-w", str(ws))
    listed = {line.split()[2].split("/")[1] for line in listing.splitlines() if "(" in line and "stages/" in line}
    assert code == 0 and listed == {"capture", "decompose", "allocate", "assemble", "evaluate", "report"}
    assert "snapshot" not in listing and "tokenize" not in listing  # shared: kept
    assert cli("gc", str(svdllm), "-w", str(ws), "--yes")[0] == 0
    assert "nothing to do" in cli("run", str(svdllm), "-w", str(ws))[1]
    code, status = cli("status", str(asvd), "-w", str(ws))
    assert code == 0 and "capture      1 stale, 1 waiting" in status and "snapshot     1 done" in status


# --------------------------------------------------------------------------- sources and options
def test_a_local_model_directory_compresses_like_its_source(write_pipeline, tmp_path: Path) -> None:
    """``model: {source: local}`` on the tiny model's snapshot directory: the same weights give the
    same factors, bit for bit, and the same perplexities."""
    tiny = write_pipeline("tiny")
    assert cli("run", str(tiny), "-w", str(tmp_path / "tiny"))[0] == 0
    found = outputs(tiny, tmp_path / "tiny")
    local = write_pipeline("local", model={"source": "local", "path": str(artifacts.model_dir(found[PartitionRef("snapshot", ALL)]))})
    code, output = cli("run", str(local), "-w", str(tmp_path / "local"))
    assert code == 0, output
    mine = outputs(local, tmp_path / "local")
    for layer in ("layer-000", "layer-001"):
        ours, theirs = (sha256_file(o[PartitionRef("decompose", layer)] / artifacts.WEIGHTED_SVD) for o in (mine, found))
        assert ours == theirs, layer
    ppl = [artifacts.read_results(o[PartitionRef("evaluate", "compressed")])["datasets"]["syn"]["ppl"] for o in (mine, found)]
    assert ppl[0] == ppl[1]


def test_a_text_file_is_the_calibration_text(write_pipeline, tmp_path: Path) -> None:
    """``text: {source: text_file}``: the calibration windows are cut from that file's own token ids."""
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus.txt"
    words = ["stage", "pipe", "layer", "rank", "matrix", "whitening", "spectrum", "token", "budget", "model"]
    corpus.write_text(" ".join(words[(i * 7 + i // 3) % len(words)] for i in range(4000)))
    pipeline = write_pipeline("text", calibration={"text": {"source": "text_file", "path": str(corpus)}})
    code, output = cli("run", str(pipeline), "-w", str(tmp_path / "ws"))
    assert code == 0, output
    found = outputs(pipeline, tmp_path / "ws")
    tokenizer = AutoTokenizer.from_pretrained(artifacts.model_dir(found[PartitionRef("snapshot", ALL)]))
    ids = tokenizer(corpus.read_text(), add_special_tokens=False)["input_ids"]
    from stagepipe.io import zarr_io

    tokens = found[PartitionRef("tokenize", "calibration")] / artifacts.TOKENS
    windows, offsets = zarr_io.read(tokens, "input_ids"), zarr_io.read(tokens, "offsets")
    for window, offset in zip(windows, offsets, strict=True):
        assert window.tolist() == ids[offset: offset + len(window)]


def test_float32_svd_runs_and_stays_close_to_float64(write_pipeline, tmp_path: Path) -> None:
    """``svd_dtype: float32`` enters decompose's key and moves the spectrum by float32 rounding only."""
    double, single = write_pipeline("f64"), write_pipeline("f32", method={"name": "svdllm", "svd_dtype": "float32"})
    ws = tmp_path / "ws"
    for pipeline in (double, single):
        assert cli("run", str(pipeline), "-w", str(ws))[0] == 0
    a, b = outputs(double, ws), outputs(single, ws)
    ref = PartitionRef("decompose", "layer-001")
    assert a[ref] != b[ref]  # another key: another output directory
    moved = []
    for name, (_, _, sigma) in artifacts.read_spectra(a[ref]).items():
        other = artifacts.read_spectra(b[ref])[name][2]
        torch.testing.assert_close(other, sigma, rtol=1e-5, atol=1e-6 * float(sigma[0]), msg=name)
        moved.append(not torch.equal(other, sigma))
    assert any(moved)  # the float32 SVD did run
