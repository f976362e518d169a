"""The compressed-tensors family: the architecture's own ``transformers`` class, its quantised linears
in compressed-tensors' ``pack-quantized`` layout, described by ``quantization_config`` in
``config.json`` — the format llm-compressor writes and vLLM serves. ``from_pretrained`` loads it
with the ``compressed-tensors`` package installed (no remote code, no modeling file of ours).

``assemble`` treats a family with ``NATIVE = True`` this way: the snapshot's ``config.json`` plus the
quantisation block (``write_config``), keys checked against ``expected_keys``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from stagepipe.models.dense import write_config  # noqa: F401  (assemble calls it on this family)

FAMILY = "compressed-tensors"
NATIVE = True
#: compressed-tensors' parameters of a quantised linear on a symmetric grid (``quantize.stored_tensors``)
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")


def quantization_config(bits: int, group_size: int | None, symmetric: bool, ignore: Sequence[str]) -> dict[str, Any]:
    """``config.json``'s ``quantization_config``: every ``Linear`` but ``ignore`` on one integer grid, weights only."""
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False,
               "strategy": "group" if group_size else "channel", "group_size": group_size}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}, "ignore": sorted(ignore)}


def expected_keys(target: Path) -> set[str]:
    """The checkpoint keys the architecture's class expects, each quantised linear's ``weight``
    replaced by compressed-tensors' parameters (from a meta-device instance)."""
    config = AutoConfig.from_pretrained(target)
    quantization = config.quantization_config
    ignore = set(quantization["ignore"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    keys = set(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):  # as assemble's check for the other families
        keys -= {k for k in keys if k.endswith("lm_head.weight")}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name not in ignore:
            keys.discard(f"{name}.weight")
            keys |= {f"{name}.{suffix}" for suffix in SUFFIXES}
    return keys
