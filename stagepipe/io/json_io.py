"""Small JSON documents (markers, checkpoint metadata): atomic writes, forgiving reads."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: Any) -> Path:
    """Write ``data`` as JSON via a temp file, fsync and ``os.replace``: readers see old or new."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}")
    with open(tmp, "w") as handle:
        handle.write(json.dumps(data, indent=1, sort_keys=True))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def read(path: Path) -> Any | None:
    """The parsed document, or ``None`` if it is missing or unreadable (a marker may be half-made)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
