"""The pipeline file as pydantic models (its model and text sources: ``sources.py``).

Every model forbids unknown keys, so a typo fails at load time with the file, the dotted key and
what was expected, in one line (``ConfigError``; the CLI exits with code 2). Stages read *slices*
of this config (see ``Stage.config_slice``); only those slices enter their cache keys. The
``method`` and ``allocation`` blocks are unions of the models that method and policy modules
register (``stagepipe.methods``, ``stagepipe.allocation``): this file names none of them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from stagepipe.allocation import DEFAULT_POLICY, POLICIES
from stagepipe.config.sources import (
    GGUFModel,
    LocalModel,
    ModelConfig,
    NewsArticles,
    ShakespearePlays,
    TextFile,
    TextSource,
)
from stagepipe.errors import ConfigError
from stagepipe.methods import METHODS
from stagepipe.schema import KEYED_WHEN_SET, Strict
from stagepipe.zeroshot import DEFAULT_TASK_LIMIT
from stagepipe.zeroshot import TASKS as ZERO_SHOT_TASKS


class ValidationConfig(Strict):
    """Windows for choosing hyperparameters (e.g. ``asvd_search``'s sensitivity): text that no
    statistic and no test perplexity reads; non-overlapping windows of the calibration ``seq_len``."""

    text: TextSource
    n_samples: int = Field(8, ge=1)


class CalibrationConfig(Strict):
    text: TextSource
    n_samples: int = Field(16, ge=1)
    seq_len: int = Field(128, ge=8)
    seed: int = 0
    validation: ValidationConfig | None = None


class EvalDataset(Strict):
    name: str
    text: TextSource


ZeroShotTask = Literal[tuple(ZERO_SHOT_TASKS)]  # type: ignore[valid-type]


class EvaluationConfig(Strict):
    datasets: list[EvalDataset] = Field(min_length=1)
    seq_len: int = Field(256, ge=8)
    max_windows: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    dense_baseline: bool = True
    tasks: list[ZeroShotTask] = Field(
        default_factory=list, description="zero-shot tasks scored by lm-eval-harness on installed data (stagepipe.zeroshot)")
    task_limit: int | None = Field(
        DEFAULT_TASK_LIMIT, ge=1, description="first documents of each task scored (lm-eval's limit); null: the full sets")
    task_limits: dict[str, int | None] = Field(default_factory=dict, description="a task's own limit over task_limit")
    task_batch_size: int = Field(16, ge=1, description="lm-eval batch size (part of the key: padding moves the last bits)")

    @field_validator("task_limits")
    @classmethod
    def _known_tasks(cls, value: dict[str, int | None]) -> dict[str, int | None]:
        unknown = sorted(set(value) - set(ZERO_SHOT_TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(ZERO_SHOT_TASKS)}")
        if any(v is not None and v < 1 for v in value.values()):
            raise ValueError("a task limit is a positive number of documents or null (the full set)")
        return value

    def limit_of(self, task: str) -> int | None:
        """The documents scored on ``task`` (``None``: all)."""
        return self.task_limits.get(task, self.task_limit)


# --------------------------------------------------------------------------- method, target, allocation
def _union(classes: list[type[Strict]], tag: str) -> Any:
    """A discriminated union of registered config models (one class stays itself)."""
    members = tuple(classes)
    return Annotated[Union[members], Field(discriminator=tag)] if len(members) > 1 else members[0]  # noqa: UP007


#: every registered method's config, told apart by ``name`` (each method module owns its model)
MethodConfig = _union([m.config for m in METHODS.values()], "name")
#: every registered policy's config, told apart by ``policy`` (default ``DEFAULT_POLICY``)
AllocationConfig = _union([p.config for p in POLICIES.values()], "policy")


class TargetConfig(Strict):
    """The budget: a kept fraction of the target matrices' parameters, or — for a quantising method — their
    stored bits per weight (packed codes, scales, zero points and shapes counted: ``quantize.stored_bytes``)."""

    kept_fraction: float = Field(gt=0, le=1, description="parameters kept over the target matrices (1 when only "
                                                         "bits_per_weight is given)")
    delta_ratio: float | None = Field(
        None, ge=1, description="a delta method's budget: bytes of the dense 16-bit delta of the target matrices over "
                                "the bytes stored for it, every index and scale counted", json_schema_extra=KEYED_WHEN_SET)
    bits_per_weight: float | None = Field(
        None, gt=0, lt=16, description="most stored bits per weight of the target matrices, all overheads counted "
                                       "(a quantising method: checked before anything runs)")
    modules: list[str] | None = Field(
        None, description="regexes matched against linear names inside a decoder block; default all"
    )

    @model_validator(mode="before")
    @classmethod
    def _bits_alone_keep_everything(cls, data: Any) -> Any:
        """``{bits_per_weight: b}`` or ``{delta_ratio: r}`` alone keeps every parameter (a quantising or a
        delta method's target)."""
        if isinstance(data, dict) and "kept_fraction" not in data and (data.get("bits_per_weight") is not None
                                                                      or data.get("delta_ratio") is not None):
            return {**data, "kept_fraction": 1.0}
        return data

    @field_validator("modules")
    @classmethod
    def _regexes_compile(cls, value: list[str] | None) -> list[str] | None:
        for pattern in value or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regex {pattern!r}: {exc}") from exc
        return value


class RuntimeConfig(Strict):
    batch_size: int = Field(4, ge=1, description="calibration windows per forward in per-layer stages")
    activation_dtype: Literal["float32", "bfloat16"] = "float32"
    threads: int | None = Field(None, ge=1)
    release_consumed: bool = Field(False, description="delete hand-over payloads (fisher's boundary gradients) once "
                                                      "every partition that reads them is done; recomputed if needed again")
    disk_budget_gb: float | None = Field(None, gt=0, description="peak workspace this run may use: implies release_consumed, "
                                                                 "and capture keeps block outputs only at every k-th layer "
                                                                 "(k from the plan), recomputing the rest when a later stage reads them")
    shards: int = Field(1, ge=1, description="capture and fisher split the calibration windows into this many contiguous "
                                             "shards of whole batches (one Ray task per shard and layer under --executor ray) "
                                             "and sum their statistics in shard order in float64: the result depends on "
                                             "this number, never on where the shards ran")

    @property
    def releases(self) -> bool:
        """Whether hand-over payloads are released (asked for, or implied by a disk budget)."""
        return self.release_consumed or self.disk_budget_gb is not None


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
    base: ModelConfig | None = Field(None, description="the model that ``model`` was fine-tuned from (a delta method "
                                                       "compresses model − base)")
    calibration: CalibrationConfig
    method: MethodConfig
    target: TargetConfig
    allocation: AllocationConfig = Field(default_factory=lambda: POLICIES[DEFAULT_POLICY].config(policy=DEFAULT_POLICY))
    evaluation: EvaluationConfig
    runtime: RuntimeConfig = RuntimeConfig()
    executor: ExecutorConfig = ExecutorConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_policy(cls, data: Any) -> Any:
        """``allocation`` without a ``policy`` means the default policy."""
        if isinstance(data, dict) and isinstance(data.get("allocation"), dict) and "policy" not in data["allocation"]:
            data = {**data, "allocation": {"policy": DEFAULT_POLICY, **data["allocation"]}}
        return data

    @model_validator(mode="after")
    def _shards_fit(self) -> PipelineConfig:
        """Every shard holds at least one whole batch of calibration windows."""
        batches = -(-self.calibration.n_samples // self.runtime.batch_size)
        if self.runtime.shards > batches:
            raise ValueError(f"runtime.shards: {self.runtime.shards} shards need at least as many batches; "
                             f"calibration.n_samples {self.calibration.n_samples} in batches of runtime.batch_size "
                             f"{self.runtime.batch_size} make {batches}")
        return self

    @model_validator(mode="after")
    def _method_fits(self) -> PipelineConfig:
        """A method of a kind (structured, learned, …) refuses pipelines it cannot run (``Method.check_pipeline``)."""
        METHODS[self.method.name].check_pipeline(self, POLICIES[DEFAULT_POLICY].config(policy=DEFAULT_POLICY))
        POLICIES[self.allocation.policy].check_pipeline(self)
        spent = "bits_per_weight" if POLICIES[self.allocation.policy].allocates_bits else METHODS[self.method.name].budget
        for key in ("bits_per_weight", "delta_ratio"):  # a budget nothing spends would be ignored silently
            if key != spent and getattr(self.target, key) is not None:
                raise ValueError(f"target.{key}: {self.method.name} with policy {self.allocation.policy} spends "
                                 f"target.{spent}, not {key}; remove it")
        return self

    @model_validator(mode="after")
    def _validation_is_held_out(self) -> PipelineConfig:
        """Validation text must be read by no statistic and no test perplexity."""
        validation = self.calibration.validation
        if validation is None:
            return self
        text = validation.text
        if text == self.calibration.text:
            raise ValueError("calibration.validation.text is the calibration text; hyperparameters must be chosen "
                             "on text that no statistic reads")
        for dataset in self.evaluation.datasets:
            if dataset.text == text:
                raise ValueError(f"calibration.validation.text is evaluation dataset {dataset.name!r}; never tune on the test split")
        if isinstance(text, NewsArticles):
            cal = self.calibration.text
            held_out = (isinstance(cal, NewsArticles) and cal.split == "train"
                        and (cal.validation_articles, cal.test_articles) == (text.validation_articles, text.test_articles))
            if text.split != "validation" or not held_out:
                raise ValueError("calibration.validation.text: news_articles validation windows need split 'validation' "
                                 "and calibration.text news_articles split 'train' with the same validation_articles "
                                 "and test_articles (so the articles are disjoint)")
        if isinstance(text, ShakespearePlays) and (text.split != "validation" or self.calibration.text != ShakespearePlays(
                source="shakespeare", split="train")):
            raise ValueError("calibration.validation.text: shakespeare validation windows need split 'validation' and "
                             "calibration.text shakespeare split 'train' (so the works are disjoint)")
        return self


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
        if isinstance(data, dict) and part not in data and part in (data.get("source"), data.get("name"), data.get("policy")):
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
    elif error["type"] == "value_error":
        message = message.removeprefix("Value error, ")
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{_format_loc(loc)}: {message}{more}" if loc else f"{message}{more}"


def _check_paths(cfg: PipelineConfig, base: Path) -> PipelineConfig:
    """Resolve relative paths against the pipeline file and require local inputs to exist."""
    updates: dict[str, Any] = {}
    for key in ("model", "base"):
        model = getattr(cfg, key)
        if isinstance(model, LocalModel):
            path = (base / model.path).expanduser()
            if not path.exists():
                raise ValueError((f"{key}.path", f"no such directory: {path}"))
            updates[key] = model.model_copy(update={"path": path.resolve()})
        if isinstance(model, GGUFModel) and model.path is not None:
            path = (base / model.path).expanduser()
            if not (path / model.file).exists():
                raise ValueError((f"{key}.path", f"no such file: {path / model.file}"))
            updates[key] = model.model_copy(update={"path": path.resolve()})

    def fix_text(text: Any, where: str) -> Any:
        if isinstance(text, TextFile):
            path = (base / text.path).expanduser()
            if not path.is_file():
                raise ValueError((where, f"no such file: {path}"))
            return text.model_copy(update={"path": path.resolve()})
        return text

    validation = cfg.calibration.validation
    if validation is not None:
        validation = validation.model_copy(update={"text": fix_text(validation.text, "calibration.validation.text.path")})
    calibration = cfg.calibration.model_copy(
        update={"text": fix_text(cfg.calibration.text, "calibration.text.path"), "validation": validation}
    )
    datasets = [
        d.model_copy(update={"text": fix_text(d.text, f"evaluation.datasets[{i}].text.path")})
        for i, d in enumerate(cfg.evaluation.datasets)
    ]
    updates["calibration"] = calibration
    updates["evaluation"] = cfg.evaluation.model_copy(update={"datasets": datasets})
    return cfg.model_copy(update=updates)


_REGISTERED = (tuple(METHODS), tuple(POLICIES))
_MODELS: dict[tuple[tuple[str, ...], tuple[str, ...]], type[PipelineConfig]] = {_REGISTERED: PipelineConfig}


def pipeline_model() -> type[PipelineConfig]:
    """The pipeline schema for the methods and policies registered now: ``PipelineConfig`` itself,
    or, once a module registered another after this one was imported (a plugin, a test), a subclass
    whose ``method`` and ``allocation`` unions include it."""
    key = (tuple(METHODS), tuple(POLICIES))
    if key not in _MODELS:
        _MODELS[key] = create_model(
            "PipelineConfig", __base__=PipelineConfig,
            method=(_union([m.config for m in METHODS.values()], "name"), ...),
            allocation=(_union([p.config for p in POLICIES.values()], "policy"),
                        Field(default_factory=lambda: POLICIES[DEFAULT_POLICY].config(policy=DEFAULT_POLICY))))
    return _MODELS[key]


def parse_pipeline(data: Any, source: str, base: Path) -> PipelineConfig:
    """Validate already-parsed YAML data; errors name ``source`` and the offending key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: <root>: expected a mapping of pipeline keys, got {type(data).__name__}")
    try:
        cfg = pipeline_model().model_validate(data)
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
