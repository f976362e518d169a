"""``snapshot``: load the model from its source once and save it as a local HF directory.

Every later stage reads weights from here (one block at a time), so a GGUF model is dequantised
once and a hub model is downloaded once. The results record the architecture and the parameter
count used by all ratio accounting; every stage that reads the model reads this one, so its
content digest is the model fingerprint in their keys.
"""

from __future__ import annotations

from typing import Any

from stagepipe.engine.stage import Context, Work
from stagepipe.models.sources import save_snapshot, snapshot_identity
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.base import PipelineStage, register
from stagepipe.stagekit.cost import CostInputs, Estimate


@register
class SnapshotStage(PipelineStage):
    name = "snapshot"
    version = 1
    description = "load the model from its source and save a local safetensors copy"
    writes = {artifacts.MODEL_DIR: "the model as a Hugging Face directory (config, safetensors, tokenizer)"}

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        return snapshot_identity(ctx.config.model)

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        size = c.shapes.params * c.weight_bytes
        return Estimate(cls.name, size, size * 2, 0, f"{c.shapes.params / 1e9:.2f} B parameters")

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        model = save_snapshot(ctx.config.model, artifacts.model_dir(work.out))
        unique = {id(p): p.numel() for p in model.parameters()}
        return {
            "model_type": model.config.model_type,
            "num_layers": int(model.config.num_hidden_layers),
            "n_params": int(sum(unique.values())),
            "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
            "dtype": ctx.config.model.dtype,
        }
