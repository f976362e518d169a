"""Content hashing and canonical JSON, shared by cache keys and manifests."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and compact separators, so equal data always hashes equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True)


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def sha256_file_cached(path: Path) -> str:
    """``sha256_file``, computed once per (path, size, mtime) in a process: the driver asks for
    source fingerprints on every scheduling round."""
    stat = path.stat()
    return _sha256_once(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_once(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def list_files(root: Path) -> list[Path]:
    """Every regular file below ``root``, sorted, as paths relative to ``root``."""
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
