"""Fault injection for the crash/resume tests: named kill points, off unless a variable is set.

A kill point is a line where a SIGKILL must leave the workspace resumable; the kill-point tests
arm one of them, run a pipeline, resume it, and compare every output with an uninterrupted run.
This module imports nothing of stagepipe, so every layer can place points. Every point is named in
``POINTS`` (a test checks that the code places exactly these), so a fuzz can assert that it fired
each of them.

Arming, by environment variables (read at each arrival, so a Ray worker started earlier follows a
plan written later):

- ``STAGEPIPE_TEST_KILL_AT=<point>[@<where>]`` kills this process with SIGKILL at that point
  (optionally only in that partition or fan-out job: ``ref``, else ``current``);
  ``STAGEPIPE_TEST_KILL_SKIP=N`` lets the first N matching arrivals of this process pass.
- ``STAGEPIPE_TEST_KILL_PLAN=<file>``: the same as JSON ``{"at": "<point>@<where>", "skip": N}``
  in a file that may change between runs (a module-wide Ray cluster's workers read it).
- ``STAGEPIPE_TEST_KILL_ONCE=<file>`` (or ``"once"`` in the plan): only the first process to
  arrive kills itself, and it writes the file first (``O_EXCL``); retries on Ray pass, and the file
  says the kill fired.
- ``STAGEPIPE_TEST_TRACE=<file>`` appends every arrival (point, where) to the file.
"""

from __future__ import annotations

import json
import os

#: every kill point the code places, in the order a partition meets them
POINTS = (
    "zarr-rows-written",  # some chunks of a streamed array are written, the rest are not
    "zarr-group-written",  # a whole zarr group sits in its temp directory, not yet renamed
    "safetensors-written",  # a safetensors temp file is complete, its final name does not exist yet
    "sweep-saved",  # GFWSVD's power iteration saved a sweep in the partition's resume directory
    "refine-saved",  # AA-SVD's block refinement saved an epoch
    "train-saved",  # the train stage saved a checkpoint
    "after-run",  # the stage's work is done, its manifest not yet written
    "manifest-written",  # the manifest's temp file is complete, not yet in place
    "before-rename",  # the output directory is complete under its temp name
    "after-rename",  # the output is committed, the running marker not yet removed
)

#: the partition (``stage@part``) or fan-out job (``stage@part#shard-i``) this process executes
current: str | None = None
_arrivals: dict[tuple[str, str, str], int] = {}


def _plan() -> tuple[str, int, str | None] | None:
    """(point@where, arrivals to let pass, once-marker) of the armed kill, if any."""
    wanted = os.environ.get("STAGEPIPE_TEST_KILL_AT")
    if wanted:
        return wanted, int(os.environ.get("STAGEPIPE_TEST_KILL_SKIP", "0")), os.environ.get("STAGEPIPE_TEST_KILL_ONCE")
    path = os.environ.get("STAGEPIPE_TEST_KILL_PLAN")
    if not path:
        return None
    try:
        with open(path) as handle:
            plan = json.load(handle)
    except (OSError, ValueError):
        return None
    return plan["at"], int(plan.get("skip", 0)), plan.get("once")


def kill_point(name: str, ref: object | None = None) -> None:
    """Arrive at kill point ``name`` (one of ``POINTS``) in ``ref`` (default: ``current``)."""
    if name not in POINTS:
        raise ValueError(f"kill point {name!r} is not in faults.POINTS")
    here = str(ref) if ref is not None else current
    trace = os.environ.get("STAGEPIPE_TEST_TRACE")
    if trace:  # the kill-point tests record every arrival of an uninterrupted run, then draw from them
        with open(trace, "a") as handle:
            handle.write(f"{name}\t{here}\n")
    plan = _plan()
    if plan is None:
        return
    wanted, skip, once = plan
    point, _, where = wanted.partition("@")
    if point != name or (where and where != here):
        return
    armed = (wanted, str(skip), str(once))  # count this plan's matching arrivals in this process
    seen = _arrivals.get(armed, 0)
    _arrivals[armed] = seen + 1
    if seen < skip:
        return
    if once is not None:
        try:
            fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # another process (or an earlier attempt of this task) fired it
        os.write(fd, f"{name}\t{here}\t{os.getpid()}\n".encode())
        os.close(fd)
    os.kill(os.getpid(), 9)
