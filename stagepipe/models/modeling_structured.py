"""Structurally compressed causal LMs (MoDeGPT): smaller dense matrices, no extra factor.

Loads with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``. Self-contained
(imports only torch and transformers): stagepipe copies it next to the weights and ``config.json``
points at it through ``auto_map``. ``config.structured_layers[i]`` is ``None`` (block unchanged) or
``{"intermediate_size", "qk_dim", "vo_dim"}``: block ``i``'s MLP keeps ``intermediate_size``
neurons, each Q/K head ``qk_dim`` coordinates (whole RoPE pairs, listed per KV group in the
``rope_index`` buffer) and each V/O head ``vo_dim`` dimensions. The attention scale stays
``head_dim^-1/2`` of the original heads, whose logits the reduced ones approximate. Nothing in
transformers is monkey-patched: the classes subclass the base architecture's and swap modules in
``__init__``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.models.llama.modeling_llama import eager_attention_forward

try:  # where the attention kernels are registered moved between transformers releases
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:  # pragma: no cover
    from transformers.integrations import ALL_ATTENTION_FUNCTIONS


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StructuredAttention(nn.Module):
    """Grouped-query attention with ``qk_dim``-wide Q/K heads and ``vo_dim``-wide V/O heads."""

    def __init__(self, config, layer_idx: int, qk_dim: int, vo_dim: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        self.num_key_value_groups = n_heads // n_kv
        self.qk_dim, self.vo_dim = qk_dim, vo_dim
        self.scaling = head_dim**-0.5
        self.attention_dropout = getattr(config, "attention_dropout", 0.0)
        self.is_causal = True
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, n_heads * qk_dim, bias=False)
        self.k_proj = nn.Linear(hidden, n_kv * qk_dim, bias=False)
        self.v_proj = nn.Linear(hidden, n_kv * vo_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * vo_dim, hidden, bias=False)
        self.register_buffer("rope_index", torch.arange(qk_dim).repeat(n_kv, 1))

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, **kwargs):
        cache = kwargs.pop("cache", None) or kwargs.pop("past_key_values", None) or kwargs.pop("past_key_value", None)
        shape = hidden_states.shape[:-1]
        q = self.q_proj(hidden_states).view(*shape, -1, self.qk_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(*shape, -1, self.qk_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(*shape, -1, self.vo_dim).transpose(1, 2)
        cos, sin = position_embeddings  # (batch, seq, head_dim) of the original heads
        cos_k = cos[..., self.rope_index].permute(0, 2, 1, 3)  # (batch, n_kv, seq, qk_dim)
        sin_k = sin[..., self.rope_index].permute(0, 2, 1, 3)
        cos_q = cos_k.repeat_interleave(self.num_key_value_groups, dim=1)
        sin_q = sin_k.repeat_interleave(self.num_key_value_groups, dim=1)
        q = q * cos_q + _rotate_half(q) * sin_q
        k = k * cos_k + _rotate_half(k) * sin_k
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        implementation = getattr(self.config, "_attn_implementation", None) or "eager"
        attend = eager_attention_forward if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
        window = getattr(self.config, "sliding_window", None)
        extra = {"sliding_window": window} if window is not None else {}
        out, weights = attend(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                              scaling=self.scaling, **extra, **kwargs)
        return self.o_proj(out.reshape(*shape, -1).contiguous()), weights


def shrink_blocks(model: nn.Module, layers: list[dict | None]) -> None:
    """Give every listed block its reduced MLP and attention (weights filled by loading)."""
    config = model.config
    for index, dims in enumerate(layers):
        if not dims:
            continue
        block = model.model.layers[index]
        mlp, ff, hidden = block.mlp, int(dims["intermediate_size"]), config.hidden_size
        dtype, device = mlp.gate_proj.weight.dtype, mlp.gate_proj.weight.device
        mlp.gate_proj = nn.Linear(hidden, ff, bias=False, dtype=dtype, device=device)
        mlp.up_proj = nn.Linear(hidden, ff, bias=False, dtype=dtype, device=device)
        mlp.down_proj = nn.Linear(ff, hidden, bias=False, dtype=dtype, device=device)
        attention = StructuredAttention(config, index, int(dims["qk_dim"]), int(dims["vo_dim"]))
        block.self_attn = attention.to(dtype=dtype, device=device)


def _structured_pair(config_cls: type, model_cls: type, model_type: str) -> tuple[type, type]:
    class Config(config_cls):
        def __init__(self, structured_layers: list[dict | None] | None = None, **kwargs) -> None:
            self.structured_layers = list(structured_layers or [])
            super().__init__(**kwargs)

    Config.model_type = model_type

    class Model(model_cls):
        config_class = Config

        def __init__(self, config: Config) -> None:
            super().__init__(config)
            shrink_blocks(self, config.structured_layers)

    return Config, Model


StructuredLlamaConfig, StructuredLlamaForCausalLM = _structured_pair(LlamaConfig, LlamaForCausalLM, "structured_llama")
StructuredMistralConfig, StructuredMistralForCausalLM = _structured_pair(MistralConfig, MistralForCausalLM,
                                                                         "structured_mistral")
for _cls, _name in [
    (StructuredLlamaConfig, "StructuredLlamaConfig"), (StructuredLlamaForCausalLM, "StructuredLlamaForCausalLM"),
    (StructuredMistralConfig, "StructuredMistralConfig"), (StructuredMistralForCausalLM, "StructuredMistralForCausalLM"),
]:
    _cls.__name__ = _cls.__qualname__ = _name

#: the assembled model's ``model_type`` is ``<FAMILY>_<base model_type>``
FAMILY = "structured"
#: base ``model_type`` → (config class name, model class name) in this file.
STRUCTURED_CLASSES = CLASSES = {
    "llama": ("StructuredLlamaConfig", "StructuredLlamaForCausalLM"),
    "mistral": ("StructuredMistralConfig", "StructuredMistralForCausalLM"),
}
