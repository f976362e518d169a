"""``evaluate``: perplexity of the dense snapshot (``dense``), of the assembled model
(``compressed``) and, for a pipeline with a ``base`` model, of the base (``base``: a compressed
delta's share of the fine-tune's gain, ``intervals.gain_retained``) on every configured test set, under one protocol (``stagepipe.perplexity``):
each perplexity with its 95 % bootstrap interval over windows, and the compressed model against
the dense one by the paired bootstrap on the same windows (``stagepipe.intervals``).

Results hold only what the models compute; wall time goes to the manifest's telemetry, so two
runs with identical perplexities have identical outputs (and the report keeps its key).

The compressed model is loaded exactly as a user would, ``from_pretrained(dir,
trust_remote_code=True)``, and the run fails unless there are zero missing and unexpected keys.
Zero-shot accuracy is the ``zeroshot`` stage's (one partition per model and task).
"""

from __future__ import annotations

import json
import time
from typing import Any

from stagepipe.engine.stage import Context, Read, Work
from stagepipe.intervals import compare, gain_retained
from stagepipe.models.sources import load_checked, resolve_device
from stagepipe.perplexity import perplexity
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import (
    BASE,
    COMPRESSED,
    DENSE,
    MODEL_DIR,
    MODEL_STAGE,
    RESULTS,
    TOKENS,
    eval_partition,
)
from stagepipe.stagekit.base import PipelineStage, register
from stagepipe.stagekit.cost import CostInputs, Estimate


@register
class EvaluateStage(PipelineStage):
    name = "evaluate"
    version = 3
    description = "fp32 perplexity of the dense and the compressed model, with 95 % intervals"
    writes = {RESULTS: "per test set: perplexity and its 95 % interval, token-mean NLL, each window's NLL, windows, "
                       "tokens, non-finite windows"}

    @classmethod
    def joins(cls, choices) -> bool:
        return True  # what a pipeline is for

    @classmethod
    def needs(cls, choices) -> dict[str, set[str]]:
        found = {"snapshot": {MODEL_DIR}, "tokenize": {TOKENS}, "assemble": {MODEL_DIR}}
        return {**found, "base": {MODEL_DIR}} if choices.config.base is not None else found

    def partitions(self, ctx: Context) -> list[str]:
        base = [BASE] if ctx.config.base is not None and ctx.config.evaluation.dense_baseline else []
        return ([DENSE] if ctx.config.evaluation.dense_baseline else []) + base + [COMPRESSED]

    def reads(self, ctx: Context, partition: str) -> list[Read]:
        tokens = [Read(artifacts.ref("tokenize", eval_partition(d.name)), TOKENS) for d in ctx.config.evaluation.datasets]
        return [Read(artifacts.ref(MODEL_STAGE[partition]), MODEL_DIR), *tokens]

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        """The full model in fp32 (loaded: twice) and the fp32 logits of one batch (+ log-softmax);
        FLOPs when the windows are capped (``max_windows``), else unknown here."""
        s, ev = c.shapes, c.config.evaluation
        logits = ev.batch_size * ev.seq_len * s.vocab * 4
        flops = 0.0
        if ev.max_windows is not None:
            flops = 2 * s.params * ev.max_windows * ev.seq_len * len(ev.datasets) * (2 if ev.dense_baseline else 1)
        return Estimate(cls.name, 1e5, s.params * 4 * 2 + 2 * logits, c.gpu(s.params * 4 + 2 * logits),
                        "full model in fp32 (loaded: twice) + logits of one batch", flops=flops)

    @classmethod
    def summarize(cls, manifests) -> dict[str, Any]:
        evaluations = {ref.partition: manifest.info for ref, manifest in manifests.items()}
        summary = {"perplexity": {p: {d: r["ppl"] for d, r in info["datasets"].items()} for p, info in evaluations.items()},
                   "perplexity_interval": {p: {d: [r["ppl_low"], r["ppl_high"]] for d, r in info["datasets"].items()}
                                           for p, info in evaluations.items()},
                   "evaluation": evaluations}
        if DENSE in evaluations:  # the same windows: the paired comparison
            dense, compressed = evaluations[DENSE]["datasets"], evaluations[COMPRESSED]["datasets"]
            summary["compressed_over_dense"] = {
                d: compare(compressed[d]["window_nll"], dense[d]["window_nll"], r["seq_len"] - 1).to_dict()
                for d, r in compressed.items()}
        if BASE in evaluations:  # a delta: how much of the fine-tune's gain over its base the compressed model keeps
            base = evaluations[BASE]["datasets"]
            summary["gain_retained"] = {
                d: gain_retained(base[d]["window_nll"], dense[d]["window_nll"], r["window_nll"], r["seq_len"] - 1).to_dict()
                for d, r in compressed.items()}
        return summary

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        ev = ctx.config.evaluation
        return {"datasets": [d.name for d in ev.datasets], "protocol": "non-overlapping windows, fp32, token-mean NLL"}

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        directory = artifacts.model_dir(work.input(MODEL_STAGE[work.partition]))
        model = load_checked(directory)
        device = resolve_device(ctx.config.model.device)
        results = {}
        for dataset in ctx.config.evaluation.datasets:
            windows = artifacts.read_windows(work.input("tokenize", eval_partition(dataset.name)))
            started = time.time()
            results[dataset.name] = perplexity(model, windows, ctx.config.evaluation.batch_size, device).to_dict()
            work.telemetry[f"seconds.{dataset.name}"] = time.time() - started
        n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        (work.out / RESULTS).write_text(json.dumps({"model": work.partition, "n_params": n_params,
                                                             "datasets": results}, indent=1))
        return {"n_params": n_params, "datasets": results}
