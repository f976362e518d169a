"""SoCo's trainer for the ``train`` stage: one score per component of the base method's weighted
SVD (``models/spectral.py``), through SoCo's four phases (``methods/soco.py``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from stagepipe.accounting import max_useful_rank
from stagepipe.methods.soco import Schedule, SoCo, penalty_units, select, shrink_to_budget, soft_kept
from stagepipe.models.spectral import SpectralLinear, install
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.cost import CostInputs
from stagepipe.stagekit.training import TrainingShape, trains


@trains(SoCo)
class SoCoTrainer:
    """Scores per component of the base method's weighted SVD, through SoCo's four phases."""

    def __init__(self, cfg: Any, model: torch.nn.Module, targets: dict[str, tuple[int, str, Path]], target: float,
                 windows: int, dtype: torch.dtype) -> None:
        self.cfg, self.target = cfg, target
        svds = {}
        for directory in dict.fromkeys(d for _, _, d in targets.values()):  # one read per layer, in order
            names = {name: full for full, (_, name, d) in targets.items() if d == directory}
            for name, svd in artifacts.read_weighted_svd(directory, list(names)).items():
                keep = math.ceil(cfg.candidates * len(svd.sigma))
                # the model dtype right away: one layer's float64 factors at a time, not the model's
                svds[names[name]] = (svd.left[:, :keep].to(dtype), svd.sigma[:keep].float(), svd.right[:keep].to(dtype))
        self.modules: dict[str, SpectralLinear] = install(model, svds)
        del svds
        self.targets = targets
        ordered = [self.modules[n] for n in sorted(self.modules)]
        self.params = [m.scores for m in ordered]
        self.masks = [m.mask for m in ordered]
        shapes = [tuple(m.weight.shape) for m in ordered]
        self.costs = [a + b for a, b in shapes]
        self.units = penalty_units([m.sigma for m in ordered], self.costs, cfg.prior, SoCo(cfg).prior_scope())
        self.caps = [min(max(1, max_useful_rank(a, b, 1)), m.components) for (a, b), m in zip(shapes, ordered, strict=True)]
        self.dense = float(sum(a * b for a, b in shapes))
        self.schedule = Schedule.of(cfg, windows)
        self.steps_per_epoch, self.total = self.schedule.steps_per_epoch, self.schedule.total
        self.start_soft: float | None = None
        self.start_cost: float | None = None

    def rate(self, step: int) -> float:
        return self.schedule.rate(step)

    def begin(self) -> None:
        if self.start_soft is None:
            with torch.no_grad():
                self.start_soft = float(soft_kept(self.params, self.masks, self.costs, self.dense))

    def before_step(self, step: int) -> None:
        if self.schedule.phase(step) == "sparsify" and self.start_cost is None:
            self.start_cost = sum(c * min(int(m.sum()), cap) for c, m, cap in zip(self.costs, self.masks, self.caps, strict=True))

    def after_step(self, step: int, loss: float) -> dict[str, Any]:
        phase = self.schedule.phase(step)
        with torch.no_grad():
            for score, mask in zip(self.params, self.masks, strict=True):
                score.clamp_(min=0).mul_(mask)
        theta = 0.0
        if phase in ("explore", "refine"):
            budget = self.schedule.soft_budget(step, self.start_soft, self.target)
            theta = shrink_to_budget(self.params, self.masks, self.costs, self.units, self.dense, budget)
        if phase == "sparsify":
            budget = self.schedule.hard_budget(step, self.start_cost, self.target * self.dense)
            for mask, new in zip(self.masks, select(self.params, self.masks, self.costs, self.units, self.caps, budget), strict=True):
                mask.copy_(new)
            debias = self.cfg.debias and step == self.schedule.bounds("sparsify")[1] - 1  # the set is now final
            with torch.no_grad():
                for score, mask in zip(self.params, self.masks, strict=True):
                    if debias:  # relaxed lasso: the kept components restart from 1, free of the shrinkage
                        score.copy_(mask)
                    else:
                        score.mul_(mask)
        with torch.no_grad():
            kept = float(soft_kept(self.params, self.masks, self.costs, self.dense))
        hard = sum(c * float(m.sum()) for c, m in zip(self.costs, self.masks, strict=True)) / self.dense
        return {"step": step, "phase": phase, "loss": loss, "kept_soft": kept, "kept_hard": hard, "shrink": theta,
                "lr": self.rate(step)}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"score.{i}": s.detach().cpu() for i, s in enumerate(self.params)}
        tensors.update({f"mask.{i}": m.cpu() for i, m in enumerate(self.masks)})
        return tensors, {"start_soft": self.start_soft, "start_cost": self.start_cost}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        with torch.no_grad():
            for i, (score, mask) in enumerate(zip(self.params, self.masks, strict=True)):
                score.copy_(tensors[f"score.{i}"])
                mask.copy_(tensors[f"mask.{i}"])
        self.start_soft, self.start_cost = meta["start_soft"], meta["start_cost"]

    @classmethod
    def plan(cls, c: CostInputs) -> TrainingShape:
        """Every target's offered components in the model dtype; scores with their gradient and
        two Adam moments; the student's forward runs through the factors."""
        s, cfg = c.shapes, c.config.method
        offered = [math.ceil(cfg.candidates * min(m, n)) for m, n in s.linears]
        factors = s.layers * sum(k * (m + n) for k, (m, n) in zip(offered, s.linears, strict=True))
        epochs = cfg.explore_epochs + cfg.refine_epochs + cfg.sparsify_epochs + cfg.tune_epochs
        return TrainingShape(offered, epochs, student_weights=factors + s.embed,
                             extra_memory=factors * c.weight_bytes + s.layers * sum(offered) * 4 * 4,
                             factor_disk=c.config.target.kept_fraction * s.layers * s.block * 4,
                             load_memory=8 * max((m + n) * min(m, n) for m, n in s.linears))

    def finish(self, out: Path, history: list[dict[str, Any]]) -> dict[str, Any]:
        """Write each layer's kept factors; the ranks, the closing loss and how far from σ order."""
        ranks = {}
        for layer in sorted({index for index, _, _ in self.targets.values()}):
            tensors = {}
            for full, (index, name, _) in self.targets.items():
                if index == layer:
                    up, down = self.modules[full].factors()
                    tensors[f"{name}.up"], tensors[f"{name}.down"] = up.cpu(), down.cpu()
                    ranks[full] = int(up.shape[1])
            artifacts.write_learned(out, layer, tensors)
        last = history[-self.steps_per_epoch:]
        return {"ranks": dict(sorted(ranks.items())), "steps": self.total,
                "final_loss": sum(h["loss"] for h in last) / max(1, len(last)), "objective": self.cfg.objective,
                "kept_soft_final": history[-1]["kept_soft"] if history else None, **_order_report(self.modules)}


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


