"""Where a benchmark's numbers come from: the commit they were made at (written beside every table)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def head_commit() -> str:
    """The repository's short ``HEAD`` commit ('' outside a git checkout)."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
