"""The ``Stage`` contract, the ``Pipeline`` the engine runs, and the per-partition cache key.

The engine knows no stage by name. A pipeline hands it the stages it needs (in execution order),
the config (opaque here: stages read their own slices of it), a ``discover`` function that learns
the model's facts (its shape) from the outputs finished so far, so per-layer partitions appear as
soon as they can be named, and a ``plan`` function that turns those facts into the pipeline's
plan (opaque here too: stages read what they need of it, such as capture's checkpoint interval).

**A stage declares what it reads**: ``reads(ctx, partition)`` lists the producer partitions and,
where it reads files, the payload (a path inside the producer's output). Everything else is
derived: a partition's dependencies are the partitions it reads; a producer's hand-over payload
(``handovers``) may be deleted once every partition that declared reading it is done. No producer
lists its consumers. A partition's key is::

    sha256(canonical_json({stage, version, partition, config slice,
                           content digests of the upstream outputs it reads}))

A content digest covers an output's files and the results a consumer reads, never its run
metadata (host, pid, timings) or diagnostics, so a redo with identical outputs leaves every
downstream key unchanged ("early cutoff", as in Bazel and Shake), and an in-process run and a Ray
run of one pipeline share every key.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from stagepipe.engine.fanout import FanOut, SerialFanOut
from stagepipe.io.hashing import sha256_json

ALL = "all"


@dataclass(frozen=True, order=True)
class PartitionRef:
    stage: str
    partition: str

    def __str__(self) -> str:
        return f"{self.stage}@{self.partition}"

    @classmethod
    def parse(cls, text: str) -> PartitionRef:
        stage, _, partition = text.partition("@")
        return cls(stage, partition or ALL)


@dataclass(frozen=True)
class Read:
    """One input of a partition: a partition it reads, and which payload of that partition's
    output (a path inside it, as the producer names it) — ``None`` when it reads only the results."""

    ref: PartitionRef
    payload: str | None = None


class Context:
    """What every stage may read: the config, the workspace root, the model's facts (its HF config:
    layer count and shapes; ``None`` until they are known) and the plan made from both.

    Built identically in the driver and in remote workers (the task carries all four).
    """

    def __init__(self, config: Any, workspace: Path, facts: Any | None = None, plan: Any | None = None) -> None:
        self.config = config
        self.workspace = Path(workspace)
        self.facts = facts
        self.plan = plan


@dataclass
class Work:
    """One partition's working directories, handed to ``Stage.run`` by the engine.

    ``out`` becomes the output by one rename; ``scratch`` is removed when the task ends (success or
    failure); ``resume`` survives a crash (checkpoints inside a long partition) and is removed after
    the commit. ``telemetry`` holds run facts for the manifest that are not results (a resumed
    sweep, a wall time) and ``diagnostics`` measured numbers that no consumer computes with
    (errors, condition numbers, losses, repair records): neither enters a content digest, so an
    output whose files and results are identical keeps every downstream key, whatever thread
    count or machine measured them. ``fan_out`` runs independent pieces of the partition
    (``engine.fanout``): in this process, or as Ray tasks under the Ray executor.
    """

    partition: str
    out: Path
    inputs: Mapping[PartitionRef, Path]
    scratch: Path
    resume: Path
    telemetry: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    fan_out: FanOut = field(default_factory=SerialFanOut)

    def input(self, stage: str, partition: str = ALL) -> Path:
        return self.inputs[PartitionRef(stage, partition)]


class Stage(ABC):
    """One step of the DAG: the engine's side of the contract (what runs, what it reads, what may go).

    Subclasses are small and live one per module in ``stagepipe/stages``."""

    name: ClassVar[str]
    version: ClassVar[int]
    description: ClassVar[str] = ""
    #: distributions whose installed versions each manifest records (telemetry ``versions``: a run fact,
    #: never keyed — numerics move with them, so a re-run that differs can be told apart)
    recorded_packages: ClassVar[tuple[str, ...]] = ()

    def partitions(self, ctx: Context) -> list[str] | None:
        """Partition names in execution order; ``None`` while unknown (model facts not known yet)."""
        return [ALL]

    def reads(self, ctx: Context, partition: str) -> list[Read]:
        """The partitions (and payloads of their outputs) this partition reads: its inputs, whose
        content digests enter its key, and the readers that hold a hand-over payload on disk."""
        return []

    def dependencies(self, ctx: Context, partition: str) -> list[PartitionRef]:
        """The partitions it reads, each once, in the order ``reads`` names them."""
        return list(dict.fromkeys(read.ref for read in self.reads(ctx, partition)))

    def handovers(self, ctx: Context, partition: str) -> set[str]:
        """Payloads of this partition's output that are hand-overs: with release on, the engine
        deletes one once every partition that declared reading it is done. The output stays done
        (manifest and content digest unchanged, so no key moves); if a reader has to run again, this
        partition runs again first (same key, same bytes) to restore it."""
        return set()

    def early_release(self, ctx: Context, partition: str) -> dict[str, list[PartitionRef]]:
        """Hand-over payloads that may go before all their readers are done: payload → the readers
        that must be done first. Later readers restore the payload by running this partition again
        (``engine.release``). Empty: a payload goes only when every reader is done."""
        return {}

    def fans_out(self, ctx: Context, partition: str) -> bool:
        """Whether this partition splits its work with ``Work.fan_out`` (the Ray executor then gives
        the partition's own task no GPU: its jobs take them, and it only waits and reduces)."""
        return False

    @abstractmethod
    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        """The config values this partition reads: exactly what enters its key."""

    @abstractmethod
    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        """Write outputs into ``work.out`` and return the results a consumer reads (part of the
        content digest: they must be reproducible bit for bit); measurements go to ``work.diagnostics``."""


#: ``discover(config, finished outputs) -> model facts or None``
Discover = Callable[[Any, Mapping[PartitionRef, Path]], Any]
#: ``plan(model facts or None) -> the pipeline's plan`` (opaque to the engine)
Planner = Callable[[Any], Any]


@dataclass(frozen=True)
class Pipeline:
    """What the engine runs: a config, the stages this config needs (in order), ``discover`` and
    ``plan`` (one plan per model facts: the caller caches it)."""

    config: Any
    stages: tuple[Stage, ...]
    discover: Discover
    plan: Planner = lambda facts: None

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]


def key_material(stage: Stage, ctx: Context, partition: str, upstream: Mapping[PartitionRef, str]) -> dict[str, Any]:
    return {
        "stage": stage.name,
        "version": stage.version,
        "partition": partition,
        "config": stage.config_slice(ctx, partition),
        "upstream": {str(ref): digest for ref, digest in sorted(upstream.items())},
    }


def compute_key(material: dict[str, Any]) -> str:
    return sha256_json(material)
