"""Low-rank causal LMs that load with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.

This file is self-contained (it imports only torch and transformers) because stagepipe copies it
next to the compressed weights; ``config.json`` points at it through ``auto_map``. Each class
subclasses the Hugging Face class of the base architecture and, in ``__init__``, swaps every linear
named in ``config.lowrank_ranks`` for a ``LowRankLinear``: ``down`` (in → r, no bias) followed by
``up`` (r → out, with the original bias). Nothing in transformers is monkey-patched.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)


class LowRankLinear(nn.Module):
    """``y = up(down(x))`` with ``down.weight`` r×in and ``up.weight`` out×r (+ bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, has_bias) of an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    if type(module).__name__ == "Conv1D":  # weight stored (in, out)
        return module.weight.shape[0], module.weight.shape[1], module.bias is not None
    raise TypeError(f"cannot factor a {type(module).__name__}")


def swap_linears(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace each named linear by a ``LowRankLinear`` of the given rank."""
    for name, rank in ranks.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        in_features, out_features, bias = linear_shape(old)
        setattr(parent, child, LowRankLinear(in_features, out_features, int(rank), bias,
                                             dtype=old.weight.dtype, device=old.weight.device))


def install_factors(block: nn.Module, name: str, up: torch.Tensor, down: torch.Tensor) -> LowRankLinear:
    """Replace the linear ``name`` of ``block`` by a ``LowRankLinear`` holding ``up · down`` (and
    the old bias), in the old weight's dtype and device; returns the new module."""
    parent_name, _, child = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    old = getattr(parent, child)
    in_features, out_features, has_bias = linear_shape(old)
    new = LowRankLinear(in_features, out_features, up.shape[1], has_bias, dtype=old.weight.dtype, device=old.weight.device)
    with torch.no_grad():
        new.up.weight.copy_(up.to(old.weight.dtype))
        new.down.weight.copy_(down.to(old.weight.dtype))
        if has_bias:
            new.up.bias.copy_(old.bias)
    setattr(parent, child, new)
    return new


def _lowrank_pair(config_cls: type, model_cls: type, model_type: str) -> tuple[type, type]:
    class Config(config_cls):
        def __init__(self, lowrank_ranks: dict[str, int] | None = None, **kwargs) -> None:
            self.lowrank_ranks = dict(lowrank_ranks or {})
            super().__init__(**kwargs)

    Config.model_type = model_type

    class Model(model_cls):
        config_class = Config

        def __init__(self, config: Config) -> None:
            super().__init__(config)
            swap_linears(self, config.lowrank_ranks)

    return Config, Model


LowRankLlamaConfig, LowRankLlamaForCausalLM = _lowrank_pair(LlamaConfig, LlamaForCausalLM, "lowrank_llama")
LowRankMistralConfig, LowRankMistralForCausalLM = _lowrank_pair(MistralConfig, MistralForCausalLM, "lowrank_mistral")
LowRankQwen2Config, LowRankQwen2ForCausalLM = _lowrank_pair(Qwen2Config, Qwen2ForCausalLM, "lowrank_qwen2")
LowRankGPT2Config, LowRankGPT2LMHeadModel = _lowrank_pair(GPT2Config, GPT2LMHeadModel, "lowrank_gpt2")
for _cls, _name in [
    (LowRankLlamaConfig, "LowRankLlamaConfig"), (LowRankLlamaForCausalLM, "LowRankLlamaForCausalLM"),
    (LowRankMistralConfig, "LowRankMistralConfig"), (LowRankMistralForCausalLM, "LowRankMistralForCausalLM"),
    (LowRankQwen2Config, "LowRankQwen2Config"), (LowRankQwen2ForCausalLM, "LowRankQwen2ForCausalLM"),
    (LowRankGPT2Config, "LowRankGPT2Config"), (LowRankGPT2LMHeadModel, "LowRankGPT2LMHeadModel"),
]:
    _cls.__name__ = _cls.__qualname__ = _name

#: base ``model_type`` → (config class name, model class name) in this file.
LOWRANK_CLASSES = {
    "llama": ("LowRankLlamaConfig", "LowRankLlamaForCausalLM"),
    "mistral": ("LowRankMistralConfig", "LowRankMistralForCausalLM"),
    "qwen2": ("LowRankQwen2Config", "LowRankQwen2ForCausalLM"),
    "gpt2": ("LowRankGPT2Config", "LowRankGPT2LMHeadModel"),
}
