"""The stages: one module (or package) per stage, each registering itself (``stagekit.base``).

Importing this package imports every module in it, so adding a stage is adding a module.
``build_pipeline(config)`` hands the engine exactly the stages the config's plan joins
(``stagekit.plan``), in the plan's order, with ``discover`` (the model's facts from the finished
``snapshot``, or before it exists from the model source or ``shape_hint``) and the planner that
turns those facts into the one ``Plan`` every stage and the CLI read.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stagepipe.engine.runner import Runner
from stagepipe.engine.stage import Pipeline
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.base import STAGES
from stagepipe.stagekit.plan import Plan, make_plan

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def planner(config: Any):
    """``facts → Plan``, one plan per model facts (discover returns the same facts object for the
    same snapshot, so the cache holds one or two)."""
    plans: dict[int, tuple[Any, Plan]] = {}

    def plan(facts: Any) -> Plan:
        found = plans.get(id(facts))
        if found is None or found[0] is not facts:
            found = plans[id(facts)] = (facts, make_plan(config, facts))
        return found[1]

    return plan


def build_pipeline(config: Any) -> Pipeline:
    """The stages ``config``'s plan joins, in its order, with ``discover`` and the planner."""
    plan = make_plan(config)
    return Pipeline(config=config, stages=tuple(STAGES[name]() for name in plan.stages), discover=discover,
                    plan=planner(config))


def check_inputs(config: Any) -> None:
    """Fail before any stage runs, with an ``InputError`` naming the key, if the model source or a
    text file cannot be used (a key is computed only once its upstream is done, which is too late),
    or a stage refuses this pipeline for the model (``check``)."""
    from stagepipe.data.text import text_identity
    from stagepipe.models.sources import source_fingerprint

    source_fingerprint(config.model)
    if config.base is not None:
        source_fingerprint(config.base)
    text_identity(config.calibration.text, "calibration.text")
    for index, dataset in enumerate(config.evaluation.datasets):
        text_identity(dataset.text, f"evaluation.datasets[{index}].text")
    facts = _config_from_source(config.model.model_dump_json())
    for name in make_plan(config).stages:
        check = getattr(STAGES[name], "check", None)
        if check is not None:
            check(config, facts)


def make_runner(config: Any, workspace: Path, pipeline_path: str = "PIPELINE.yaml") -> Runner:
    """A driver for ``config`` in ``workspace`` (what the CLI runs)."""
    return Runner(build_pipeline(config), workspace, pipeline_path=pipeline_path, threads=config.runtime.threads,
                  release=config.runtime.releases)


def discover(config: Any, finished: Mapping[Any, Path]) -> Any | None:
    """The model's HF config: this pipeline's own snapshot once it is done, else the source's
    config when it is reachable (offline hub ids are not), else ``model.shape_hint``."""
    snapshot = finished.get(artifacts.ref("snapshot"))
    if snapshot is not None:
        return _config_from(str(artifacts.model_dir(snapshot)))
    return _config_from_source(config.model.model_dump_json())


@functools.lru_cache(maxsize=16)
def _config_from(directory: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(directory)


@functools.lru_cache(maxsize=16)
def _config_from_source(spec_json: str) -> Any | None:
    from stagepipe.config import ModelSpec
    from stagepipe.models.sources import load_config

    spec = ModelSpec.validate_json(spec_json)
    found = load_config(spec)
    if found is None and spec.shape_hint is not None:
        from transformers import AutoConfig, PretrainedConfig

        hint = spec.shape_hint.model_dump(exclude={"model_type"})
        model_type = spec.shape_hint.model_type
        return AutoConfig.for_model(model_type, **hint) if model_type else PretrainedConfig(**hint)
    return found


__all__ = ["build_pipeline", "check_inputs", "discover", "make_runner"]
