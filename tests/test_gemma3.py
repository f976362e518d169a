"""Gemma 3 (``gemma3_text``) end to end on a tiny random model: sliding-window and global attention
blocks, q/k norms, a norm after each sublayer, tied embeddings. The pipeline runs the methods that
apply, the assembled model reloads with no missing key, and the ones that cannot run on this
architecture say so in one line before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from stagepipe.cli import main
from stagepipe.config import load_pipeline
from stagepipe.engine.stage import ALL, PartitionRef
from stagepipe.stagekit import artifacts
from stagepipe.stages import make_runner
from tests.conftest import TINY, merge

#: two sliding-window blocks and two global ones; 32-token windows, past the 16-token window
GEMMA = merge(TINY, {"model": {"source": "tiny", "arch": "gemma3", "num_layers": 4, "hidden": 32, "intermediate": 64,
                               "num_heads": 4, "num_kv_heads": 2}})


def _write(tmp: Path, name: str, **updates) -> Path:
    data = merge(GEMMA, {"name": name, **updates})
    if "allocation" in updates and updates["allocation"] is None:
        del data["allocation"]
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


CASES = {
    "svdllm": {"method": {"name": "svdllm"}},
    "kfac_svd-greedy": {"method": {"name": "kfac_svd"}, "allocation": {"policy": "global_greedy", "align": 4}},
    "gfwsvd": {"method": {"name": "gfwsvd", "max_sweeps": 2}},
    "aasvd-refine": {"method": {"name": "aasvd", "refine_epochs": 1, "refine_batch": 2}},
    "soco": {"method": {"name": "soco", "base": "kfac_svd", "explore_epochs": 1, "refine_epochs": 1, "sparsify_epochs": 1,
                        "tune_epochs": 1, "lr": 0.05}, "allocation": None},
    "dobi_svd": {"method": {"name": "dobi_svd", "epochs": 1}, "allocation": None},
}


@pytest.mark.parametrize("case", list(CASES))
def test_methods_run_on_gemma3_and_the_model_reloads(tmp_path: Path, case: str) -> None:
    pipeline = _write(tmp_path, case.replace("-", "_"), **CASES[case])
    ws = tmp_path / "ws"
    result = CliRunner().invoke(main, ["run", str(pipeline), "-w", str(ws)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    found = {e.ref: e.state.output for e in make_runner(load_pipeline(pipeline), ws).states()}
    report = json.loads((found[PartitionRef("report", ALL)] / "report.json").read_text())
    assert all(v < float("inf") for v in report["perplexity"]["compressed"].values())
    assert report["ratios"]["kept_over_target_matrices"] <= 0.8 + 1e-9
    model, info = AutoModelForCausalLM.from_pretrained(artifacts.model_dir(found[PartitionRef("assemble", ALL)]),
                                                       trust_remote_code=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied


@pytest.mark.parametrize(("method", "expected"), [
    ({"name": "modegpt"}, "no structured model class for 'gemma3_text'"),
    ({"name": "aasvd", "refine_epochs": 1, "refine_metric": "kfac_out"}, "a norm follows the last linear"),
])
def test_what_cannot_run_on_gemma3_says_so_in_one_line_before_anything_runs(tmp_path: Path, method: dict,
                                                                             expected: str) -> None:
    pipeline = _write(tmp_path, "refused", method=method)
    result = CliRunner().invoke(main, ["run", str(pipeline), "-w", str(tmp_path / "ws")])
    assert result.exit_code == 2, result.output
    assert expected in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "ws" / "stages").exists() or not any((tmp_path / "ws" / "stages").iterdir())
