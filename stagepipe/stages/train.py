"""``train`` (global, trainable, checkpointed): a learned method's scores on the whole model (SoCo).

The model is held once with every target linear swapped for a ``SpectralLinear`` built from
``decompose``'s weighted SVD (all components, or the top ``candidates`` share by σ); only the
per-component scores train, on the calibration windows, following the method's four-phase
schedule (``stagepipe.methods.soco``). The teacher of the KL objective is the same model in dense
mode, so no second copy is held.

Every ``checkpoint_every`` steps the scores, the masks, Adam's state, the budget schedule's start,
the history and the RNG state are written atomically to the partition's resume directory: a crash
loses at most that many steps, and the resumed run ends with the same scores as an uninterrupted
one (bit-identical on CPU: the window order is a function of the seed and the epoch).

Output: ``learned/layer-NNN.safetensors`` (``<linear>.up|down`` of the kept components, σ ⊙ d
split symmetrically) and ``history.json`` (loss, soft and hard kept fraction, shrinkage θ per step); the
results hold the learned rank of every target matrix, which ``allocate`` reports.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm import tqdm

from stagepipe.accounting import max_useful_rank
from stagepipe.engine.stage import Context, PartitionRef, Stage, Work
from stagepipe.faults import kill_point
from stagepipe.methods.soco import Schedule, penalty_units, select, shrink_to_budget, soft_kept
from stagepipe.models.layout import layout_for
from stagepipe.models.sources import DTYPES, resolve_device
from stagepipe.models.spectral import SpectralLinear, dense_mode, install
from stagepipe.stages import artifacts
from stagepipe.stages.artifacts import layer_index
from stagepipe.stages.requirements import needs


class TrainStage(Stage):
    name = "train"
    version = 1
    description = "learned per-component scores on the whole model (SoCo), checkpointed"

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
        svds, order = {}, {}
        for ref, directory in sorted(work.inputs.items()):
            if ref.stage != "decompose":
                continue
            names = sorted(artifacts.read_results(directory)["linears"])
            for name, svd in artifacts.read_weighted_svd(directory, names).items():
                keep = math.ceil(cfg.candidates * len(svd.sigma))
                full = layout.layer_prefix(layer_index(ref.partition)) + name
                # the model dtype right away: one layer's float64 factors at a time, not the model's
                svds[full] = (svd.left[:, :keep].to(dtype), svd.sigma[:keep].float(), svd.right[:keep].to(dtype))
                order[full] = (layer_index(ref.partition), name)
        modules = install(model, svds)
        del svds
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.train()  # checkpointing is active in training mode only; the models have no dropout at 0
        windows = artifacts.read_windows(work.input("tokenize", artifacts.CALIBRATION))
        training = _Training(cfg, model, modules, windows, ctx.config.target.kept_fraction, work, device)
        summary = training.run()
        ranks = {}
        for layer in sorted({i for i, _ in order.values()}):
            tensors = {}
            for full, (index, name) in order.items():
                if index == layer:
                    up, down = modules[full].factors()
                    tensors[f"{name}.up"], tensors[f"{name}.down"] = up.cpu(), down.cpu()
                    ranks[full] = int(up.shape[1])
            artifacts.write_learned(work.out, layer, tensors)
        artifacts.write_history(work.out, training.history)
        return {"ranks": dict(sorted(ranks.items())), **summary, **_order_report(modules)}


class _Training:
    """Adam on the scores through the four phases, checkpointed every ``checkpoint_every`` steps."""

    FILE = "train.safetensors"

    def __init__(self, cfg: Any, model: torch.nn.Module, modules: dict[str, SpectralLinear], windows: torch.Tensor,
                 target: float, work: Work, device: torch.device) -> None:
        self.cfg, self.model, self.windows, self.target, self.work, self.device = cfg, model, windows, target, work, device
        self.modules = [modules[n] for n in sorted(modules)]
        self.all = modules
        self.scores = [m.scores for m in self.modules]
        self.masks = [m.mask for m in self.modules]
        shapes = [tuple(m.weight.shape) for m in self.modules]
        self.costs = [a + b for a, b in shapes]
        self.units = penalty_units([m.sigma for m in self.modules], self.costs, cfg.prior, cfg.prior_scope)
        self.caps = [min(max(1, max_useful_rank(a, b, 1)), m.components) for (a, b), m in zip(shapes, self.modules, strict=True)]
        self.dense = float(sum(a * b for a, b in shapes))
        self.schedule = Schedule.of(cfg, len(windows))
        self.history: list[dict[str, Any]] = []

    def batch(self, step: int) -> torch.Tensor:
        """The windows of ``step``: a fixed permutation per epoch (seed, epoch), so a resumed run sees the same."""
        epoch, position = divmod(step, self.schedule.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.windows), generator=generator)
        return self.windows[order[position * self.cfg.batch:(position + 1) * self.cfg.batch]].to(self.device)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Token mean of KL(dense ‖ compressed) over every position, or the next-token loss (fp32)."""
        logits = self.model(input_ids=ids).logits.float()
        if self.cfg.objective == "nll":
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        with torch.no_grad(), dense_mode(self.all):
            teacher = torch.log_softmax(self.model(input_ids=ids).logits.float(), dim=-1)
        student = torch.log_softmax(logits, dim=-1)
        return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="sum") / (ids.numel())

    def run(self) -> dict[str, Any]:
        schedule, cfg = self.schedule, self.cfg
        optimizer = torch.optim.Adam(self.scores, lr=cfg.lr)
        step, start_soft, start_cost = self._resume(optimizer)
        if start_soft is None:
            with torch.no_grad():
                start_soft = float(soft_kept(self.scores, self.masks, self.costs, self.dense))
        bar = tqdm(total=schedule.total, initial=step, desc="train", unit="step", disable=None, leave=False, dynamic_ncols=True)
        while step < schedule.total:
            phase = schedule.phase(step)
            if phase == "sparsify" and start_cost is None:
                start_cost = sum(c * min(int(m.sum()), cap) for c, m, cap in zip(self.costs, self.masks, self.caps, strict=True))
            loss = self.loss(self.batch(step))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = schedule.rate(step)
            optimizer.step()
            with torch.no_grad():
                for score, mask in zip(self.scores, self.masks, strict=True):
                    score.clamp_(min=0).mul_(mask)
            theta = 0.0
            if phase in ("explore", "refine"):
                budget = schedule.soft_budget(step, start_soft, self.target)
                theta = shrink_to_budget(self.scores, self.masks, self.costs, self.units, self.dense, budget)
            if phase == "sparsify":
                budget = schedule.hard_budget(step, start_cost, self.target * self.dense)
                for mask, new in zip(self.masks, select(self.scores, self.masks, self.costs, self.units, self.caps, budget), strict=True):
                    mask.copy_(new)
                with torch.no_grad():
                    for score, mask in zip(self.scores, self.masks, strict=True):
                        score.mul_(mask)
            with torch.no_grad():
                kept = float(soft_kept(self.scores, self.masks, self.costs, self.dense))
            value = float(loss.detach())
            self.history.append({"step": step, "phase": phase, "loss": value, "kept_soft": kept,
                                 "kept_hard": self._hard_kept(), "shrink": theta, "lr": schedule.rate(step)})
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", kept=f"{kept:.3f}", phase=phase)
            if step % cfg.checkpoint_every == 0 or step == schedule.total:
                self._save(step, optimizer, start_soft, start_cost)
        bar.close()
        last = self.history[-schedule.steps_per_epoch:] if self.history else []
        return {"steps": schedule.total, "final_loss": sum(h["loss"] for h in last) / max(1, len(last)),
                "objective": cfg.objective, "kept_soft_final": self.history[-1]["kept_soft"] if self.history else None}

    def _hard_kept(self) -> float:
        return sum(c * float(m.sum()) for c, m in zip(self.costs, self.masks, strict=True)) / self.dense

    def _resume(self, optimizer: torch.optim.Optimizer) -> tuple[int, float | None, float | None]:
        found = artifacts.read_checkpoint(self.work.resume / self.FILE)
        if found is None:
            return 0, None, None
        tensors, meta = found
        with torch.no_grad():
            for i, (score, mask) in enumerate(zip(self.scores, self.masks, strict=True)):
                score.copy_(tensors[f"score.{i}"])
                mask.copy_(tensors[f"mask.{i}"])
        state = {i: {key: tensors[f"adam.{i}.{key}"] for key in ("step", "exp_avg", "exp_avg_sq")}
                 for i in range(len(self.scores)) if f"adam.{i}.step" in tensors}
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        torch.set_rng_state(tensors["rng"])
        self.history = meta["history"]
        self.work.telemetry["resumed_from_step"] = meta["step"]
        return meta["step"], meta["start_soft"], meta["start_cost"]

    def _save(self, step: int, optimizer: torch.optim.Optimizer, start_soft: float, start_cost: float | None) -> None:
        state = optimizer.state_dict()
        tensors = {f"score.{i}": s.detach().cpu() for i, s in enumerate(self.scores)}
        tensors.update({f"mask.{i}": m.cpu() for i, m in enumerate(self.masks)})
        tensors.update({f"adam.{i}.{key}": value.cpu() for i, s in state["state"].items() for key, value in s.items()})
        tensors["rng"] = torch.get_rng_state()
        meta = {"step": step, "start_soft": start_soft, "start_cost": start_cost, "history": self.history,
                "param_groups": state["param_groups"]}
        artifacts.write_checkpoint(self.work.resume / self.FILE, tensors, meta)
        kill_point("train-saved")


def _order_report(modules: dict[str, SpectralLinear]) -> dict[str, Any]:
    """How far the learned choice is from σ order: the share of kept components outside each
    matrix's top-r by weighted σ, and the share of kept scores above 1 (grown to compensate)."""
    kept = outside = grown = 0
    for module in modules.values():
        indices = torch.nonzero(module.mask > 0).flatten()
        kept += len(indices)
        outside += int((indices >= len(indices)).sum())
        grown += int((module.scores.detach()[indices] > 1).sum())
    return {"kept_components": kept, "share_outside_sigma_order": outside / max(1, kept),
            "share_scores_above_one": grown / max(1, kept)}
