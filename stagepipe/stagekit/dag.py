"""The DAG of a pipeline as the code derives it (``stagepipe dag``): what ``Plan`` joins, in its
order, each stage with the producers and payloads it declares reading (``PipelineStage.needs``)."""

from __future__ import annotations

from typing import Any

from stagepipe.stagekit.plan import make_plan


def edges(config: Any) -> list[tuple[str, str, tuple[str, ...]]]:
    """(producer, reader, payloads) for every read between joined stages, in the plan's order
    (a stage reading its own previous partition: producer == reader)."""
    plan = make_plan(config)
    found = []
    for reader in plan.stages:
        if plan.stage_class(reader).reads_everything:
            found += [(producer, reader, ()) for producer in plan.stages if producer != reader]
            continue
        for producer, payloads in plan.needs(reader).items():
            found.append((producer, reader, tuple(sorted(payloads))))
    return found


def describe(config: Any) -> str:
    plan = make_plan(config)
    by_reader: dict[str, list[str]] = {}
    for producer, reader, payloads in edges(config):
        if plan.stage_class(reader).reads_everything:
            continue
        by_reader.setdefault(reader, []).append(f"{producer} ({', '.join(payloads) or 'results'})")
    width = max(len(s) for s in plan.stages) + 2
    lines = [f"{config.name}: {len(plan.stages)} stages ({plan.method.name}, {config.allocation.policy}); "
             f"allocation by {plan.allocator or 'the policy'}, layers assembled from {plan.assembler}"]
    for stage in plan.stages:
        mark = "*" if stage in plan.choices.roots else " "
        reads = "every other stage" if plan.stage_class(stage).reads_everything else "; ".join(by_reader.get(stage, [])) or "-"
        lines.append(f"{mark} {stage:<{width}} ← {reads}")
    return "\n".join(lines)


def to_dot(config: Any) -> str:
    plan = make_plan(config)
    lines = [f'digraph "{config.name}" {{', "  rankdir=LR;"]
    for stage in plan.stages:
        lines.append(f'  "{stage}"{" [style=bold]" if stage in plan.choices.roots else ""};')
    for producer, reader, payloads in edges(config):
        if producer != reader and not plan.stage_class(reader).reads_everything:
            lines.append(f'  "{producer}" -> "{reader}" [label="{", ".join(payloads)}"];')
    lines.append("}")
    return "\n".join(lines)


def problems(config: Any, facts: Any) -> list[str]:
    """Where a stage's declarations disagree, for this config and model: a partition's read that
    its stage does not declare in ``needs`` (or of a payload the producer does not write, or of a
    stage the plan does not run), or ``dependencies()`` that are not exactly the partitions it
    reads. The DAG, the keys and the release all follow from the reads, so these must agree."""
    from stagepipe.engine.stage import Context
    from stagepipe.stagekit.base import STAGES

    plan = make_plan(config, facts)
    ctx = Context(config, ".", facts, plan)
    found = []
    for name in plan.stages:
        stage = STAGES[name]()
        declared = plan.needs(name)
        for partition in stage.partitions(ctx) or []:
            where = f"{name}@{partition}"
            reads = stage.reads(ctx, partition)
            for read in reads:
                producer = read.ref.stage
                if producer not in plan.stages:
                    found.append(f"{where} reads {read.ref}, a stage this pipeline does not run")
                elif not stage.reads_everything and producer not in declared:
                    found.append(f"{where} reads {read.ref}, but {name}.needs does not name {producer!r}")
                elif read.payload is not None and not stage.reads_everything:
                    if read.payload not in declared[producer]:
                        found.append(f"{where} reads {read.payload} of {read.ref}, not in {name}.needs")
                    if read.payload not in STAGES[producer].writes:
                        found.append(f"{where} reads {read.payload} of {read.ref}, which {producer} does not write")
            if list(stage.dependencies(ctx, partition)) != list(dict.fromkeys(r.ref for r in reads)):
                found.append(f"{where}: dependencies() are not the partitions its reads() name")
    return found
