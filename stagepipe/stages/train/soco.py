"""SoCo's trainer for the ``train`` stage: one score per component of the base method's weighted
SVD (``models/spectral.py``), through SoCo's four phases (``methods/soco.py``). Its guard
candidates (``guard``, on by default) are the start — ``select`` on untrained scores at
``start_align``, i.e. global_greedy at that align on the base's spectra (8 by default: the base
method's own row; 1: what ``lr: 0`` gives) — and the learned set."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

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
        self.dtype = dtype  # what finish writes in (the guard's fp32 perplexity converts the model in place)
        svds, sigmas = {}, {}
        for directory in dict.fromkeys(d for _, _, d in targets.values()):  # one read per layer, in order
            names = {name: full for full, (_, name, d) in targets.items() if d == directory}
            for name, svd in artifacts.read_weighted_svd(directory, list(names)).items():
                keep = math.ceil(cfg.candidates * len(svd.sigma))
                # the model dtype right away: one layer's float64 factors at a time, not the model's
                svds[names[name]] = (svd.left[:, :keep].to(dtype), svd.sigma[:keep].float(), svd.right[:keep].to(dtype))
                sigmas[names[name]] = svd.sigma[:keep].clone()  # float64: the penalty's units, as allocate sees them
        self.modules: dict[str, SpectralLinear] = install(model, svds)
        del svds
        self.targets = targets
        self.names = sorted(self.modules)
        ordered = self.ordered = [self.modules[n] for n in self.names]
        self.params = [m.scores for m in ordered]
        self.masks = [m.mask for m in ordered]
        self.shapes = [(int(m.weight.shape[0]), int(m.weight.shape[1])) for m in ordered]
        self.costs = [a + b for a, b in self.shapes]
        self.sizes = [a * b for a, b in self.shapes]
        self.units = penalty_units([sigmas[n] for n in self.names], self.costs, cfg.prior, SoCo(cfg).prior_scope())
        self.dense = float(sum(self.sizes))
        self.schedule = Schedule.of(cfg, windows)
        self.steps_per_epoch, self.total = self.schedule.steps_per_epoch, self.schedule.total
        self.start_soft: float | None = None
        self.start_cost: float | None = None
        self.shift = 0.0  # Θ: the sum of the penalty's θ so far (a score's value is d/unit + Θ)
        self.candidates = ("start", "learned") if cfg.guard else ()
        self._learned: tuple[list[torch.Tensor], list[torch.Tensor], list[bool]] | None = None
        self._before: list[torch.Tensor] = []

    def rate(self, step: int) -> float:
        return self.schedule.rate(step)

    def begin(self) -> None:
        if self.start_soft is None:
            self.start_soft = soft_kept(self.params, self.masks, self.costs, self.sizes, self.dense)

    def before_step(self, step: int) -> None:
        if self.schedule.phase(step) == "sparsify" and self.start_cost is None:
            self.start_cost = self._hard_cost()
        self._before = [score.detach().clone() for score in self.params]

    def _hard_cost(self) -> float:
        """Parameters the kept set stores: ``mn`` for a dense-kept matrix, else ``c`` per kept
        component, never more than dense (the sparsify phase starts from the dense size)."""
        return float(sum(size if dense else min(c * float(m.sum()), size)
                         for c, size, m, dense in zip(self.costs, self.sizes, self.masks, self.kept_dense, strict=True)))

    def after_step(self, step: int, loss: float) -> dict[str, Any]:
        phase = self.schedule.phase(step)
        with torch.no_grad():  # a pruned score stays where it was pruned (no gradient; Adam's momentum must not move it)
            for score, mask, before in zip(self.params, self.masks, self._before, strict=True):
                score.copy_(torch.where(mask > 0, score, before))
        theta = 0.0
        if phase in ("explore", "refine"):
            budget = self.schedule.soft_budget(step, self.start_soft, self.target)
            theta = shrink_to_budget(self.params, self.masks, self.costs, self.sizes, self.units, self.dense, budget)
            self.shift += theta
        if phase == "sparsify":
            budget = self.schedule.hard_budget(step, self.start_cost, self.target * self.dense)
            masks, dense = select(self.params, self.units, self.shapes, self.shift, budget)
            for mask, new in zip(self.masks, masks, strict=True):
                mask.copy_(new)
            self._keep_dense(dense)
            if self.cfg.debias and step == self.schedule.bounds("sparsify")[1] - 1:  # the set is now final
                with torch.no_grad():  # relaxed lasso: the kept components restart from 1, free of the shrinkage
                    for score, mask in zip(self.params, self.masks, strict=True):
                        score.copy_(mask)
        kept = soft_kept(self.params, self.masks, self.costs, self.sizes, self.dense)
        return {"step": step, "phase": phase, "loss": loss, "kept_soft": kept, "kept_hard": self._hard_cost() / self.dense,
                "shrink": theta, "lr": self.rate(step)}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"score.{i}": s.detach().cpu() for i, s in enumerate(self.params)}
        tensors.update({f"mask.{i}": m.cpu() for i, m in enumerate(self.masks)})
        return tensors, {"start_soft": self.start_soft, "start_cost": self.start_cost, "shift": self.shift,
                         "kept_dense": self.kept_dense}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        with torch.no_grad():
            for i, (score, mask) in enumerate(zip(self.params, self.masks, strict=True)):
                score.copy_(tensors[f"score.{i}"])
                mask.copy_(tensors[f"mask.{i}"])
        self.start_soft, self.start_cost = meta["start_soft"], meta["start_cost"]
        self.shift = meta["shift"]
        self._keep_dense(meta["kept_dense"])

    @property
    def kept_dense(self) -> list[bool]:
        """Per target (in ``names`` order), whether the selection keeps it dense (all components,
        ``mn`` parameters): the modules' own flags, which their forward follows."""
        return [module.kept_dense for module in self.ordered]

    def _keep_dense(self, flags: list[bool]) -> None:
        for module, dense in zip(self.ordered, flags, strict=True):
            module.kept_dense = dense

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

    def use(self, candidate: str) -> None:
        """Scores, masks and dense flags of ``candidate``: the trained ones (kept aside at the first
        call), or the start's — every score 1 and ``select``'s choice at the target without learning,
        at ``start_align`` (global_greedy's allocation at that align)."""
        with torch.no_grad():
            if self._learned is None:
                self._learned = ([p.detach().clone() for p in self.params], [m.clone() for m in self.masks],
                                 list(self.kept_dense))
            if candidate == "start":
                scores = [torch.ones_like(p) for p in self.params]
                masks, dense = select(scores, self.units, self.shapes, 0.0, self.target * self.dense,
                                     self.cfg.start_align)
            else:
                scores, masks, dense = self._learned
            for param, value in zip(self.params, scores, strict=True):
                param.copy_(value)
            for mask, value in zip(self.masks, masks, strict=True):
                mask.copy_(value.to(mask.device, mask.dtype))
            self._keep_dense(dense)

    def finish(self, out: Path, history: list[dict[str, Any]], chosen: str | None) -> dict[str, Any]:
        """Write each layer's kept factors from ``decompose``'s float64 SVD (so at scores of exactly 1
        they are the base method's truncation, bit for bit), and each dense-kept matrix whose scores
        moved as ``W + left·diag(σ̃(d − 1))·right`` (one untouched stays the snapshot's); the ranks
        (``None``: dense), the closing loss and how far from σ order. With a guard, of the ``chosen``
        candidate."""
        if chosen is not None:
            self.use(chosen)
        ranks: dict[str, int | None] = {}
        index = {name: j for j, name in enumerate(self.names)}
        for layer in sorted({i for i, _, _ in self.targets.values()}):
            local = {name: full for full, (i, name, _) in self.targets.items() if i == layer}
            directory = next(d for full, (i, _, d) in self.targets.items() if i == layer)
            tensors = {}
            for name, svd in artifacts.read_weighted_svd(directory, list(local)).items():
                full = local[name]
                j = index[full]
                module = self.modules[full]
                k = module.components
                scores = self.params[j].detach().double().cpu().clamp(min=0) * self.masks[j].double().cpu()
                left, sigma, right = svd.left[:, :k], svd.sigma[:k], svd.right[:k]
                if self.kept_dense[j]:
                    ranks[full] = None
                    moved = torch.nonzero(scores != 1).flatten()
                    if len(moved):
                        weight = module.weight.detach().double().cpu()
                        weight += (left[:, moved] * (sigma[moved] * (scores[moved] - 1))) @ right[moved]
                        tensors[f"{name}.weight"] = weight.to(self.dtype)
                    continue
                kept = torch.nonzero(self.masks[j] > 0).flatten().cpu()
                root = (sigma[kept] * scores[kept]).sqrt()
                tensors[f"{name}.up"] = (left[:, kept] * root).to(self.dtype)
                tensors[f"{name}.down"] = (root[:, None] * right[kept]).to(self.dtype)
                ranks[full] = len(kept)
            artifacts.write_learned(out, layer, tensors)
        last = history[-self.steps_per_epoch:]
        return {"ranks": dict(sorted(ranks.items())), "steps": self.total,
                "final_loss": sum(h["loss"] for h in last) / max(1, len(last)), "objective": self.cfg.objective,
                "kept_soft_final": history[-1]["kept_soft"] if history else None,
                "dense_kept": sum(self.kept_dense), **_order_report(self.ordered)}


def _order_report(modules: list[SpectralLinear]) -> dict[str, Any]:
    """How far the learned choice is from σ order: the share of kept components of the factored
    matrices outside each one's top-r by weighted σ, and the share of kept scores above 1 (grown to
    compensate)."""
    kept = outside = grown = 0
    for module in (m for m in modules if not m.kept_dense):
        indices = torch.nonzero(module.mask > 0).flatten()
        kept += len(indices)
        outside += int((indices >= len(indices)).sum())
        grown += int((module.scores.detach()[indices] > 1).sum())
    return {"kept_components": kept, "share_outside_sigma_order": outside / max(1, kept),
            "share_scores_above_one": grown / max(1, kept)}


