"""The ``quantize`` stage (issue #33): GPTQ / RTN / GPTVQ on the tiny model through the real pipeline
— stored bytes equal the accounting, the compressed-tensors output (GPTVQ's: our ``VQLinear``) loads
with ``transformers`` and gives the logits of stagepipe's own dequantised weights, a kill -9 inside
the stage resumes bit for bit, and a budget or shape the grid cannot meet is one error line before
anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from stagepipe.cli import main
from stagepipe.config import load_pipeline
from stagepipe.io import safetensors_io
from stagepipe.models.layout import block_linear_shapes
from stagepipe.quantize import Grid, dequantize_stored, stored_bytes
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.plan import make_plan
from tests.conftest import TINY, assert_kill_resumes_identically, finished_outputs, merge, run_report


def pipeline(tmp: Path, name: str, method: dict, bits_per_weight: float = 4.5) -> Path:
    data = merge(TINY, {"name": name, "method": method})
    del data["allocation"]  # a quantising method has no ranks to allocate
    data["target"] = {"bits_per_weight": bits_per_weight}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


run = run_report


@pytest.fixture(scope="module")
def gptq_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    tmp = tmp_path_factory.mktemp("gptq")
    path = pipeline(tmp, "gptq3", {"name": "gptq", "bits": 3, "group_size": 32})
    return path, tmp / "ws", run(path, tmp / "ws")


def test_stored_bytes_equal_the_accounting_and_the_files(gptq_run) -> None:
    path, ws, report = gptq_run
    config = load_pipeline(path)
    model_dir = finished_outputs(ws)["assemble@all"] / "model"
    from transformers import AutoConfig

    shapes = block_linear_shapes(AutoConfig.from_pretrained(model_dir))
    grid = Grid(3, 32, symmetric=True)
    accounted = sum(stored_bytes(m, n, grid) for m, n in shapes.values())
    on_disk = 0
    for shard in model_dir.glob("layer-*.safetensors"):
        tensors = safetensors_io.read(shard)
        on_disk += sum(t.numel() * t.element_size() for k, t in tensors.items() if k.rsplit(".", 1)[1].startswith("weight_"))
    memory = report["ratios"]["memory"]
    assert memory["stored_bytes"] == accounted == on_disk
    assert memory["bits_per_weight"] == pytest.approx(8 * accounted / sum(m * n for m, n in shapes.values()))
    assert memory["bits_per_weight"] <= config.target.bits_per_weight
    assert report["ratios"]["kept_over_target_matrices"] == 1.0


def test_compressed_tensors_output_loads_and_gives_stagepipes_logits(gptq_run) -> None:
    """``from_pretrained`` through compressed-tensors (no remote code) equals the snapshot model with
    each target's weight replaced by stagepipe's own unpacking of the stored tensors."""
    from transformers import AutoModelForCausalLM

    _, ws, report = gptq_run
    outputs = finished_outputs(ws)
    model_dir = outputs["assemble@all"] / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized" and "auto_map" not in config
    loaded, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    dense = AutoModelForCausalLM.from_pretrained(outputs["snapshot@all"] / "model", dtype=torch.float32)
    grid = Grid(3, 32, symmetric=True)
    state = dense.state_dict()
    for shard in model_dir.glob("layer-*.safetensors"):
        tensors = safetensors_io.read(shard)
        for linear in {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_packed")}:
            stored = {k.rsplit(".", 1)[1]: t for k, t in tensors.items() if k.rsplit(".", 1)[0] == linear}
            assert f"{linear}.weight" not in tensors
            state[f"{linear}.weight"] = dequantize_stored(stored, grid).float()
    dense.load_state_dict(state)
    ids = torch.randint(0, dense.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, dense(ids).logits)
    assert report["perplexity"]["compressed"]["syn"] != report["perplexity"]["dense"]["syn"]


@pytest.fixture(scope="module")
def dense_inputs_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    tmp = tmp_path_factory.mktemp("gptq_dense")
    path = pipeline(tmp, "gptq3dense", {"name": "gptq", "bits": 3, "group_size": 32, "inputs": "dense"})
    return path, tmp / "ws", run(path, tmp / "ws")


def test_gptq_is_below_rtn_in_output_error_on_the_same_grid(dense_inputs_run) -> None:
    """GPTQ's own objective, the output error under the Gram, beats round-to-nearest on every matrix
    of the tiny model (the stage's diagnostics; RTN measured on the same Grams, capture's)."""
    from stagepipe.io import manifest as manifest_io
    from stagepipe.quantize import rtn

    _, ws, _ = dense_inputs_run
    outputs = finished_outputs(ws)
    snapshot = Loaded(outputs["snapshot@all"] / "model")
    for layer in ("layer-000", "layer-001"):
        manifest = manifest_io.read(outputs[f"quantize@{layer}"])
        stats = artifacts.read_input_stats(outputs[f"capture@{layer}"])
        for name, item in manifest.diagnostics["linears"].items():
            w = snapshot.weight(int(layer[-3:]), name)
            gram = stats.gram[name].double()
            delta = rtn(w, Grid(3, 32, symmetric=True)).weight - w
            rtn_err = float(torch.trace(delta @ gram @ delta.T) / torch.trace(w @ gram @ w.T))
            assert item["output_rel_err"] < rtn_err, (layer, name)


def test_propagated_inputs_are_the_quantised_models_own(gptq_run, dense_inputs_run) -> None:
    """Layer 0 sees the embeddings either way (same tensors as with capture's Grams); layer 1's Grams
    are those of its linears' inputs with block 0 quantised and block 1 dense (as llm-compressor
    calibrates a block before quantising it), recomputed here with forward hooks on the assembled
    model, and GPTQ on them gives the stored tensors."""
    from stagepipe.config import load_pipeline
    from stagepipe.methods import make_method
    from stagepipe.quantize import stored_tensors

    path, ws, _ = gptq_run
    propagated, dense = finished_outputs(ws), finished_outputs(dense_inputs_run[1])
    first = [artifacts.read_quantized(o["quantize@layer-000"]) for o in (propagated, dense)]
    assert first[0].keys() == first[1].keys() and all(torch.equal(first[0][k], first[1][k]) for k in first[0])
    second = [artifacts.read_quantized(o["quantize@layer-001"]) for o in (propagated, dense)]
    assert not all(torch.equal(second[0][k], second[1][k]) for k in second[0])

    quantized = Loaded(propagated["assemble@all"] / "model").model
    original = Loaded(propagated["snapshot@all"] / "model")
    ids = artifacts.read_windows(propagated["tokenize@calibration"])
    block = quantized.model.layers[1] = original.model.model.layers[1]  # inside the block the sublayers are dense
    grams: dict[str, torch.Tensor] = {}
    names = list(block.self_attn._modules) + list(block.mlp._modules)
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: grams.__setitem__(n, grams.get(n, 0) + (
        x := a[0].reshape(-1, a[0].shape[-1]).double()).T @ x)) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for start in range(0, len(ids), 2):
            quantized(ids[start:start + 2])
    for h in hooks:
        h.remove()
    assert names
    method = make_method(load_pipeline(path).method)
    for name, gram in grams.items():
        w = original.weight(1, name)
        stored = stored_tensors(method.quantize(w, gram))
        rebuilt = dequantize_stored(stored, method.grid())
        ours = dequantize_stored({k.rsplit(".", 1)[1]: t for k, t in second[0].items() if k.startswith(name + ".")},
                                 method.grid())
        torch.testing.assert_close(ours, rebuilt, rtol=0, atol=1e-6)


class Loaded:
    def __init__(self, directory: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)

    def weight(self, layer: int, name: str) -> torch.Tensor:
        return self.model.model.layers[layer].get_submodule(name).weight.detach().double()


def test_kill_inside_quantize_resumes_bit_identically(gptq_run, tmp_path: Path) -> None:
    path, reference, _ = gptq_run
    assert_kill_resumes_identically(path, reference, "quantize@layer-001", tmp_path)


def remote_and_rebuilt(outputs: dict[str, Path], marker: str, decode) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """(the assembled model loaded through stagepipe's modeling code with zero missing keys, the snapshot
    model with each quantised linear's weight replaced by ``decode(stored tensors, shape)``, the bytes of
    those stored tensors in the files). A quantised linear is one with a ``marker`` tensor."""
    from transformers import AutoModelForCausalLM

    model_dir = outputs["assemble@all"] / "model"
    loaded, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=True,
                                                        output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    dense = AutoModelForCausalLM.from_pretrained(outputs["snapshot@all"] / "model", dtype=torch.float32)
    state, on_disk = dense.state_dict(), 0
    for shard in model_dir.glob("layer-*.safetensors"):
        tensors = safetensors_io.read(shard)
        for linear in {k.rsplit(".", 1)[0] for k in tensors if k.endswith(marker)}:
            stored = {k.rsplit(".", 1)[1]: t for k, t in tensors.items() if k.rsplit(".", 1)[0] == linear and k[-5:] != ".bias"}
            on_disk += sum(t.numel() * t.element_size() for t in stored.values())
            state[f"{linear}.weight"] = decode(stored, tuple(state[f"{linear}.weight"].shape)).float()
    dense.load_state_dict(state)
    return loaded, dense, on_disk


VQ = {"name": "gptvq", "dim": 2, "bits_per_dim": 2, "group_columns": 16, "group_weights": 64, "kmeans_iters": 10,
      "refine_steps": 5}
#: candidates: 64 columns tile only down_proj's 64 inputs (1 row × 64), the rest take 4 rows × 16
VQ_PER_SHAPE = {**VQ, "group_columns": [64, 16]}


@pytest.fixture(scope="module")
def gptvq_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    tmp = tmp_path_factory.mktemp("gptvq")
    path = pipeline(tmp, "gptvq2", VQ_PER_SHAPE, bits_per_weight=6.5)  # a 64-weight codebook costs 4.25 bits
    return path, tmp / "ws", run(path, tmp / "ws")


def test_gptvq_bytes_and_logits_through_its_own_linear(gptvq_run) -> None:
    """Stored bytes = the accounting (``gptvq.stored_bytes``) = the files' tensors; the model loads with
    zero missing keys through ``VQLinear`` and gives exactly the logits of the snapshot model with
    each target's weight replaced by ``gptvq.dequantize_stored`` of its stored tensors — with each
    shape on the first ``group_columns`` candidate that tiles it (down_proj 1 × 64, the rest 4 × 16)."""
    from transformers import AutoConfig

    from stagepipe.gptvq import VQGrid, dequantize_stored
    from stagepipe.gptvq import stored_bytes as vq_bytes

    _, ws, report = gptvq_run
    outputs = finished_outputs(ws)

    def grid(shape: tuple[int, int]) -> VQGrid:
        return VQGrid(dim=2, bits_per_dim=2, group_columns=64 if shape[1] == 64 else 16, group_weights=64)

    shapes = block_linear_shapes(AutoConfig.from_pretrained(outputs["snapshot@all"] / "model"))
    accounted = sum(vq_bytes(m, n, grid((m, n))) for m, n in shapes.values())
    loaded, dense, on_disk = remote_and_rebuilt(outputs, ".weight_codes",
                                                lambda stored, shape: dequantize_stored(stored, grid(shape), shape))
    assert report["ratios"]["memory"]["stored_bytes"] == accounted == on_disk
    layouts = loaded.config.lowrank_vq
    assert {k: (v["group_rows"], v["group_columns"]) for k, v in layouts.items() if k.startswith("model.layers.1.")} == {
        f"model.layers.1.{name}": (1, 64) if name == "mlp.down_proj" else (4, 16)
        for name in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
                     "self_attn.q_proj", "self_attn.v_proj")}
    assert report["ratios"]["memory"]["storage"] == "vq"
    ids = torch.randint(0, dense.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, dense(ids).logits)
    assert "VQLinear" in type(loaded.model.layers[0].mlp.down_proj).__name__


def test_gptvq_codebook_refinement_never_raises_the_loss(gptvq_run) -> None:
    from stagepipe.io import manifest as manifest_io

    outputs = finished_outputs(gptvq_run[1])
    for layer in ("layer-000", "layer-001"):
        for name, item in manifest_io.read(outputs[f"quantize@{layer}"]).diagnostics["linears"].items():
            assert item["refine"]["loss_after"] <= item["refine"]["loss_before"], (layer, name)


@pytest.fixture(scope="module")
def compensated_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    tmp = tmp_path_factory.mktemp("gptq_eora")
    path = pipeline(tmp, "gptq3eora", {"name": "gptq", "bits": 3, "group_size": 32, "inputs": "dense",
                                       "compensate": {"rank": 4, "metric": "whitened"}}, bits_per_weight=8)
    return path, tmp / "ws", run(path, tmp / "ws")


def test_compensated_gptq_bytes_logits_and_a_lower_output_error(compensated_run, dense_inputs_run) -> None:
    """GPTQ + EoRA: stored bytes (compressed-tensors' tensors + float16 factors) = the accounting = the
    files; the model loads through ``GridLinear`` with zero missing keys and gives the logits of the
    snapshot model with each target's weight replaced by what the stored tensors decode to (to fp32
    rounding: the low-rank branch is a separate product); and on every matrix the output error under
    the Gram is below plain GPTQ's on the same grid and Grams."""
    from transformers import AutoConfig

    from stagepipe.io import manifest as manifest_io
    from stagepipe.methods import make_method

    path, ws, report = compensated_run
    outputs = finished_outputs(ws)
    method = make_method(load_pipeline(path).method)
    shapes = block_linear_shapes(AutoConfig.from_pretrained(outputs["snapshot@all"] / "model"))
    loaded, dense, on_disk = remote_and_rebuilt(outputs, ".weight_packed", method.unpack_linear)
    assert report["ratios"]["memory"]["stored_bytes"] == sum(method.linear_bytes(m, n) for m, n in shapes.values()) == on_disk
    ids = torch.randint(0, dense.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "GridLinear"
    plain = finished_outputs(dense_inputs_run[1])
    for layer in ("layer-000", "layer-001"):
        ours = manifest_io.read(outputs[f"quantize@{layer}"]).diagnostics["linears"]
        theirs = manifest_io.read(plain[f"quantize@{layer}"]).diagnostics["linears"]
        for name, item in ours.items():
            assert item["output_rel_err"] < theirs[name]["output_rel_err"], (layer, name)
            assert item["best_round"] == 0 and len(item["compensation_losses"]) == 1


@pytest.mark.parametrize("method, bits_per_weight, message", [
    ({"name": "rtn", "bits": 4, "group_size": 32}, 4.2,
     "target.bits_per_weight: 4.2 is below what rtn with 4 bits, group 32 stores (4.5"),
    ({"name": "gptq", "bits": 3, "group_size": 48}, 8,
     "method.group_size: 48 does not divide the targets' input sizes [32, 64]"),
    ({**VQ, "group_columns": 24, "group_weights": 96}, 8,
     "method.group_columns/group_weights: groups of 4 rows × 24 columns of 2-vectors do not tile the target shapes"),
    ({**VQ, "group_columns": [64, 32], "group_weights": 1024}, 8,
     "groups of 16 rows × 64 columns or 32 rows × 32 columns of 2-vectors do not tile the target shapes [(16, 32)]"),
    (VQ, 6.0, "target.bits_per_weight: 6.0 is below what gptvq with 2-D vectors, 2 bits per dimension, 64 weights"),
], ids=["budget", "uneven-groups", "vq-shapes", "vq-candidates", "vq-budget"])
def test_a_grid_the_model_cannot_take_is_one_line_before_anything_runs(tmp_path: Path, method: dict,
                                                                       bits_per_weight: float, message: str) -> None:
    path = pipeline(tmp_path, "refused", method, bits_per_weight=bits_per_weight)
    result = CliRunner().invoke(main, ["run", str(path), "-w", str(tmp_path / "ws")])
    assert result.exit_code != 0 and message in result.output, result.output
    assert not (tmp_path / "ws" / "stages").exists()


def test_rtn_reads_no_calibration_statistics(tmp_path: Path) -> None:
    config = load_pipeline(pipeline(tmp_path, "rtn", {"name": "rtn", "bits": 4, "group_size": None}))
    stages = make_plan(config).stages
    assert "quantize" in stages and "capture" not in stages and "decompose" not in stages


@pytest.mark.parametrize("updates, message", [
    ({"target": {"kept_fraction": 0.8, "bits_per_weight": 4}}, "target.kept_fraction"),
    ({"allocation": {"policy": "global_greedy"}}, "allocation"),
])
def test_a_quantising_method_refuses_ranks(tmp_path: Path, updates: dict, message: str) -> None:
    data = merge(TINY, {"name": "bad", "method": {"name": "gptq"}})
    del data["allocation"]
    data.update(updates)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    result = CliRunner().invoke(main, ["run", str(path), "-w", str(tmp_path / "ws")])
    assert result.exit_code != 0 and message in result.output, result.output
