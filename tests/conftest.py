"""Shared fixtures: tiny pipeline files written into a temporary directory."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

TINY: dict[str, Any] = {
    "name": "tiny",
    "model": {"source": "tiny", "arch": "llama", "num_layers": 2, "hidden": 32, "intermediate": 64,
              "num_heads": 4, "num_kv_heads": 2},
    "calibration": {"text": {"source": "synthetic", "n_words": 3000, "seed": 0}, "n_samples": 6, "seq_len": 32},
    "method": {"name": "svdllm"},
    "target": {"kept_fraction": 0.8},
    "allocation": {"policy": "uniform", "align": 4},
    "evaluation": {"datasets": [{"name": "syn", "text": {"source": "synthetic", "n_words": 2000, "seed": 1}}],
                   "seq_len": 64, "batch_size": 4},
    "runtime": {"batch_size": 2, "threads": 1},
}


def learned_pipeline(tmp: Path, name: str, kept: float, method: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """The tiny pipeline with a learned method (SoCo, Dobi-SVD): no allocation block, it learns every
    rank (``extra``: more keys merged in, e.g. validation windows)."""
    data = merge(TINY, {"name": name, "method": method, "target": {"kept_fraction": kept}, **(extra or {})})
    del data["allocation"]
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def learned_run(tmp: Path, name: str, kept: float, method: dict[str, Any],
                extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """(pipeline file, workspace) of a finished run of the tiny pipeline with a learned method."""
    from click.testing import CliRunner

    from stagepipe.cli import main

    pipeline, ws = learned_pipeline(tmp, name, kept, method, extra), tmp / "ws"
    result = CliRunner().invoke(main, ["run", str(pipeline), "-w", str(ws)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return pipeline, ws


def train_killed_and_resumed(pipeline: Path, tmp: Path, skip: int) -> tuple[Any, Any]:
    """Run ``pipeline`` once uninterrupted and once SIGKILLed after checkpoint ``skip + 1`` of the
    ``train`` stage and resumed (CLI subprocesses); the two ``train`` manifests (resumed, reference)."""
    import subprocess
    import sys

    from stagepipe.config import load_pipeline
    from stagepipe.engine.stage import ALL, PartitionRef
    from stagepipe.io import manifest as manifest_io
    from stagepipe.stages import make_runner

    def stagepipe(ws: Path, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "stagepipe.cli", "run", str(pipeline), "-w", str(ws)],
                              capture_output=True, text=True, env={**os.environ, **env}, timeout=600)

    def train(ws: Path) -> Any:
        states = {e.ref: e.state.output for e in make_runner(load_pipeline(pipeline), ws).states()}
        return manifest_io.read(states[PartitionRef("train", ALL)])

    reference, ws = tmp / "reference", tmp / "killed"
    assert stagepipe(reference).returncode == 0
    killed = stagepipe(ws, STAGEPIPE_TEST_KILL_AT="train-saved@train@all", STAGEPIPE_TEST_KILL_SKIP=str(skip))
    assert killed.returncode == -9, killed.stdout + killed.stderr
    resumed = stagepipe(ws)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return train(ws), train(reference)


def merge(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and "source" not in value and "name" not in value:
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def write_pipeline(tmp_path: Path):
    """``write_pipeline(**updates) -> Path`` of a YAML file for the tiny pipeline with updates merged."""

    def write(name: str = "tiny", **updates: Any) -> Path:
        data = merge(TINY, updates)
        data["name"] = name
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skipped or xfailed test fails the run, here as in CI: a missing package (Ray, the demo
    model) must not turn the suite green by skipping what it could not run (``scripts/setup.sh``
    installs everything the suite needs)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    skipped = [*reporter.stats.get("skipped", []), *reporter.stats.get("xfailed", []), *reporter.stats.get("xpassed", [])]
    if skipped:
        names = ", ".join(sorted({r.nodeid for r in skipped})[:5])
        reporter.write_line(f"{len(skipped)} skipped or xfailed test(s) fail the run: {names}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def cli_run(pipeline: Path, ws: Path, **env: str) -> Any:
    """``stagepipe run PIPELINE -w WS -v`` in a subprocess (``env``: kill points and the like)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "stagepipe.cli", "run", str(pipeline), "-w", str(ws), "-v"],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=600)


def started_partitions(result: Any) -> list[str]:
    """Every partition a ``run -v`` started (its ``run  <stage@partition> (why)`` lines), in order."""
    return [line.split()[1] for line in result.stderr.splitlines() if line.split()[:1] == ["run"]]


def partition_states(pipeline: Path, ws: Path) -> dict:
    """``{PartitionRef: runner entry}`` of a workspace for a pipeline file."""
    from stagepipe.config import load_pipeline
    from stagepipe.stages import make_runner

    return {e.ref: e for e in make_runner(load_pipeline(pipeline), ws).states()}


def finished_outputs(ws: Path) -> dict[str, Path]:
    """stage@partition → its finished output directory (one key per partition in these runs)."""
    from stagepipe.io import manifest as manifest_io

    return {f"{m.stage}@{m.partition}": p.parent for p in sorted(ws.glob("stages/*/*/[!.]*/manifest.json"))
            if (m := manifest_io.read(p.parent))}


def keys_and_digests(ws: Path) -> dict[str, tuple[str, str]]:
    """Key and content digest of every finished partition but the report (it records timings)."""
    from stagepipe.io import manifest as manifest_io

    out = {}
    for ref, path in finished_outputs(ws).items():
        manifest = manifest_io.read(path)
        if manifest.stage != "report":
            out[ref] = (manifest.key, manifest.content_digest())
    return out


def assert_kill_resumes_identically(pipeline: Path, reference: Path, partition: str, tmp: Path) -> None:
    """SIGKILL once ``partition``'s tensors are written (before its manifest), resume, and compare every
    key and content digest with the uninterrupted run in ``reference``."""
    import subprocess
    import sys

    def stagepipe(ws: Path, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "stagepipe.cli", "run", str(pipeline), "-w", str(ws)],
                              capture_output=True, text=True, env={**os.environ, **env}, timeout=600)

    ws = tmp / "killed"
    killed = stagepipe(ws, STAGEPIPE_TEST_KILL_AT=f"safetensors-written@{partition}")
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert partition not in finished_outputs(ws)
    resumed = stagepipe(ws)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert keys_and_digests(ws) == keys_and_digests(reference)


def runnable_bundled(path: Path, tmp: Path) -> Path:
    """A bundled pipeline as the tests can load it: a ``model: {source: local}`` directory that a script
    makes first (the delta pipelines' fine-tune, ``scripts/finetune_shakespeare.py``) and that this
    checkout lacks is replaced by the tiny model saved under ``tmp``; every other key is the file's."""
    data = yaml.safe_load(path.read_text())
    model = data.get("model", {})
    if model.get("source") != "local" or (path.parent / model["path"]).exists():
        return path
    from stagepipe.config import TinyModel
    from stagepipe.models.sources import load_model

    directory = tmp / "made_by_a_script"
    if not directory.exists():
        tiny, tokenizer = load_model(TinyModel(**TINY["model"]))
        tiny.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    data["model"] = {"source": "local", "path": str(directory)}
    copy_path = tmp / path.name
    copy_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return copy_path


def run_report(path: Path, ws: Path) -> dict:
    """``stagepipe run PATH -w WS`` in process (it must succeed) and the report it leaves."""
    import json

    from click.testing import CliRunner

    from stagepipe.cli import main

    result = CliRunner().invoke(main, ["run", str(path), "-w", str(ws)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((finished_outputs(ws)["report@all"] / "report.json").read_text())
