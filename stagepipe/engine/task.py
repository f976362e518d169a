"""One partition's execution: the unit an executor ships (in-process or to a Ray worker).

A task carries the stage object, the config, the model facts and the plan (small, picklable), the
paths of its inputs and its key: never tensors. It writes the running marker, runs the stage into a temp
directory, writes the manifest last and commits by one rename. An exception is returned as a
small failure record (partition, host, error); a killed process leaves its marker behind, which
the next run reports as ``incomplete`` and redoes.
"""

from __future__ import annotations

import functools
import os
import platform
import socket
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from stagepipe import faults
from stagepipe.engine.fanout import hang_if_asked, make_fan_out, ray_node_id
from stagepipe.engine.stage import Context, PartitionRef, Stage, Work
from stagepipe.engine.workspace import Workspace
from stagepipe.faults import kill_point
from stagepipe.io import manifest as manifest_io


@dataclass(frozen=True)
class Task:
    workspace: str
    config: Any
    facts: Any
    plan: Any
    stage: Stage
    partition: str
    key: str
    key_material: dict[str, Any]
    inputs: dict[str, str]
    run_id: str
    replace: bool = False
    threads: int | None = None
    #: the partition runs again to restore a released payload: the output it replaces has the same
    #: key and content, so it is deleted once the new one is in place instead of kept aside
    restore: bool = False
    #: Ray task options for the partition's fan-out jobs (``engine.fanout``); ``None``: in this process
    fan_out: dict[str, Any] | None = None

    @property
    def ref(self) -> PartitionRef:
        return PartitionRef(self.stage.name, self.partition)


@dataclass
class TaskResult:
    ref: str
    ok: bool
    host: str
    node: str = "-"
    wall_s: float = 0.0
    error: str = ""
    traceback: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    #: the task refused to start because this input partition does not match its manifest
    corrupt_input: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ResourceMeter:
    """Peak RSS of this process while a task runs (sampled), and peak GPU memory when the stage
    used CUDA (read from torch only if the stage imported it: the engine itself does not)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_rss = 0
        self.peak_gpu: int | None = None
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    @staticmethod
    def _cuda() -> Any | None:
        torch = sys.modules.get("torch")
        return torch.cuda if torch is not None and torch.cuda.is_available() else None

    def __enter__(self) -> ResourceMeter:
        if (cuda := self._cuda()) is not None:
            cuda.reset_peak_memory_stats()
        self.peak_rss = self.start_rss = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
        if (cuda := self._cuda()) is not None:
            self.peak_gpu = cuda.max_memory_allocated()


def _test_hooks(ref: PartitionRef) -> None:
    """Hang or fail on request (crash, retry and failure-report tests; off by default):
    ``STAGEPIPE_TEST_HANG_IN`` (``fanout.hang_if_asked``) and ``STAGEPIPE_TEST_FAIL_IN=stage@part``."""
    hang_if_asked(str(ref))
    if os.environ.get("STAGEPIPE_TEST_FAIL_IN") == str(ref):
        raise RuntimeError(f"injected failure in {ref}")


@functools.cache
def installed_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Python's version and each installed distribution's (``missing`` when not installed); read once
    per process (each lookup scans the import path), the same for every task of a stage."""
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def execute(task: Task) -> TaskResult:
    """Run one partition to completion (or to a failure record). Safe to run twice."""
    torch = sys.modules.get("torch")
    threads_before = torch.get_num_threads() if torch is not None else None
    if task.threads and torch is not None:  # restored below: an in-process task leaves no trace
        torch.set_num_threads(task.threads)
    ctx = Context(task.config, Path(task.workspace), task.facts, task.plan)
    ws = Workspace(Path(task.workspace))
    ref = task.ref
    host, node = socket.gethostname(), ray_node_id()
    started = time.time()
    tmp = ws.begin(ref, task.key, task.run_id)
    committed = False
    faults.current = str(ref)
    try:
        inputs = {PartitionRef.parse(k): Path(v) for k, v in task.inputs.items()}
        for input_ref, directory in inputs.items():
            problem = Workspace.check_input(directory)
            if problem is not None:
                return TaskResult(ref=str(ref), ok=False, host=host, node=node, wall_s=time.time() - started,
                                  error=f"input {input_ref} does not match its manifest: {problem}",
                                  corrupt_input=str(input_ref))
        work = Work(task.partition, tmp, inputs, ws.scratch_dir(tmp), ws.resume_dir(ref, task.key),
                    fan_out=make_fan_out(task.fan_out, task.threads))
        with ResourceMeter() as meter:
            info = task.stage.run(ctx, work) or {}
            _test_hooks(ref)
        if work.fan_out.runs:
            work.telemetry["jobs"] = [run.to_dict() for run in work.fan_out.runs]
        kill_point("after-run", ref)
        work.telemetry["rss_at_start_mb"] = meter.start_rss / 2**20  # what the process held before the task
        work.telemetry["versions"] = dict(installed_versions(task.stage.recorded_packages))  # a copy: cached
        finished = time.time()
        manifest = manifest_io.Manifest(
            stage=ref.stage, partition=task.partition, stage_version=task.stage.version, key=task.key,
            key_material=task.key_material, files=manifest_io.record_files(tmp), info=info,
            diagnostics=work.diagnostics, telemetry=work.telemetry, run_id=task.run_id, host=host, pid=os.getpid(), started_at=started,
            finished_at=finished, wall_s=finished - started, peak_rss_mb=meter.peak_rss / 2**20,
            peak_gpu_mb=None if meter.peak_gpu is None else meter.peak_gpu / 2**20,
        )
        manifest_io.write_atomic(tmp, manifest)
        manifest_io.stamp_all(tmp, manifest)  # hashed just now: the first reader need not hash again
        kill_point("before-rename", ref)
        ws.commit(ref, task.key, tmp, replace=task.replace, discard_replaced=task.restore)
        committed = True
        kill_point("after-rename", ref)
        return TaskResult(ref=str(ref), ok=True, host=host, node=node, wall_s=finished - started)
    except Exception as exc:  # reported to the driver with the partition and host; never swallowed
        return TaskResult(ref=str(ref), ok=False, host=host, node=node, wall_s=time.time() - started,
                          error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    finally:
        faults.current = None
        if threads_before is not None:
            torch.set_num_threads(threads_before)
        ws.end(ref, task.key, tmp, committed)
