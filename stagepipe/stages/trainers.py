"""What the ``train`` stage trains, one class per ``Method.learned`` kind (not a stage).

A trainer swaps the target linears of the model for trainable modules, names its parameters,
its learning rate per step, its steps per epoch and in all, does what follows each Adam step (SoCo: the
budget's proximal step or pruning; Dobi-SVD: the projection onto the budget), saves and loads its
own state for the checkpoint, and writes its outputs. ``train.py`` owns everything else: the
windows, the loss, Adam, checkpoints, the progress bar.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from stagepipe.accounting import max_stored_rank, max_useful_rank, rank_cost
from stagepipe.methods.dobi_svd import DobiSVD, project_to_budget, round_to_budget
from stagepipe.methods.soco import Schedule, SoCo, penalty_units, select, shrink_to_budget, soft_kept
from stagepipe.models.layout import weight_matrix
from stagepipe.models.spectral import SpectralLinear, install
from stagepipe.models.truncation import install_truncation
from stagepipe.stages import artifacts


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


class DobiTrainer:
    """One truncation position ``γ = g·k`` per target, projected onto the budget after every step
    (parameters, or 16-bit words with remapping: ``accounting.rank_cost``)."""

    def __init__(self, cfg: Any, model: torch.nn.Module, targets: dict[str, tuple[int, str, Path]], target: float,
                 windows: int, dtype: torch.dtype) -> None:
        self.cfg, self.target = cfg, target
        storage = DobiSVD(cfg).storage()
        names = sorted(targets)
        shapes = {n: tuple(weight_matrix(model.get_submodule(n)).shape) for n in names}
        self.costs = [rank_cost(*shapes[n], storage) for n in names]
        self.ks = [min(shapes[n]) for n in names]
        self.caps = [max(1, max_stored_rank(*shapes[n], storage)) for n in names]
        self.dense = float(sum(m * n for m, n in shapes.values()))
        # start from the uniform allocation: rank τ·mn/cost, as a fraction of min(m, n)
        uniform = {n: target * m * n_in / (cost * min(m, n_in))
                   for (n, (m, n_in)), cost in zip(shapes.items(), self.costs, strict=True)}
        self.modules = install_truncation(model, names, uniform, cfg.beta, cfg.svd_gap, cfg.svd_terms)
        self.params = [self.modules[n].fraction for n in names]
        self.weights = torch.tensor([c * k for c, k in zip(self.costs, self.ks, strict=True)], dtype=torch.float64) / self.dense
        self.low = torch.tensor([1.0 / k for k in self.ks], dtype=torch.float64)
        self.high = torch.tensor([cap / k for cap, k in zip(self.caps, self.ks, strict=True)], dtype=torch.float64)
        self.steps_per_epoch = math.ceil(windows / cfg.batch)
        self.total = cfg.epochs * self.steps_per_epoch
        self._project()

    def _project(self) -> None:
        with torch.no_grad():
            g = torch.stack([p.detach().double().cpu() for p in self.params])
            new = project_to_budget(g, self.weights, self.low, self.high, self.target)
            for param, value in zip(self.params, new, strict=True):
                param.copy_(value.to(param.dtype))

    def rate(self, step: int) -> float:
        """Cosine from ``lr`` to ``lr/10`` over all steps."""
        return self.cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, self.total))))

    def begin(self) -> None:
        pass

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, step: int, loss: float) -> dict[str, Any]:
        self._project()
        kept = float(sum(p.item() * w for p, w in zip(self.params, self.weights.tolist(), strict=True)))
        return {"step": step, "loss": loss, "kept_soft": kept, "lr": self.rate(step)}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"fractions": torch.stack([p.detach().cpu() for p in self.params])}, {}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        with torch.no_grad():
            for param, value in zip(self.params, tensors["fractions"], strict=True):
                param.copy_(value)

    def finish(self, out: Path, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The learned ranks, rounded so that the budget is spent (no factors: ``assemble`` truncates
        ``decompose``'s SVD-LLM factors, the exact activation PCA, at these ranks)."""
        names = sorted(self.modules)
        gammas = [self.modules[n].gamma.item() for n in names]
        ranks = round_to_budget(gammas, self.costs, self.caps, self.target * self.dense)
        last = history[-self.steps_per_epoch:]
        return {"ranks": dict(zip(names, ranks, strict=True)), "gammas": dict(zip(names, gammas, strict=True)),
                "steps": self.total, "final_loss": sum(h["loss"] for h in last) / max(1, len(last)),
                "objective": self.cfg.objective}


#: trainer per ``Method.learned`` kind
TRAINERS = {"scores": SoCoTrainer, "truncation": DobiTrainer}
