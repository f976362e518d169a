"""Pipeline configuration: pydantic models loaded from one YAML file.

``pipeline`` holds the pipeline file's blocks and the loader (``load_pipeline``, ``parse_pipeline``);
``sources`` the model and text sources those blocks name. Every ``from stagepipe.config import …``
reads from here.
"""

from stagepipe.config.pipeline import (
    CalibrationConfig,
    EvalDataset,
    EvaluationConfig,
    ExecutorConfig,
    PipelineConfig,
    RuntimeConfig,
    TargetConfig,
    ValidationConfig,
    load_pipeline,
    parse_pipeline,
    pipeline_model,
)
from stagepipe.config.sources import (
    GGUFModel,
    HubDataset,
    HubModel,
    LocalModel,
    ModelConfig,
    ModelSpec,
    NewsArticles,
    ShakespearePlays,
    ShapeHint,
    SyntheticText,
    TextFile,
    TextSource,
    TinyModel,
)

__all__ = [
    "CalibrationConfig", "EvalDataset", "EvaluationConfig", "ExecutorConfig", "GGUFModel", "HubDataset", "HubModel",
    "LocalModel", "ModelConfig", "ModelSpec", "NewsArticles", "PipelineConfig", "RuntimeConfig", "ShakespearePlays",
    "ShapeHint", "SyntheticText", "TargetConfig", "TextFile", "TextSource", "TinyModel", "ValidationConfig",
    "load_pipeline", "parse_pipeline", "pipeline_model",
]
