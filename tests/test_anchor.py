"""The ``anchor`` stage (AA-SVD) on the tiny model: the closed form on unshifted inputs is SVD-LLM,
the shifted objective is what the stage minimises, refinement never worsens the block output,
and a SIGKILL inside refinement resumes to bit-identical factors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from stagepipe.cli import main
from stagepipe.config import load_pipeline
from stagepipe.engine.stage import ALL, PartitionRef
from stagepipe.io import manifest as manifest_io
from stagepipe.stages import artifacts, make_runner
from tests.conftest import TINY, merge

AASVD = {"name": "aasvd", "refine_epochs": 3, "refine_lr": 1e-3, "refine_batch": 1}


def run_cli(*args: str) -> str:
    """The command's output; ``run`` gets ``-v`` so its per-partition run/done lines are in it."""
    args = (*args, "-v") if args[0] == "run" else args
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def outputs(pipeline: Path, ws: Path) -> dict[PartitionRef, Path]:
    return {e.ref: e.state.output for e in make_runner(load_pipeline(pipeline), ws).states()}


@pytest.fixture(scope="module")
def refined(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("aasvd")
    pipeline = tmp / "aasvd.yaml"
    pipeline.write_text(yaml.safe_dump(merge(TINY, {"name": "aasvd", "method": AASVD, "target": {"kept_fraction": 0.5}})))
    ws = tmp / "ws"
    out = run_cli("run", str(pipeline), "-w", str(ws))
    assert "anchor@layer-001" in out and "perplexity compressed" in out
    return pipeline, ws


def test_first_group_of_layer_0_is_svdllm(refined) -> None:
    """Block 0's q/k/v see the embeddings on both paths (``Ŷ = Y``): their anchored factors are
    SVD-LLM's (decompose's weighted SVD truncated to the same rank)."""
    pipeline, ws = refined
    state = outputs(pipeline, ws)
    ranks = artifacts.read_ranks(state[PartitionRef("allocate", ALL)])
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    svdllm = artifacts.allocated_factors(state[PartitionRef("decompose", "layer-000")], None,
                                         {n: ranks[f"model.layers.0.{n}"] for n in names})
    # refinement moves the factors: compare with the closed form, re-fitted here without refinement
    closed = _closed_form_layer0(pipeline, ws)
    gram = artifacts.read_input_stats(state[PartitionRef("capture", "layer-000")]).gram
    for name in names:
        up, down = svdllm[name]
        # Compared on the calibration inputs (‖Δ X‖ / ‖Ŵ X‖): the tiny model's 192 tokens leave the Gram
        # rank-deficient, and on its null space both objectives are flat (the floored directions are
        # un-whitened by 1/√floor), so the weights may differ there without any effect on the data.
        delta, g = closed[name] - up @ down, gram[name].double()
        assert float(torch.trace(delta @ g @ delta.T) / torch.trace(up @ down @ g @ (up @ down).T)) < 1e-8, name


def _closed_form_layer0(pipeline: Path, ws: Path) -> dict[str, torch.Tensor]:
    """Layer 0's q/k/v products from a run of the same pipeline without refinement."""
    data = yaml.safe_load(pipeline.read_text())
    data["method"] = {**data["method"], "refine_epochs": 0}
    plain = pipeline.with_name("aasvd_plain.yaml")
    plain.write_text(yaml.safe_dump(data))
    run_cli("run", str(plain), "-w", str(ws))
    anchored = artifacts.read_anchored(outputs(plain, ws)[PartitionRef("anchor", "layer-000")])
    return {name: up @ down for name, (up, down) in anchored.items()}


def test_refinement_never_increases_the_block_output_error(refined) -> None:
    """The best epoch is kept (the closed form counts as epoch 0), so an epoch that overshoots —
    layer 0 of the tiny model at lr 1e-3 — cannot make the block worse."""
    pipeline, ws = refined
    improved = []
    for partition in ("layer-000", "layer-001"):
        block = manifest_io.read(outputs(pipeline, ws)[PartitionRef("anchor", partition)]).info["block"]
        history = block["refine_history"]
        assert len(history) == AASVD["refine_epochs"] + 1 and history[0] == block["rel_err_closed_form"]
        assert block["rel_err_final"] == min(history) <= block["rel_err_closed_form"]
        improved.append(block["rel_err_final"] < block["rel_err_closed_form"])
    assert any(improved)  # and it does something


def test_assembled_model_holds_the_anchored_factors(refined) -> None:
    from transformers import AutoModelForCausalLM

    pipeline, ws = refined
    state = outputs(pipeline, ws)
    low = AutoModelForCausalLM.from_pretrained(artifacts.model_dir(state[PartitionRef("assemble", ALL)]),
                                               trust_remote_code=True)
    anchored = artifacts.read_anchored(state[PartitionRef("anchor", "layer-001")])
    for name, (up, down) in anchored.items():
        module = low.model.layers[1].get_submodule(name)
        assert torch.equal(module.up.weight.detach(), up.float()) and torch.equal(module.down.weight.detach(), down.float())


def test_refit_with_aasvd_is_refused(write_pipeline, tmp_path: Path) -> None:
    pipeline = write_pipeline("bad", method={"name": "aasvd", "refit": True})
    result = CliRunner().invoke(main, ["run", str(pipeline), "-w", str(tmp_path / "ws")])
    assert result.exit_code == 2
    assert "aasvd already fits every linear on the propagated inputs" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_sigkill_inside_refinement_resumes_to_identical_factors(write_pipeline, tmp_path: Path) -> None:
    pipeline = write_pipeline("kill_aasvd", method=AASVD, target={"kept_fraction": 0.5})

    def stagepipe(ws: Path, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "stagepipe.cli", "run", str(pipeline), "-w", str(ws)],
                              capture_output=True, text=True, env={**os.environ, **env}, timeout=600)

    reference, ws = tmp_path / "reference", tmp_path / "killed"
    assert stagepipe(reference).returncode == 0
    killed = stagepipe(ws, STAGEPIPE_TEST_KILL_AT="refine-saved@anchor@layer-001", STAGEPIPE_TEST_KILL_SKIP="1")
    assert killed.returncode == -9, killed.stdout + killed.stderr  # after the second epoch's checkpoint
    resumed = stagepipe(ws)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    done = manifest_io.read(outputs(pipeline, ws)[PartitionRef("anchor", "layer-001")])
    assert done.telemetry["resumed_from_epoch"] == 2
    for partition in ("layer-000", "layer-001"):
        a = manifest_io.read(outputs(pipeline, ws)[PartitionRef("anchor", partition)])
        b = manifest_io.read(outputs(pipeline, reference)[PartitionRef("anchor", partition)])
        assert a.content_digest() == b.content_digest(), partition


def test_refinement_of_a_bfloat16_block_steps_float32_masters(write_pipeline, tmp_path: Path) -> None:
    """A bfloat16 model (the GPU setting) refines through float32 master copies: the run finishes,
    keeps its best epoch, and the stored factors are the block's bfloat16 values."""
    pipeline = write_pipeline("bf16", model={**TINY["model"], "dtype": "bfloat16"}, method=AASVD,
                              target={"kept_fraction": 0.5})
    ws = tmp_path / "ws"
    run_cli("run", str(pipeline), "-w", str(ws))
    state = outputs(pipeline, ws)
    for partition in ("layer-000", "layer-001"):
        block = manifest_io.read(state[PartitionRef("anchor", partition)]).info["block"]
        assert block["rel_err_final"] == min(block["refine_history"]) <= block["rel_err_closed_form"]
        for up, down in artifacts.read_anchored(state[PartitionRef("anchor", partition)]).values():
            assert torch.equal(up.to(torch.bfloat16).double(), up) and torch.equal(down.to(torch.bfloat16).double(), down)


def test_refinement_under_the_block_output_fisher(write_pipeline, tmp_path: Path) -> None:
    """``refine_metric: kfac_out`` weights the block-output error by ``F = E[g gᵀ]`` of the gradient at
    the block output, read as the K-FAC output factor of ``mlp.down_proj`` (its output gradient *is*
    the block-output gradient: checked against the head's stored gradient of the last block); the
    recorded errors are in that metric and refinement never increases them."""
    method = {**AASVD, "refine_metric": "kfac_out"}
    pipeline = write_pipeline("fisher_refine", method=method, target={"kept_fraction": 0.5})
    ws = tmp_path / "ws"
    run_cli("run", str(pipeline), "-w", str(ws))
    state = outputs(pipeline, ws)
    fisher, _ = artifacts.read_fisher(state[PartitionRef("fisher", "layer-001")])
    grad = torch.from_numpy(artifacts.open_grad(state[PartitionRef("fisher", artifacts.HEAD)])[:]).double()
    grad = grad.reshape(-1, grad.shape[-1])
    expected = grad.T @ grad / len(grad)
    assert float(torch.linalg.norm(fisher["mlp.down_proj"]["kfac_out"] - expected) / torch.linalg.norm(expected)) < 1e-5
    for partition in ("layer-000", "layer-001"):
        block = manifest_io.read(state[PartitionRef("anchor", partition)]).info["block"]
        assert block["rel_err_final"] == min(block["refine_history"]) <= block["rel_err_closed_form"]


def test_refined_norms_are_trained_stored_and_assembled(write_pipeline, tmp_path: Path) -> None:
    """``refine_norms`` trains the block's norm weights beside its factors: they move, the best epoch
    still never raises the block error, and the assembled model carries exactly the stored values."""
    from transformers import AutoModelForCausalLM

    from stagepipe.stages.anchor import norm_parameters

    pipeline = write_pipeline("norms", method={**AASVD, "refine_norms": True}, target={"kept_fraction": 0.5})
    ws = tmp_path / "ws"
    run_cli("run", str(pipeline), "-w", str(ws))
    state = outputs(pipeline, ws)
    low = AutoModelForCausalLM.from_pretrained(artifacts.model_dir(state[PartitionRef("assemble", ALL)]),
                                               trust_remote_code=True)
    dense = AutoModelForCausalLM.from_pretrained(artifacts.model_dir(state[PartitionRef("snapshot", ALL)]))
    moved: list[bool] = []
    for i, partition in enumerate(("layer-000", "layer-001")):
        block = manifest_io.read(state[PartitionRef("anchor", partition)]).info["block"]
        assert block["rel_err_final"] == min(block["refine_history"]) <= block["rel_err_closed_form"]
        norms = artifacts.read_anchored_params(state[PartitionRef("anchor", partition)])
        expected = [name for name, _ in norm_parameters(dense.model.layers[i])]
        assert sorted(norms) == sorted(expected) and expected  # input_layernorm, post_attention_layernorm
        moved.append(any(not torch.equal(norms[n], dense.model.layers[i].get_parameter(n).detach()) for n in norms))
        assert moved[-1] == bool(block["refine_best_epoch"])  # a kept epoch moved them; the closed form did not
        for name, value in norms.items():
            assert torch.equal(low.model.layers[i].get_parameter(name).detach(), value), name
    assert any(moved)


def test_weighted_square_is_the_quadratic_form() -> None:
    from stagepipe.stages.anchor import _weighted_square

    x, a = torch.randn(3, 5, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64)
    metric = a @ a.T
    assert torch.equal(_weighted_square(x, None), x * x)
    assert torch.allclose(_weighted_square(x, metric).sum(-1), torch.einsum("ti,ij,tj->t", x, metric, x))


@pytest.mark.parametrize(("updates", "message"), [
    ({"method": {"name": "aasvd", "refine_metric": "kfac_out"}}, "only the refinement uses it"),
    ({"method": {"name": "aasvd", "refine_norms": True}}, "only the refinement trains norms"),
    ({"method": {**AASVD, "refine_metric": "kfac_out"}, "target": {"modules": ["self_attn"]}},
     "reads the K-FAC output factor of 'mlp.down_proj'"),
])
def test_refine_metric_errors_are_one_line(write_pipeline, tmp_path: Path, updates, message) -> None:
    pipeline = write_pipeline("bad_metric", **updates)
    result = CliRunner().invoke(main, ["run", str(pipeline), "-w", str(tmp_path / "ws")])
    assert result.exit_code != 0 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
