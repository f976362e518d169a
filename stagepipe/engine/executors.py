"""Executors run tasks; the driver alone decides *what* runs, from the manifests.

- ``LocalExecutor`` (default): runs each task in this process as it is submitted; no Ray import.
- ``RayExecutor``: one Ray task per partition with the configured CPUs/GPUs/memory; Ray retries
  system failures (a dead worker or node) ``max_retries`` times, and our atomic commit makes a
  retried or duplicated task harmless. A partition that fans out (``Stage.fans_out``) runs its
  jobs as Ray tasks with the same resources (``engine.fanout``). Ray is an optional extra (``pip install stagepipe[ray]``).
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Any

from stagepipe.engine.stage import Context
from stagepipe.engine.task import Task, TaskResult, execute
from stagepipe.errors import StagepipeError


class Executor(ABC):
    @abstractmethod
    def submit(self, task: Task) -> None: ...

    @abstractmethod
    def wait(self) -> list[TaskResult]:
        """Block until at least one submitted task has finished; return the finished ones."""

    @property
    @abstractmethod
    def pending(self) -> int: ...

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        pass


class LocalExecutor(Executor):
    def __init__(self) -> None:
        self._done: list[TaskResult] = []

    def submit(self, task: Task) -> None:
        self._done.append(execute(task))

    def wait(self) -> list[TaskResult]:
        done, self._done = self._done, []
        return done

    @property
    def pending(self) -> int:
        return len(self._done)


#: Ray kills idle workers beyond one per CPU after 1 s; a partition that waits on its fan-out jobs
#: holds a worker too, so its jobs' workers would be killed and re-spawned (≈2 s of imports each)
#: between rounds of jobs. Keep them a minute (``ray start --system-config`` for a cluster).
KEEP_IDLE_WORKERS = {"idle_worker_killing_time_threshold_ms": 60_000}


def _remote_execute(task: Task) -> dict[str, Any]:
    return execute(task).to_dict()


class RayExecutor(Executor):
    """``cfg``: the pipeline's ``executor`` block (address, num_cpus_per_task, num_gpus_per_task,
    memory_gb_per_task, max_retries), duck-typed so the engine does not import the config schema."""

    def __init__(self, cfg: Any, address: str | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise StagepipeError("executor 'ray' needs Ray: pip install 'stagepipe[ray]'") from None
        self._ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            address = address or cfg.address
            if address:
                _reachable(address)
            # a Ray started here keeps idle workers (docs/distributed.md: fan-out jobs outnumber CPUs)
            extra = {} if address else {"_system_config": KEEP_IDLE_WORKERS}
            ray.init(address=address, include_dashboard=False, log_to_driver=False, **extra)
            self._owns_ray = True
        options: dict[str, Any] = {"num_cpus": cfg.num_cpus_per_task, "num_gpus": cfg.num_gpus_per_task,
                                   "max_retries": cfg.max_retries, "retry_exceptions": False}
        if cfg.memory_gb_per_task:
            options["memory"] = int(cfg.memory_gb_per_task * 2**30)
        self._options = options
        self._remote = ray.remote(_remote_execute).options(**options)
        # a partition that fans out only waits and reduces: its jobs hold the GPUs, so it holds none
        self._waiting = ray.remote(_remote_execute).options(**{**options, "num_gpus": 0})
        self._refs: dict[Any, Task] = {}

    def submit(self, task: Task) -> None:
        ctx = Context(task.config, Path(task.workspace), task.facts, task.plan)
        if task.stage.fans_out(ctx, task.partition):
            self._refs[self._waiting.remote(replace(task, fan_out=self._options))] = task
        else:
            self._refs[self._remote.remote(task)] = task

    def wait(self) -> list[TaskResult]:
        self._ray.wait(list(self._refs), num_returns=1)
        ready, _ = self._ray.wait(list(self._refs), num_returns=len(self._refs), timeout=0)
        results = []
        for ref in ready:
            task = self._refs.pop(ref)
            try:
                results.append(TaskResult(**self._ray.get(ref)))
            except Exception as exc:  # the task's worker died more often than max_retries
                results.append(TaskResult(ref=str(task.ref), ok=False, host="?", error=f"{type(exc).__name__}: {exc}"))
        return results

    @property
    def pending(self) -> int:
        return len(self._refs)

    def shutdown(self) -> None:
        if self._owns_ray:
            self._ray.shutdown()


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in one line when an explicit ``host:port`` has no listener: ``ray.init`` would wait on
    it for minutes. ``auto`` (a local cluster) is left to Ray, which says so at once."""
    if address == "auto" or ":" not in address:
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise StagepipeError(f"Ray address {address!r}: nothing answers there ({reason}); start a cluster "
                             "(ray start --head) or pass --ray-address auto") from None


def make_executor(cfg: Any, kind: str | None = None, address: str | None = None) -> Executor:
    kind = kind or cfg.kind
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(cfg, address)
    raise StagepipeError(f"unknown executor {kind!r}; expected 'local' or 'ray'")
