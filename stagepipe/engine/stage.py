"""The ``Stage`` contract and the per-partition cache key.

A stage declares an explicit integer ``version`` (bumped by hand when its output changes), its
partitions (``all``, or one per decoder layer), the partitions it depends on, and the slice of the
pipeline config it reads. Its key is::

    sha256(canonical_json({stage, version, partition, config slice, upstream manifest digests,
                           model fingerprint}))

so changing an evaluation setting never invalidates ``decompose``, and changing the method does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from stagepipe.config import PipelineConfig
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


def layer_partition(index: int) -> str:
    return f"layer-{index:03d}"


def layer_index(partition: str) -> int:
    return int(partition.split("-")[1])


class Context:
    """What every stage may read: the config, the workspace and the model's shape.

    Built identically in the driver and in remote workers from (config, workspace path).
    """

    def __init__(self, config: PipelineConfig, workspace: Path) -> None:
        self.config = config
        self.workspace = Path(workspace)

    @cached_property
    def model_config(self) -> Any | None:
        """The model's HF config: from the snapshot once it exists, else from the source if reachable."""
        from transformers import AutoConfig

        from stagepipe.engine.workspace import Workspace
        from stagepipe.models.sources import load_config
        from stagepipe.stages import STAGES

        snapshot = STAGES["snapshot"]
        key = compute_key(key_material(snapshot, self, ALL, {}, None))
        config_json = Workspace(self.workspace).output_dir(PartitionRef("snapshot", ALL), key) / "model" / "config.json"
        if config_json.is_file():  # this model's own snapshot, not another one in the same workspace
            return AutoConfig.from_pretrained(config_json.parent)
        found = load_config(self.config.model)
        hint = self.config.model.shape_hint
        if found is None and hint is not None:
            from transformers import PretrainedConfig

            return PretrainedConfig(**hint.model_dump())
        return found

    @property
    def num_layers(self) -> int | None:
        return None if self.model_config is None else int(self.model_config.num_hidden_layers)

    def layer_partitions(self) -> list[str] | None:
        n = self.num_layers
        return None if n is None else [layer_partition(i) for i in range(n)]


class Stage(ABC):
    """One step of the DAG. Subclasses are small and live one per file in ``stagepipe/stages``."""

    name: ClassVar[str]
    version: ClassVar[int]
    description: ClassVar[str] = ""

    def partitions(self, ctx: Context) -> list[str] | None:
        """Partition names in execution order; ``None`` while unknown (model shape not known yet)."""
        return [ALL]

    def dependencies(self, ctx: Context, partition: str) -> list[PartitionRef]:
        return []

    @abstractmethod
    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        """The config values this partition reads: exactly what enters its key."""

    def skip_reason(self, ctx: Context, partition: str) -> str | None:
        """Why this partition is an explicit no-op for the configured method (``None`` = real work)."""
        return None

    @abstractmethod
    def run(self, ctx: Context, partition: str, out: Path, inputs: dict[PartitionRef, Path]) -> dict[str, Any]:
        """Write outputs into ``out`` (a fresh temp directory) and return info for the manifest."""


def key_material(stage: Stage, ctx: Context, partition: str, upstream: dict[PartitionRef, str],
                 model_fingerprint: str | None) -> dict[str, Any]:
    return {
        "stage": stage.name,
        "version": stage.version,
        "partition": partition,
        "config": stage.config_slice(ctx, partition),
        "upstream": {str(ref): digest for ref, digest in sorted(upstream.items())},
        "model_fingerprint": model_fingerprint,
    }


def compute_key(material: dict[str, Any]) -> str:
    return sha256_json(material)
