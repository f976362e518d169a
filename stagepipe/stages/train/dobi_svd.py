"""Dobi-SVD's trainer for the ``train`` stage: one truncation position ``γ = g·k`` per target on its
activations (``models/truncation.py``), projected onto the budget after every step
(``methods/dobi_svd.py``); the factors are decompose's, truncated at the learned ranks — or at the
uniform start's, unless the learned ones are better on validation outside the noise (``guard``, on by default:
the paper's training has no such check, and at 128 windows, kept 0.8, its ranks were worse than
the start's outside the noise; docs/headline/results.md)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from stagepipe.accounting import max_stored_rank, rank_cost
from stagepipe.methods.dobi_svd import DobiSVD, project_to_budget, round_to_budget
from stagepipe.models.layout import weight_matrix
from stagepipe.models.modeling_lowrank import RemappedLinear, remap_factors
from stagepipe.models.truncation import install_truncation
from stagepipe.schedules import cosine_to_tenth
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.cost import CostInputs
from stagepipe.stagekit.training import TrainingShape, trains


@trains(DobiSVD)
class DobiTrainer:
    """One truncation position ``γ = g·k`` per target, projected onto the budget after every step
    (parameters, or 16-bit words with remapping: ``accounting.rank_cost``)."""

    def __init__(self, cfg: Any, model: torch.nn.Module, targets: dict[str, tuple[int, str, Path]], target: float,
                 windows: int, dtype: torch.dtype) -> None:
        self.cfg, self.target, self.targets = cfg, target, targets
        self.candidates = ("start", "learned") if cfg.guard else ()
        storage = self.storage = DobiSVD(cfg).storage()
        names = sorted(targets)
        shapes = {n: tuple(weight_matrix(model.get_submodule(n)).shape) for n in names}
        self.costs = [rank_cost(*shapes[n], storage) for n in names]
        self.ks = [min(shapes[n]) for n in names]
        self.caps = [max(1, max_stored_rank(*shapes[n], storage)) for n in names]
        self.dense = float(sum(m * n for m, n in shapes.values()))
        # start from the uniform allocation: rank τ·mn/cost, as a fraction of min(m, n)
        uniform = {n: target * m * n_in / (cost * min(m, n_in))
                   for (n, (m, n_in)), cost in zip(shapes.items(), self.costs, strict=True)}
        self.start = [uniform[n] * k for n, k in zip(names, self.ks, strict=True)]  # γ of the uniform start
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
        return cosine_to_tenth(self.cfg.lr, step, 0, self.total)

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

    @classmethod
    def plan(cls, c: CostInputs) -> TrainingShape:
        """One SVD of each window's activations per target, forward and backward (float32: the
        activations, U, V and the backward's square matrices); it writes ranks, no factors."""
        s, cfg = c.shapes, c.config.method
        t = c.config.calibration.seq_len
        return TrainingShape([0] * len(s.linears), cfg.epochs, student_weights=s.params,
                             window_flops=s.layers * sum(cfg.batch * 14 * t * m * min(t, m) for m, _ in s.linears),
                             window_memory=sum(cfg.batch * (3 * t * m + 3 * min(t, m) ** 2) * 4 for m, _ in s.linears))

    def _ranks(self, candidate: str) -> list[int]:
        """Integer ranks (name order) of the learned positions or of the uniform start, rounded so
        that the budget is spent."""
        gammas = self.start if candidate == "start" else [self.modules[n].gamma.item() for n in sorted(self.modules)]
        return round_to_budget(gammas, self.costs, self.caps, self.target * self.dense)

    def use(self, candidate: str) -> None:
        """Every target computes decompose's factors truncated at ``candidate``'s ranks, as
        ``assemble`` will build it (the dense weights are overwritten: training is over)."""
        ranks = dict(zip(sorted(self.modules), self._ranks(candidate), strict=True))
        for directory in dict.fromkeys(d for _, _, d in self.targets.values()):  # one layer's float64 SVD at a time
            local = {name: full for full, (_, name, d) in self.targets.items() if d == directory}
            with torch.no_grad():
                for name, svd in artifacts.read_weighted_svd(directory, list(local)).items():
                    module = self.modules[local[name]]
                    up, down = svd.factors(ranks[local[name]])
                    if self.storage == "remap8":  # decoded from the 8-bit codes that will be stored
                        stored = RemappedLinear(down.shape[1], up.shape[0], up.shape[1], bias=False)
                        stored.load_state_dict(remap_factors(up, down))
                        up, down = stored.factors(torch.float64)
                    module.weight.copy_((up @ down).to(module.weight.dtype))
                    module.dense = True

    def finish(self, out: Path, history: list[dict[str, Any]], chosen: str | None) -> dict[str, Any]:
        """The ranks of the ``chosen`` candidate (the learned ones without a guard), rounded so that
        the budget is spent (no factors: ``assemble`` truncates ``decompose``'s SVD-LLM factors, the
        exact activation PCA, at these ranks); the learned ones and the start's beside them."""
        names = sorted(self.modules)
        gammas = [self.modules[n].gamma.item() for n in names]
        learned, start = self._ranks("learned"), self._ranks("start")
        moved = [abs(r - s) for r, s in zip(learned, start, strict=True)]
        last = history[-self.steps_per_epoch:]
        return {"ranks": dict(zip(names, start if chosen == "start" else learned, strict=True)),
                "gammas": dict(zip(names, gammas, strict=True)),
                "start_ranks": dict(zip(names, start, strict=True)), "learned_ranks": dict(zip(names, learned, strict=True)),
                "ranks_moved": sum(m > 0 for m in moved), "rank_change_max": max(moved, default=0),
                "steps": self.total, "final_loss": sum(h["loss"] for h in last) / max(1, len(last)),
                "objective": self.cfg.objective}


