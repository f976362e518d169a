"""Arrays as zarr v3 groups (statistics, activations, gradients, token ids).

zarr 3.1 has no bfloat16: such arrays are stored as their ``uint16`` bit pattern with the attribute
``logical_dtype = "bfloat16"`` and viewed back on read. Arrays are uncompressed by default: float
statistics barely compress and compression halves write speed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from stagepipe.faults import kill_point

LOGICAL_DTYPE = "logical_dtype"


def _to_storable(value: np.ndarray | torch.Tensor) -> tuple[np.ndarray, dict[str, str]]:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            return value.view(torch.uint16).numpy(), {LOGICAL_DTYPE: "bfloat16"}
        value = value.numpy()
    return np.ascontiguousarray(value), {}


def write_atomic(path: Path, arrays: Mapping[str, np.ndarray | torch.Tensor], attrs: Mapping[str, Any] | None = None) -> Path:
    """Write a group of whole arrays into ``path`` via a temp directory and one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    group = zarr.open_group(tmp, mode="w")
    group.attrs.update(dict(attrs or {}))
    for name, value in arrays.items():
        data, extra = _to_storable(value)
        array = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape or None,
                                   compressors=None, fill_value=0)
        array[...] = data
        array.attrs.update(extra)
    kill_point("zarr-group-written")  # the whole group sits in its temp directory, not yet renamed
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def create_array(path: Path, name: str, shape: tuple[int, ...], dtype: str, chunk_rows: int) -> zarr.Array:
    """Create an array for streaming writes along the first axis (one chunk per ``chunk_rows``).

    ``dtype`` may be ``"bfloat16"``: it is stored as uint16 with ``logical_dtype`` set.
    """
    group = zarr.open_group(path, mode="a")
    stored = "uint16" if dtype == "bfloat16" else dtype
    chunks = (max(1, min(chunk_rows, shape[0])),) + tuple(shape[1:])
    array = group.create_array(name, shape=shape, dtype=stored, chunks=chunks, compressors=None, fill_value=0)
    if dtype == "bfloat16":
        array.attrs[LOGICAL_DTYPE] = "bfloat16"
    return array


def write_rows(array: zarr.Array, start: int, value: torch.Tensor | np.ndarray) -> None:
    """Write ``value`` at rows ``start:start+len(value)``, converting bfloat16 to its bit pattern."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if array.attrs.get(LOGICAL_DTYPE) == "bfloat16":
            value = value.to(torch.bfloat16).view(torch.uint16)
        elif value.dtype == torch.bfloat16:
            value = value.float()
        value = value.numpy()
    array[start : start + len(value)] = value.astype(array.dtype, copy=False)
    kill_point("zarr-rows-written")  # some chunks of the array are written, the rest are not


def _chunk_exists(array: zarr.Array, key: str) -> bool:
    from zarr.core.sync import sync

    return bool(sync(array.store_path.store.exists(f"{array.store_path.path}/{key}")))


def open_array(path: Path, name: str, writable: bool = False) -> zarr.Array:
    """An existing array; ``writable`` to write rows into one that another process created."""
    return zarr.open_group(path, mode="r+" if writable else "r")[name]


def read_rows(array: zarr.Array, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` as a torch tensor in the logical dtype.

    Refuses rows whose chunks were never written or have gone: zarr would silently return the
    fill value (zeros) for them.
    """
    stop = min(stop, array.shape[0])
    rows_per_chunk = array.chunks[0]
    for chunk in range(start // rows_per_chunk, -(-stop // rows_per_chunk)):
        key = "/".join(["c", str(chunk)] + ["0"] * (array.ndim - 1))
        if not _chunk_exists(array, key):
            raise FileNotFoundError(f"{array.store_path}: chunk {key} is missing (rows {start}:{stop})")
    data = torch.from_numpy(np.ascontiguousarray(array[start:stop]))
    if array.attrs.get(LOGICAL_DTYPE) == "bfloat16":
        data = data.view(torch.bfloat16)
    return data


def read(path: Path, name: str | None = None) -> dict[str, np.ndarray] | np.ndarray:
    """Whole arrays as numpy (bfloat16 arrays come back as float32)."""
    group = zarr.open_group(path, mode="r")
    names = [name] if name is not None else sorted(group.array_keys())
    out = {}
    for key in names:
        array = group[key]
        data = np.asarray(array[...])
        if array.attrs.get(LOGICAL_DTYPE) == "bfloat16":
            data = torch.from_numpy(data).view(torch.bfloat16).float().numpy()
        out[key] = data
    return out[name] if name is not None else out


def attrs(path: Path) -> dict[str, Any]:
    return dict(zarr.open_group(path, mode="r").attrs)

