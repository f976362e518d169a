"""``benchmarks/tune.py`` end to end on the tiny pipeline: it chooses on the validation split, says
with the paired bootstrap whether the choice is outside the noise, and reads the test split once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("entry", [["--entry", "svdllm", "--kept", "0.8"], []], ids=["grid point", "base file as it is"])
def test_tune_reports_whether_its_choice_is_outside_the_noise(tmp_path: Path, entry: list[str]) -> None:
    data = yaml.safe_load((ROOT / "pipelines" / "tiny_demo.yaml").read_text())
    data["calibration"]["validation"] = {"text": {"source": "synthetic", "n_words": 6000, "seed": 7}, "n_samples": 8}
    data["model"]["num_layers"] = 2
    base = tmp_path / "tiny_tune.yaml"
    base.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune.py"), "--base", str(base), *entry,
                           "--option", "floor_rel", "--values", "1e-6", "1e-2",
                           "--workspace", str(tmp_path / "ws"), "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    stem = "tuning_svdllm_floor_rel" if entry else f"tuning_{data['name']}_floor_rel"
    saved = json.loads((out / f"{stem}.json").read_text())
    points = {p["value"]: p for p in saved["validation"]}
    chosen = points[saved["chosen"]]
    assert chosen["validation"]["ppl"] == min(p["validation"]["ppl"] for p in points.values())
    assert chosen["against_chosen"]["ratio"] == 1.0 and not chosen["against_chosen"]["resolved"]
    others = [p for p in points.values() if p is not chosen]
    assert all(p["against_chosen"]["ratio"] >= 1.0 for p in others)
    assert saved["choice_outside_noise"] == all(p["against_chosen"]["resolved"] for p in others)
    text = (out / f"{stem}.md").read_text()
    assert ("outside the noise against every other value" in text) == saved["choice_outside_noise"]
    assert len(saved["test_of_chosen"]) == 1  # the test split: read once, for the chosen value
