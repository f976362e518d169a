"""``train`` (global, trainable, checkpointed): a learned method's parameters on the whole model.

The model is held once with every target linear swapped for a trainable module by the method's
trainer (``stages/trainers.py``): SoCo's ``SpectralLinear`` (one score per component of the base
method's weighted SVD) or Dobi-SVD's ``TruncatedLinear`` (one truncation position per matrix on
its activations). Only those parameters train, with Adam, on the calibration windows; the loss is
the token mean of ``KL(dense ‖ compressed)`` (the teacher is the same model in dense mode, so no
second copy is held) or the text's next-token loss.

Every ``checkpoint_every`` steps the trainer's state, Adam's state, the history and the RNG state
are written atomically to the partition's resume directory: a crash loses at most that many
steps, and the resumed run ends with the same outputs as an uninterrupted one (bit-identical on
CPU: the window order is a function of the seed and the epoch).

Output: what the trainer writes (SoCo: ``learned/layer-NNN.safetensors``) and ``history.json``
(one record per step); the results hold the learned rank of every target matrix, which
``allocate`` reports.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm import tqdm

from stagepipe.engine.stage import Context, PartitionRef, Stage, Work
from stagepipe.faults import kill_point
from stagepipe.models.layout import layout_for
from stagepipe.models.sources import DTYPES, resolve_device
from stagepipe.models.spectral import dense_mode
from stagepipe.stages import artifacts
from stagepipe.stages.artifacts import layer_index
from stagepipe.stages.requirements import needs
from stagepipe.stages.trainers import TRAINERS


class TrainStage(Stage):
    name = "train"
    version = 1
    description = "a learned method's parameters on the whole model (SoCo, Dobi-SVD), checkpointed"

    def dependencies(self, ctx: Context, partition: str) -> list[PartitionRef]:
        layers = artifacts.model_layers(ctx) or []
        return [artifacts.ref("snapshot"), artifacts.ref("tokenize", artifacts.CALIBRATION)] + [
            artifacts.ref("decompose", p) for p in layers]

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        method = needs(ctx.config).method
        return {"method": method.key_options(), "training": method.training_options(),
                "kept_fraction": ctx.config.target.kept_fraction, "modules": ctx.config.target.modules}

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM

        cfg = ctx.config.method
        device, dtype = resolve_device(ctx.config.model.device), DTYPES[ctx.config.model.dtype]
        model = AutoModelForCausalLM.from_pretrained(artifacts.model_dir(work.input("snapshot")), dtype=dtype).to(device)
        model.eval()
        layout = layout_for(model.config.model_type)
        targets = {}  # full name → (layer, name in the block, decompose output)
        for ref, directory in sorted(work.inputs.items()):
            if ref.stage == "decompose":
                for name in sorted(artifacts.read_results(directory)["linears"]):
                    targets[layout.layer_prefix(layer_index(ref.partition)) + name] = (layer_index(ref.partition), name, directory)
        windows = artifacts.read_windows(work.input("tokenize", artifacts.CALIBRATION))
        trainer = TRAINERS[needs(ctx.config).method.learned](cfg, model, targets, ctx.config.target.kept_fraction,
                                                              len(windows), dtype)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.train()  # checkpointing is active in training mode only; the models have no dropout at 0
        loop = _Loop(cfg, model, trainer, windows, work, device)
        loop.run()
        summary = trainer.finish(work.out, loop.history)
        artifacts.write_history(work.out, loop.history)
        # the ranks are what allocate reads; losses, positions and shares are the report's
        work.diagnostics.update({k: v for k, v in summary.items() if k not in ("ranks", "steps")})
        return {"ranks": summary["ranks"], "steps": summary["steps"]}


class _Loop:
    """Adam on the trainer's parameters, checkpointed every ``checkpoint_every`` steps."""

    FILE = "train.safetensors"

    def __init__(self, cfg: Any, model: torch.nn.Module, trainer: Any, windows: torch.Tensor, work: Work,
                 device: torch.device) -> None:
        self.cfg, self.model, self.trainer, self.windows, self.work, self.device = cfg, model, trainer, windows, work, device
        self.history: list[dict[str, Any]] = []

    def batch(self, step: int) -> torch.Tensor:
        """The windows of ``step``: a fixed permutation per epoch (seed, epoch), so a resumed run sees the same."""
        epoch, position = divmod(step, self.trainer.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.windows), generator=generator)
        return self.windows[order[position * self.cfg.batch:(position + 1) * self.cfg.batch]].to(self.device)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Token mean of KL(dense ‖ compressed) over every position, or the next-token loss (fp32)."""
        logits = self.model(input_ids=ids).logits.float()
        if self.cfg.objective == "nll":
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        with torch.no_grad(), dense_mode(self.trainer.modules):
            teacher = torch.log_softmax(self.model(input_ids=ids).logits.float(), dim=-1)
        student = torch.log_softmax(logits, dim=-1)
        return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="sum") / (ids.numel())

    def run(self) -> None:
        trainer = self.trainer
        optimizer = torch.optim.Adam(trainer.params, lr=self.cfg.lr)
        step = self._resume(optimizer)
        trainer.begin()
        bar = tqdm(total=trainer.total, initial=step, desc="train", unit="step", disable=None, leave=False, dynamic_ncols=True)
        while step < trainer.total:
            trainer.before_step(step)
            loss = self.loss(self.batch(step))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = trainer.rate(step)
            optimizer.step()
            record = trainer.after_step(step, float(loss.detach()))
            self.history.append(record)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", kept=f"{record['kept_soft']:.3f}")
            if step % self.cfg.checkpoint_every == 0 or step == trainer.total:
                self._save(step, optimizer)
        bar.close()

    def _resume(self, optimizer: torch.optim.Optimizer) -> int:
        found = artifacts.read_checkpoint(self.work.resume / self.FILE)
        if found is None:
            return 0
        tensors, meta = found
        self.trainer.load(tensors, meta["trainer"])
        artifacts.load_optimizer(optimizer, tensors, meta["param_groups"], len(self.trainer.params))
        torch.set_rng_state(tensors["rng"])
        self.history = meta["history"]
        self.work.telemetry["resumed_from_step"] = meta["step"]
        return meta["step"]

    def _save(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        tensors, trainer_meta = self.trainer.state()
        adam, param_groups = artifacts.optimizer_tensors(optimizer)
        tensors.update(adam)
        tensors["rng"] = torch.get_rng_state()
        meta = {"step": step, "trainer": trainer_meta, "history": self.history, "param_groups": param_groups}
        artifacts.write_checkpoint(self.work.resume / self.FILE, tensors, meta)
        kill_point("train-saved")
