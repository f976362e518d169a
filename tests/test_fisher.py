"""What ``fisher`` stores besides its statistics: the input Grams it records for methods that need
both (so capture's need not wait on disk through the backward walk), and boundary gradients in the
model's dtype. Both change bytes on disk, never a method's numbers."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from stagepipe.config import load_pipeline
from stagepipe.io import safetensors_io
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.plan import make_plan
from stagepipe.stages import make_runner
from tests.conftest import TINY, merge
from tests.conftest import finished_outputs as outputs

GFWSVD = {"name": "gfwsvd", "max_sweeps": 2}


def run(tmp: Path, name: str, **updates) -> dict[str, Path]:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(merge(TINY, {"name": name, **updates}), sort_keys=False))
    make_runner(load_pipeline(path), tmp / f"ws-{name}").run()
    return outputs(tmp / f"ws-{name}")


def test_grams_move_to_fisher_only_when_no_other_stage_reads_them(write_pipeline) -> None:
    def plan(**updates):
        return make_plan(load_pipeline(write_pipeline(**updates)))

    assert plan(method={"name": "gfwsvd"}).gram_in_fisher
    assert plan(method={"name": "kfac_svd"}).gram_in_fisher
    assert plan(method={"name": "gfwsvd"}).capture_stats == frozenset()
    assert not plan(method={"name": "svdllm"}).gram_in_fisher  # no fisher stage
    assert not plan(method={"name": "fwsvd"}).gram_in_fisher  # no Gram
    # a sensitivity table truncates decompose's factors and reads capture's block outputs, not its
    # Grams: they move to fisher too; AA-SVD's anchor reads them after the allocation: they stay
    assert plan(method={"name": "gfwsvd"}, allocation={"policy": "asvd_search"}).gram_in_fisher
    assert not plan(method={"name": "aasvd", "output_metric": "kfac_out"}).gram_in_fisher


def test_fisher_records_the_same_grams_as_capture_bit_for_bit(tmp_path) -> None:
    """SVD-LLM's Grams come from capture, GFWSVD's and K-FAC-SVD's from fisher's recording pass:
    the same floats, so a method's factors do not depend on which stage summed them."""
    reference = run(tmp_path, "svdllm", method={"name": "svdllm"})
    ours = run(tmp_path, "gfwsvd", method=GFWSVD)
    for layer in ("layer-000", "layer-001"):
        assert not (ours[f"capture@{layer}"] / artifacts.STATS).exists()  # capture keeps no Gram
        want = artifacts.read_layer_stats(reference[f"capture@{layer}"], None)
        got = artifacts.read_layer_stats(ours[f"capture@{layer}"], ours[f"fisher@{layer}"])
        assert set(got.gram) == set(want.gram) and got.tokens == want.tokens
        for name in want.gram:
            assert torch.equal(got.gram[name], want.gram[name]), (layer, name)
        # one Gram per distinct input (q/k/v and gate/up share theirs), as capture stores them
        stored = safetensors_io.read(ours[f"fisher@{layer}"] / artifacts.FISHER)
        assert sorted(k for k in stored if k.endswith(".gram")) == [
            "mlp.down_proj.gram", "mlp.gate_proj.gram", "self_attn.o_proj.gram", "self_attn.q_proj.gram"]


def test_16bit_boundary_gradients_are_stored_in_16_bits_and_change_no_statistic(tmp_path, monkeypatch) -> None:
    """The block's backward runs in the model's dtype and reads its output gradient in it, so a
    bfloat16 model's boundary gradients lose nothing in bfloat16 (half the disk of float32)."""
    model = {"dtype": "bfloat16"}
    ours = run(tmp_path, "bf16", method=GFWSVD, model=model)
    for part in ("head", "layer-001"):
        assert artifacts.open_grad(ours[f"fisher@{part}"]).attrs["logical_dtype"] == "bfloat16"

    create = artifacts.create_grad
    monkeypatch.setattr(artifacts, "create_grad", lambda out, shape, batch, dtype: create(out, shape, batch, "float32"))
    wide = run(tmp_path, "fp32-grads", method=GFWSVD, model=model)
    assert artifacts.open_grad(wide["fisher@head"]).dtype == "float32"
    for layer in ("layer-000", "layer-001"):
        a = safetensors_io.read(ours[f"fisher@{layer}"] / artifacts.FISHER)
        b = safetensors_io.read(wide[f"fisher@{layer}"] / artifacts.FISHER)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (layer, key)


def test_float32_models_keep_float32_gradients(tmp_path) -> None:
    found = run(tmp_path, "fp32", method={"name": "kfac_svd"})
    assert artifacts.open_grad(found["fisher@head"]).dtype == "float32"
