"""The manifest: a pydantic record written last, whose presence and validity mean "done".

A partition's output directory is complete iff ``manifest.json`` parses, checks against its own
hash, has the current ``schema_version`` and key, and every listed file has the content the
manifest records. Non-finite numbers survive the round trip (``Infinity``/``NaN``).

**Nothing corrupt is read.** ``verify`` compares every file with its recorded SHA-256. Hashing a
whole workspace on every look would be slow, so a *stamp* (``.stamps.json`` beside the manifest,
not part of the output) remembers each file's size, mtime, ctime and inode at the moment its hash
was last checked; a file whose stat still matches its stamp is not re-hashed. Any write to a file
changes its ctime (which no user call can set back), so a changed file is always re-hashed. A
stamp taken in the same filesystem clock tick as the file's last change is not trusted
("racily clean", as git treats its index): such a file is hashed once more on the next look.
``deep=True`` (``stagepipe verify``) ignores stamps and re-hashes everything (bit rot leaves no
trace in a stat).

A manifest holds three kinds of facts: the *content* (file hashes and ``info``, the results a
consumer reads), *diagnostics* (measured numbers a reader may print but no computation reads:
floating-point reductions whose last bits depend on the thread count) and the *run* (key
material, host, pid, timings, ``telemetry``). Downstream keys hash the content alone
(``content_digest``), so an identical redo changes nothing downstream, whatever executor ran it.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from stagepipe.faults import kill_point
from stagepipe.io.hashing import list_files, sha256_file, sha256_json

MANIFEST_NAME = "manifest.json"
STAMPS_NAME = ".stamps.json"
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
    #: measured numbers no consumer computes with (errors, conditions, losses, repair records)
    diagnostics: dict[str, Any] = {}
    telemetry: dict[str, Any] = {}
    run_id: str
    host: str
    pid: int
    started_at: float
    finished_at: float
    wall_s: float
    peak_rss_mb: float
    peak_gpu_mb: float | None = None
    #: SHA-256 of this manifest's canonical JSON without this field: an edited or bit-flipped
    #: manifest that still parses is refused (absent in manifests written before it existed)
    self_sha256: str | None = None

    def sealed(self) -> Manifest:
        """This manifest with ``self_sha256`` set."""
        return self.model_copy(update={"self_sha256": self._own_hash()})

    def _own_hash(self) -> str:
        return sha256_json(self.model_dump(mode="json", exclude={"self_sha256"}))

    def content_digest(self) -> str:
        """Identity of what downstream stages read: file hashes and results, not how or when they
        were made (key, host, timings, telemetry)."""
        return sha256_json({"files": [f.model_dump() for f in self.files], "info": self.info})


def record_files(root: Path) -> list[FileRecord]:
    """Hash every file under ``root`` (excluding the manifest itself and its stamps)."""
    return [
        FileRecord(path=str(rel), size=(root / rel).stat().st_size, sha256=sha256_file(root / rel))
        for rel in list_files(root)
        if str(rel) not in (MANIFEST_NAME, STAMPS_NAME)
    ]


def write_atomic(directory: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` via temp file + fsync + ``os.replace``."""
    path = directory / MANIFEST_NAME
    tmp = directory / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(manifest.sealed().model_dump_json(indent=1))
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
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(f"{path}: invalid ({exc.errors()[0]['msg']})") from None
    if manifest.self_sha256 is not None and manifest.self_sha256 != manifest._own_hash():
        raise ManifestError(f"{path}: content differs from its own hash (edited or damaged)")
    return manifest


def under(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` or inside the directory ``prefix`` (manifest paths use ``/``)."""
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def verify(directory: Path, manifest: Manifest, deep: bool = False, skip: Collection[str] = (),
           only: str | None = None, missing_ok: bool = False) -> list[str]:
    """Problems with the files a manifest lists: missing, wrong size, or content that differs from
    the recorded hash — re-hashed unless the file's stamp vouches for it (always with ``deep``).
    Files under a ``skip`` prefix are not checked; with ``only`` just the files under that prefix
    are; with ``missing_ok`` an absent file is no problem (a released payload). Files found good
    are stamped, so the next look costs one ``stat`` each."""
    stamps = {} if deep else read_stamps(directory)
    fresh: dict[str, list[int]] = {}
    problems = []
    for record in manifest.files:
        if any(under(record.path, prefix) for prefix in skip) or (only is not None and not under(record.path, only)):
            continue
        path = directory / record.path
        try:
            seen = _stat(path)
        except FileNotFoundError:
            if not missing_ok:
                problems.append(f"{record.path}: missing")
            continue
        if seen[0] != record.size:
            problems.append(f"{record.path}: size {seen[0]}, manifest says {record.size}")
        elif stamps.get(record.path) == seen:
            continue
        elif sha256_file(path) != record.sha256:
            problems.append(f"{record.path}: content hash differs from manifest")
        else:
            fresh[record.path] = seen
    if fresh:
        write_stamps(directory, fresh)
    return problems


def _stat(path: Path) -> list[int]:
    """What a write to ``path`` changes: size, mtime, ctime (no call sets it back), inode."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def read_stamps(directory: Path) -> dict[str, list[int]]:
    """The stamps of files whose hash was checked, less those stamped in the clock tick of their
    own last change (racily clean: a write in that tick would leave the stat unchanged)."""
    path = directory / STAMPS_NAME
    try:
        taken = path.stat().st_mtime_ns
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {name: seen for name, seen in data.items() if isinstance(seen, list) and len(seen) == 4 and seen[2] < taken}


def write_stamps(directory: Path, fresh: dict[str, list[int]]) -> None:
    """Add ``fresh`` stamps (files whose hash was just checked, their stat taken before the
    check). Best effort: a read-only workspace only costs re-hashing next time."""
    path = directory / STAMPS_NAME
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        data = {}
    data = {**(data if isinstance(data, dict) else {}), **fresh}
    tmp = directory / f".{STAMPS_NAME}.{uuid.uuid4().hex[:6]}"
    try:
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def stamp_all(directory: Path, manifest: Manifest) -> None:
    """Stamp every file of a manifest just written from these very files (``record_files``
    hashed them): the commit's own check, so the first reader does not hash them again."""
    write_stamps(directory, {record.path: _stat(directory / record.path) for record in manifest.files})
