"""Where the decoder blocks, the final norm and the linears live in each supported architecture.

Weights are always handled as ``W`` with shape (out, in) = (m, n). GPT-2's ``Conv1D`` stores its
weight as (in, out); ``weight_matrix`` transposes it so no formula downstream has to know.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from stagepipe.errors import StagepipeError
from stagepipe.geometry import BlockGeometry


@dataclass(frozen=True)
class Layout:
    layers_path: str  # ModuleList of decoder blocks, relative to the CausalLM root
    final_norm_path: str
    #: the block's last linear, whose output is added to the residual stream as the block's last
    #: operation: its output gradient is the gradient at the block output (None: a norm follows it,
    #: as Gemma 3's post-feedforward norm)
    residual_out: str | None

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}."


LAYOUTS = {
    "llama": Layout("model.layers", "model.norm", "mlp.down_proj"),
    "mistral": Layout("model.layers", "model.norm", "mlp.down_proj"),
    "qwen2": Layout("model.layers", "model.norm", "mlp.down_proj"),
    "gpt2": Layout("transformer.h", "transformer.ln_f", "mlp.c_proj"),
    # Gemma 3 (text): sliding-window and global attention blocks, q/k norms, a norm after the
    # attention and after the MLP output, so no linear writes the residual stream directly
    "gemma3_text": Layout("model.layers", "model.norm", None),
}


def layout_for(model_type: str) -> Layout:
    try:
        return LAYOUTS[model_type]
    except KeyError:
        raise StagepipeError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(LAYOUTS))}"
        ) from None


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a linear; GPT-2 ``Conv1D`` weights are transposed."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D":
        return module.weight.T
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def set_weight_matrix(module: nn.Module, w: torch.Tensor) -> None:
    """Overwrite a linear's weight from an (out, in) matrix (transposed back for ``Conv1D``)."""
    target = weight_matrix(module)
    target.data.copy_(w.to(target.dtype))


def swap_modules(model: nn.Module, names: Iterable[str], build: Callable[[str, nn.Module], nn.Module]) -> dict[str, nn.Module]:
    """Freeze every parameter of ``model`` and replace each named module by ``build(name, old)``, on
    the instance (no class is patched); the new modules by name. The learned methods' trainers use it."""
    for param in model.parameters():
        param.requires_grad_(False)
    swapped = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        swapped[name] = build(name, old).to(weight_matrix(old).device)
        setattr(parent, child, swapped[name])
    return swapped


def block_linears(layer: nn.Module, patterns: list[str] | None) -> dict[str, nn.Module]:
    """Linears inside one decoder block, by name relative to the block, filtered by regexes."""
    compiled = [re.compile(p) for p in patterns] if patterns else None
    found = {}
    for name, module in layer.named_modules():
        if name and is_linear(module) and (compiled is None or any(p.search(name) for p in compiled)):
            found[name] = module
    return found


def block_linear_shapes(config, patterns: list[str] | None = None) -> dict[str, tuple[int, int]]:
    """(m, n) of every linear inside every decoder block, by full name (``geometry.BlockGeometry``,
    the one derivation of a block's shapes; tested against a meta-device model of each layout);
    with ``patterns``, only the linears whose block-relative name one of them matches (as ``block_linears``)."""
    layout = layout_for(config.model_type)
    geometry = BlockGeometry.of(config)
    compiled = [re.compile(p) for p in patterns] if patterns else None
    local = {name: shape for name, shape in geometry.linear_shapes().items()
             if compiled is None or any(p.search(name) for p in compiled)}
    return {layout.layer_prefix(i) + name: shape for i in range(geometry.layers) for name, shape in local.items()}
