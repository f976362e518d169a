"""The DAG: one module per stage, the ``artifacts`` they exchange, and the pipeline a config needs.

``build_pipeline(config)`` hands the engine exactly the stages this config needs
(``requirements.needs``), in execution order, with ``discover``: how to learn the model's facts
from the finished ``snapshot`` (or, before it exists, from the model source or ``shape_hint``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stagepipe.engine.runner import Runner
from stagepipe.engine.stage import Pipeline, Stage
from stagepipe.stages import artifacts
from stagepipe.stages.allocate import AllocateStage
from stagepipe.stages.anchor import AnchorStage
from stagepipe.stages.assemble import AssembleStage
from stagepipe.stages.capture import CaptureStage
from stagepipe.stages.decompose import DecomposeStage
from stagepipe.stages.evaluate import EvaluateStage
from stagepipe.stages.fisher import FisherStage
from stagepipe.stages.refit import RefitStage
from stagepipe.stages.report import ReportStage
from stagepipe.stages.requirements import ORDER, needs
from stagepipe.stages.residual import ResidualStage
from stagepipe.stages.sensitivity import SensitivityStage
from stagepipe.stages.snapshot import SnapshotStage
from stagepipe.stages.structure import StructureStage
from stagepipe.stages.tokenize import TokenizeStage
from stagepipe.stages.train import TrainStage

_STAGE_CLASSES: dict[str, type[Stage]] = {
    cls.name: cls for cls in (SnapshotStage, TokenizeStage, CaptureStage, FisherStage, DecomposeStage, SensitivityStage,
                              TrainStage, AllocateStage, StructureStage, ResidualStage, AnchorStage, RefitStage, AssembleStage, EvaluateStage, ReportStage)
}
assert tuple(_STAGE_CLASSES) == ORDER


def build_pipeline(config: Any) -> Pipeline:
    """The stages ``config`` needs, in execution order; ``report`` reads all the others."""
    names = needs(config).stage_names()
    stages = [_STAGE_CLASSES[name]() for name in names if name != "report"]
    return Pipeline(config=config, stages=(*stages, ReportStage(upstream=stages)), discover=discover)


def check_inputs(config: Any) -> None:
    """Fail before any stage runs, with an ``InputError`` naming the key, if the model source or a
    text file cannot be used (a key is computed only once its upstream is done, which is too late)."""
    from stagepipe.data.text import text_identity
    from stagepipe.models.sources import source_fingerprint

    source_fingerprint(config.model)
    text_identity(config.calibration.text, "calibration.text")
    for index, dataset in enumerate(config.evaluation.datasets):
        text_identity(dataset.text, f"evaluation.datasets[{index}].text")
    if needs(config).anchor:
        AnchorStage.check(config, _config_from_source(config.model.model_dump_json()))


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
        from transformers import PretrainedConfig

        return PretrainedConfig(**spec.shape_hint.model_dump())
    return found


__all__ = ["build_pipeline", "check_inputs", "discover", "make_runner"]
