"""The whole DAG on tiny models: end to end, invalidation rules, GPT-2, GFWSVD modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from stagepipe.cli import main
from stagepipe.config import load_pipeline
from stagepipe.engine.stage import ALL, PartitionRef
from stagepipe.io import safetensors_io
from stagepipe.stages.estimate import estimate
from stagepipe.stages import make_runner


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def entries(pipeline: Path, ws: Path) -> dict:
    return {e.ref: e for e in make_runner(load_pipeline(pipeline), ws).states()}


def ran(output: str) -> set[str]:
    return {line.split()[1] for line in output.splitlines() if line.startswith("run ")}


def test_end_to_end_then_noop(write_pipeline, tmp_path: Path) -> None:
    pipeline, ws = write_pipeline(), tmp_path / "ws"
    out = run_cli("run", str(pipeline), "-w", str(ws))
    assert "perplexity compressed" in out
    started = [line.split()[1] for line in out.splitlines() if line.startswith("run ")]
    assert len(started) == len(set(started))  # no partition runs twice (every key waits for the snapshot)
    state = entries(pipeline, ws)
    assert all(e.state.status == "done" for e in state.values())
    report = json.loads((state[PartitionRef("report", ALL)].state.output / "report.json").read_text())
    assert all(v < float("inf") for v in report["perplexity"]["compressed"].values())
    assert report["ratios"]["kept_over_target_matrices"] <= 0.8
    assert "nothing to do" in run_cli("run", str(pipeline), "-w", str(ws))
    assert "capture      2 done" in run_cli("status", str(pipeline), "-w", str(ws))


def test_eval_change_keeps_decompose_method_change_redoes_it(write_pipeline, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    run_cli("run", str(write_pipeline()), "-w", str(ws))
    changed_eval = write_pipeline(evaluation={"datasets": [{"name": "syn2", "text": {"source": "synthetic", "n_words": 1500, "seed": 5}}],
                                              "seq_len": 32})
    assert not any(r.startswith(("decompose", "capture", "allocate")) for r in ran(run_cli("run", str(changed_eval), "-w", str(ws))))
    status = run_cli("status", str(write_pipeline(method={"name": "asvd"})), "-w", str(ws), "-v")
    assert "capture@layer-000          stale  (config changed: stats)" in status
    redone = ran(run_cli("run", str(write_pipeline(method={"name": "asvd"})), "-w", str(ws)))
    assert {"decompose@layer-000", "decompose@layer-001", "allocate@all"} <= redone


GPT2 = {"source": "tiny", "arch": "gpt2", "num_layers": 2, "hidden": 32, "intermediate": 64, "num_heads": 4}


def test_gpt2_factors_are_the_svdllm_optimum_of_the_conv1d_weight(write_pipeline, tmp_path: Path) -> None:
    """GPT-2 stores Conv1D weights as (in, out). The assembled, reloaded factors must be the SVD-LLM
    optimum of W = weightᵀ, computed here from the raw HF tensor and the captured Gram without
    stagepipe's layout code; a transposition anywhere (square ``attn.c_proj`` included) fails."""
    from transformers import AutoModelForCausalLM

    from stagepipe.stages import artifacts

    pipeline = write_pipeline("gpt", model=GPT2, method={"name": "svdllm"})
    ws = tmp_path / "ws"
    assert "perplexity compressed" in run_cli("run", str(pipeline), "-w", str(ws))
    state = {ref: e.state.output for ref, e in entries(pipeline, ws).items()}
    dense = AutoModelForCausalLM.from_pretrained(artifacts.model_dir(state[PartitionRef("snapshot", ALL)]))
    low = AutoModelForCausalLM.from_pretrained(artifacts.model_dir(state[PartitionRef("assemble", ALL)]),
                                               trust_remote_code=True)
    stats = artifacts.read_input_stats(state[PartitionRef("capture", "layer-000")])
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        w = dense.transformer.h[0].get_submodule(name).weight.detach().double().T  # (out, in), by hand
        factored = low.transformer.h[0].get_submodule(name)
        up, down = factored.up.weight.detach().double(), factored.down.weight.detach().double()
        rank = up.shape[1]
        chol = torch.linalg.cholesky(stats.gram[name])
        u, sigma, vh = torch.linalg.svd(w @ chol)
        best = torch.linalg.solve_triangular(chol.T, ((u[:, :rank] * sigma[:rank]) @ vh[:rank]).T, upper=True).T
        assert up.shape[0] == w.shape[0] and down.shape[1] == w.shape[1]
        assert torch.allclose(up @ down, best, rtol=1e-4, atol=1e-5 * float(best.abs().max())), name


def test_gpt2_refit_runs_through_every_stage(write_pipeline, tmp_path: Path) -> None:
    pipeline = write_pipeline("gptrefit", model=GPT2, method={"name": "svdllm", "refit": True})
    out = run_cli("run", str(pipeline), "-w", str(tmp_path / "ws"))
    assert "refit@layer-001" in ran(out) and "perplexity compressed" in out


def test_layerwise_gradients_equal_full_model_per_sequence_gradients(write_pipeline, tmp_path: Path) -> None:
    """G_k from the block-by-block backward equals autograd on the whole model, window by window."""
    from stagepipe.stages import fisher

    pipeline = write_pipeline("g", method={"name": "gfwsvd", "mode": "stored", "max_sweeps": 1})
    ws = tmp_path / "ws"
    run_cli("run", str(pipeline), "-w", str(ws), "--only", "snapshot", "--only", "tokenize", "--only", "capture")
    state = entries(pipeline, ws)
    runner = make_runner(load_pipeline(pipeline), ws)
    grads_seen: list[torch.Tensor] = []
    original = fisher.nkp_power_iteration

    def spy(source, warm, sweeps, tol, **kw):
        grads_seen.extend(d.transpose(1, 2) @ x for d, x in (b["mlp.down_proj"] for b in source()))
        return original(source, warm, sweeps, tol, **kw)

    fisher.nkp_power_iteration = spy
    try:
        runner.run(only={"fisher@head", "fisher@layer-001"})
    finally:
        fisher.nkp_power_iteration = original
    from transformers import AutoModelForCausalLM

    from stagepipe.io import zarr_io

    model = AutoModelForCausalLM.from_pretrained(state[PartitionRef("snapshot", ALL)].state.output / "model").float()
    ids = torch.from_numpy(zarr_io.read(state[PartitionRef("tokenize", "calibration")].state.output / "tokens.zarr", "input_ids"))
    ours = torch.cat(grads_seen)
    for k in range(len(ids)):
        model.zero_grad()
        logits = model(ids[k : k + 1]).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[k, 1:])
        loss.backward()
        ref = model.model.layers[1].mlp.down_proj.weight.grad
        assert torch.allclose(ours[k], ref, atol=1e-6, rtol=1e-4)


def test_gfwsvd_stored_equals_streaming(write_pipeline, tmp_path: Path) -> None:
    factors = {}
    for mode in ("stored", "streaming"):
        pipeline = write_pipeline(f"g{mode}", method={"name": "gfwsvd", "mode": mode, "max_sweeps": 3})
        ws = tmp_path / mode
        run_cli("run", str(pipeline), "-w", str(ws))
        out = entries(pipeline, ws)[PartitionRef("fisher", "layer-000")].state.output
        factors[mode] = safetensors_io.read(out / "fisher.safetensors")
        assert not list(ws.glob("stages/fisher/*/.resume-*")) and not list(ws.glob("stages/fisher/*/.scratch-*"))
    assert factors["stored"].keys() == factors["streaming"].keys()
    for key in factors["stored"]:
        assert torch.allclose(factors["stored"][key], factors["streaming"][key], rtol=1e-6, atol=1e-9), key


def test_gfwsvd_diagnostics_on_tiny_layers(write_pipeline, tmp_path: Path) -> None:
    pipeline = write_pipeline("diag", model={"source": "tiny", "arch": "llama", "num_layers": 1, "hidden": 16,
                                             "intermediate": 24, "num_heads": 2, "num_kv_heads": 1},
                              method={"name": "gfwsvd", "mode": "stored", "diagnostics": True, "diagnostics_max_dim": 400})
    ws = tmp_path / "ws"
    run_cli("run", str(pipeline), "-w", str(ws))
    from stagepipe.io import manifest as manifest_io

    info = manifest_io.read(entries(pipeline, ws)[PartitionRef("fisher", "layer-000")].state.output).info
    diag = {n: v["diagnostics"] for n, v in info["linears"].items() if "diagnostics" in v}
    assert diag and all(0 <= d["nkp_rel_error"] <= 1.0 + 1e-9 for d in diag.values())
    assert all(d["predicted_loss_increase"] >= 0 and d["full_fisher_loss_increase"] >= 0 for d in diag.values())


@pytest.mark.parametrize("method,policy", [
    ({"name": "svd"}, "last_k"),
    ({"name": "svdllm_v2"}, "svdllm_v2"),
    ({"name": "asvd", "alpha": 0.5, "scale": "max"}, "uniform"),
    ({"name": "fwsvd", "sides": "both"}, "global_greedy"),
    ({"name": "kfac_svd", "shrinkage": 0.1}, "uniform"),
    ({"name": "gfwsvd", "max_sweeps": 2, "chunk_tokens": 16}, "global_greedy"),
    ({"name": "gfwsvd", "max_sweeps": 2, "fisher_labels": "model"}, "uniform"),
    ({"name": "mixed", "left": "fisher_nkp", "right": "gram", "max_sweeps": 2}, "uniform"),
    ({"name": "ressvd", "split": 0.5}, "last_k"),
    ({"name": "asvd"}, "asvd_search"),
])
def test_every_method_and_policy_runs_end_to_end(write_pipeline, tmp_path: Path, method: dict, policy: str) -> None:
    pipeline = write_pipeline(f"m_{method['name']}", method=method, allocation={"policy": policy, "align": 4})
    ws = tmp_path / "ws"
    executed = {ref.split("@")[0] for ref in ran(run_cli("run", str(pipeline), "-w", str(ws)))}
    runner = make_runner(load_pipeline(pipeline), ws)
    runner.states()  # learns the model's facts from the snapshot
    planned = [row.stage for row in estimate(runner.config, runner.ctx.model)]
    assert set(planned) == executed  # the dry-run plan lists exactly the stages that run executed
    state = entries(pipeline, ws)
    report = json.loads((state[PartitionRef("report", ALL)].state.output / "report.json").read_text())
    assert report["method"] == method["name"] and report["policy"] == policy
    assert all(v < float("inf") for v in report["perplexity"]["compressed"].values())
    assert report["ratios"]["kept_over_target_matrices"] <= 0.8 + 1e-9 or policy == "svdllm_v2"


def test_refit_minimises_output_error_on_calibration_inputs(write_pipeline, tmp_path: Path) -> None:
    """Layer 0's q_proj sees the same inputs on the original and the compressed path, so its
    refitted ``up`` must be the least-squares optimum of ‖up·down·x − W x‖ over the calibration
    tokens: no worse than the plain truncation."""
    from stagepipe.io import zarr_io
    from stagepipe.models.blocks import BlockRunner
    from stagepipe.stages.artifacts import allocated_factors, read_refit

    pipeline = write_pipeline("refit", method={"name": "svdllm", "refit": True}, target={"kept_fraction": 0.5})
    ws = tmp_path / "ws"
    run_cli("run", str(pipeline), "-w", str(ws))
    state = entries(pipeline, ws)
    runner = BlockRunner(state[PartitionRef("snapshot", ALL)].state.output / "model", torch.device("cpu"), torch.float32)
    ids = torch.from_numpy(zarr_io.read(state[PartitionRef("tokenize", "calibration")].state.output / "tokens.zarr", "input_ids"))
    block = runner.load_block(0)
    name = "self_attn.q_proj"
    inputs = []
    handle = block.get_submodule(name).register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    with torch.no_grad():
        runner.run_block(block, runner.embed(ids))
    handle.remove()
    x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs]).double()
    w = block.get_submodule(name).weight.detach().double()
    ranks = json.loads((state[PartitionRef("allocate", ALL)].state.output / "allocation.json").read_text())["ranks"]
    up, down = allocated_factors(state[PartitionRef("decompose", "layer-000")].state.output, None,
                                 {name: ranks[f"model.layers.0.{name}"]})[name]
    refit_up = read_refit(state[PartitionRef("refit", "layer-000")].state.output)[name]
    h = x @ down.T
    lstsq = torch.linalg.lstsq(h, x @ w.T).solution.T
    assert torch.allclose(refit_up, lstsq, rtol=1e-4, atol=1e-5)
    err = lambda u: float(torch.linalg.norm(h @ u.T - x @ w.T))  # noqa: E731
    assert err(refit_up) <= err(up) + 1e-9
