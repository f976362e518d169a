"""The stage contract as the stages see it, and the registry of stage classes.

A stage module defines one ``PipelineStage`` subclass decorated with ``@register``; importing
``stagepipe.stages`` imports every module of the package, so adding a stage is adding a module.
Each stage says of itself:

- **when it joins** a pipeline: ``joins(choices)`` for a stage that runs although no other stage
  reads it (evaluate; a method kind's own stage; a stage an option asks for), ``needs(choices)``
  for the stages (and payloads) it reads, which join because it does — the DAG is the closure of
  these reads from the joining stages, and its order is derived from them (``stagekit.plan``);
- **what it reads** per partition (``reads``, the engine's contract) and **writes** (``writes``);
- **its cost row** in the plan (``cost``) and **its part of the report** (``summarize``);
- for a method kind's stage, **its share of allocation or assembly**: ``allocates`` (its outputs
  replace the allocation policy: the allocate stage calls ``allocation``) and ``assembles`` (its
  outputs are the final form of each layer: the assemble stage calls ``layer_shard``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import torch

from stagepipe.allocation import POLICIES, Policy
from stagepipe.engine.stage import Context, PartitionRef, Read, Stage, Work
from stagepipe.methods import Method, make_method
from stagepipe.models import modeling_lowrank
from stagepipe.stagekit.artifacts import block_ranks, layer_partition
from stagepipe.stagekit.assembly import lowrank_layer
from stagepipe.stagekit.cost import CostInputs, Estimate


@dataclass(frozen=True)
class Choices:
    """What a pipeline file chose, as objects: its config, its method and its allocation policy,
    and the stages that join by their own choice (``roots``, once known)."""

    config: Any
    method: Method
    policy: type[Policy]
    roots: frozenset[str] = frozenset()

    @classmethod
    def of(cls, config: Any) -> Choices:
        return cls(config, make_method(config.method), POLICIES[config.allocation.policy])


#: what the allocate and assemble stages hand a kind's stage: the layer's tensors as the snapshot
#: holds them (full names), keyed by name, and the ranks ``allocate`` chose (full names)
LayerTensors = dict[str, torch.Tensor]


class PipelineStage(Stage):
    #: the libraries whose versions move a stage's numbers (recorded in every manifest, never keyed)
    recorded_packages = ("torch", "transformers", "numpy", "zarr", "safetensors")
    #: payloads an output holds: path inside it → what it is (``stagepipe dag`` prints them)
    writes: ClassVar[dict[str, str]] = {}
    #: reads every partition of every other joined stage (the report): it comes last
    reads_everything: ClassVar[bool] = False

    @classmethod
    def joins(cls, choices: Choices) -> bool:
        """Whether the pipeline runs this stage although no joined stage reads it."""
        return False

    @classmethod
    def needs(cls, choices: Choices) -> Mapping[str, set[str]]:
        """Producer stage → the payloads of its outputs this stage reads under these choices (an
        empty set: only its results). The DAG's edges before the model's partitions are known;
        every ``Read`` of every partition names one of them (tested)."""
        return {}

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        """This stage's row in the plan (a stage that computes little: nothing to plan)."""
        return Estimate(cls.name, 0.0, 0.0, 0.0)

    @classmethod
    def summarize(cls, manifests: Mapping[Any, Any]) -> dict[str, Any]:
        """This stage's part of the report, from its partitions' manifests: ``repairs`` and
        ``fallbacks`` (lists that the report concatenates) and sections of its own."""
        return {}

    # ------------------------------------------------------------------ a method kind's share
    @classmethod
    def allocates(cls, choices: Choices) -> bool:
        """Whether this stage's outputs replace the allocation policy (a learned method's ranks,
        a structured method's inner dimensions); then ``allocate`` reads ``allocation_reads`` and
        calls ``allocation``."""
        return False

    @classmethod
    def allocation_needs(cls, choices: Choices) -> Mapping[str, set[str]]:
        return {}

    @classmethod
    def allocation_reads(cls, ctx: Context) -> list[Read]:
        return []

    @classmethod
    def allocation_slice(cls, ctx: Context) -> dict[str, Any]:
        """What of the config shapes this allocation (part of allocate's key)."""
        return {}

    @classmethod
    def allocation(cls, ctx: Context, work: Work, shapes: dict[str, tuple[int, int]], n_params: int) -> dict[str, Any]:
        """Write ``allocation.json`` and return allocate's results (``artifacts.write_allocation``)."""
        raise NotImplementedError(f"{cls.name} does not allocate")

    @classmethod
    def assembles(cls, choices: Choices) -> bool:
        """Whether this stage's outputs are the final form of each layer; of several joined, the
        one no other reads (refit's refitted factors over rank_factors')."""
        return False

    #: the payload of this stage's outputs that holds a layer's final form
    assembly_payload: ClassVar[str | None] = None
    #: takes every other stage's final form of the layers and stores it differently (``quantize_factors``):
    #: a stage that transforms factors (refit) reads the form from before it (``plan.source_of``)
    on_final_form: ClassVar[bool] = False

    @classmethod
    def assembly_needs(cls, choices: Choices) -> Mapping[str, set[str]]:
        """Producer stage → payloads ``assembly_reads`` reads (``assemble``'s needs): by default this
        stage's ``assembly_payload``."""
        return {cls.name: {cls.assembly_payload}}

    @classmethod
    def assembly_reads(cls, ctx: Context, layer: int) -> list[Read]:
        """What ``layer_factors`` / ``layer_shard`` read for one layer: by default this stage's
        partition of that layer, its ``assembly_payload``."""
        return [Read(PartitionRef(cls.name, layer_partition(layer)), cls.assembly_payload)]

    @classmethod
    def layer_factors(cls, ctx: Context, work: Work, layer: int,
                      ranks: Mapping[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(up, down) of each factored linear of ``layer`` (block-relative names, at its rank ``ranks``)."""
        raise NotImplementedError(f"{cls.name} does not assemble factors")

    @classmethod
    def layer_params(cls, ctx: Context, work: Work, layer: int) -> dict[str, torch.Tensor]:
        """Other tensors of ``layer`` this stage trained (block-relative names; AA-SVD's refined norms)."""
        return {}

    @classmethod
    def layer_shard(cls, ctx: Context, work: Work, layer: int, tensors: LayerTensors,
                    ranks: Mapping[str, int | None]) -> LayerTensors:
        """One layer of the assembled model: ``tensors`` (the snapshot's, full names) with the
        stage's final form of the layer in place — by default its factors (``layer_factors``) at
        the allocated ranks, stored as the method stores them (``Method.storage``)."""
        prefix = ctx.plan.layout.layer_prefix(layer)
        local = block_ranks(ranks, prefix)
        factors = cls.layer_factors(ctx, work, layer, local) if local else {}
        # trained tensors apply even where every target stays dense (refined or learned dense weights)
        return lowrank_layer(tensors, prefix, factors, ctx.plan.method.storage(), cls.layer_params(ctx, work, layer))

    @classmethod
    def model_family(cls, ctx: Context, work: Work, ranks: Mapping[str, int | None]) -> tuple[ModuleType, dict[str, Any]]:
        """(the self-contained modeling module the assembled model uses, the fields its
        ``config.json`` adds): by default the low-rank family with its ranks (and the remapped
        linears, when the method stores factors remapped)."""
        factored = dict(sorted((n, r) for n, r in ranks.items() if r is not None))
        extra: dict[str, Any] = {"lowrank_ranks": factored}
        if ctx.plan.method.storage() == "remap8":
            extra["lowrank_remapped"] = sorted(factored)
        return modeling_lowrank, extra


#: every stage class, by name (``register`` fills it when a stage module is imported)
STAGES: dict[str, type[PipelineStage]] = {}


def register(cls: type[PipelineStage]) -> type[PipelineStage]:
    """Class decorator: add a stage to ``STAGES`` under its ``name``."""
    if cls.name in STAGES and STAGES[cls.name] is not cls:
        raise ValueError(f"two stages are named {cls.name!r}: {STAGES[cls.name].__module__} and {cls.__module__}")
    STAGES[cls.name] = cls
    return cls
