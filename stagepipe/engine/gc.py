"""Workspace garbage: what no given pipeline uses any more, and what dead runs left behind.

Outputs are addressed by key, so every superseded configuration stays on disk until something
deletes it (an experiment workspace on SmolLM2 reached 67 GB). ``find_garbage`` lists

- finished outputs ``<key16>/`` of a partition that none of the given pipelines' *current* keys
  reference (superseded keys, stages or partitions no given pipeline has);
- ``.aside-*`` directories (corrupt or forced-over outputs moved out of the way);
- temp, scratch and resume directories and running markers of tasks that are provably over
  (``Workspace.dead_run_leftovers``).

It never lists an output that a given pipeline still uses, nor anything of a partition whose
current key is unknown (its upstream is not done, so the key cannot be computed yet) or of a stage
whose partitions are unknown (before the model snapshot exists). Deleting is the caller's choice
and must happen under the driver lock, so no run of this workspace is in flight.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from stagepipe.engine.stage import PartitionRef
from stagepipe.engine.workspace import KEY_LEN, Workspace


@dataclass(frozen=True)
class Garbage:
    path: Path
    size: int
    why: str


def tree_size(path: Path) -> int:
    """Bytes of the files under ``path`` (symbolic links not followed)."""
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        total += sum((Path(folder) / f).lstat().st_size for f in files)
    return total


def find_garbage(ws: Workspace, keep: Mapping[PartitionRef, set[str] | None], keep_stages: set[str]) -> list[Garbage]:
    """Everything under ``ws`` that may go. ``keep`` maps each partition of the given pipelines to
    its current keys (``None``: unknown, keep every output of it); ``keep_stages`` are stages whose
    partitions are unknown (kept whole)."""
    found: list[Garbage] = []
    for directory in sorted((ws.root / "stages").glob("*/*")):
        ref = PartitionRef(directory.parent.name, directory.name)
        if ref.stage in keep_stages or not directory.is_dir():
            continue
        wanted = keep.get(ref, set())
        for child in sorted(directory.iterdir()):
            if child.name.startswith(".aside-"):
                found.append(Garbage(child, tree_size(child), "moved aside (corrupt or forced over)"))
            elif child.name.startswith(".") or not child.is_dir() or wanted is None:
                continue
            elif child.name not in {key[:KEY_LEN] for key in wanted}:
                why = "superseded key" if ref in keep else "no given pipeline has this partition"
                found.append(Garbage(child, tree_size(child), why))
    found += [Garbage(path, tree_size(path), "left by a dead run") for path in ws.dead_run_leftovers()]
    return found


def delete(items: list[Garbage]) -> int:
    """Remove the listed paths; returns the bytes freed."""
    freed = 0
    for item in items:
        if item.path.is_dir() and not item.path.is_symlink():
            shutil.rmtree(item.path)
        else:
            item.path.unlink(missing_ok=True)
        freed += item.size
    return freed
