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
    """Under ``CI=true`` a skipped test fails the run: a missing package (Ray, the demo model) must
    not turn a test suite green by skipping what it could not run."""
    if os.environ.get("CI") != "true":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        names = ", ".join(sorted({r.nodeid for r in skipped})[:5])
        reporter.write_line(f"CI=true: {len(skipped)} skipped test(s) fail the run: {names}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
