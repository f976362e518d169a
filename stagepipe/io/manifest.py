"""The manifest: a pydantic record written last, whose presence and validity mean "done".

A partition's output directory is complete iff ``manifest.json`` parses, has the current
``schema_version`` and key, and every listed file has the recorded size (``verify(..., deep=True)``
also re-hashes contents). Non-finite numbers survive the round trip (``Infinity``/``NaN``).

A manifest holds two kinds of facts: the *content* (file hashes and ``info``, the stage's results)
and the *run* (key material, host, pid, timings, ``telemetry``). Downstream keys hash the content
alone (``content_digest``), so an identical redo changes nothing downstream.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from stagepipe.faults import kill_point
from stagepipe.io.hashing import list_files, sha256_file, sha256_json

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 2


class ManifestError(Exception):
    """The manifest is missing, unreadable or of another schema: the partition is not done."""


class FileRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    size: int
    sha256: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    schema_version: Literal[2] = SCHEMA_VERSION
    stage: str
    partition: str
    stage_version: int
    key: str
    key_material: dict[str, Any]
    files: list[FileRecord]
    info: dict[str, Any] = {}
    telemetry: dict[str, Any] = {}
    run_id: str
    host: str
    pid: int
    started_at: float
    finished_at: float
    wall_s: float
    peak_rss_mb: float
    peak_gpu_mb: float | None = None

    def content_digest(self) -> str:
        """Identity of what downstream stages read: file hashes and results, not how or when they
        were made (key, host, timings, telemetry)."""
        return sha256_json({"files": [f.model_dump() for f in self.files], "info": self.info})


def record_files(root: Path) -> list[FileRecord]:
    """Hash every file under ``root`` (excluding the manifest itself)."""
    return [
        FileRecord(path=str(rel), size=(root / rel).stat().st_size, sha256=sha256_file(root / rel))
        for rel in list_files(root)
        if str(rel) != MANIFEST_NAME
    ]


def write_atomic(directory: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` via temp file + fsync + ``os.replace``."""
    path = directory / MANIFEST_NAME
    tmp = directory / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(manifest.model_dump_json(indent=1))
        handle.flush()
        os.fsync(handle.fileno())
    kill_point("manifest-written")  # the manifest's temp file is complete, not yet in place
    os.replace(tmp, path)
    return path


def read(directory: Path) -> Manifest:
    """Parse a partition's manifest or raise ``ManifestError`` saying why it is not trusted."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: missing")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: unreadable ({exc})") from None
    if isinstance(raw, dict) and raw.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema_version {raw.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(f"{path}: invalid ({exc.errors()[0]['msg']})") from None


def under(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` or inside the directory ``prefix`` (manifest paths use ``/``)."""
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def verify(directory: Path, manifest: Manifest, deep: bool = False, skip: Collection[str] = (),
           only: str | None = None) -> list[str]:
    """Problems with the files a manifest lists: missing, wrong size, or (deep) wrong hash; files
    under a ``skip`` prefix are not checked, and with ``only`` just the files under that prefix are."""
    problems = []
    for record in manifest.files:
        if any(under(record.path, prefix) for prefix in skip) or (only is not None and not under(record.path, only)):
            continue
        path = directory / record.path
        if not path.is_file():
            problems.append(f"{record.path}: missing")
            continue
        size = path.stat().st_size
        if size != record.size:
            problems.append(f"{record.path}: size {size}, manifest says {record.size}")
        elif deep and sha256_file(path) != record.sha256:
            problems.append(f"{record.path}: content hash differs from manifest")
    return problems
