"""The one block geometry (``stagepipe/geometry.py``) is what the models really hold: every linear's
(out, in) shape of every block equals a meta-device instance's, for each supported layout."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from stagepipe.geometry import BlockGeometry
from stagepipe.models.layout import block_linear_shapes, is_linear, layout_for, weight_matrix

CONFIGS = {
    "llama": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                  vocab_size=100),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                    vocab_size=100, head_dim=16),
    "qwen2": dict(hidden_size=32, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=100),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100),
}


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_the_geometry_is_every_linear_of_a_meta_model(model_type: str) -> None:
    config = AutoConfig.for_model(model_type, **CONFIGS[model_type])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    prefix = layout_for(model_type).layers_path + "."
    real = {name: tuple(weight_matrix(m).shape) for name, m in model.named_modules() if name.startswith(prefix) and is_linear(m)}
    assert block_linear_shapes(config) == real
    geometry = BlockGeometry.of(config)
    assert geometry.params == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()
                                  if p.dim() == 2) - (0 if model_type != "gpt2" else config.n_positions * config.n_embd)


def test_a_shape_hint_plans_as_a_llama_block() -> None:
    hint = PretrainedConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                            vocab_size=32000)
    geometry = BlockGeometry.of(hint)
    assert geometry.linear_shapes()["self_attn.k_proj"] == (4096, 4096) and geometry.block == 202_375_168
    assert geometry.params == 32 * 202_375_168 + 2 * 32000 * 4096
