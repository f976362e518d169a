"""The driver: decide from manifests what is done, stale or missing, and run what is needed.

Partitions are examined in topological order; a partition's key needs its upstream outputs'
content digests, so a partition whose upstream is not done is ``waiting``. ``run`` repeatedly submits every runnable
partition to the executor (several at once under Ray), waits for any to finish, and re-reads the
states, until nothing is left or a task failed. A failure ends the run with the partition, the host,
the error and the exact command to resume.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stagepipe.engine.executors import Executor, LocalExecutor
from stagepipe.engine.release import releasable, restore_order
from stagepipe.engine.stage import Context, PartitionRef, Pipeline, compute_key, key_material
from stagepipe.engine.task import Task, TaskResult
from stagepipe.engine.workspace import PartitionState, Workspace
from stagepipe.errors import StageFailedError, StagepipeError

log = logging.getLogger("stagepipe")
TODO = {"missing", "stale", "incomplete", "corrupt"}
#: how often one partition may find an input corrupt (changed after the driver checked it) before
#: the run fails: each time the input is redone first
MAX_INPUT_REDOS = 2


@dataclass
class Entry:
    ref: PartitionRef
    state: PartitionState
    key: str | None = None
    material: dict[str, Any] | None = None
    inputs: dict[str, str] | None = None
    #: hand-over payload → the partitions that declared reading it (``Stage.reads``)
    transient: dict[str, list[PartitionRef]] = field(default_factory=dict)
    early: dict[str, list[PartitionRef]] = field(default_factory=dict)  # payload → readers before an early release


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def stale_reason(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Why a previous output no longer matches, in the words of the spec (Snakemake ``--reason``)."""
    if old.get("version") != new.get("version"):
        return f"stage_version {old.get('version')}→{new.get('version')}"
    old_cfg, new_cfg = _flatten(old.get("config", {})), _flatten(new.get("config", {}))
    changed = sorted(k for k in old_cfg.keys() | new_cfg.keys() if old_cfg.get(k) != new_cfg.get(k))
    if changed:
        return "config changed: " + ", ".join(changed[:4]) + (" …" if len(changed) > 4 else "")
    ups = sorted(k for k in old.get("upstream", {}).keys() | new.get("upstream", {}).keys()
                 if old.get("upstream", {}).get(k) != new.get("upstream", {}).get(k))
    if ups:
        return "upstream changed: " + ", ".join(ups[:3]) + (" …" if len(ups) > 3 else "")
    return "key changed"


class Runner:
    """Drives one pipeline in one workspace. ``threads`` caps torch threads inside each task;
    ``release`` deletes transient payloads once their readers are done (``engine.release``)."""

    def __init__(self, pipeline: Pipeline, workspace: Path, pipeline_path: str = "PIPELINE.yaml",
                 threads: int | None = None, release: bool = False) -> None:
        self.pipeline = pipeline
        self.config = pipeline.config
        self.ws = Workspace(Path(workspace))
        self.ctx = Context(pipeline.config, self.ws.root)
        self.pipeline_path = pipeline_path
        self.threads = threads
        self.release = release

    @property
    def stages(self) -> list[str]:
        return self.pipeline.names

    # ------------------------------------------------------------------ states
    def learn(self, finished: Mapping[PartitionRef, Path]) -> None:
        """The model's facts from the outputs finished so far, and the plan made from them."""
        self.ctx.facts = self.pipeline.discover(self.config, finished)
        self.ctx.plan = self.pipeline.plan(self.ctx.facts)

    def states(self, deep: bool = False) -> list[Entry]:
        """Every known partition with its state, in execution order; a hand-over payload's readers
        are the partitions that declared reading it."""
        entries: dict[PartitionRef, Entry] = {}
        finished: dict[PartitionRef, Path] = {}
        order: list[PartitionRef] = []
        readers: dict[tuple[PartitionRef, str], list[PartitionRef]] = defaultdict(list)
        handovers: dict[PartitionRef, set[str]] = {}
        for stage in self.pipeline.stages:
            self.learn(finished)
            partitions = stage.partitions(self.ctx)
            if partitions is None:
                continue
            for partition in partitions:
                ref = PartitionRef(stage.name, partition)
                order.append(ref)
                for read in stage.reads(self.ctx, partition):
                    if read.payload is not None:
                        readers[(read.ref, read.payload)].append(ref)
                deps = stage.dependencies(self.ctx, partition)
                blocked = [d for d in deps if d not in entries or entries[d].state.status != "done"]
                if blocked:
                    entries[ref] = Entry(ref, PartitionState("waiting", f"needs {blocked[0]}"))
                    continue
                upstream = {d: entries[d].state.manifest.content_digest() for d in deps}
                material = key_material(stage, self.ctx, partition, upstream)
                key = compute_key(material)
                handovers[ref] = stage.handovers(self.ctx, partition)
                early = stage.early_release(self.ctx, partition) if self.release else {}
                state = self.ws.state(ref, key, deep=deep, transient=sorted(handovers[ref]))
                if state.status == "missing":
                    previous = self.ws.previous_manifest(ref)
                    if previous is not None:
                        state = PartitionState("stale", stale_reason(previous.key_material, material))
                if state.status == "done":
                    finished[ref] = state.output
                inputs = {str(d): str(entries[d].state.output) for d in deps}
                entries[ref] = Entry(ref, state, key, material, inputs, early=early)
        for ref, payloads in handovers.items():
            entries[ref].transient = {payload: readers[(ref, payload)] for payload in sorted(payloads)}
        return [entries[r] for r in order]

    # ------------------------------------------------------------------ running
    def _matches(self, ref: PartitionRef, selectors: set[str]) -> bool:
        return ref.stage in selectors or str(ref) in selectors

    def run(self, executor: Executor | None = None, force: set[str] | None = None,
            only: set[str] | None = None, dry_run: bool = False) -> list[TaskResult]:
        """Run everything not done (or just ``only``); ``force`` re-runs matching partitions once."""
        force, only = set(force or ()), set(only or ())
        self._check_selectors(force | only)
        if dry_run:
            return []
        executor = executor or LocalExecutor()
        for path in self.ws.clean_dead_runs():
            log.debug("removed %s (left by a task that is over)", path)
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        forced_done: set[PartitionRef] = set()
        submitted: set[PartitionRef] = set()
        restored: set[PartitionRef] = set()  # ran again in this run to restore a released payload
        results: list[TaskResult] = []
        failures: list[TaskResult] = []
        refused: dict[PartitionRef, int] = {}  # tasks that found an input corrupt: it is redone, then they run
        # one bar over every partition, with an ETA; the per-partition run/done lines are DEBUG
        # (shown with ``run -v``, always in the workspace's log file)
        bar = tqdm(desc="partitions", unit="part", disable=None, leave=False, dynamic_ncols=True)
        try:
            while True:
                entries = self.states()
                bar.total = len(entries)
                bar.n = sum(e.state.status == "done" for e in entries)
                bar.set_postfix(running=executor.pending, failed=len(failures))  # refreshes: rate and ETA
                by_ref = {e.ref: e for e in entries}
                wanted = [e for e in entries if self._should_run(e, force, only, forced_done, submitted)]
                runnable, demanded = restore_order(wanted, by_ref)
                if self.release:  # consumers first: a partition that hands nothing over frees what it read
                    runnable.sort(key=lambda e: bool(e.transient))
                    if isinstance(executor, LocalExecutor):  # it runs on submit: release between partitions
                        runnable = runnable[:1]
                if not failures:
                    for entry in runnable:
                        if entry.ref in submitted:
                            continue
                        restoring = entry.state.status == "done" and not self._matches(entry.ref, force)
                        reason = entry.state.reason or ("restores a released payload" if restoring else
                                                        "forced" if self._matches(entry.ref, force) else "")
                        log.debug("run  %-24s (%s%s)", entry.ref, entry.state.status if entry.state.status != "done" else "redo",
                                  f": {reason}" if reason else "")
                        submitted.add(entry.ref)
                        if restoring:
                            restored.add(entry.ref)
                        executor.submit(Task(
                            workspace=str(self.ws.root), config=self.config, facts=self.ctx.facts, plan=self.ctx.plan,
                            stage=self.pipeline.stage(entry.ref.stage), partition=entry.ref.partition,
                            key=entry.key, key_material=entry.material, inputs=entry.inputs, run_id=run_id,
                            replace=self._matches(entry.ref, force) or restoring, threads=self.threads, restore=restoring,
                        ))
                if self.release:
                    for entry, path in releasable(entries, by_ref, demanded | submitted, restored):
                        log.debug("release %s of %s", path, entry.ref)
                        self.ws.release(entry.state.output, path)
                if executor.pending == 0:
                    break
                for result in executor.wait():
                    ref = PartitionRef.parse(result.ref)
                    submitted.discard(ref)
                    results.append(result)
                    if self._matches(ref, force):
                        forced_done.add(ref)
                    if result.ok:
                        log.debug("done %-24s %.2fs on %s", result.ref, result.wall_s, result.host)
                    elif result.corrupt_input and refused.get(ref, 0) < MAX_INPUT_REDOS:
                        refused[ref] = refused.get(ref, 0) + 1  # the next look finds it corrupt and redoes it
                        log.warning("%s: %s; it is redone first", result.ref, result.error)
                    else:
                        log.error("FAIL %-24s on %s: %s", result.ref, result.host, result.error)
                        log.debug(result.traceback)
                        failures.append(result)
        finally:
            bar.close()
        if failures:
            first = failures[0]
            raise StageFailedError(
                f"{first.ref} failed on {first.host}: {first.error}. Finished partitions are kept; "
                f"resume with: stagepipe run {self.pipeline_path} --workspace {self.ws.root}"
            )
        if only:
            waiting = [e.ref for e in self.states() if self._matches(e.ref, only) and e.state.status == "waiting"]
            if waiting:
                raise StagepipeError(f"{waiting[0]} cannot run: its upstream is not done; run without --only first")
        return results

    def _should_run(self, entry: Entry, force: set[str], only: set[str], forced_done: set[PartitionRef],
                    submitted: set[PartitionRef]) -> bool:
        if entry.ref in submitted or entry.key is None:
            return False
        if only and not self._matches(entry.ref, only):
            return False
        if entry.state.status == "running":
            return False
        if self._matches(entry.ref, force) and entry.ref not in forced_done:
            return True
        return entry.state.status in TODO

    def _check_selectors(self, selectors: set[str]) -> None:
        refs = {selector: PartitionRef.parse(selector) for selector in selectors}
        for selector, ref in refs.items():
            if ref.stage not in self.stages:
                raise StagepipeError(f"unknown stage {ref.stage!r} in {selector!r}; this pipeline's stages: "
                                     f"{', '.join(self.stages)}")
        if refs:
            self.states()  # the model facts, so per-layer partitions can be named
        for selector, ref in refs.items():
            known = self.pipeline.stage(ref.stage).partitions(self.ctx)
            if "@" in selector and known is not None and ref.partition not in known:
                raise StagepipeError(f"unknown partition {selector!r}; {ref.stage} has {', '.join(known[:4])} …")
