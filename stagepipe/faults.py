"""Fault injection for the crash/resume tests: named kill points, off unless a variable is set.

A kill point is a line where a SIGKILL must leave the workspace resumable; the kill-point tests
set ``STAGEPIPE_TEST_KILL_AT`` to one of them, run a pipeline in a subprocess, resume it, and
compare every output with an uninterrupted run. This module imports nothing of stagepipe, so
every layer can place points.
"""

from __future__ import annotations

import os

#: the partition this process is executing (``stage@part``), set by the engine around each task
current: str | None = None


def kill_point(name: str, ref: object | None = None) -> None:
    """Fault injection for the crash/resume tests (environment variables, off by default).

    ``STAGEPIPE_TEST_KILL_AT=<point>[@<stage@part>]`` kills this process with SIGKILL the first
    time execution reaches that point (optionally only in that partition: ``ref``, else ``current``). Points are named where
    they are placed (``after-run``, ``before-rename``, ``sweep-saved``…); ``STAGEPIPE_TEST_KILL_SKIP=N``
    lets the first N arrivals pass, so a test can kill at the N-th chunk write of an array;
    ``STAGEPIPE_TEST_TRACE=<file>`` appends every arrival (point and partition) to the file.
    """
    here = str(ref) if ref is not None else current
    trace = os.environ.get("STAGEPIPE_TEST_TRACE")
    if trace:  # the kill-point tests record every arrival of an uninterrupted run, then draw from them
        with open(trace, "a") as handle:
            handle.write(f"{name}\t{here}\n")
    wanted = os.environ.get("STAGEPIPE_TEST_KILL_AT")
    if not wanted:
        return
    point, _, where = wanted.partition("@")
    if point != name or (where and where != here):
        return
    skip = int(os.environ.get("STAGEPIPE_TEST_KILL_SKIP", "0"))
    if skip > 0:
        os.environ["STAGEPIPE_TEST_KILL_SKIP"] = str(skip - 1)
        return
    os.kill(os.getpid(), 9)
