"""The on-disk layout of a run directory, partition states, atomic commits and the driver lock.

::

    <workspace>/
      .lock, .lock.owner.json          one driver at a time (FileLock + who holds it)
      pipeline.json                    the validated config of the last run
      logs/run-<time>.log
      stages/<stage>/<partition>/
        <key16>/                       a finished output: files + manifest.json (written last)
        .running-<key16>.json          written before work starts, removed after the commit
        .tmp-<key16>-<uuid>/           work in progress; renamed to <key16>/ in one step
        .scratch-<key16>-<uuid>/       a task's scratch space (e.g. stored gradients); removed when it ends
        .resume-<key16>/               checkpoints inside one long partition (e.g. GFWSVD sweeps):
                                       survive a crash, removed after the commit
        .aside-<key16>-<time>/         a corrupt or forced-over output, moved out of the way
        <key16>/.released-<name>-<id>   a transient payload being deleted (runtime.release_consumed)

Outputs are addressed by key, so flipping a config value back finds the earlier result again.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import psutil
from filelock import FileLock, Timeout

from stagepipe.engine.stage import PartitionRef
from stagepipe.errors import WorkspaceBusyError
from stagepipe.io import json_io
from stagepipe.io import manifest as manifest_io

KEY_LEN = 16


@dataclass(frozen=True)
class PartitionState:
    """``done``, ``missing``, ``stale``, ``incomplete``, ``running``, ``corrupt`` or ``waiting``."""

    status: str
    reason: str = ""
    output: Path | None = None
    manifest: manifest_io.Manifest | None = None
    #: transient payloads (``Stage.transient``) no longer on disk: the output is still done
    released: tuple[str, ...] = ()


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def partition_dir(self, ref: PartitionRef) -> Path:
        return self.root / "stages" / ref.stage / ref.partition

    def output_dir(self, ref: PartitionRef, key: str) -> Path:
        return self.partition_dir(ref) / key[:KEY_LEN]

    def marker(self, ref: PartitionRef, key: str) -> Path:
        return self.partition_dir(ref) / f".running-{key[:KEY_LEN]}.json"

    def resume_dir(self, ref: PartitionRef, key: str) -> Path:
        """Where a partition keeps checkpoints that must survive a crash of the task."""
        return self.partition_dir(ref) / f".resume-{key[:KEY_LEN]}"

    def scratch_dir(self, tmp: Path) -> Path:
        """The scratch directory that goes with a temp output directory (same key and uuid)."""
        return tmp.with_name(".scratch-" + tmp.name.removeprefix(".tmp-"))

    # ------------------------------------------------------------------ state
    def state(self, ref: PartitionRef, key: str, deep: bool = False, transient: Collection[str] = ()) -> PartitionState:
        """Is the output for ``key`` done? Every file is checked against the manifest's hash (a
        stamp spares re-hashing a file that has not changed since: ``manifest_io.verify``; ``deep``
        re-hashes all). Untrusted outputs are reported, never used. A ``transient`` payload whose
        files are all gone is *released*; one with a damaged or partly missing file is corrupt."""
        out = self.output_dir(ref, key)
        marker = self.marker(ref, key)
        if out.is_dir():
            try:
                manifest = manifest_io.read(out)
            except manifest_io.ManifestError as exc:
                return PartitionState("corrupt", str(exc), out)
            if manifest.key != key:
                return PartitionState("corrupt", f"{out}: manifest key {manifest.key[:12]} != {key[:12]}", out)
            problems = manifest_io.verify(out, manifest, deep=deep, skip=transient)
            released = []
            for payload in transient:
                files = [r.path for r in manifest.files if manifest_io.under(r.path, payload)]
                gone = [f for f in files if not (out / f).is_file()]
                if files and len(gone) == len(files):
                    released.append(payload)
                elif gone:
                    problems.append(f"{gone[0]}: missing ({len(gone)} of the {len(files)} files of {payload})")
                else:
                    problems += manifest_io.verify(out, manifest, deep=deep, only=payload)
            if problems:
                return PartitionState("corrupt", "; ".join(problems[:3]), out, manifest)
            return PartitionState("done", "", out, manifest, tuple(released))
        if marker.is_file():
            owner = json_io.read(marker)
            if self._owner_dead(owner):
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started_at", 0)))
                return PartitionState("incomplete", f"crashed: pid {owner.get('pid')} on {owner.get('host')} started {when}")
            if owner:
                return PartitionState("running", f"pid {owner.get('pid')} on {owner.get('host')}")
        return PartitionState("missing", "")

    @staticmethod
    def check_input(output: Path) -> str | None:
        """What a task checks of each input before it reads one byte: the manifest and the hash of
        every file still there (stamps spare unchanged files; released payloads are absent, and the
        driver restores those a task reads). ``None`` when it is sound, else the first problem."""
        try:
            manifest = manifest_io.read(output)
        except manifest_io.ManifestError as exc:
            return str(exc)
        problems = manifest_io.verify(output, manifest, missing_ok=True)
        return f"{output}/{problems[0]}" if problems else None

    def previous_manifest(self, ref: PartitionRef) -> manifest_io.Manifest | None:
        """The newest valid manifest of this partition under any key (to explain staleness)."""
        best = None
        directory = self.partition_dir(ref)
        if not directory.is_dir():
            return None
        for child in directory.iterdir():
            if child.name.startswith(".") or not child.is_dir():
                continue
            try:
                manifest = manifest_io.read(child)
            except manifest_io.ManifestError:
                continue
            if best is None or manifest.finished_at > best.finished_at:
                best = manifest
        return best

    @staticmethod
    def release(output: Path, path: str) -> None:
        """Delete a transient payload of a done output: renamed first, so a crash mid-delete leaves
        it plainly absent (released), never half-present under its own name."""
        payload = output / path
        if not payload.exists():
            return
        doomed = output / f".released-{payload.name}-{uuid.uuid4().hex[:6]}"
        os.rename(payload, doomed)  # a crash from here on leaves a leftover that clean_dead_runs removes
        shutil.rmtree(doomed) if doomed.is_dir() else doomed.unlink()

    # ------------------------------------------------------------------ commit protocol
    def begin(self, ref: PartitionRef, key: str, run_id: str) -> Path:
        """Write the running marker and return a fresh temp directory for the outputs."""
        directory = self.partition_dir(ref)
        directory.mkdir(parents=True, exist_ok=True)
        proc = psutil.Process()
        json_io.write_atomic(self.marker(ref, key), {
            "host": socket.gethostname(), "pid": os.getpid(), "create_time": proc.create_time(),
            "started_at": time.time(), "run_id": run_id,
        })
        for stale in (*directory.glob(f".tmp-{key[:KEY_LEN]}-*"), *directory.glob(f".scratch-{key[:KEY_LEN]}-*")):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = directory / f".tmp-{key[:KEY_LEN]}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        self.scratch_dir(tmp).mkdir()
        return tmp

    def commit(self, ref: PartitionRef, key: str, tmp: Path, replace: bool = False,
               discard_replaced: bool = False) -> Path:
        """Rename the finished temp directory into place.

        A valid output already there wins (a duplicated or retried task is harmless) unless
        ``replace`` (``--force``, a restore): then the old output is moved aside, only now that the
        new one is complete — and with ``discard_replaced`` (a restore: same key, same content, its
        released payloads back) deleted once the new one is in place.
        """
        final = self.output_dir(ref, key)
        aside = None
        if final.exists():
            if self.state(ref, key).status == "done" and not replace:
                shutil.rmtree(tmp, ignore_errors=True)  # a duplicated task finished first: harmless
                return final
            aside = self.move_aside(ref, key)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        if aside is not None and discard_replaced:  # a crash before this leaves it to `stagepipe gc`
            shutil.rmtree(aside, ignore_errors=True)
        return final

    def move_aside(self, ref: PartitionRef, key: str) -> Path | None:
        """Move an existing output out of the way (it is kept, never deleted here)."""
        final = self.output_dir(ref, key)
        if not final.exists():
            return None
        aside = final.with_name(f".aside-{key[:KEY_LEN]}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}")
        os.rename(final, aside)
        return aside

    def end(self, ref: PartitionRef, key: str, tmp: Path, committed: bool) -> None:
        """Remove the scratch directory and the running marker; after a failure also the temp
        directory. The resume directory survives a failure and goes after a commit."""
        shutil.rmtree(self.scratch_dir(tmp), ignore_errors=True)
        if committed:
            shutil.rmtree(self.resume_dir(ref, key), ignore_errors=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        self.marker(ref, key).unlink(missing_ok=True)

    def dead_run_leftovers(self) -> list[Path]:
        """What crashed tasks left behind: temp and scratch directories and running markers of
        tasks that are provably over (no marker, or a marker of a dead process on this host), and
        resume directories of partitions that are committed, released payloads a crash left
        half-deleted inside an output. Never a file a finished output's manifest needs."""
        found: list[Path] = []
        for directory in sorted((self.root / "stages").glob("*/*")):
            for path in sorted(directory.glob(".*")):
                kind, _, rest = path.name[1:].partition("-")
                key16 = rest[:KEY_LEN]
                marker = directory / f".running-{key16}.json"
                over = not marker.exists() or self._owner_dead(json_io.read(marker))
                committed = (directory / key16).is_dir()
                if (kind in ("tmp", "scratch") and over) or (kind == "resume" and committed) or (
                        kind == "running" and over and committed):
                    found.append(path)
            found += sorted(directory.glob("*/.released-*"))  # payloads a crash left half-deleted
        return found

    def clean_dead_runs(self) -> list[Path]:
        """Remove ``dead_run_leftovers``. Call it with the driver lock held."""
        removed = self.dead_run_leftovers()
        for path in removed:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return removed

    @staticmethod
    def _owner_dead(owner: dict | None) -> bool:
        """A running marker's owner is provably gone: a process of this host that no longer runs
        (a marker of another host is never judged from here)."""
        return bool(owner) and owner.get("host") == socket.gethostname() and not pid_alive(
            owner.get("pid"), owner.get("create_time"))

    # ------------------------------------------------------------------ driver lock
    def lock(self) -> DriverLock:
        return DriverLock(self.root)


class DriverLock:
    """One driver per workspace; a second one gets a clear message naming the holder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = FileLock(str(root / ".lock"))
        self._owner = root / ".lock.owner.json"

    def __enter__(self) -> DriverLock:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            owner = json_io.read(self._owner) or {}
            raise WorkspaceBusyError(
                f"{self.root}: another stagepipe driver holds this workspace "
                f"(pid {owner.get('pid', '?')} on {owner.get('host', '?')}, command: {owner.get('command', '?')}); "
                "wait for it to finish or stop it first"
            ) from None
        json_io.write_atomic(self._owner, {"pid": os.getpid(), "host": socket.gethostname(),
                                 "command": " ".join(psutil.Process().cmdline()), "since": time.time()})
        return self

    def __exit__(self, *exc: object) -> None:
        self._owner.unlink(missing_ok=True)
        self._lock.release()


def pid_alive(pid: int | None, create_time: float | None) -> bool:
    if pid is None or not psutil.pid_exists(pid):
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 1.0
    except psutil.Error:
        return False


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
