"""One layer of a low-rank model: a block's tensors with each factored linear replaced by its
factors, the form ``modeling_lowrank`` loads (``<name>.down.weight`` / ``<name>.up.weight`` /
``<name>.up.bias``; with Dobi-SVD's remapping the 8-bit codes and fp16 scales of
``modeling_lowrank.remap_factors``). Every stage whose outputs are a layer's final factors
(decompose, rank_factors, anchor, refit, a learned method's train) hands its factors here."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from stagepipe.models import modeling_lowrank


def lowrank_layer(tensors: dict[str, torch.Tensor], prefix: str, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                  storage: str, params: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``tensors`` (the block's, full names) with ``factors`` (block-relative names) in place of the
    dense weights and ``params`` (block-relative names: refined norm weights) over the originals."""
    for local, value in (params or {}).items():
        tensors[prefix + local] = value.to(tensors[prefix + local].dtype)
    for local, (up, down) in factors.items():
        full = prefix + local
        weight = tensors.pop(f"{full}.weight")
        if storage == "remap8":  # the bias keeps its name: RemappedLinear.bias
            tensors.update({f"{full}.{key}": t for key, t in modeling_lowrank.remap_factors(up, down).items()})
            continue
        tensors[f"{full}.up.weight"] = up.to(weight.dtype)
        tensors[f"{full}.down.weight"] = down.to(weight.dtype)
        if f"{full}.bias" in tensors:
            tensors[f"{full}.up.bias"] = tensors.pop(f"{full}.bias")
    return tensors


def replaced_layer(tensors: Mapping[str, torch.Tensor], prefix: str, replaced: set[str],
                   added: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's tensors (full names under ``prefix``) without those whose block-relative name is in
    ``replaced``, with ``added`` (block-relative names) in their place: a structured block's smaller
    matrices, a quantised linear's packed tensors."""
    kept = {key: value for key, value in tensors.items() if key[len(prefix):] not in replaced}
    return {**kept, **{prefix + local: t for local, t in added.items()}}
