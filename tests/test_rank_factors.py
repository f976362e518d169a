"""The ``rank_factors`` stage (ResSVD): assembled factors are the two-stage factors of the real layer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stagepipe.config import load_pipeline
from stagepipe.engine.stage import ALL, PartitionRef
from stagepipe.io import manifest as manifest_io
from stagepipe.io import safetensors_io
from stagepipe.linalg import factor_metric
from stagepipe.methods.ressvd import residual_factors
from stagepipe.stagekit.artifacts import read_input_stats as load_input_stats
from stagepipe.stages import make_runner


def test_assembled_ressvd_factors_are_the_two_stage_factors(write_pipeline, tmp_path: Path) -> None:
    pipeline = write_pipeline("res", method={"name": "ressvd", "split": 0.25}, target={"kept_fraction": 0.6})
    runner = make_runner(load_pipeline(pipeline), tmp_path / "ws")
    runner.run()
    state = {e.ref: e.state.output for e in runner.states()}
    snapshot = state[PartitionRef("snapshot", ALL)] / "model"
    weights = safetensors_io.read(next(snapshot.glob("*.safetensors")))
    assembled = {}
    for shard in (state[PartitionRef("assemble", ALL)] / "model").glob("layer-*.safetensors"):
        assembled.update(safetensors_io.read(shard))
    ranks = json.loads((state[PartitionRef("allocate", ALL)] / "allocation.json").read_text())["ranks"]
    stats = load_input_stats(state[PartitionRef("capture", "layer-001")])
    for local in ("self_attn.v_proj", "mlp.up_proj"):
        full = f"model.layers.1.{local}"
        right = factor_metric(stats.gram[local] / stats.tokens[local], 1e-6)
        up, down, _ = residual_factors(weights[f"{full}.weight"].double(), right, ranks[full], 0.25)
        ours = assembled[f"{full}.up.weight"].double() @ assembled[f"{full}.down.weight"].double()
        assert torch.allclose(ours, up @ down, atol=1e-5)
    info = manifest_io.read(state[PartitionRef("rank_factors", "layer-001")]).diagnostics["linears"]
    assert all(item["loss_over_one_shot"] >= 1 - 1e-6 for item in info.values())  # Eckart–Young, measured
    assert all(item["r1"] + item["r2"] == item["rank"] for item in info.values())
