"""Checkpoints inside a long partition, and the one resumable Adam.

A checkpoint is one safetensors file in the partition's resume directory (``Work.resume``): the
tensors, and JSON metadata riding along as ``uint8``, written by temp file + rename, so a kill at
any moment leaves the previous checkpoint or this one. ``ResumableAdam`` is the Adam every trained
parameter uses (the ``train`` stage's learned methods, AA-SVD's block refinement): its moments and
parameter groups go into the caller's checkpoint, and a resumed run continues with the very state
an uninterrupted run had (bit-identical on CPU).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from stagepipe.faults import kill_point
from stagepipe.io import safetensors_io

_META = "__meta__"


def write_checkpoint(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Tensors and JSON metadata as one safetensors file, written by temp file + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
    safetensors_io.write_atomic(path, {**tensors, _META: blob})


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, metadata) of a checkpoint, or ``None`` when there is none yet."""
    if not path.is_file():
        return None
    tensors = safetensors_io.read(path)
    meta = json.loads(bytes(tensors.pop(_META).tolist()).decode())
    return tensors, meta


class ResumableAdam:
    """Adam over ``params``, checkpointed with the caller's state in one file at ``path``.

    ``resume()`` returns the caller's tensors and metadata of the last checkpoint (and restores
    Adam's moments), or ``None``; ``step(rate)`` takes one step at that learning rate;
    ``save(tensors, meta)`` writes the caller's state with Adam's and arrives at kill point
    ``point`` (``faults.POINTS``)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, path: Path, point: str) -> None:
        self.params = list(params)
        self.optimizer = torch.optim.Adam(self.params, lr=lr)
        self.path, self.point = path, point

    def resume(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        found = read_checkpoint(self.path)
        if found is None:
            return None
        tensors, meta = found
        state = {i: {key: tensors.pop(f"adam.{i}.{key}") for key in ("step", "exp_avg", "exp_avg_sq")}
                 for i in range(len(self.params)) if f"adam.{i}.step" in tensors}
        groups = meta.pop("adam_param_groups") if "adam_param_groups" in meta else meta.pop("param_groups")  # older files
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        return tensors, meta

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, rate: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        self.optimizer.step()

    def save(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        state = self.optimizer.state_dict()
        adam = {f"adam.{i}.{key}": value.cpu() for i, s in state["state"].items() for key, value in s.items()}
        write_checkpoint(self.path, {**tensors, **adam}, {**meta, "adam_param_groups": state["param_groups"]})
        kill_point(self.point)
