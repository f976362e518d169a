"""The ``delta`` stage (issue #34) on a tiny base / fine-tuned pair through the real pipeline: every delta
method meets its ratio with stored bytes equal to the files, DARE at ratio 1 gives the fine-tuned model
back (to the 16-bit rounding of the delta), the exported delta applied to the base is the assembled
model bit for bit, a kill -9 inside the stage resumes to the same masks, and bad input is one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from stagepipe.cli import main
from stagepipe.config import TinyModel
from stagepipe.delta import tensor_bytes
from stagepipe.io import safetensors_io
from stagepipe.models.sources import load_model
from tests.conftest import TINY, assert_kill_resumes_identically, finished_outputs, merge, run_report

TARGET = re.compile(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


def fine_tuned(directory: Path, also: str | None = None) -> Path:
    """The tiny model plus a rank-3 delta and a little noise on every target matrix (and, with
    ``also``, a change to that non-target tensor), saved as a Hugging Face directory."""
    model, tokenizer = load_model(TinyModel(**TINY["model"]))
    g = torch.Generator().manual_seed(5)
    for name, p in model.named_parameters():
        if TARGET.search(name):
            m, n = p.shape
            p.data += 0.01 * torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g) + 0.001 * torch.randn(m, n, generator=g)
        elif also and name == also:
            p.data += 0.1
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def pipeline(tmp: Path, name: str, method: dict, ratio: float, model_dir: Path) -> Path:
    data = merge(TINY, {"name": name, "method": method})
    data["model"], data["base"] = {"source": "local", "path": str(model_dir)}, TINY["model"]
    del data["allocation"]
    data["target"] = {"delta_ratio": ratio}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


run = run_report


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        found.update(safetensors_io.read(file))
    return found


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    return fine_tuned(tmp_path_factory.mktemp("pair") / "ft")


@pytest.mark.parametrize(("method", "ratio"), [({"name": "impart"}, 4), ({"name": "dare"}, 4),
                                               ({"name": "delta_lowrank"}, 8),
                                               ({"name": "delta_lowrank", "metric": "whitened"}, 8),
                                               ({"name": "bitdelta"}, 8), ({"name": "impart_qt"}, 16)])
def test_each_method_meets_its_ratio_with_the_bytes_it_writes(pair: Path, tmp_path: Path, method: dict, ratio: float) -> None:
    report = run(pipeline(tmp_path, method["name"], method, ratio, pair), tmp_path / "ws")
    memory, achieved = report["ratios"]["memory"], report["ratios"]["delta_ratio"]
    on_disk = sum(tensor_bytes(safetensors_io.read(p / "delta.safetensors"))
                  for ref, p in finished_outputs(tmp_path / "ws").items() if ref.startswith("delta@"))
    assert on_disk == memory["stored_bytes"] and achieved["achieved"] >= ratio
    assert achieved["achieved"] == pytest.approx(memory["dense_bytes_16bit"] / on_disk)
    assert set(report["perplexity"]) == {"base", "dense", "compressed"} and "syn" in report["gain_retained"]


def test_dare_at_ratio_one_gives_the_fine_tuned_model_back(pair: Path, tmp_path: Path) -> None:
    run(pipeline(tmp_path, "dare1", {"name": "dare"}, 1, pair), tmp_path / "ws")
    outputs = finished_outputs(tmp_path / "ws")
    assembled, tuned = tensors_of(outputs["assemble@all"] / "model"), tensors_of(pair)
    base = tensors_of(outputs["base@all"] / "model")
    for key, weight in tuned.items():
        if TARGET.search(key):  # base + float16(Δ): off by at most float16's rounding of Δ (plus float32's of the sum)
            delta = weight.double() - base[key].double()
            bound = delta.abs() * 2**-11 + weight.abs().double() * 2**-23 + 2**-24  # float16 subnormals: 2^-24 apart
            assert bool(((assembled[key].double() - weight.double()).abs() <= bound).all()), key
        else:
            assert torch.equal(assembled[key], weight), key


def test_the_exported_delta_applied_to_the_base_is_the_assembled_model(pair: Path, tmp_path: Path) -> None:
    path = pipeline(tmp_path, "impart4", {"name": "impart", "beta": 0.3}, 4, pair)
    run(path, tmp_path / "ws")
    runner = CliRunner()
    exported = runner.invoke(main, ["delta-export", str(path), str(tmp_path / "delta"), "-w", str(tmp_path / "ws")])
    assert exported.exit_code == 0, exported.output
    outputs = finished_outputs(tmp_path / "ws")
    applied = runner.invoke(main, ["delta-apply", str(outputs["base@all"] / "model"), str(tmp_path / "delta"),
                                   str(tmp_path / "applied")])
    assert applied.exit_code == 0, applied.output
    ours, assembled = tensors_of(tmp_path / "applied"), tensors_of(outputs["assemble@all"] / "model")
    assert set(ours) == set(assembled) and all(torch.equal(ours[k], assembled[k]) for k in ours)
    again = runner.invoke(main, ["delta-apply", str(outputs["base@all"] / "model"), str(tmp_path / "delta"),
                                 str(tmp_path / "applied")])
    assert again.exit_code != 0 and "never overwrites" in again.output  # a finished output is never replaced
    layer = tmp_path / "delta" / "layer-001.safetensors"
    data = bytearray(layer.read_bytes())
    data[-1] ^= 0xFF  # bit rot in the exported delta: never read
    layer.write_bytes(bytes(data))
    corrupt = runner.invoke(main, ["delta-apply", str(outputs["base@all"] / "model"), str(tmp_path / "delta"),
                                   str(tmp_path / "applied2")])
    assert corrupt.exit_code != 0 and "layer-001.safetensors: content differs from the sha256" in corrupt.output
    assert not (tmp_path / "applied2").exists()


def test_the_base_is_scored_beside_the_fine_tuned_and_the_compressed_model(pair: Path, tmp_path: Path) -> None:
    """``evaluate`` and ``zeroshot`` add a ``base`` partition: the report has the base's perplexity and its
    zero-shot scores against the fine-tuned model's, on the same documents."""
    path = pipeline(tmp_path, "zs", {"name": "dare"}, 8, pair)
    data = yaml.safe_load(path.read_text())
    data["evaluation"].update(tasks=["lambada"], task_limit=4)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    report = run(path, tmp_path / "ws")
    zeroshot = report["zeroshot"]
    assert zeroshot["base"]["tasks"]["lambada"]["n_docs"] == 4 == zeroshot["tasks"]["lambada"]["n_docs"]
    assert "dense" in zeroshot["base"]["tasks"]["lambada"] and set(zeroshot["wall_s"]) == {"base", "dense", "compressed"}


def test_kill_inside_the_delta_stage_resumes_to_the_same_masks(pair: Path, tmp_path: Path) -> None:
    path = pipeline(tmp_path, "impart_kill", {"name": "impart", "seed": 3}, 8, pair)
    run(path, tmp_path / "reference")
    assert_kill_resumes_identically(path, tmp_path / "reference", "delta@layer-001", tmp_path)


def test_bad_input_is_one_line_before_or_without_losing_anything(tmp_path: Path) -> None:
    changed = fine_tuned(tmp_path / "ft_norm", also="model.layers.1.input_layernorm.weight")
    result = CliRunner().invoke(main, ["run", str(pipeline(tmp_path, "norm", {"name": "dare"}, 4, changed)),
                                       "-w", str(tmp_path / "ws")])
    assert result.exit_code != 0
    assert "model.layers.1.input_layernorm.weight differs from the base's" in result.output
    beyond = CliRunner().invoke(main, ["run", str(pipeline(tmp_path, "bd", {"name": "bitdelta"}, 32, changed)),
                                       "-w", str(tmp_path / "ws2")])
    assert beyond.exit_code != 0 and "beyond bitdelta" in beyond.output and not (tmp_path / "ws2" / "stages").exists()
