"""The whole DAG on tiny models: end to end, invalidation rules, GPT-2, GFWSVD modes."""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from stagepipe.cli import main
from stagepipe.config import load_pipeline
from stagepipe.engine.stage import ALL, PartitionRef
from stagepipe.io import manifest as manifest_io
from stagepipe.io import safetensors_io
from stagepipe.stages import make_runner


def run_cli(*args: str) -> str:
    """The command's output; ``run`` gets ``-v`` so its per-partition run/done lines are in it."""
    args = (*args, "-v") if args[0] == "run" else args
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
    for dataset, ppl in report["perplexity"]["compressed"].items():  # intervals from the kept window losses
        low, high = report["perplexity_interval"]["compressed"][dataset]
        assert low < ppl < high
        result = {m: report["evaluation"][m]["datasets"][dataset] for m in ("compressed", "dense")}
        gap = sum(result["compressed"]["window_nll"]) - sum(result["dense"]["window_nll"])
        ratio = report["compressed_over_dense"][dataset]
        assert ratio["ratio"] == pytest.approx(math.exp(gap / result["dense"]["n_tokens"]), rel=1e-9)
        assert ratio["ratio"] == pytest.approx(ppl / report["perplexity"]["dense"][dataset], rel=1e-9)
        assert f"compressed / dense on {dataset}: ×{ratio['ratio']:.4f}" in out
    assert "nothing to do" in run_cli("run", str(pipeline), "-w", str(ws))
    assert "capture      2 done" in run_cli("status", str(pipeline), "-w", str(ws))
    # every manifest records the versions that move the numbers (a run fact, never keyed)
    versions = manifest_io.read(state[PartitionRef("capture", "layer-000")].state.output).telemetry["versions"]
    assert versions["torch"] == importlib.metadata.version("torch") and versions["python"] == platform.python_version()


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

    from stagepipe.stagekit import artifacts

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


def test_layerwise_gradients_equal_full_model_per_sequence_gradients(write_pipeline, tmp_path: Path, monkeypatch) -> None:
    """G_k from the block-by-block backward equals autograd on the whole model, window by window."""
    from stagepipe.stages.fisher import gradients

    pipeline = write_pipeline("g", method={"name": "gfwsvd", "mode": "stored", "max_sweeps": 1})
    ws = tmp_path / "ws"
    run_cli("run", str(pipeline), "-w", str(ws), "--only", "snapshot", "--only", "tokenize", "--only", "capture")
    state = entries(pipeline, ws)
    runner = make_runner(load_pipeline(pipeline), ws)
    seen: dict[tuple[int, int], list[torch.Tensor]] = {}
    original = gradients.shard_source

    def spy(job):  # the gradients every half-sweep reads, once per shard
        source = original(job)
        seen.setdefault(job.rows, [d.transpose(1, 2) @ x for d, x in (b["mlp.down_proj"] for b in source())])
        return source

    monkeypatch.setattr(gradients, "shard_source", spy)
    runner.run(only={"fisher@head", "fisher@layer-001"})
    grads_seen = [g for rows in sorted(seen) for g in seen[rows]]
    from transformers import AutoModelForCausalLM

    from stagepipe.io import zarr_io

    model = AutoModelForCausalLM.from_pretrained(state[PartitionRef("snapshot", ALL)].state.output / "model").float()
    ids = torch.from_numpy(zarr_io.read(state[PartitionRef("tokenize", "calibration")].state.output / "tokens.zarr", "input_ids"))
    ours = torch.cat(grads_seen).cpu()  # the stage's device (CUDA when there is one), the reference's CPU
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


@pytest.mark.parametrize("shards", [1, 2])
def test_gfwsvd_diagnostics_cover_exactly_the_small_linears(write_pipeline, tmp_path: Path, shards: int) -> None:
    """Full-Fisher diagnostics run for the linears with m·n ≤ diagnostics_max_dim and no others
    (the values themselves are tested against an exactly Kronecker Fisher in test_kron.py); with
    two shards they read every shard's gradients."""
    from stagepipe.models.layout import block_linear_shapes
    from stagepipe.stagekit import artifacts

    pipeline = write_pipeline("diag", model={"source": "tiny", "arch": "llama", "num_layers": 1, "hidden": 16,
                                             "intermediate": 24, "num_heads": 2, "num_kv_heads": 1},
                              method={"name": "gfwsvd", "mode": "stored", "diagnostics": True, "diagnostics_max_dim": 300},
                              runtime={"shards": shards})
    ws = tmp_path / "ws"
    run_cli("run", str(pipeline), "-w", str(ws))
    state = entries(pipeline, ws)
    info = artifacts.read_diagnostics(state[PartitionRef("fisher", "layer-000")].state.output)
    diagnosed = {n for n, v in info["linears"].items() if "diagnostics" in v}
    runner = make_runner(load_pipeline(pipeline), ws)
    runner.states()
    shapes = {k.removeprefix("model.layers.0."): v for k, v in block_linear_shapes(runner.ctx.facts).items()}
    assert diagnosed == {n for n, (m, k) in shapes.items() if m * k <= 300} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    for name in diagnosed:
        d = info["linears"][name]["diagnostics"]
        assert 0 < d["nkp_rel_error"] < 1 and d["rank"] > 0 and d["full_fisher_loss_increase"] > 0


def _results(state: dict, stage: str, partition: str = ALL) -> dict:
    from stagepipe.stagekit import artifacts

    return artifacts.read_results(state[PartitionRef(stage, partition)].state.output)


def _ranks(state: dict) -> dict:
    from stagepipe.stagekit import artifacts

    return artifacts.read_ranks(state[PartitionRef("allocate", ALL)].state.output)


def _spectra(state: dict) -> list:
    from stagepipe.allocation import MatrixSpectrum
    from stagepipe.stagekit import artifacts

    return [MatrixSpectrum(f"model.layers.{i}.{n}", m, k, sigma) for i in (0, 1)
            for n, (m, k, sigma) in artifacts.read_spectra(state[PartitionRef("decompose", f"layer-00{i}")].state.output).items()]


def _uniform(state: dict, kept: float = 0.8, align: int = 4) -> dict:
    """What the uniform policy allocates from the same stored spectra."""
    from stagepipe.allocation import POLICIES

    return POLICIES["uniform"](align).allocate(_spectra(state), kept)


def _stats(state: dict, layer: int = 0):
    """Block ``layer``'s statistics as the methods read them (capture's and fisher's)."""
    from stagepipe.stagekit import artifacts

    part = f"layer-{layer:03d}"
    found = {stage: state[PartitionRef(stage, part)].state.output for stage in ("capture", "fisher")
             if PartitionRef(stage, part) in state}
    return artifacts.read_layer_stats(found.get("capture"), found.get("fisher"))


def _weights(state: dict, layer: int = 0) -> dict[str, torch.Tensor]:
    """Block ``layer``'s linear weights (out × in, float64), read with transformers alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(state[PartitionRef("snapshot", ALL)].state.output / "model")
    block = model.model.layers[layer]
    return {name: module.weight.detach().double() for name, module in block.named_modules()
            if isinstance(module, torch.nn.Linear)}


def _stored_sigma(state: dict, layer: int = 0) -> dict[str, torch.Tensor]:
    from stagepipe.stagekit import artifacts

    return {name: sigma.double() for name, (_, _, sigma) in
            artifacts.read_spectra(state[PartitionRef("decompose", f"layer-{layer:03d}")].state.output).items()}


def _root(metric: torch.Tensor, floor_rel: float = 1e-6) -> torch.Tensor:
    """A square root ``P`` (``M = P Pᵀ``) of a metric with its eigenvalues floored at ``floor_rel·λ_max``
    (the documented repair: the synthetic text's few distinct tokens leave block 0's Gram singular)."""
    metric = metric.double()
    if metric.ndim == 1:
        return torch.diag(metric.clamp(min=floor_rel * float(metric.max())).sqrt())
    eigenvalues, basis = torch.linalg.eigh(0.5 * (metric + metric.T))
    return basis * eigenvalues.clamp(min=floor_rel * float(eigenvalues.max())).sqrt()


def _check_spectra(left, right):
    """The stored weighted σ of every linear of block 0 are the singular values of ``Pᵀ W Q`` for the
    metrics ``left(stats, name)`` / ``right(stats, name)`` built here from the raw statistics (``None``:
    identity): the option under test shaped the metric the SVD used."""
    def check(state: dict, *_) -> None:
        stats, weights, stored = _stats(state), _weights(state), _stored_sigma(state)
        assert stored.keys() == weights.keys()
        for name, w in weights.items():
            a, b = left(stats, name), right(stats, name)
            whitened = (w if a is None else _root(a).T @ w) if b is None else (w if a is None else _root(a).T @ w) @ _root(b)
            expected = torch.linalg.svdvals(whitened)
            torch.testing.assert_close(stored[name], expected, rtol=1e-7, atol=1e-12 * float(expected[0]), msg=name)
    return check


def _gram(stats, name):
    return stats.gram[name] / stats.tokens[name]


def _shrunk(metric: torch.Tensor, amount: float = 0.1) -> torch.Tensor:
    """``(1−λ) M + λ (tr M / n) I``, written out here (K-FAC-SVD shrinks both of its factors)."""
    m = metric.double()
    return (1 - amount) * m + amount * torch.trace(m) / m.shape[0] * torch.eye(m.shape[0], dtype=torch.float64)


def _check_last_k(state: dict) -> None:
    ranks = _ranks(state)
    assert all(r is None for n, r in ranks.items() if ".layers.0." in n)  # the first block stays dense
    assert all(r is not None for n, r in ranks.items() if ".layers.1." in n)


def _check_labels_from_the_model(state: dict, pipeline: Path, tmp_path: Path) -> None:
    """Sampled labels give other gradients than the text's own (same pipeline, empirical labels)."""
    from stagepipe.stagekit import artifacts

    empirical = pipeline.with_name("empirical.yaml")
    data = yaml.safe_load(pipeline.read_text())
    data["method"]["fisher_labels"] = "empirical"
    empirical.write_text(yaml.safe_dump(data))
    ws = tmp_path / "empirical"
    run_cli("run", str(empirical), "-w", str(ws), "--only", "snapshot", "--only", "tokenize", "--only", "capture",
            "--only", "fisher")
    theirs, _ = artifacts.read_fisher(entries(empirical, ws)[PartitionRef("fisher", "layer-001")].state.output)
    ours, _ = artifacts.read_fisher(state[PartitionRef("fisher", "layer-001")].state.output)
    assert not torch.allclose(ours["mlp.down_proj"]["kfac_out"], theirs["mlp.down_proj"]["kfac_out"], rtol=1e-2)


def _check_ranks_differ_from_uniform(state: dict, pipeline: Path, *_) -> None:
    align = yaml.safe_load(pipeline.read_text())["allocation"]["align"]
    assert _ranks(state) != _uniform(state, align=align)


def _check_v2(state: dict, *_) -> None:
    """The stored ranks are V2's allocation of the stored spectra, whose group losses differ (two
    random layers are too alike for V2's flat score to move a rank, so the policy's own effect is
    shown on heterogeneous spectra, and against a hand-worked example, in test_allocation.py)."""
    from stagepipe.allocation import POLICIES

    spectra = _spectra(state)
    assert _ranks(state) == POLICIES["svdllm_v2"](1).allocate(spectra, 0.8)
    dropped = _results(state, "allocate")  # per-matrix losses at the uniform rank are not all equal
    assert len({round(float((s.sigma[12:] ** 2).sum()), 6) for s in spectra if s.name.endswith("q_proj")}) == 2
    assert dropped["policy"] == "svdllm_v2"


def _check_svd_last_k(state: dict, *_) -> None:
    _check_last_k(state)
    _check_spectra(lambda stats, name: None, lambda stats, name: None)(state)  # plain SVD: σ of W itself


def _check_fwsvd_greedy(state: dict, pipeline: Path, *_) -> None:
    """Both sides weighted by the diagonal Fisher: row sums on the output side, column sums on the input."""
    _check_spectra(lambda stats, name: stats.fisher[name]["grad_sq"].sum(1),
                   lambda stats, name: stats.fisher[name]["grad_sq"].sum(0))(state)
    _check_ranks_differ_from_uniform(state, pipeline)


def _check_chunks(state: dict, *_) -> None:
    from stagepipe.stagekit import artifacts

    assert _results(state, "fisher", "layer-000")["K"] == 6 * 2  # 6 windows of 32 tokens in chunks of 16
    sweeps = artifacts.read_diagnostics(state[PartitionRef("fisher", "layer-000")].state.output)["linears"]
    assert all(v["sweeps"] <= 2 for v in sweeps.values())


def _check_official_alpha(state: dict, *_) -> None:
    """On 2 windows of 16 tokens the 64-wide Kronecker factors have rank ≤ 32, so Cholesky fails and
    the official rule must act: each stored factor is ``(1−α) M + α·mean(diag M)·I`` of a singular
    ``M`` with α = 1e-5·10^k, k ≥ 1 tries (where the floor regulariser would floor eigenvalues instead)."""
    from stagepipe.stagekit import artifacts

    fisher, _ = artifacts.read_fisher(state[PartitionRef("fisher", "layer-000")].state.output)
    repairs = artifacts.read_diagnostics(state[PartitionRef("fisher", "layer-000")].state.output)["linears"]
    acted = 0
    for name, sides in fisher.items():
        for side in ("A", "B"):
            stored, repair = sides[side].double(), repairs[name][side]
            assert repair["kind"] == "official_alpha" and torch.linalg.cholesky_ex(stored).info == 0
            if stored.shape[0] < 64:
                continue
            alpha = repair["alpha"]
            assert alpha == pytest.approx(1e-5 * 10 ** repair["tries"]) and repair["tries"] >= 1, (name, side)
            eye = torch.eye(stored.shape[0], dtype=torch.float64)
            raw = (stored - alpha * stored.diagonal().mean() * eye) / (1 - alpha)  # the mean diagonal is α-invariant
            eigenvalues = torch.linalg.eigvalsh(raw)
            # singular up to the sweeps' float32 products: below 1e-8 relative on the CPU, 1.4e-8 measured on an H200
            bound = 1e-6 if torch.cuda.is_available() else 1e-8
            assert float(eigenvalues[:32].abs().max()) < bound * float(eigenvalues[-1]), (name, side)
            acted += 1  # (that α is the first of the sequence to pass: test_kron's unit test of the rule)
    assert acted == 3  # gate's and up's A (64 outputs), down's B (64 inputs)


def _check_ressvd(state: dict, *_) -> None:
    from stagepipe.stagekit import artifacts

    _check_last_k(state)
    measured = artifacts.read_diagnostics(state[PartitionRef("rank_factors", "layer-001")].state.output)["linears"]
    for v in measured.values():
        assert v["r1"] == int(0.5 * v["rank"] + 0.5) and v["r1"] + v["r2"] == v["rank"]


def _check_search(state: dict, pipeline: Path, *_) -> None:
    assert _results(state, "allocate")["search"]["threshold"] is not None
    _check_ranks_differ_from_uniform(state, pipeline)


def _check_modegpt(state: dict, *_) -> None:
    from transformers import AutoModelForCausalLM

    from stagepipe.stagekit import artifacts

    search = _results(state, "allocate")["search"]
    assert len(search["influence"]) == 2 and all(0 < s < 2 for s in search["influence"])
    assert search["layer_kept"] != [0.8, 0.8]  # block influence moved the fractions apart
    ratios = _results(state, "allocate")["ratios"]
    assert 0.8 - 3 * 32 * 4 / (4 * 32 * 32 + 3 * 32 * 64) <= ratios["kept_over_target_matrices"] <= 0.8  # spent
    dims = _results(state, "assemble")["structured_layers"]
    model, info = AutoModelForCausalLM.from_pretrained(state[PartitionRef("assemble", ALL)].state.output / "model",
                                                       trust_remote_code=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    for i, d in enumerate(dims):
        attention = model.model.layers[i].self_attn
        assert model.model.layers[i].mlp.up_proj.out_features == d["intermediate_size"] < 64
        assert attention.q_proj.out_features == 4 * d["qk_dim"] and attention.v_proj.out_features == 2 * d["vo_dim"]
        layer = artifacts.read_diagnostics(state[PartitionRef("structure", f"layer-{i:03d}")].state.output)
        assert layer["mlp"]["dropped_output_energy"] >= 0 and 0 < layer["qk"]["kept_score_fraction"] <= 1
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == _results(state, "allocate")["ratios"]["kept_params_model"]  # one accounting, checked


#: per case: method, allocation, what shows that the options under test changed the outcome, and
#: other updates to the tiny pipeline
CASES = {
    "svd-last_k": ({"name": "svd"}, {"policy": "last_k"}, _check_svd_last_k),
    "svdllm_v2-svdllm_v2": ({"name": "svdllm_v2"}, {"policy": "svdllm_v2", "align": 1}, _check_v2),
    "asvd_max": ({"name": "asvd", "alpha": 0.5, "scale": "max"}, {"policy": "uniform"},
                 _check_spectra(lambda stats, name: None, lambda stats, name: stats.abs_max[name] ** (2 * 0.5))),
    "fwsvd_both-greedy": ({"name": "fwsvd", "sides": "both"}, {"policy": "global_greedy"}, _check_fwsvd_greedy),
    "kfac_shrinkage": ({"name": "kfac_svd", "shrinkage": 0.1}, {"policy": "uniform"}, _check_spectra(lambda stats, name: _shrunk(stats.fisher[name]["kfac_out"]),
                                  lambda stats, name: _shrunk(_gram(stats, name)))),
    "gfwsvd_chunks-greedy": ({"name": "gfwsvd", "max_sweeps": 2, "chunk_tokens": 16}, {"policy": "global_greedy"},
                             _check_chunks),
    "gfwsvd_model_labels": ({"name": "gfwsvd", "max_sweeps": 2, "fisher_labels": "model"}, {"policy": "uniform"},
                            _check_labels_from_the_model),
    "mixed": ({"name": "mixed", "left": "fisher_nkp", "right": "gram", "max_sweeps": 2}, {"policy": "uniform"},
              _check_spectra(lambda stats, name: stats.fisher[name]["A"], _gram)),
    "gfwsvd_official_alpha": ({"name": "gfwsvd", "max_sweeps": 2, "regularizer": "official_alpha"}, {"policy": "uniform"},
                              _check_official_alpha, {"calibration": {"n_samples": 2, "seq_len": 16}}),
    "ressvd-last_k": ({"name": "ressvd", "split": 0.5}, {"policy": "last_k"}, _check_ressvd),
    "asvd-search": ({"name": "asvd"}, {"policy": "asvd_search"}, _check_search),
    "modegpt": ({"name": "modegpt", "temperature": 0.05}, {"policy": "uniform"}, _check_modegpt),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_method_and_policy_runs_and_its_options_take_effect(write_pipeline, tmp_path: Path, case: str) -> None:
    method, allocation, check, *extra = CASES[case]
    policy = allocation["policy"]
    pipeline = write_pipeline(f"m_{method['name']}", method=method, allocation={"align": 4, **allocation},
                              **(extra[0] if extra else {}))
    ws = tmp_path / "ws"
    executed = {ref.split("@")[0] for ref in ran(run_cli("run", str(pipeline), "-w", str(ws)))}
    runner = make_runner(load_pipeline(pipeline), ws)
    runner.states()  # learns the model's facts from the snapshot
    planned = [row.stage for row in runner.ctx.plan.rows]
    assert set(planned) == executed  # the dry-run plan lists exactly the stages that run executed
    state = entries(pipeline, ws)
    report = json.loads((state[PartitionRef("report", ALL)].state.output / "report.json").read_text())
    assert report["method"] == method["name"] and report["policy"] == policy
    assert all(v < float("inf") for v in report["perplexity"]["compressed"].values())
    assert report["ratios"]["kept_over_target_matrices"] <= 0.8 + 1e-9 or policy == "svdllm_v2"
    check(state, pipeline, tmp_path)


def test_refit_minimises_output_error_on_calibration_inputs(write_pipeline, tmp_path: Path) -> None:
    """Layer 0's q_proj sees the same inputs on the original and the compressed path, so its
    refitted ``up`` must be the least-squares optimum of ‖up·down·x − W x‖ over the calibration
    tokens: no worse than the plain truncation."""
    from stagepipe.io import zarr_io
    from stagepipe.models.blocks import BlockRunner
    from stagepipe.stagekit.artifacts import REFIT, read_factors, truncated_factors

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
    up, down = truncated_factors(state[PartitionRef("decompose", "layer-000")].state.output,
                                 {name: ranks[f"model.layers.0.{name}"]})[name]
    refit_up, refit_down = read_factors(state[PartitionRef("refit", "layer-000")].state.output, REFIT)[name]
    assert torch.equal(refit_down, down)  # refit keeps the factor it fitted with
    h = x @ down.T
    lstsq = torch.linalg.lstsq(h, x @ w.T).solution.T
    assert torch.allclose(refit_up, lstsq, rtol=1e-4, atol=1e-5)
    err = lambda u: float(torch.linalg.norm(h @ u.T - x @ w.T))  # noqa: E731
    assert err(refit_up) <= err(up) + 1e-9
