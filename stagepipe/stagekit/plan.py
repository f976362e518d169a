"""The one ``Plan`` per (config, model facts): which stages run in which order, who allocates and
who assembles, capture's checkpoint interval, and the predicted disk, RAM and time per stage.

The DAG is derived, never written down: the stages that join by their own choice
(``PipelineStage.joins``: evaluate, report, a method kind's stage, an option's stage) and,
closing over their ``needs``, every stage they read; the order is the topological order of those
reads (ties by name). The engine (through ``Context.plan``), capture (its checkpoint interval),
``run --dry-run``, ``status`` and ``stagepipe dag`` all read the same object, made once per model
facts by ``build_pipeline``'s planner.

**The disk budget is a target, not a limit**: ``runtime.disk_budget_gb`` picks the smallest
checkpoint interval whose *predicted* peak fits (the least recompute), else the lowest peak; the
run itself does not measure its disk. Measured on SmolLM2 the plan's peak was 9 % low (temporary
directories beside finished outputs are not counted: docs/cost_budget), so ``--dry-run`` prints
the budget with that margin (``BUDGET_MARGIN``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from stagepipe.geometry import BlockGeometry
from stagepipe.models.layout import Layout, layout_for
from stagepipe.stagekit.base import STAGES, Choices, PipelineStage
from stagepipe.stagekit.cost import CostInputs, Estimate

#: the plan's peak was measured 9 % below the real one on SmolLM2 (docs/cost_budget): a budget needs that room
BUDGET_MARGIN = 0.09


@dataclass(frozen=True)
class Plan:
    config: Any
    choices: Choices
    #: the joined stages, in execution order
    stages: tuple[str, ...]
    #: the stage whose outputs replace the allocation policy (``None``: the policy allocates)
    allocator: str | None
    #: the stage whose outputs are each layer's final form
    assembler: str
    #: fisher records the input Grams (only fisher and decompose read them, so capture's would wait
    #: on disk through the whole backward walk: 32 × 1.4 GB on a 7B model)
    gram_in_fisher: bool
    #: the model's facts (its HF config) and what follows from them; ``None`` / empty until known
    facts: Any | None = None
    interval: int = 1
    rows: tuple[Estimate, ...] = field(default=())

    @property
    def method(self) -> Any:
        return self.choices.method

    @property
    def policy(self) -> Any:
        return self.choices.policy

    @property
    def capture_stats(self) -> frozenset[str]:
        """The input statistics ``capture`` records: the method's, less the Grams fisher records."""
        return self.method.activation_stats - ({"gram"} if self.gram_in_fisher else set())

    def joined(self, stage: str) -> bool:
        return stage in self.stages

    def stage_class(self, name: str) -> type[PipelineStage]:
        return STAGES[name]

    def needs(self, stage: str) -> Mapping[str, set[str]]:
        return STAGES[stage].needs(self.choices)

    def readers(self, producer: str, payload: str) -> list[str]:
        """The joined stages that read ``payload`` of ``producer``'s outputs, in execution order."""
        return [s for s in self.stages if s != producer and payload in self.needs(s).get(producer, set())]

    def row(self, stage: str) -> Estimate | None:
        return next((r for r in self.rows if r.stage == stage), None)

    @property
    def shapes(self) -> BlockGeometry | None:
        return None if self.facts is None else BlockGeometry.of(self.facts)

    @property
    def layout(self) -> Layout:
        """Where the blocks and linears live in the model (its ``model_type``)."""
        return layout_for(self.facts.model_type)

    def end_and_peak(self) -> tuple[float, float]:
        return peak_disk(list(self.rows))


def make_plan(config: Any, facts: Any | None = None, interval: int | None = None) -> Plan:
    """The plan of ``config`` for a model with these facts (``None``: the stages only); ``interval``
    forces capture's checkpoint interval (the plan chooses it from the disk budget otherwise)."""
    choices = Choices.of(config)
    roots = frozenset(name for name, cls in STAGES.items() if cls.joins(choices))
    choices = replace(choices, roots=roots)
    edges = {name: set(STAGES[name].needs(choices)) - {name} for name in STAGES}
    joined: set[str] = set()
    todo = sorted(roots)
    while todo:
        name = todo.pop()
        if name in joined:
            continue
        if name not in STAGES:
            raise ValueError(f"a stage reads {name!r}, which no stage module defines")
        joined.add(name)
        todo += sorted(edges[name] - joined)
    for name in joined:
        if STAGES[name].reads_everything:
            edges[name] = joined - {name}
    order = _topological(joined, edges)
    base = Plan(config, choices, tuple(order), allocator_of(choices), assembler_of(choices),
                _gram_in_fisher(choices, order))
    if facts is None:
        return base
    with_facts = replace(base, facts=facts)
    if interval is None:
        interval = capture_interval(with_facts)
    return replace(with_facts, interval=interval, rows=tuple(estimate(with_facts, interval)))


def allocator_of(choices: Choices) -> str | None:
    """The joining stage whose outputs replace the allocation policy (a learned method's ranks, a
    structured method's dimensions), if any."""
    found = [name for name in sorted(choices.roots) if STAGES[name].allocates(choices)]
    if len(found) > 1:
        raise ValueError(f"stages {found} all replace the allocation policy")
    return found[0] if found else None


def assembler_of(choices: Choices) -> str:
    """The stage whose outputs are each layer's final form: of the joining stages that assemble,
    the one that none of the others reads (refit over rank_factors); decompose's factors at the
    allocated ranks when none does."""
    candidates = [name for name in sorted(choices.roots) if STAGES[name].assembles(choices)]
    final = [c for c in candidates if not any(c in STAGES[o].needs(choices) for o in candidates if o != c)]
    if len(final) > 1:
        raise ValueError(f"stages {final} all assemble the layers")
    return final[0] if final else "decompose"


def source_of(choices: Choices, stage: str) -> str:
    """The stage whose outputs ``stage`` takes as each layer's form: the assembler without it, and —
    unless ``stage`` itself works on the final form — without the stages that do
    (``PipelineStage.on_final_form``: ``quantize_factors`` quantises what refit refitted, never the reverse)."""
    after = set() if STAGES[stage].on_final_form else {n for n in choices.roots if STAGES[n].on_final_form}
    return assembler_of(replace(choices, roots=choices.roots - {stage} - after))


def _gram_in_fisher(choices: Choices, stages: list[str]) -> bool:
    """Fisher records the input Grams when every joined stage that reads capture's statistics can
    take them from fisher instead (``takes_grams_from_fisher``), and the method needs both."""
    from stagepipe.stagekit.artifacts import STATS

    if "gram" not in choices.method.activation_stats or not choices.method.needs_gradients or "fisher" not in stages:
        return False
    readers = [s for s in stages if STATS in STAGES[s].needs(choices).get("capture", set())]
    return all(getattr(STAGES[s], "takes_grams_from_fisher", False) for s in readers)


def _topological(names: set[str], edges: Mapping[str, set[str]]) -> list[str]:
    """``names`` in an order where every stage follows the stages it reads (ties by name)."""
    order: list[str] = []
    waiting = {n: edges[n] & names for n in names}
    while waiting:
        ready = sorted(n for n, deps in waiting.items() if not deps - set(order))
        if not ready:
            raise ValueError(f"the stages' reads form a cycle among {sorted(waiting)}")
        order.append(ready[0])
        del waiting[ready[0]]
    return order


# --------------------------------------------------------------------------- the cost rows
def estimate(plan: Plan, interval: int) -> list[Estimate]:
    """One cost row per stage of the plan, in its order: each stage's own (``cost``), then each
    stage's adjustment for what release and its neighbours change (``adjust``: capture's released
    block outputs, fisher's walk down the blocks)."""
    inputs = CostInputs(plan.config, replace(plan, interval=interval), BlockGeometry.of(plan.facts))
    rows = {name: STAGES[name].cost(inputs) for name in plan.stages}
    for name in plan.stages:
        adjust = getattr(STAGES[name], "adjust", None)
        if adjust is not None:
            rows = adjust(rows, inputs)
    return [rows[name] for name in plan.stages]


def peak_disk(rows: list[Estimate]) -> tuple[float, float]:
    """(workspace bytes at the end, peak while running): every stage's outputs stay, and released
    payloads are on disk from their stage through the last stage that reads them; a stage that
    works out its own peak (``Estimate.peak``: fisher's walk down the blocks) counts that too."""
    order = {row.stage: i for i, row in enumerate(rows)}
    total = peak = 0.0
    for i, row in enumerate(rows):
        total += row.disk
        live = sum(r.transient for r in rows[: i + 1] if order.get(r.until or r.stage, 0) >= i)
        live += sum(size for r in rows[: i + 1] for size, until in r.extra if order.get(until, 0) >= i)
        peak = max(peak, total + live, row.peak)
    return total, peak


def checkpoints(layers: int, interval: int) -> list[int]:
    """Layers whose stored block outputs stay (besides the last layer's): every ``interval``-th."""
    return [i for i in range(layers - 1) if (i + 1) % interval == 0]


def capture_interval(plan: Plan) -> int:
    """Every how many layers capture keeps its block outputs: 1 (all of them) without a disk budget
    or when no later stage reads them, else the smallest interval whose predicted peak fits the
    budget (the least recompute), or the one of the lowest peak when none fits."""
    budget = plan.config.runtime.disk_budget_gb
    if budget is None or not later_hidden_readers(plan):
        return 1
    layers = int(plan.facts.num_hidden_layers)
    peaks = {k: peak_disk(estimate(plan, k))[1] for k in range(1, layers + 1)}
    fitting = [k for k, peak in peaks.items() if peak <= budget * 2**30]
    return fitting[0] if fitting else min(peaks, key=lambda k: (peaks[k], k))


def later_hidden_readers(plan: Plan) -> list[str]:
    """Stages after ``capture`` that read its stored block outputs (``HIDDEN``)."""
    from stagepipe.stagekit.artifacts import HIDDEN

    return [s for s in plan.readers("capture", HIDDEN) if plan.stages.index(s) > plan.stages.index("capture")]


def recomputed_captures(plan: Plan, layers: int, interval: int) -> int:
    """Layer captures run again to restore released block outputs: every non-checkpoint layer's
    (the last one's stays) once for each later stage that reads them."""
    if interval == 1:
        return 0
    return (layers - 1 - len(checkpoints(layers, interval))) * len(later_hidden_readers(plan))
