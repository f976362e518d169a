"""The DAG as the code derives it (``stagekit.plan``, ``stagekit.dag``, ``stagepipe dag``): every
declared read agrees with its stage's ``needs`` and its ``dependencies()``; a stage and a method
kind added in a module of their own join the DAG, the plan and the release with no edit anywhere
else; the CLI prints it."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from stagepipe.allocation import POLICIES
from stagepipe.cli import main
from stagepipe.config import load_pipeline, parse_pipeline
from stagepipe.engine.stage import PartitionRef
from stagepipe.methods import METHODS, DeltaMethod, LearnedMethod, QuantizedMethod, StructuredMethod
from stagepipe.stagekit.artifacts import HIDDEN
from stagepipe.stagekit.base import STAGES
from stagepipe.stagekit.dag import problems
from stagepipe.stagekit.plan import make_plan
from stagepipe.stages import discover, make_runner
from tests.conftest import TINY, merge, runnable_bundled

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {"mixed": {"left": "kfac_out", "right": "gram"}}


def tiny(method: str, policy: str, **updates) -> object:
    data = merge(TINY, {"method": {"name": method, **REQUIRED.get(method, {})}, "allocation": {"policy": policy, "align": 4},
                        **updates})
    if issubclass(METHODS[method], (LearnedMethod, QuantizedMethod, DeltaMethod)):
        del data["allocation"]
    if issubclass(METHODS[method], QuantizedMethod):  # its budget is bits, every parameter kept
        data["target"] = {"bits_per_weight": 8}
    if policy == "rank_bits":  # ranks and widths for quantize_factors under a byte budget
        data["method"]["quantize_factors"], data["target"] = {"group_size": 16}, {"bits_per_weight": 6}
    if issubclass(METHODS[method], DeltaMethod):  # model − base at a compression ratio
        data["target"], data["base"] = {"delta_ratio": 8}, {**TINY["model"], "seed": 1}
    return parse_pipeline(data, "test", ".")


CONFIGS = [(m, p) for m in sorted(METHODS) for p in sorted(POLICIES)
           if not (issubclass(METHODS[m], (LearnedMethod, StructuredMethod, QuantizedMethod, DeltaMethod)) and p != "uniform")]


@pytest.mark.parametrize("method,policy", CONFIGS, ids=[f"{m}-{p}" for m, p in CONFIGS])
def test_every_read_is_declared_and_is_a_dependency(method: str, policy: str) -> None:
    for runtime in ({}, {"runtime": {"disk_budget_gb": 1e-3, "threads": 1}}, {"calibration": {
            "validation": {"text": {"source": "synthetic", "n_words": 500, "seed": 7}}}}):
        config = tiny(method, policy, **runtime)
        assert problems(config, discover(config, {})) == []


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_bundled_pipeline_declares_what_it_reads(path: Path, tmp_path: Path) -> None:
    config = load_pipeline(runnable_bundled(path, tmp_path))
    assert problems(config, discover(config, {})) == []


def test_a_dependency_that_is_not_a_read_is_found(monkeypatch) -> None:
    """``dependencies()`` that drift from ``reads()`` (a stage overriding one and not the other)
    are a declaration problem: keys and release would disagree."""
    config = tiny("svdllm", "uniform")
    decompose = STAGES["decompose"]
    monkeypatch.setattr(decompose, "dependencies", lambda self, ctx, partition: [PartitionRef("snapshot", "all")])
    found = problems(config, discover(config, {}))
    assert found and all("dependencies() are not the partitions its reads() name" in p for p in found)
    monkeypatch.undo()
    monkeypatch.setattr(STAGES["allocate"], "needs", classmethod(lambda cls, choices: {"snapshot": {"model"}}))
    assert any("allocate.needs does not name 'decompose'" in p for p in problems(config, discover(config, {})))


THROWAWAY = '''
"""A method kind and its stage, in one module that no other module names."""
from typing import Any, Literal

import torch

from stagepipe.engine.stage import Read
from stagepipe.methods import Method, MethodConfig, register as register_method
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import HIDDEN, WEIGHTED_SVD
from stagepipe.stagekit.base import PipelineStage, register
from stagepipe.stagekit.cost import Estimate


class ProbingMethod(Method):
    """A kind: its methods bring the ``probe`` stage."""


class ProbeConfig(MethodConfig):
    name: Literal["probe_svd"]


@register_method
class ProbeSVD(ProbingMethod):
    """SVD-LLM's pair, probed."""

    name = "probe_svd"
    config = ProbeConfig
    right = "gram"


@register
class ProbeStage(PipelineStage):
    name = "probe"
    version = 1
    writes = {"probe.json": "the mean square of the block inputs"}

    @classmethod
    def joins(cls, choices) -> bool:
        return isinstance(choices.method, ProbingMethod)

    @classmethod
    def needs(cls, choices) -> dict[str, set[str]]:
        return {"capture": {HIDDEN}, "decompose": {WEIGHTED_SVD}}

    def partitions(self, ctx):
        return artifacts.model_layers(ctx)

    def reads(self, ctx, partition):
        return [Read(artifacts.ref("capture", partition), HIDDEN), Read(artifacts.ref("decompose", partition), WEIGHTED_SVD)]

    def config_slice(self, ctx, partition) -> dict[str, Any]:
        return {}

    @classmethod
    def cost(cls, c) -> Estimate:
        return Estimate(cls.name, 12345.0, 678.0, 0.0, "probes")

    def run(self, ctx, work) -> dict[str, Any]:
        hidden = torch.from_numpy(artifacts.open_hidden(work.input("capture", work.partition))[...])
        (work.out / "probe.json").write_text(str(float((hidden.double() ** 2).mean())))
        return {}
'''


@pytest.fixture
def throwaway(tmp_path: Path, monkeypatch):
    (tmp_path / "throwaway_kind.py").write_text(textwrap.dedent(THROWAWAY))
    monkeypatch.syspath_prepend(str(tmp_path))
    import throwaway_kind  # noqa: F401 - registers the method and the stage

    yield
    METHODS.pop("probe_svd", None)
    STAGES.pop("probe", None)
    sys.modules.pop("throwaway_kind", None)


def test_a_new_stage_and_method_kind_join_the_dag_the_plan_and_the_release(throwaway, write_pipeline, tmp_path) -> None:
    """Written in a module of its own: a method kind (``ProbingMethod``), a method of it, and the
    stage the kind brings, which reads capture's block outputs and decompose's factors."""
    pipeline = write_pipeline("probe", method={"name": "probe_svd"}, runtime={"release_consumed": True, "threads": 1})
    config = load_pipeline(pipeline)  # the schema took the new method
    plan = make_plan(config, discover(config, {}))
    assert "probe" in plan.stages and plan.stages.index("probe") > plan.stages.index("decompose")
    assert plan.row("probe").disk == 12345.0  # its cost row is in the plan
    assert problems(config, plan.facts) == []
    runner = make_runner(config, tmp_path / "ws")
    results = runner.run()
    assert {r.ref for r in results} >= {"probe@layer-000", "probe@layer-001"} and all(r.ok for r in results)
    entries = {e.ref: e for e in runner.states()}
    capture = entries[PartitionRef("capture", "layer-000")]
    assert PartitionRef("probe", "layer-000") in capture.transient[HIDDEN]  # a reader the release waits for
    assert HIDDEN in capture.state.released  # and, every reader done, released
    code, output = CliRunner().invoke(main, ["dag", str(pipeline)]).exit_code, CliRunner().invoke(main, ["dag", str(pipeline)]).output
    assert code == 0 and "* probe" in output and "capture (hidden.zarr); decompose (svd.safetensors)" in output


def test_the_dag_command_prints_the_derived_dag(write_pipeline) -> None:
    pipeline = write_pipeline("dag", method={"name": "aasvd"})
    result = CliRunner().invoke(main, ["dag", str(pipeline)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("dag: 9 stages (aasvd, uniform); allocation by the policy, layers assembled from anchor")
    stages = [line.split()[1] if line.startswith("*") else line.split()[0] for line in lines[1:]]
    assert stages == list(make_plan(load_pipeline(pipeline)).stages)
    assert any(line.startswith("* anchor") and "anchor (hidden.zarr)" in line for line in lines)
    dot = CliRunner().invoke(main, ["dag", str(pipeline), "--format", "dot"]).output
    assert dot.startswith('digraph "dag" {') and '"capture" -> "anchor" [label="groups.json, hidden.zarr, stats.zarr"];' in dot
