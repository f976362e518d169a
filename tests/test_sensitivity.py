"""The ``sensitivity`` stage against brute force: the whole model with one matrix replaced."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from stagepipe.config import load_pipeline
from stagepipe.engine.stage import ALL, PartitionRef
from stagepipe.io import zarr_io
from stagepipe.models.layout import set_weight_matrix
from stagepipe.stagekit.artifacts import SENSITIVITY as TABLE
from stagepipe.stagekit.artifacts import read_results
from stagepipe.stagekit.artifacts import read_weighted_svd as decomposed_spectra
from stagepipe.stages import make_runner


def calibration_ppl(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(float(nll))


@pytest.mark.parametrize("windows", ["calibration", "validation"])
def test_sensitivity_table_equals_whole_model_perplexity(write_pipeline, tmp_path: Path, windows: str) -> None:
    """On the calibration windows (inputs from capture) and on held-out validation windows (inputs
    recomputed through the dense blocks below): every entry is the whole model's perplexity."""
    # weights of std 0.3 make truncation effects 0.5–30 % of the perplexity: ≥ 500× the tolerance below
    validation = {"validation": {"text": {"source": "synthetic", "n_words": 1500, "seed": 2}, "n_samples": 4}}
    pipeline = write_pipeline("sens", calibration=validation if windows == "validation" else {}, model={"source": "tiny", "arch": "llama", "num_layers": 3, "hidden": 32,
                                             "intermediate": 64, "num_heads": 4, "num_kv_heads": 2, "init_std": 0.3},
                              method={"name": "svd"}, target={"kept_fraction": 0.7},
                              allocation={"policy": "asvd_search", "align": 4, "candidates": [0.3, 0.6],
                                          "sensitivity_windows": 4, "sensitivity_memory_gb": 1e-4})  # several groups
    ws = tmp_path / "ws"
    runner = make_runner(load_pipeline(pipeline), ws)
    runner.run()
    state = {e.ref: e.state.output for e in runner.states()}
    model = AutoModelForCausalLM.from_pretrained(state[PartitionRef("snapshot", ALL)] / "model", dtype=torch.float32).eval()
    ids = torch.from_numpy(zarr_io.read(state[PartitionRef("tokenize", windows)] / "tokens.zarr", "input_ids"))[:4]
    for layer in (0, 2):
        out = state[PartitionRef("sensitivity", f"layer-{layer:03d}")]
        assert read_results(out)["windows_from"] == windows
        table = json.loads((out / TABLE).read_text())
        assert table["base_ppl"] == pytest.approx(calibration_ppl(model, ids), rel=1e-5)
        for local in ("self_attn.q_proj", "mlp.down_proj"):
            name = f"model.layers.{layer}.{local}"
            spectrum = decomposed_spectra(state[PartitionRef("decompose", f"layer-{layer:03d}")], [local])[local]
            module = model.get_submodule(name)
            original = module.weight.detach().clone()
            for entry in table["matrices"][name]:
                set_weight_matrix(module, spectrum.reconstruct(entry["rank"]))
                expected = calibration_ppl(model, ids)
                assert entry["ppl"] == pytest.approx(expected, rel=1e-5), (name, entry)
                assert abs(expected - table["base_ppl"]) > 100 * 1e-5 * expected  # the effect dwarfs the tolerance
                set_weight_matrix(module, original)
    allocation = json.loads((state[PartitionRef("allocate", ALL)] / "allocation.json").read_text())
    assert allocation["ratios"]["kept_over_target_matrices"] <= 0.7 and allocation["search"]["threshold"] is not None
