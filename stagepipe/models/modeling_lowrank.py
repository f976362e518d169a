"""Low-rank causal LMs that load with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.

This file is self-contained (it imports only torch and transformers) because stagepipe copies it
next to the compressed weights; ``config.json`` points at it through ``auto_map``. Each class
subclasses the Hugging Face class of the base architecture and, in ``__init__``, swaps every linear
named in ``config.lowrank_ranks`` for a ``LowRankLinear``: ``down`` (in → r, no bias) followed by
``up`` (r → out, with the original bias). Nothing in transformers is monkey-patched.

Linears named in ``config.lowrank_remapped`` are ``RemappedLinear`` instead (Dobi-SVD's
"remapping"): the square ``min(in, out)``-row part of both factors in int8, one fp16 scale per
component and factor, the rest of the longer factor in fp16; ``remap_factors`` writes them.

Linears named in ``config.lowrank_vq`` stay dense but vector-quantised (GPTVQ): ``VQLinear`` holds
the packed centroid indices, the int8 codebooks and their fp16 scales, and decodes its weight in
the input's dtype at every call (``gptvq.stored_tensors`` writes them). Linears in
``config.lowrank_grid`` are ``GridLinear``: compressed-tensors' ``pack-quantized`` tensors of a
symmetric integer grid, decoded here. Either may carry a low-rank compensation of its error
(``rank`` > 0): fp16 factors ``lowrank_up`` (out×r) and ``lowrank_down`` (r×in) added to the output.
With ``config.lowrank_factor_grid`` (``{"bits", "group_size"}``) each ``LowRankLinear``'s ``down`` and
``up`` are ``GridLinear`` themselves: the factors quantised (at ``config.lowrank_factor_bits[name]``
bits where a joint allocation chose a width per linear).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
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


#: symmetric 8-bit codes: x ≈ code · scale with code in [-127, 127] and scale = absmax / 127
CODE_MAX = 127


def _codes(block: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of ``block`` and the fp16 scale of each slice along ``dim`` (absmax / 127; the
    codes are rounded against the fp16 scale that is stored, so decoding uses what was encoded)."""
    scale = (block.abs().amax(dim=dim) / CODE_MAX).to(torch.float16)
    if not torch.isfinite(scale).all():
        raise ValueError("a factor's scale does not fit fp16")
    divisor = torch.where(scale > 0, scale.double(), torch.ones_like(scale, dtype=torch.float64)).unsqueeze(dim)
    codes = torch.round(block.double() / divisor).clamp(-CODE_MAX, CODE_MAX).to(torch.int8)
    return codes, scale


def remap_factors(up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    """A ``RemappedLinear``'s tensors (without bias) from ``up`` (out×r) and ``down`` (r×in): the
    first ``min(in, out)`` rows of ``up`` and columns of ``down`` as int8 with per-component fp16
    scales, the longer factor's remainder in fp16."""
    out_features, in_features = up.shape[0], down.shape[1]
    square = min(out_features, in_features)
    up_codes, up_scale = _codes(up[:square], dim=0)
    down_codes, down_scale = _codes(down[:, :square], dim=1)
    tensors = {"up_codes": up_codes, "up_scale": up_scale, "down_codes": down_codes, "down_scale": down_scale}
    if out_features > square:
        tensors["up_rest"] = up[square:].to(torch.float16).contiguous()
    if in_features > square:
        tensors["down_rest"] = down[:, square:].to(torch.float16).contiguous()
    if not all(torch.isfinite(t.float()).all() for t in tensors.values()):
        raise ValueError("a factor does not fit fp16")
    return tensors


class RemappedLinear(nn.Module):
    """``y = up(down(x))`` with each factor's square part stored in int8 (Dobi-SVD's remapping).

    ``up = [up_codes · up_scale ; up_rest]`` (out×r), ``down = [down_codes · down_scale | down_rest]``
    (r×in); the codes are buffers (int8 is not a trainable type), decoded in the input's dtype at
    every call.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        square = min(in_features, out_features)
        self.register_buffer("up_codes", torch.zeros(square, rank, dtype=torch.int8, device=device))
        self.register_buffer("up_scale", torch.zeros(rank, dtype=torch.float16, device=device))
        self.register_buffer("down_codes", torch.zeros(rank, square, dtype=torch.int8, device=device))
        self.register_buffer("down_scale", torch.zeros(rank, dtype=torch.float16, device=device))
        if out_features > square:
            self.register_buffer("up_rest", torch.zeros(out_features - square, rank, dtype=torch.float16, device=device))
        if in_features > square:
            self.register_buffer("down_rest", torch.zeros(rank, in_features - square, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded (up, down) in ``dtype``."""
        up = self.up_codes.to(dtype) * self.up_scale.to(dtype)
        down = self.down_codes.to(dtype) * self.down_scale.to(dtype)[:, None]
        if hasattr(self, "up_rest"):
            up = torch.cat([up, self.up_rest.to(dtype)], dim=0)
        if hasattr(self, "down_rest"):
            down = torch.cat([down, self.down_rest.to(dtype)], dim=1)
        return up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.factors(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(nn.functional.linear(x, down), up, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, storage=remap8"


class _Compensated(nn.Module):
    """A quantised linear's shared parts: the optional fp16 low-rank compensation and the bias."""

    def _init_extras(self, in_features: int, out_features: int, rank: int, bias: bool, dtype, device) -> None:
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        if rank:
            self.register_buffer("lowrank_up", torch.zeros(out_features, rank, dtype=torch.float16, device=device))
            self.register_buffer("lowrank_down", torch.zeros(rank, in_features, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    def decoded_weight(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = nn.functional.linear(x, self.decoded_weight(x.dtype), bias)
        if self.rank:
            y = y + nn.functional.linear(nn.functional.linear(x, self.lowrank_down.to(x.dtype)), self.lowrank_up.to(x.dtype))
        return y


def _unpack(data: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """The first ``count`` ``width``-bit integers (int64) of each little-endian byte stream along the
    last dimension of ``data``. Bytes are read in blocks that hold a whole number of integers
    (``lcm(width, 8)/8`` bytes, at most 8 for every width the quantisers write), each block one int64
    word and every integer a shift and a mask of it: no tensor of single bits, so decoding a layer at
    every call costs a few elementwise passes over its codes."""
    block = math.lcm(width, 8) // 8
    if block > 8:
        raise ValueError(f"{width}-bit codes: a block of {block} bytes does not fit one 64-bit word")
    data = data.to(torch.int64)
    pad = (-data.shape[-1]) % block
    if pad:
        data = torch.cat([data, data.new_zeros(*data.shape[:-1], pad)], dim=-1)
    data = data.reshape(*data.shape[:-1], -1, block)
    word = data[..., 0]
    for byte in range(1, block):
        word = word | (data[..., byte] << (8 * byte))
    mask = (1 << width) - 1
    values = torch.stack([(word >> (width * i)) & mask for i in range(8 * block // width)], dim=-1)
    return values.flatten(-2)[..., :count]


class VQLinear(_Compensated):
    """``y = W x + b`` with ``W`` stored as GPTVQ codes: each ``dim`` consecutive weights of a row are
    one index (``bits_per_dim·dim`` bits, packed little-endian into ``weight_codes``) into the int8
    codebook of its group (``group_rows`` rows × ``group_columns`` columns), scaled by the codebook's
    fp16 scale. The int8 × fp16 products are exact in fp32, so the decoded weight is the quantiser's."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dim: int, bits_per_dim: int,
                 group_rows: int, group_columns: int, rank: int = 0, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self._init_extras(in_features, out_features, rank, bias, dtype, device)
        self.dim, self.bits_per_dim, self.group_rows, self.group_columns = dim, bits_per_dim, group_rows, group_columns
        vectors, width = out_features * in_features // dim, bits_per_dim * dim
        groups = (out_features // group_rows, in_features // group_columns)
        self.register_buffer("weight_codes", torch.zeros(-(-vectors * width // 8), dtype=torch.uint8, device=device))
        self.register_buffer("weight_codebooks", torch.zeros(*groups, 1 << width, dim, dtype=torch.int8, device=device))
        self.register_buffer("weight_scales", torch.zeros(*groups, dtype=torch.float16, device=device))

    def decoded_weight(self, dtype: torch.dtype) -> torch.Tensor:
        width, count = self.bits_per_dim * self.dim, self.out_features * self.in_features // self.dim
        device = self.weight_codes.device
        index = _unpack(self.weight_codes, width, count).reshape(self.out_features, -1)
        values = self.weight_codebooks.to(dtype) * self.weight_scales.to(dtype)[..., None, None]
        group_columns, entries = values.shape[1], values.shape[2]
        rows = torch.arange(self.out_features, device=device) // self.group_rows
        columns = torch.arange(index.shape[1], device=device) // (self.group_columns // self.dim)
        # each vector's row in the codebooks flattened to (groups · entries) × dim: one gather
        flat = (rows[:, None] * group_columns + columns[None, :]) * entries + index
        return values.reshape(-1, self.dim).index_select(0, flat.reshape(-1)).reshape(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, dim={self.dim}, "
                f"bits_per_dim={self.bits_per_dim}, groups={self.group_rows}x{self.group_columns}, rank={self.rank}")


class GridLinear(_Compensated):
    """``y = W x + b`` with ``W`` on a symmetric ``bits``-bit grid in compressed-tensors' ``pack-quantized``
    layout: each row's codes a dense little-endian bit stream in int32 words (``weight_packed``),
    ``(code − 2^(bits−1)) · scale`` with an fp16 scale per row and group of ``group_size`` columns."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int | None,
                 rank: int = 0, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self._init_extras(in_features, out_features, rank, bias, dtype, device)
        self.bits, self.group_size = bits, group_size
        groups = 1 if group_size is None else -(-in_features // group_size)
        self.register_buffer("weight_packed", torch.zeros(out_features, -(-in_features * bits // 32), dtype=torch.int32,
                                                          device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64, device=device))

    def decoded_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if torch.tensor([1], dtype=torch.int32).view(torch.uint8)[0] != 1:
            raise RuntimeError("GridLinear decodes int32 words as little-endian bytes")
        device = self.weight_packed.device
        codes = _unpack(self.weight_packed.contiguous().view(torch.uint8), self.bits, self.in_features)
        columns = torch.arange(self.in_features, device=device) // (self.group_size or self.in_features)
        return (codes - (1 << (self.bits - 1))).to(dtype) * self.weight_scale.to(dtype)[:, columns]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, rank={self.rank}")


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, has_bias) of an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    if type(module).__name__ == "Conv1D":  # weight stored (in, out)
        return module.weight.shape[0], module.weight.shape[1], module.bias is not None
    raise TypeError(f"cannot factor a {type(module).__name__}")


def swap_linears(model: nn.Module, ranks: dict[str, int], remapped: frozenset[str] = frozenset(),
                 vq: dict[str, dict[str, int]] | None = None, grid: dict[str, dict] | None = None,
                 factor_grid: dict | None = None, factor_bits: dict[str, int] | None = None) -> None:
    """Replace each named linear by a ``LowRankLinear`` of the given rank (a ``RemappedLinear``
    for the names in ``remapped``; with ``factor_grid``, its two factors ``GridLinear``, at the width
    ``factor_bits`` gives the linear if any), and each linear in ``vq`` / ``grid`` by a ``VQLinear`` /
    ``GridLinear`` of its spec."""
    for kind, specs in ((VQLinear, vq or {}), (GridLinear, grid or {})):
        for name, spec in specs.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
            in_features, out_features, bias = linear_shape(old)
            setattr(parent, child, kind(in_features, out_features, bias, **spec, dtype=old.weight.dtype,
                                        device=old.weight.device))
    for name, rank in ranks.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        in_features, out_features, bias = linear_shape(old)
        kind = RemappedLinear if name in remapped else LowRankLinear
        new = kind(in_features, out_features, int(rank), bias, dtype=old.weight.dtype, device=old.weight.device)
        if factor_grid:
            spec = {**factor_grid, "bits": (factor_bits or {}).get(name, factor_grid["bits"])}
            new.down = GridLinear(in_features, int(rank), False, **spec, dtype=old.weight.dtype, device=old.weight.device)
            new.up = GridLinear(int(rank), out_features, bias, **spec, dtype=old.weight.dtype, device=old.weight.device)
        setattr(parent, child, new)


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
        def __init__(self, lowrank_ranks: dict[str, int] | None = None, lowrank_remapped: list[str] | None = None,
                     lowrank_vq: dict[str, dict[str, int]] | None = None, lowrank_grid: dict[str, dict] | None = None,
                     lowrank_factor_grid: dict | None = None, lowrank_factor_bits: dict[str, int] | None = None,
                     **kwargs) -> None:
            self.lowrank_ranks = dict(lowrank_ranks or {})
            if lowrank_remapped:  # absent from configs without remapping, so theirs stay as they were
                self.lowrank_remapped = sorted(lowrank_remapped)
            if lowrank_vq:  # likewise
                self.lowrank_vq = dict(sorted(lowrank_vq.items()))
            if lowrank_grid:
                self.lowrank_grid = dict(sorted(lowrank_grid.items()))
            if lowrank_factor_grid:
                self.lowrank_factor_grid = dict(lowrank_factor_grid)
            if lowrank_factor_bits:  # a joint (rank, bits) allocation: each factored linear's own width
                self.lowrank_factor_bits = dict(sorted(lowrank_factor_bits.items()))
            super().__init__(**kwargs)

    Config.model_type = model_type

    class Model(model_cls):
        config_class = Config

        def __init__(self, config: Config) -> None:
            super().__init__(config)
            swap_linears(self, config.lowrank_ranks, frozenset(getattr(config, "lowrank_remapped", ())),
                         getattr(config, "lowrank_vq", None), getattr(config, "lowrank_grid", None),
                         getattr(config, "lowrank_factor_grid", None), getattr(config, "lowrank_factor_bits", None))

    return Config, Model


LowRankLlamaConfig, LowRankLlamaForCausalLM = _lowrank_pair(LlamaConfig, LlamaForCausalLM, "lowrank_llama")
LowRankMistralConfig, LowRankMistralForCausalLM = _lowrank_pair(MistralConfig, MistralForCausalLM, "lowrank_mistral")
LowRankQwen2Config, LowRankQwen2ForCausalLM = _lowrank_pair(Qwen2Config, Qwen2ForCausalLM, "lowrank_qwen2")
LowRankGPT2Config, LowRankGPT2LMHeadModel = _lowrank_pair(GPT2Config, GPT2LMHeadModel, "lowrank_gpt2")
LowRankGemma3TextConfig, LowRankGemma3ForCausalLM = _lowrank_pair(Gemma3TextConfig, Gemma3ForCausalLM, "lowrank_gemma3_text")
for _cls, _name in [
    (LowRankLlamaConfig, "LowRankLlamaConfig"), (LowRankLlamaForCausalLM, "LowRankLlamaForCausalLM"),
    (LowRankMistralConfig, "LowRankMistralConfig"), (LowRankMistralForCausalLM, "LowRankMistralForCausalLM"),
    (LowRankQwen2Config, "LowRankQwen2Config"), (LowRankQwen2ForCausalLM, "LowRankQwen2ForCausalLM"),
    (LowRankGPT2Config, "LowRankGPT2Config"), (LowRankGPT2LMHeadModel, "LowRankGPT2LMHeadModel"),
    (LowRankGemma3TextConfig, "LowRankGemma3TextConfig"), (LowRankGemma3ForCausalLM, "LowRankGemma3ForCausalLM"),
]:
    _cls.__name__ = _cls.__qualname__ = _name

#: the assembled model's ``model_type`` is ``<FAMILY>_<base model_type>``
FAMILY = "lowrank"
#: base ``model_type`` → (config class name, model class name) in this file.
LOWRANK_CLASSES = CLASSES = {
    "llama": ("LowRankLlamaConfig", "LowRankLlamaForCausalLM"),
    "mistral": ("LowRankMistralConfig", "LowRankMistralForCausalLM"),
    "qwen2": ("LowRankQwen2Config", "LowRankQwen2ForCausalLM"),
    "gpt2": ("LowRankGPT2Config", "LowRankGPT2LMHeadModel"),
    "gemma3_text": ("LowRankGemma3TextConfig", "LowRankGemma3ForCausalLM"),
}
