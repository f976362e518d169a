"""The ``quantize_factors`` stage (issue #33 item 4b): a low-rank model's factors (and dense-kept
targets) on an integer grid — stored bytes equal the accounting and the files, the model loads
through ``GridLinear`` factors with the logits of the decoded weights, GPTQ beats round-to-nearest
on every target, and a method without factors refuses the option in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from stagepipe.accounting import factor_grid_memory_report
from stagepipe.cli import main
from stagepipe.config import load_pipeline
from stagepipe.io import manifest as manifest_io
from stagepipe.io import safetensors_io
from stagepipe.models.layout import block_linear_shapes
from stagepipe.quantize import Grid, dequantize_stored
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.plan import make_plan
from tests.conftest import TINY, assert_kill_resumes_identically, finished_outputs, merge

GRID = {"bits": 4, "group_size": 16}


def run(tmp: Path, name: str, quantizer: str, policy: str = "global_greedy") -> tuple[Path, Path, dict]:
    data = merge(TINY, {"name": name, "target": {"kept_fraction": 0.7}, "allocation": {"policy": policy, "align": 4},
                        "method": {"name": "svdllm", "quantize_factors": {**GRID, "quantizer": quantizer}}})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    result = CliRunner().invoke(main, ["run", str(path), "-w", str(tmp / "ws")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return path, tmp / "ws", json.loads((finished_outputs(tmp / "ws")["report@all"] / "report.json").read_text())


@pytest.fixture(scope="module")
def gptq_factors(tmp_path_factory) -> tuple[Path, Path, dict]:
    return run(tmp_path_factory.mktemp("qf"), "qf", "gptq")


def test_the_stage_assembles_after_the_factors_it_quantises(gptq_factors) -> None:
    plan = make_plan(load_pipeline(gptq_factors[0]))
    assert plan.assembler == "quantize_factors"
    assert plan.stages.index("decompose") < plan.stages.index("allocate") < plan.stages.index("quantize_factors")


def test_bytes_equal_the_accounting_and_the_files_and_logits_the_decoded_weights(gptq_factors) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    _, ws, report = gptq_factors
    outputs = finished_outputs(ws)
    model_dir = outputs["assemble@all"] / "model"
    ranks = artifacts.read_ranks(outputs["allocate@all"])
    assert any(r is None for r in ranks.values()) and any(r is not None for r in ranks.values())  # both kinds
    shapes = block_linear_shapes(AutoConfig.from_pretrained(outputs["snapshot@all"] / "model"))
    accounted = factor_grid_memory_report(shapes, ranks, Grid(4, 16, symmetric=True), None)
    loaded, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=True,
                                                        output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    dense = AutoModelForCausalLM.from_pretrained(outputs["snapshot@all"] / "model", dtype=torch.float32)
    state, on_disk = dense.state_dict(), 0
    grid = Grid(4, 16, symmetric=True)
    for shard in model_dir.glob("layer-*.safetensors"):
        tensors = safetensors_io.read(shard)
        packed = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_packed")}
        on_disk += sum(t.numel() * t.element_size() for k, t in tensors.items() if k.rsplit(".", 1)[0] in packed)

        def decoded(owner: str, tensors: dict = tensors) -> torch.Tensor:
            return dequantize_stored({k.rsplit(".", 1)[1]: t for k, t in tensors.items() if k.rsplit(".", 1)[0] == owner}, grid)

        for owner in packed:
            if owner.endswith(".down"):
                linear = owner.removesuffix(".down")
                state[f"{linear}.weight"] = (decoded(f"{linear}.up") @ decoded(owner)).float()
            elif not owner.endswith(".up"):
                state[f"{owner}.weight"] = decoded(owner).float()
    assert report["ratios"]["memory"]["stored_bytes"] == accounted.stored_bytes == on_disk
    assert report["ratios"]["kept_over_target_matrices"] <= 0.7 + 1e-9  # the allocation's parameters, as before
    dense.load_state_dict(state)
    ids = torch.randint(0, dense.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    kinds = {type(m).__name__ for m in loaded.modules()}
    assert {"LowRankLinear", "GridLinear"} <= kinds


def test_gptq_beats_rtn_on_every_target_of_the_first_block(gptq_factors, tmp_path) -> None:
    """Block 0 sees the embeddings either way, so its Grams are equal for both quantisers: GPTQ's
    output error under them is below round-to-nearest's on every target of that block."""
    _, ws, _ = gptq_factors
    _, rtn_ws, _ = run(tmp_path, "qf_rtn", "rtn")
    ours = manifest_io.read(finished_outputs(ws)["quantize_factors@layer-000"]).diagnostics["linears"]
    theirs = manifest_io.read(finished_outputs(rtn_ws)["quantize_factors@layer-000"]).diagnostics["linears"]
    assert ours.keys() == theirs.keys()
    for name, item in ours.items():
        assert item["quantization_rel_err"] < theirs[name]["quantization_rel_err"], name


def test_a_structured_or_quantising_method_refuses_it(tmp_path: Path) -> None:
    data = merge(TINY, {"name": "bad", "method": {"name": "gptq", "quantize_factors": GRID}})
    del data["allocation"]
    data["target"] = {"bits_per_weight": 8}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    result = CliRunner().invoke(main, ["run", str(path), "-w", str(tmp_path / "ws")])
    assert result.exit_code != 0 and "method.quantize_factors" in result.output, result.output


def test_kill_inside_quantize_factors_resumes_bit_identically(gptq_factors, tmp_path: Path) -> None:
    path, reference, _ = gptq_factors
    assert_kill_resumes_identically(path, reference, "quantize_factors@layer-001", tmp_path)


def test_with_refit_it_quantises_the_refitted_factors(tmp_path: Path) -> None:
    """Refit reads decompose's factors, this stage refit's, and it is the assembler (no cycle)."""
    data = merge(TINY, {"name": "qf_refit", "method": {"name": "svdllm", "refit": True, "quantize_factors": GRID}})
    path = tmp_path / "qf_refit.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    plan = make_plan(load_pipeline(path))
    assert plan.assembler == "quantize_factors"
    assert "refit" in plan.needs("quantize_factors") and "quantize_factors" not in plan.needs("refit")
    assert "decompose" in plan.needs("refit")
    assert plan.stages.index("refit") < plan.stages.index("quantize_factors") < plan.stages.index("assemble")
