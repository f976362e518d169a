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
from stagepipe.stagekit import artifacts
from stagepipe.stages import make_runner
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


def _models(state: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(dense snapshot, assembled compressed model), float32, loaded with transformers as a user would."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(artifacts.model_dir(state[PartitionRef("snapshot", ALL)]))
    low = AutoModelForCausalLM.from_pretrained(artifacts.model_dir(state[PartitionRef("assemble", ALL)]),
                                               trust_remote_code=True)
    return dense.float().eval(), low.float().eval()


def _seen(model: torch.nn.Module, ids: torch.Tensor, layer: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Over all windows: the input of every linear of block ``layer`` (tokens × in, float64) and the
    block's output (tokens × d), from hooks on the whole model's forward pass."""
    block = model.model.layers[layer]
    inputs: dict[str, list[torch.Tensor]] = {}
    outputs_: list[torch.Tensor] = []
    hooks = [module.register_forward_pre_hook(lambda m, a, n=name: inputs.setdefault(n, []).append(a[0].detach()))
             for name, module in block.named_modules() if name.count(".") == 1 and name.endswith("_proj")]
    hooks.append(block.register_forward_hook(lambda m, a, out: outputs_.append((out[0] if isinstance(out, tuple) else out).detach())))
    with torch.no_grad():
        for window in ids:
            model(input_ids=window[None])
    for hook in hooks:
        hook.remove()
    flat = {name: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double() for name, xs in inputs.items()}
    return flat, torch.cat([y.reshape(-1, y.shape[-1]) for y in outputs_]).double()


def _windows(state: dict) -> torch.Tensor:
    return artifacts.read_windows(state[PartitionRef("tokenize", "calibration")])


def _block_error(model: torch.nn.Module, dense: torch.nn.Module, ids: torch.Tensor, layer: int) -> float:
    """``Σ‖f̂(ŷ) − f(y)‖² / Σ‖f(y)‖²`` of block ``layer``: the compressed model's block on its own
    running inputs against the dense model's block on the dense inputs, recomputed from scratch."""
    _, compressed = _seen(model, ids, layer)
    _, target = _seen(dense, ids, layer)
    return float(((compressed - target) ** 2).sum() / (target**2).sum())


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
    svdllm = artifacts.truncated_factors(state[PartitionRef("decompose", "layer-000")],
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


def _reduced_rank_regression(w: torch.Tensor, dense: torch.Tensor, shifted: torch.Tensor, rank: int, alpha: float,
                              metric: torch.Tensor | None) -> torch.Tensor:
    """The rank-``rank`` minimiser of ``‖M^{1/2} (W T − Ŵ Ŷ)‖_F`` with targets ``T = α Y + (1−α) Ŷ``,
    written the textbook way (Izenman's reduced-rank regression): the full least-squares fit
    ``B = W T Ŷᵀ (Ŷ Ŷᵀ)⁻¹`` by the normal equations, then the projection of its weighted fitted
    values onto their top ``rank`` left singular vectors. The Gram ``Ŷ Ŷᵀ`` gets the documented
    repair (eigenvalues floored at 1e-6 of the largest: an attention output of this tiny GQA model
    is nearly rank-deficient); no whitening and no code of the stage."""
    targets = (alpha * dense + (1 - alpha) * shifted) @ w.T  # tokens × m
    eigenvalues, basis = torch.linalg.eigh(shifted.T @ shifted)
    eigenvalues = eigenvalues.clamp(min=1e-6 * float(eigenvalues.max()))
    full = (basis @ ((basis.T @ shifted.T @ targets) / eigenvalues[:, None])).T  # m × n: B = W T Ŷᵀ G⁻¹
    root = torch.eye(w.shape[0], dtype=torch.float64) if metric is None else torch.linalg.cholesky(metric.double())
    fitted = root.T @ full @ (basis * eigenvalues.sqrt())  # weighted fitted values in the Gram's geometry
    u = torch.linalg.svd(fitted, full_matrices=False)[0][:, :rank]
    return torch.linalg.solve(root.T, u @ u.T @ root.T @ full)


def test_a_later_layer_is_the_reduced_rank_regression_on_the_compressed_models_inputs(write_pipeline,
                                                                                       tmp_path: Path) -> None:
    """Layer 1, where the compressed model's inputs differ from the dense one's: the stage's running
    inputs are the block outputs of the compressed model a user loads, and every factored linear
    is the reduced-rank regression of its dense outputs on its inputs in the compressed model
    (those of q/k/v shifted by block 0, those of o/gate/up/down also by this block's earlier
    groups), with the cross term half anchored (``anchor_weight`` 0.5) and the error weighted on the
    output side by the K-FAC factor (``output_metric: kfac_out``). Inputs, weights and the K-FAC
    factor are taken here from the models and fisher's statistics, the solution by lstsq + SVD."""
    method = {"name": "aasvd", "anchor_weight": 0.5, "output_metric": "kfac_out"}
    pipeline = write_pipeline("aasvd_rrr", method=method, target={"kept_fraction": 0.5})
    ws = tmp_path / "ws"
    run_cli("run", str(pipeline), "-w", str(ws))
    state = outputs(pipeline, ws)
    dense, low = _models(state)
    ids = _windows(state)
    running = torch.from_numpy(artifacts.open_hidden(state[PartitionRef("anchor", "layer-000")])[...]).double()
    _, compressed_block0 = _seen(low, ids, 0)
    torch.testing.assert_close(running.reshape(-1, running.shape[-1]), compressed_block0, rtol=1e-5, atol=1e-6)
    dense_inputs, _ = _seen(dense, ids, 1)
    shifted_inputs, _ = _seen(low, ids, 1)
    assert float((shifted_inputs["self_attn.q_proj"] - dense_inputs["self_attn.q_proj"]).norm()) > 1e-3  # shifted
    fisher, _ = artifacts.read_fisher(state[PartitionRef("fisher", "layer-001")])
    anchored = artifacts.read_factors(state[PartitionRef("anchor", "layer-001")], artifacts.ANCHOR)
    assert set(anchored) == set(dense_inputs)
    for name, (up, down) in anchored.items():
        w = dense.model.layers[1].get_submodule(name).weight.detach().double()
        expected = _reduced_rank_regression(w, dense_inputs[name], shifted_inputs[name], up.shape[1], 0.5,
                                            fisher[name]["kfac_out"])
        y = shifted_inputs[name]
        error = float(((y @ (up @ down - expected).T) ** 2).sum() / ((y @ expected.T) ** 2).sum())
        assert error < 1e-8, (name, error)


def test_the_input_aware_closed_form_is_svdllm_in_every_layer(write_pipeline, tmp_path: Path) -> None:
    """``closed_form: input_aware`` (the paper's objective ②, its final method's start): in every
    layer, shifted inputs or not, the anchored factors are decompose's SVD-LLM factors at the same
    ranks, so a refinement starts from SVD-LLM."""
    method = {"name": "aasvd", "closed_form": "input_aware"}
    pipeline = write_pipeline("aasvd_input", method=method, target={"kept_fraction": 0.5})
    ws = tmp_path / "ws"
    run_cli("run", str(pipeline), "-w", str(ws))
    state = outputs(pipeline, ws)
    ranks = artifacts.read_ranks(state[PartitionRef("allocate", ALL)])
    layers = sorted(ref.partition for ref in state if ref.stage == "anchor")
    assert len(layers) > 1
    for layer in layers:
        anchored = artifacts.read_factors(state[PartitionRef("anchor", layer)], artifacts.ANCHOR)
        index = int(layer.split("-")[1])
        svdllm = artifacts.truncated_factors(state[PartitionRef("decompose", layer)],
                                             {n: ranks[f"model.layers.{index}.{n}"] for n in anchored})
        for name, (up, down) in anchored.items():
            expected = svdllm[name][0] @ svdllm[name][1]
            torch.testing.assert_close(up.double() @ down.double(), expected.double(), rtol=0, atol=1e-6)


def _closed_form_layer0(pipeline: Path, ws: Path) -> dict[str, torch.Tensor]:
    """Layer 0's q/k/v products from a run of the same pipeline without refinement."""
    data = yaml.safe_load(pipeline.read_text())
    data["method"] = {**data["method"], "refine_epochs": 0}
    plain = pipeline.with_name("aasvd_plain.yaml")
    plain.write_text(yaml.safe_dump(data))
    run_cli("run", str(plain), "-w", str(ws))
    anchored = artifacts.read_factors(outputs(plain, ws)[PartitionRef("anchor", "layer-000")], artifacts.ANCHOR)
    return {name: up @ down for name, (up, down) in anchored.items()}


def test_refinement_never_increases_the_block_output_error(refined) -> None:
    """The best epoch is kept (the closed form counts as epoch 0), so an epoch that overshoots —
    layer 0 of the tiny model at lr 1e-3 — cannot make the block worse. Recomputed here from the
    models a user loads: block 0's error refined vs the closed form (same inputs: the embeddings),
    and every block's recorded final error against its recomputation on the refined chain."""
    pipeline, ws = refined
    state = outputs(pipeline, ws)
    dense, low = _models(state)
    ids = _windows(state)
    _closed_form_layer0(pipeline, ws)  # the same pipeline without refinement, in the same workspace
    plain = pipeline.with_name("aasvd_plain.yaml")
    _, closed = _models(outputs(plain, ws))
    refined_error, closed_error = _block_error(low, dense, ids, 0), _block_error(closed, dense, ids, 0)
    assert refined_error <= closed_error * (1 + 1e-6)
    improved = []
    for layer in (0, 1):
        block = artifacts.read_diagnostics(state[PartitionRef("anchor", f"layer-{layer:03d}")])["block"]
        history = block["refine_history"]
        assert len(history) == AASVD["refine_epochs"] + 1 and history[0] == block["rel_err_closed_form"]
        assert block["rel_err_final"] == pytest.approx(_block_error(low, dense, ids, layer), rel=1e-4)
        assert block["rel_err_final"] == min(history) <= block["rel_err_closed_form"]
        improved.append(block["rel_err_final"] < block["rel_err_closed_form"])
    layer0 = artifacts.read_diagnostics(state[PartitionRef("anchor", "layer-000")])["block"]
    assert layer0["rel_err_closed_form"] == pytest.approx(closed_error, rel=1e-4)  # the history starts where it should
    assert any(improved)  # and it does something


def test_assembled_model_holds_the_anchored_factors(refined) -> None:
    from transformers import AutoModelForCausalLM

    pipeline, ws = refined
    state = outputs(pipeline, ws)
    low = AutoModelForCausalLM.from_pretrained(artifacts.model_dir(state[PartitionRef("assemble", ALL)]),
                                               trust_remote_code=True)
    anchored = artifacts.read_factors(state[PartitionRef("anchor", "layer-001")], artifacts.ANCHOR)
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


def test_refinement_of_a_bfloat16_block_steps_float32_masters(write_pipeline, tmp_path: Path, monkeypatch) -> None:
    """A bfloat16 model (the GPU setting) refines through float32 master copies: Adam steps the
    masters (they hold values bfloat16 cannot), the block's factors are the masters rounded, the
    run keeps its best epoch, and the stored factors are the block's bfloat16 values."""
    from stagepipe.stages import anchor

    seen: list = []
    real = anchor._Refinement.run

    def spy(self, start_error):
        result = real(self, start_error)
        seen.append(self)
        return result

    monkeypatch.setattr(anchor._Refinement, "run", spy)
    pipeline = write_pipeline("bf16", model={**TINY["model"], "dtype": "bfloat16"}, method=AASVD,
                              target={"kept_fraction": 0.5})
    ws = tmp_path / "ws"
    run_cli("run", str(pipeline), "-w", str(ws))
    assert len(seen) == 2  # one refinement per layer
    for refinement in seen:
        assert all(p.dtype == torch.bfloat16 for p in refinement.params)
        assert all(m.dtype == torch.float32 and m is not p for m, p in zip(refinement.masters, refinement.params, strict=True))
        finer = [bool((m != m.to(torch.bfloat16).float()).any()) for m in refinement.masters]
        assert any(finer)  # the masters keep what a bfloat16 step would round away
    state = outputs(pipeline, ws)
    for partition in ("layer-000", "layer-001"):
        block = artifacts.read_diagnostics(state[PartitionRef("anchor", partition)])["block"]
        assert block["rel_err_final"] == min(block["refine_history"]) <= block["rel_err_closed_form"]
        for up, down in artifacts.read_factors(state[PartitionRef("anchor", partition)], artifacts.ANCHOR).values():
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
        block = artifacts.read_diagnostics(state[PartitionRef("anchor", partition)])["block"]
        assert block["rel_err_final"] == min(block["refine_history"]) <= block["rel_err_closed_form"]


def _run_and_load(pipeline: Path, ws: Path) -> tuple[dict, torch.nn.Module, torch.nn.Module]:
    """Run ``pipeline``; its outputs, the assembled model as a user loads it, and the dense snapshot."""
    from transformers import AutoModelForCausalLM

    run_cli("run", str(pipeline), "-w", str(ws))
    state = outputs(pipeline, ws)
    low = AutoModelForCausalLM.from_pretrained(artifacts.model_dir(state[PartitionRef("assemble", ALL)]),
                                               trust_remote_code=True)
    dense = AutoModelForCausalLM.from_pretrained(artifacts.model_dir(state[PartitionRef("snapshot", ALL)]))
    return state, low, dense


def test_refined_norms_are_trained_stored_and_assembled(write_pipeline, tmp_path: Path) -> None:
    """``refine_norms`` trains the block's norm weights beside its factors: they move, the best epoch
    still never raises the block error, and the assembled model carries exactly the stored values."""
    from stagepipe.stages.anchor import norm_parameters

    pipeline = write_pipeline("norms", method={**AASVD, "refine_norms": True}, target={"kept_fraction": 0.5})
    state, low, dense = _run_and_load(pipeline, tmp_path / "ws")
    moved: list[bool] = []
    for i, partition in enumerate(("layer-000", "layer-001")):
        block = artifacts.read_diagnostics(state[PartitionRef("anchor", partition)])["block"]
        assert block["rel_err_final"] == min(block["refine_history"]) <= block["rel_err_closed_form"]
        norms = artifacts.read_block_params(state[PartitionRef("anchor", partition)], artifacts.ANCHOR)
        expected = [name for name, _ in norm_parameters(dense.model.layers[i])]
        assert sorted(norms) == sorted(expected) and expected  # input_layernorm, post_attention_layernorm
        moved.append(any(not torch.equal(norms[n], dense.model.layers[i].get_parameter(n).detach()) for n in norms))
        assert moved[-1] == bool(block["refine_best_epoch"])  # a kept epoch moved them; the closed form did not
        for name, value in norms.items():
            assert torch.equal(low.model.layers[i].get_parameter(name).detach(), value), name
    assert any(moved)


def test_dense_kept_linears_are_refined_stored_and_assembled(write_pipeline, tmp_path: Path) -> None:
    """``refine_dense``: the target linears the allocation keeps dense train with the factors; the
    best epoch never raises the block error, and the assembled model carries the stored weights."""
    pipeline = write_pipeline("dense", method={**AASVD, "refine_dense": True, "refine_lr": 1e-4}, target={"kept_fraction": 0.9},
                              allocation={"policy": "global_greedy", "align": 1})
    state, low, dense = _run_and_load(pipeline, tmp_path / "ws")
    refined = 0
    for i, partition in enumerate(("layer-000", "layer-001")):
        block = artifacts.read_diagnostics(state[PartitionRef("anchor", partition)])["block"]
        stored = artifacts.read_block_params(state[PartitionRef("anchor", partition)], artifacts.ANCHOR)
        assert sorted(stored) == sorted(f"{n}.weight" for n in block.get("refined_dense", []))
        if not stored:
            continue
        assert block["rel_err_final"] == min(block["refine_history"]) <= block["rel_err_closed_form"]
        original = {n: dense.model.layers[i].get_parameter(n).detach() for n in stored}
        moved = any(not torch.equal(stored[n], original[n]) for n in stored)
        assert moved == bool(block["refine_best_epoch"])
        refined += moved
        for name, value in stored.items():
            assert torch.equal(low.model.layers[i].get_parameter(name).detach(), value), name
    assert refined  # some block kept a matrix dense and trained it


def test_weighted_square_is_the_quadratic_form() -> None:
    from stagepipe.stages.anchor import _weighted_square

    x, a = torch.randn(3, 5, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64)
    metric = a @ a.T
    assert torch.equal(_weighted_square(x, None), x * x)
    assert torch.allclose(_weighted_square(x, metric).sum(-1), torch.einsum("ti,ij,tj->t", x, metric, x))


@pytest.mark.parametrize(("updates", "message"), [
    ({"method": {"name": "aasvd", "refine_metric": "kfac_out"}}, "only the refinement uses it"),
    ({"method": {"name": "aasvd", "refine_norms": True}}, "only the refinement trains norms"),
    ({"method": {"name": "aasvd", "refine_dense": True}}, "only the refinement trains dense linears"),
    ({"method": {"name": "aasvd", "closed_form": "input_aware", "anchor_weight": 0.5}},
     "only the shift-aware closed form mixes the cross term"),
    ({"method": {**AASVD, "refine_metric": "kfac_out"}, "target": {"modules": ["self_attn"]}},
     "reads the K-FAC output factor of 'mlp.down_proj'"),
])
def test_refine_metric_errors_are_one_line(write_pipeline, tmp_path: Path, updates, message) -> None:
    pipeline = write_pipeline("bad_metric", **updates)
    result = CliRunner().invoke(main, ["run", str(pipeline), "-w", str(tmp_path / "ws")])
    assert result.exit_code != 0 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
