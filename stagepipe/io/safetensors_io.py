"""Weights and factors as safetensors files (float tensors, string metadata)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stagepipe.faults import kill_point

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomic(path: Path, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Save contiguous CPU copies via a temp file and rename, with metadata ``{"format": "pt"}`` only.

    safetensors serialises metadata from a hash map, so two or more keys make the header bytes
    differ from run to run; stagepipe promises bit-identical outputs, and the manifest carries the
    provenance instead.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    clean = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    save_file(clean, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o666 & ~_UMASK)  # safetensors creates 0600: shipped model files are for other users too
    kill_point("safetensors-written")  # the temp file is complete, the final name does not exist yet
    os.replace(tmp, path)
    return path


def read(path: Path, keys: Iterable[str] | None = None, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load all tensors, or just ``keys``, without reading the rest of the file."""
    with safe_open(str(path), framework="pt", device=device) as handle:
        names = list(keys) if keys is not None else list(handle.keys())
        return {name: handle.get_tensor(name) for name in names}


def keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())

