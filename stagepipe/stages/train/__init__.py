"""``train`` (global, trainable, checkpointed): a learned method's parameters on the whole model.

Joins for a ``LearnedMethod`` (SoCo, Dobi-SVD). The model is held once with every target linear
swapped for a trainable module by the method's trainer (``stages/train/<method>.py``, registered
for its method class: SoCo's ``SpectralLinear``, one score per component of the base method's
weighted SVD; Dobi-SVD's ``TruncatedLinear``, one truncation position per matrix on its
activations). Only those parameters train, with Adam, on the calibration windows; the loss is
the token mean of ``KL(dense ‖ compressed)`` (the teacher is the same model in dense mode, so no
second copy is held) or the text's next-token loss (``stagekit.training``).

Output: what the trainer writes (SoCo: ``learned/layer-NNN.safetensors``) and ``history.json``
(one record per step); the results hold the learned rank of every target matrix. This stage's
outputs replace the allocation policy (``allocation``: the learned ranks, accounted like every
other allocation) and, when the trainer writes factors, are each layer's final form.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from pathlib import Path
from typing import Any

import torch

from stagepipe.accounting import memory_report, ratio_report
from stagepipe.engine.stage import Context, Read, Work
from stagepipe.methods import LearnedMethod
from stagepipe.models.sources import DTYPES, resolve_device
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import (
    CALIBRATION,
    HISTORY,
    LEARNED,
    MODEL_DIR,
    TOKENS,
    VALIDATION,
    WEIGHTED_SVD,
    layer_index,
)
from stagepipe.stagekit.base import PipelineStage, register
from stagepipe.stagekit.cost import CPU_FLOPS, GPU_FLOPS, INTERPRETER, CostInputs, Estimate, duration
from stagepipe.stagekit.training import TrainingLoop, trainer_for, validation_guard


def _guard_windows(ctx: Context) -> str:
    """The windows the guard compares the start and the learned model on: the held-out validation
    articles when the pipeline has them, else the calibration windows (the record says which)."""
    return VALIDATION if ctx.config.calibration.validation else CALIBRATION


for _module in pkgutil.iter_modules(__path__):  # the trainers register themselves for their methods
    importlib.import_module(f"{__name__}.{_module.name}")


@register
class TrainStage(PipelineStage):
    name = "train"
    version = 4
    description = "a learned method's parameters on the whole model (SoCo, Dobi-SVD), checkpointed"
    writes = {LEARNED: "learned/layer-NNN.safetensors: the factors of the components a learned method kept "
                       "(and SoCo's dense-kept linears its scores changed, as <linear>.weight)",
              HISTORY: "one record per training step: loss, kept fraction, learning rate"}
    assembly_payload = LEARNED

    @classmethod
    def joins(cls, choices) -> bool:
        return isinstance(choices.method, LearnedMethod)

    @classmethod
    def needs(cls, choices) -> dict[str, set[str]]:
        return {"snapshot": {MODEL_DIR}, "tokenize": {TOKENS}, "decompose": {WEIGHTED_SVD}}

    def reads(self, ctx: Context, partition: str) -> list[Read]:
        layers = artifacts.model_layers(ctx) or []
        guard = [Read(artifacts.ref("tokenize", VALIDATION), TOKENS)] if _guard_windows(ctx) == VALIDATION else []
        return [Read(artifacts.ref("snapshot"), MODEL_DIR), Read(artifacts.ref("tokenize", CALIBRATION), TOKENS),
                *guard] + [Read(artifacts.ref("decompose", p), WEIGHTED_SVD) for p in layers]

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        method = ctx.plan.method
        return {"method": method.key_options(), "training": method.training_options(),
                "kept_fraction": ctx.config.target.kept_fraction, "modules": ctx.config.target.modules}

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        """The whole model, one step = ``batch`` windows: the model, what the trainer adds, one step's
        activations (every block's, or one block's plus the block inputs with gradient
        checkpointing) and fp32 logits (teacher, student, their gradients), on top of the
        interpreter. The dense weights stay for the KL teacher. FLOPs per step: the teacher's forward
        (KL), the student's forward and input-gradient backward (+ a recompute with gradient
        checkpointing), and what the trainer adds (Dobi-SVD: an SVD of each window's activations)."""
        config, s, cfg = c.config, c.shapes, c.config.method
        t = config.calibration.seq_len
        tokens = cfg.batch * t
        w = c.weight_bytes
        shape = trainer_for(c.method).plan(c)
        block_act = tokens * (12 * s.d + 4 * s.ff + 2 * max(shape.offered)) * w + shape.window_memory
        acts = tokens * s.d * w * s.layers + block_act if cfg.gradient_checkpointing else block_act * s.layers
        logits = 6 * tokens * s.vocab * 4  # student logits, their float copy and log-softmax, the teacher's, two gradients
        memory = INTERPRETER + s.params * w + shape.extra_memory + acts + logits
        steps = shape.epochs * math.ceil(config.calibration.n_samples / cfg.batch)
        passes = 2 + (1 if cfg.gradient_checkpointing else 0)  # student forward, input-gradient backward, recompute
        flops = steps * (2 * tokens * ((s.params if cfg.objective == "kl" else 0) + passes * shape.student_weights)
                         + passes * shape.window_flops)
        if getattr(cfg, "guard", False):  # two forward passes over the guard's windows
            held_out = config.calibration.validation.n_samples if config.calibration.validation else config.calibration.n_samples
            flops += 2 * 2 * held_out * t * s.params
        note = (f"{steps} steps, {flops / 1e12:.0f} TFLOP: ≈{duration(flops / GPU_FLOPS)} on one 80 GB GPU at "
                f"{GPU_FLOPS / 1e12:.0f} TFLOP/s, ≈{duration(flops / CPU_FLOPS)} on CPU at {CPU_FLOPS / 1e9:.0f} GFLOP/s (estimates)")
        load = s.params * w * 2 + shape.load_memory
        cuda = config.model.device == "cuda"  # "auto" may resolve to the CPU: plan host RAM for it
        return Estimate(cls.name, shape.factor_disk + 200 * steps, load if cuda else max(load, memory),
                        memory if c.on_gpu else 0, note, flops=flops)

    @classmethod
    def summarize(cls, manifests) -> dict[str, Any]:
        """The training's summary (steps, closing loss, the trainer's own figures) and its plot."""
        (manifest,) = manifests.values()
        return {"training": {"steps": manifest.info["steps"],
                             **{k: v for k, v in manifest.diagnostics.items() if k not in ("gammas", "start_ranks", "learned_ranks")}}}

    @classmethod
    def plot(cls, report: dict[str, Any], outputs: dict, out: Path, plt: Any) -> list[str]:
        """Its loss and soft (and hard) kept fraction per training step."""
        history = artifacts.read_history(outputs[artifacts.ref(cls.name)])
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
        steps = [h["step"] for h in history]
        ax1.plot(steps, [h["loss"] for h in history], lw=0.8)
        ax1.set(title="training loss per step", xlabel="step", ylabel="loss")
        ax2.plot(steps, [h["kept_soft"] for h in history], label="soft kept fraction")
        if history and "kept_hard" in history[0]:
            ax2.plot(steps, [h["kept_hard"] for h in history], label="components alive")
        ax2.set(title="kept fraction of the target parameters", xlabel="step")
        ax2.legend(fontsize=7)
        return [artifacts.save_figure(fig, out / artifacts.PLOTS["training"], plt)]

    # ------------------------------------------------------------------ the learned ranks replace the policy
    @classmethod
    def allocates(cls, choices) -> bool:
        return True

    @classmethod
    def allocation_needs(cls, choices) -> dict[str, set[str]]:
        return {cls.name: set()}

    @classmethod
    def allocation_reads(cls, ctx: Context) -> list[Read]:
        return [Read(artifacts.ref(cls.name))]  # its results: the learned ranks

    @classmethod
    def allocation(cls, ctx: Context, work: Work, shapes: dict[str, tuple[int, int]], n_params: int) -> dict[str, Any]:
        """The learned ranks as trained (no policy), accounted like every other allocation."""
        ranks = artifacts.read_learned_ranks(work.input(cls.name))
        kept = ctx.config.target.kept_fraction
        ratios = ratio_report(shapes, ranks, n_params, kept).model_dump()
        storage = ctx.plan.method.storage()
        if storage != "16-bit":
            ratios["memory"] = memory_report(shapes, ranks, storage, kept).model_dump()
        details = {"learned_by": ctx.plan.method.name}
        artifacts.write_allocation(work.out, ranks, {}, ratios, details)
        return {"ratios": ratios, "policy": "learned", "search": details,
                "dense_targets": sorted(n for n, r in ranks.items() if r is None)}

    # ------------------------------------------------------------------ and, with factors, assemble
    @classmethod
    def assembles(cls, choices) -> bool:
        return choices.method.learned_factors

    @classmethod
    def assembly_reads(cls, ctx: Context, layer: int) -> list[Read]:
        return [Read(artifacts.ref(cls.name), LEARNED)]

    @classmethod
    def layer_factors(cls, ctx: Context, work: Work, layer: int, ranks):
        return artifacts.read_learned(work.input(cls.name), layer)

    @classmethod
    def layer_params(cls, ctx: Context, work: Work, layer: int) -> dict[str, torch.Tensor]:
        """The dense-kept linears whose learned scores changed them (SoCo: ``<linear>.weight``)."""
        return artifacts.read_learned_params(work.input(cls.name), layer)

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM

        cfg = ctx.config.method
        device, dtype = resolve_device(ctx.config.model.device), DTYPES[ctx.config.model.dtype]
        model = AutoModelForCausalLM.from_pretrained(artifacts.model_dir(work.input("snapshot")), dtype=dtype).to(device)
        model.eval()
        targets = {}  # full name → (layer, name in the block, decompose output)
        for ref, directory in sorted(work.inputs.items()):
            if ref.stage == "decompose":
                for name in sorted(artifacts.read_results(directory)["linears"]):
                    targets[ctx.plan.layout.layer_prefix(layer_index(ref.partition)) + name] = (layer_index(ref.partition), name, directory)
        windows = artifacts.read_windows(work.input("tokenize", CALIBRATION))
        trainer = trainer_for(ctx.plan.method)(cfg, model, targets, ctx.config.target.kept_fraction, len(windows), dtype)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.train()  # checkpointing is active in training mode only; the models have no dropout at 0
        loop = TrainingLoop(cfg, model, trainer, windows, work, device)
        loop.run()
        source = _guard_windows(ctx)
        held_out = artifacts.read_windows(work.input("tokenize", source)) if trainer.candidates else windows
        chosen, guard = validation_guard(trainer, model, held_out, source, ctx.config.runtime.batch_size, device)
        summary = {**trainer.finish(work.out, loop.history, chosen), **guard}
        artifacts.write_history(work.out, loop.history)
        # the ranks are what allocate reads; losses, positions and shares are the report's
        work.diagnostics.update({k: v for k, v in summary.items() if k not in ("ranks", "steps")})
        return {"ranks": summary["ranks"], "steps": summary["steps"]}
