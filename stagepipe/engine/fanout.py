"""Fan-out inside one partition: the same function over a list of jobs, results in job order.

A partition whose work splits into independent pieces (``capture`` and ``fisher`` over shards of
the calibration windows) hands them to ``Work.fan_out.map``. The partition stays the unit of
caching and commit: it reduces the pieces' results in job order and commits once, so its output
depends on the list of jobs (a config value), never on where they ran.

- ``SerialFanOut`` (in-process, and whenever the task was not shipped by the Ray executor): runs
  the jobs one after another in this process.
- ``RayFanOut``: one Ray task per job with the executor's per-task resources; Ray retries a job
  whose worker or node died (``max_retries``), so a lost node costs that job, not the partition.
  A job writes only its own rows (distinct zarr chunks) into the partition's temp directory on the
  shared workspace, so a retried or duplicated job is harmless. The calling task blocks in
  ``ray.get``, which hands its CPUs back to Ray while it waits.

This is not a scheduler: order, retries and placement are Ray's; the engine only keeps the order
of the results, which makes the reduction exact.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from stagepipe import faults


@dataclass
class JobRun:
    """Where and how long one job ran (telemetry: never part of a content digest)."""

    label: str
    host: str
    node: str
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.label, "host": self.host, "node": self.node, "wall_s": round(self.wall_s, 3)}


class FanOut(Protocol):
    runs: list[JobRun]
    #: jobs run in this process (their tensors may stay on its device); else they are shipped
    in_process: bool

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any], labels: Sequence[str]) -> list[Any]:
        """``[fn(job) for job in jobs]``, possibly in parallel elsewhere; results in job order."""


def ray_node_id() -> str:
    """The Ray node this process runs on, or ``-`` outside Ray (never imports Ray itself)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return "-"
    return ray.get_runtime_context().get_node_id()


def hang_if_asked(label: str) -> None:
    """Test hook: ``STAGEPIPE_TEST_HANG_IN=<label>`` (a partition ``stage@part`` or a job
    ``stage@part#shard-i``) hangs there; with ``STAGEPIPE_TEST_HANG_ONCE=<file>`` only the first
    attempt hangs (it writes the file with its host, pid and Ray node), so a retry can finish."""
    if os.environ.get("STAGEPIPE_TEST_HANG_IN") != label:
        return
    once = os.environ.get("STAGEPIPE_TEST_HANG_ONCE")
    if once is not None and os.path.exists(once):
        return
    if once is not None:  # whole or absent: a watcher never reads it half written
        partial = Path(f"{once}.{os.getpid()}.partial")
        partial.write_text(f"{socket.gethostname()} {os.getpid()} {ray_node_id()}")
        partial.replace(once)
    print(f"STAGEPIPE_TEST: hanging in {label}", flush=True)
    time.sleep(3600)


def run_job(fn: Callable[[Any], Any], job: Any, label: str, threads: int | None = None) -> tuple[Any, JobRun]:
    """Run one job and time it (the unit both fan-outs execute), with the task's torch thread count
    (``runtime.threads``) in a Ray worker too; the worker's own count is restored afterwards."""
    started = time.time()
    torch = sys.modules.get("torch")  # imported by the job's module when it was unpickled
    before = torch.get_num_threads() if torch is not None and threads else None
    if before is not None:
        torch.set_num_threads(threads)
    where, faults.current = faults.current, label  # kill points inside the job name the job
    try:
        hang_if_asked(label)
        result = fn(job)
    finally:
        faults.current = where
        if before is not None:
            torch.set_num_threads(before)
    return result, JobRun(label, socket.gethostname(), ray_node_id(), time.time() - started)


class SerialFanOut:
    in_process = True

    def __init__(self) -> None:
        self.runs: list[JobRun] = []

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any], labels: Sequence[str]) -> list[Any]:
        results = []
        for job, label in zip(jobs, labels, strict=True):
            result, run = run_job(fn, job, label)
            self.runs.append(run)
            results.append(result)
        return results


class RayFanOut:
    """``options``: Ray task options (num_cpus, num_gpus, memory, max_retries) for every job."""

    in_process = False

    def __init__(self, options: dict[str, Any], threads: int | None = None) -> None:
        import ray  # only ever built inside a Ray task, where Ray is imported and initialised

        self._ray = ray
        self._remote = ray.remote(run_job).options(**options)
        self._threads = threads
        self.runs: list[JobRun] = []

    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any], labels: Sequence[str]) -> list[Any]:
        refs = [self._remote.remote(fn, job, label, self._threads) for job, label in zip(jobs, labels, strict=True)]
        results = []
        for result, run in self._ray.get(refs):  # job order, whatever order they finished in
            self.runs.append(run)
            results.append(result)
        return results


def make_fan_out(options: dict[str, Any] | None, threads: int | None = None) -> FanOut:
    """Ray jobs when the task carries Ray options (it was shipped by the Ray executor), else serial
    (in the task's process, which already runs with ``threads``)."""
    return SerialFanOut() if options is None else RayFanOut(options, threads)
