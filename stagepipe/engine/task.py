"""One partition's execution: the unit an executor ships (in-process or to a Ray worker).

A task carries only paths, keys and the config as JSON: never tensors. It writes the running
marker, runs the stage into a temp directory, writes the manifest last and commits by one rename.
An exception is returned as a small failure record (partition, host, error); a killed process
leaves its marker behind, which the next run reports as ``incomplete`` and redoes.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from stagepipe.config import PipelineConfig
from stagepipe.engine.stage import Context, PartitionRef
from stagepipe.engine.workspace import Workspace
from stagepipe.io import manifest as manifest_io


@dataclass(frozen=True)
class Task:
    workspace: str
    config_json: str
    stage: str
    partition: str
    key: str
    key_material: dict[str, Any]
    inputs: dict[str, str]
    run_id: str
    replace: bool = False

    @property
    def ref(self) -> PartitionRef:
        return PartitionRef(self.stage, self.partition)


@dataclass
class TaskResult:
    ref: str
    ok: bool
    host: str
    wall_s: float = 0.0
    error: str = ""
    traceback: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ResourceMeter:
    """Peak RSS of this process while a task runs (sampled), and peak GPU memory when present."""

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

    def __enter__(self) -> ResourceMeter:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.peak_rss = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
        if torch.cuda.is_available():
            self.peak_gpu = torch.cuda.max_memory_allocated()


def _test_hooks(ref: PartitionRef) -> None:
    """Fault injection for the crash/resume tests (environment variables, off by default).

    ``STAGEPIPE_TEST_HANG_IN=stage@part`` hangs there; with ``STAGEPIPE_TEST_HANG_ONCE=<file>`` only
    the first attempt hangs (it writes the file with its host and pid), so a retry can finish.
    """
    if os.environ.get("STAGEPIPE_TEST_HANG_IN") == str(ref):
        once = os.environ.get("STAGEPIPE_TEST_HANG_ONCE")
        if once is None or not os.path.exists(once):
            if once is not None:
                Path(once).write_text(f"{socket.gethostname()} {os.getpid()} {_ray_node_id()}")
            print(f"STAGEPIPE_TEST: hanging in {ref}", flush=True)
            time.sleep(3600)
    if os.environ.get("STAGEPIPE_TEST_FAIL_IN") == str(ref):
        raise RuntimeError(f"injected failure in {ref}")


def _ray_node_id() -> str:
    """The Ray node this process runs on, or ``-`` outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "-"
    except ImportError:
        return "-"


def execute(task: Task) -> TaskResult:
    """Run one partition to completion (or to a failure record). Safe to run twice."""
    from stagepipe.stages import STAGES

    config = PipelineConfig.model_validate_json(task.config_json)
    if config.runtime.threads:
        import torch

        torch.set_num_threads(config.runtime.threads)
    ctx = Context(config, Path(task.workspace))
    stage = STAGES[task.stage]
    ws = Workspace(Path(task.workspace))
    ref = task.ref
    host = socket.gethostname()
    started = time.time()
    tmp = ws.begin(ref, task.key, task.run_id)
    try:
        inputs = {PartitionRef.parse(k): Path(v) for k, v in task.inputs.items()}
        with ResourceMeter() as meter:
            skipped = stage.skip_reason(ctx, task.partition)
            info = {} if skipped else stage.run(ctx, task.partition, tmp, inputs)
            _test_hooks(ref)
        finished = time.time()
        manifest = manifest_io.Manifest(
            stage=task.stage, partition=task.partition, stage_version=stage.version, key=task.key,
            key_material=task.key_material, files=manifest_io.record_files(tmp), info=info or {},
            skipped=skipped, run_id=task.run_id, host=host, pid=os.getpid(), started_at=started,
            finished_at=finished, wall_s=finished - started, peak_rss_mb=meter.peak_rss / 2**20,
            peak_gpu_mb=None if meter.peak_gpu is None else meter.peak_gpu / 2**20,
        )
        manifest_io.write_atomic(tmp, manifest)
        ws.commit(ref, task.key, tmp, replace=task.replace)
        ws.end(ref, task.key)
        return TaskResult(ref=str(ref), ok=True, host=host, wall_s=finished - started)
    except Exception as exc:  # reported to the driver with the partition and host; never swallowed
        ws.end(ref, task.key, tmp)
        return TaskResult(ref=str(ref), ok=False, host=host, wall_s=time.time() - started,
                          error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
