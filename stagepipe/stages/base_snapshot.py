"""``base``: the model a fine-tune started from (``pipeline.base``), saved as a local HF directory like
``snapshot`` saves the fine-tuned ``model``. Joins when a stage reads it: a delta method's ``delta``
(each target's ``Δ = W_model − W_base``) and assembly, and ``evaluate``'s ``base`` partition (the
perplexity a compressed delta's gain is measured from)."""

from __future__ import annotations

from typing import Any

from stagepipe.engine.stage import Context, Work
from stagepipe.errors import ConfigError
from stagepipe.models.sources import save_snapshot, snapshot_identity
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.base import PipelineStage, register
from stagepipe.stagekit.cost import CostInputs, Estimate


@register
class BaseSnapshotStage(PipelineStage):
    name = "base"
    version = 1
    description = "load the base model (pipeline.base) and save a local safetensors copy"
    writes = {artifacts.MODEL_DIR: "the base model as a Hugging Face directory (config, safetensors, tokenizer)"}

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        spec = ctx.config.base
        if spec is None:
            raise ConfigError("base: this pipeline reads the base model; name it (base: {source: …})")
        return snapshot_identity(spec)

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        size = c.shapes.params * c.weight_bytes
        return Estimate(cls.name, size, size * 2, 0, f"{c.shapes.params / 1e9:.2f} B parameters (the base model)")

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        model = save_snapshot(ctx.config.base, artifacts.model_dir(work.out))
        return {"model_type": model.config.model_type, "num_layers": int(model.config.num_hidden_layers)}
