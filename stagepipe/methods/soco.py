"""SoCo (Li et al., arXiv 2502.15092): a learned importance score per singular component.

On top of any plain metric-pair method (``base``: svdllm, kfac_svd, …) every target matrix is
``Ŵ(d) = left · diag(σ ⊙ d) · right`` (``decompose``'s weighted SVD, ``left = P^{-T} U``,
``right = Vᵀ Q^{-1}``), and only the non-negative scores ``d`` train, on the calibration windows,
against the dense model (KL of its next-token distribution, or the plain next-token loss). Which
components survive is decided by the learned score, not by σ order, and survivors may grow above 1
to make up for the pruned ones. The published schedule is sparse; ours (docs/methods.md):

1. **explore** — after every Adam step on the loss, the proximal step of a weighted L1 penalty
   ``θ Σ c·d/σ̃^prior`` shrinks the scores (``shrink_to_budget``), θ solved so that the soft kept
   fraction ``κ(d) = Σ c·min(d, 1) / Σ mn`` follows a line from its start (≈1.5 with every
   component offered) down to the target. Without learning this reproduces the base method's
   global allocation (``prior = 2``: weighted σ̃² per parameter); the loss gradient moves scores
   against it, so components the loss needs survive and the others go to 0;
2. **refine** — the same at the target with a decaying learning rate: the loss moves budget
   between components while κ stays on the target;
3. **sparsify** — the penalty is lifted and a hard budget falls linearly to the target; after
   every step the components of highest learned value ``d·σ̃^prior/c`` that fit are kept
   (``select``), the others are pruned for good, while the survivors' scores follow the loss alone;
4. **tune** — the pruned set is fixed and the retained scores keep training without pressure.

This module holds the method's config, its metric pair (the base method's) and the pure parts of
the schedule; the ``train`` stage runs it on the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator

from stagepipe.methods.base import METHODS, GradientOptions, LayerStats, LearnedMethod, MetricPair, register
from stagepipe.schedules import cosine_to_tenth

PHASES = ("explore", "refine", "sparsify", "tune")


class SoCoConfig(GradientOptions):
    """Learned per-component scores on top of a base method's weighted SVD (SoCo)."""

    name: Literal["soco"]
    base: str = Field("svdllm", description="the metric-pair method whose weighted SVD the scores act on")
    alpha: float = Field(0.5, gt=0, le=2, description="exponent of act_mean / act_max (an asvd base)")
    shrinkage: float = Field(0.0, ge=0, lt=1, description="a kfac_svd base's shrinkage")
    objective: Literal["kl", "nll"] = Field(
        "kl", description="KL(dense ‖ compressed) of the next-token distributions, or the next-token loss of the text")
    explore_epochs: int = Field(1, ge=0)
    refine_epochs: int = Field(1, ge=0)
    sparsify_epochs: int = Field(1, ge=1, description="epochs over which the hard budget falls to the target")
    tune_epochs: int = Field(3, ge=0, description="epochs with the pruned set fixed (3 over 1 on the validation split)")
    lr: float = Field(0.02, gt=0, description="Adam learning rate of the scores (which start at 1)")
    batch: int = Field(1, ge=1, description="calibration windows per step")
    prior: float = Field(2.0, ge=0, description="exponent of the weighted σ̃ in the penalty's per-component weight "
                                                 "c/σ̃^prior (2: the base method's global allocation order; 0: parameters only)")
    prior_scope: Literal["auto", "global", "matrix"] = Field(
        "auto", description="where the σ̃^prior are compared: across all matrices (global; the base's spectra are in "
                            "loss units: kfac_svd, fwsvd, gfwsvd) or only within each matrix (matrix; svdllm, asvd: "
                            "output units); auto: matrix when the base's left metric is the identity, else global")
    candidates: float = Field(1.0, gt=0, le=1, description="share of each matrix's components offered to training "
                                                           "(top by weighted σ; 1: all)")
    debias: bool = Field(False, description="reset the kept scores to 1 once the set is fixed (relaxed lasso: the tune "
                                            "phase starts from the plain truncation of the learned set, free of the L1 "
                                            "shrinkage)")
    checkpoint_every: int = Field(16, ge=1, description="steps between checkpoints (a crash loses at most this many)")
    gradient_checkpointing: bool = Field(False, description="recompute block activations in the backward pass (GPU memory)")
    seed: int = Field(0, description="window order")

    @field_validator("base")
    @classmethod
    def _plain_pair(cls, value: str) -> str:
        method = METHODS.get(value)
        if method is None or not method.is_metric_pair():
            allowed = sorted(n for n, m in METHODS.items() if m.is_metric_pair())
            raise ValueError(f"unknown or unsupported base {value!r}; expected one of {allowed}")
        return value


@register
class SoCo(LearnedMethod):
    """SoCo: learned per-component scores on a base method's weighted SVD, pruned by score."""

    name = "soco"
    config = SoCoConfig
    learned_factors: ClassVar[bool] = True

    def __init__(self, cfg: SoCoConfig) -> None:
        super().__init__(cfg)
        base = METHODS[cfg.base]
        shared = {k: v for k, v in cfg.model_dump().items() if k in base.config.model_fields and k != "name"}
        self.base = base(base.config(name=cfg.base, **shared))

    def pair(self) -> tuple[str, str]:
        return self.base.pair()

    def key_options(self) -> dict[str, Any]:
        """The base method's: its capture and fisher outputs are shared with its own rows (decompose
        is SoCo's own: it stores every offered component, ``stored_options``)."""
        return self.base.key_options()

    def stored_rank(self, m: int, n: int) -> int:
        """Training is offered the top ``candidates`` share of every matrix's components, which may
        go past break-even (all of them by default)."""
        return max(super().stored_rank(m, n), math.ceil(self.cfg.candidates * min(m, n)))

    def stored_options(self) -> dict[str, Any]:
        return {**super().stored_options(), "candidates": self.cfg.candidates}

    def metrics(self, linear: str, shape: tuple[int, int], stats: LayerStats) -> MetricPair:
        return self.base.metrics(linear, shape, stats)

    def prior_scope(self) -> str:
        """``prior_scope`` with ``auto`` resolved: an identity left metric leaves σ̃ in each matrix's own
        output units (SVD-LLM: its global_greedy row is the grid's worst), a Fisher one makes them loss units."""
        if self.cfg.prior_scope != "auto":
            return self.cfg.prior_scope
        return "matrix" if self.base.pair()[0] == "identity" else "global"

    def training_options(self) -> dict[str, Any]:
        """What shapes the learned scores beyond the factors (the ``train`` stage's key; scope resolved)."""
        names = ("objective", "explore_epochs", "refine_epochs", "sparsify_epochs", "tune_epochs", "lr",
                 "prior", "prior_scope", "batch", "candidates", "seed")
        options = {name: self.prior_scope() if name == "prior_scope" else getattr(self.cfg, name) for name in names}
        if self.cfg.debias:  # keyed only when set: earlier outputs keep their keys
            options["debias"] = True
        return options


# --------------------------------------------------------------------------- the schedule, as pure functions
@dataclass(frozen=True)
class Schedule:
    """Phase boundaries in steps and the learning rate of each step."""

    steps_per_epoch: int
    epochs: tuple[int, int, int, int]  # explore, refine, sparsify, tune
    lr: float

    @classmethod
    def of(cls, cfg: SoCoConfig, windows: int) -> Schedule:
        return cls(math.ceil(windows / cfg.batch),
                   (cfg.explore_epochs, cfg.refine_epochs, cfg.sparsify_epochs, cfg.tune_epochs), cfg.lr)

    @property
    def total(self) -> int:
        return sum(self.epochs) * self.steps_per_epoch

    def bounds(self, phase: str) -> tuple[int, int]:
        """First and one-past-last step of ``phase``."""
        index = PHASES.index(phase)
        start = sum(self.epochs[:index]) * self.steps_per_epoch
        return start, start + self.epochs[index] * self.steps_per_epoch

    def phase(self, step: int) -> str:
        return next(p for p in PHASES if step < self.bounds(p)[1])

    def rate(self, step: int) -> float:
        """Constant while exploring; cosine from ``lr`` to ``lr/10`` over refine + sparsify, and again
        over tune (the retained scores move again once the set is fixed)."""
        start, _ = self.bounds("refine")
        _, stop = self.bounds("sparsify")
        if step < start:
            return self.lr
        if step >= stop:
            start, stop = self.bounds("tune")
        return cosine_to_tenth(self.lr, step, start, stop)

    def soft_budget(self, step: int, start: float, target: float) -> float:
        """Soft kept fraction allowed after ``step``: linear from ``start`` to ``target`` over explore
        (reached on its last step), then ``target``."""
        first, stop = self.bounds("explore")
        done = (step - first + 1) / max(1, stop - first)
        return start + (target - start) * min(1.0, done)

    def hard_budget(self, step: int, start_cost: float, target_cost: float) -> float:
        """Parameters the kept components may cost after ``step`` of the sparsify phase: linear from
        ``start_cost`` to ``target_cost``, reached on its last step."""
        first, stop = self.bounds("sparsify")
        done = (step - first + 1) / max(1, stop - first)
        return start_cost + (target_cost - start_cost) * min(1.0, done)


def soft_kept(scores: list[torch.Tensor], masks: list[torch.Tensor], costs: list[int], dense: float) -> torch.Tensor:
    """``κ(d) = Σ c·min(d, 1) / Σ mn`` over the unpruned components (differentiable in ``d``)."""
    total = sum(c * (d.clamp(max=1.0) * m).sum() for d, m, c in zip(scores, masks, costs, strict=True))
    return total / dense


def penalty_units(sigmas: list[torch.Tensor], costs: list[int], prior: float, scope: str = "global") -> list[torch.Tensor]:
    """Per component, the L1 penalty's weight ``c / (c̄ · π)``: its parameters over its prior
    importance ``π = σ̃^prior``, normalised to mean 1 over all components (``scope="global"``) or
    within each matrix (``"matrix"``: σ order inside a matrix, parameters alone across matrices);
    float64. With ``prior = 2`` and global scope the penalty ranks components like the base
    method's global allocation (weighted σ̃² per parameter); with 0 by parameters alone."""
    powered = [s.double().clamp(min=0) ** prior for s in sigmas]
    flat = torch.cat(powered)
    tiny = float(flat.max()) * 1e-30 if flat.numel() and float(flat.max()) > 0 else 1e-300
    mean_cost = float(sum(c * len(s) for s, c in zip(sigmas, costs, strict=True))) / max(1, flat.numel())
    units = []
    for p, c in zip(powered, costs, strict=True):
        p = p.clamp(min=tiny)
        norm = float(p.mean()) if scope == "matrix" else float(flat.clamp(min=tiny).mean())
        units.append(c / (mean_cost * (p / norm)))
    return units


def shrink_to_budget(scores: list[torch.Tensor], masks: list[torch.Tensor], costs: list[int], units: list[torch.Tensor],
                     dense: float, budget: float) -> float:
    """The proximal step of the weighted L1 penalty ``θ Σ unit·d``, with θ solved so that the soft
    kept fraction lands on ``budget``: ``d ← max(0, d − θ·unit)`` on every unpruned score.

    θ = 0 when ``κ(d) ≤ budget`` already; otherwise the smallest θ with ``κ ≤ budget`` (bisection:
    κ falls monotonically in θ). Done outside the optimizer, so Adam's momentum cannot carry the
    kept fraction past the target, and Adam's normalisation cannot hide the penalty's scale.
    """
    with torch.no_grad():
        d = torch.cat([s.detach().double() for s in scores])
        live = torch.cat([m.double() for m in masks])
        cost = torch.cat([torch.full_like(s, c, dtype=torch.float64) for s, c in zip(scores, costs, strict=True)])
        unit = torch.cat(units).to(d.device)

        def kept(theta: float) -> float:
            return float((cost * ((d - theta * unit).clamp(0, 1) * live)).sum()) / dense

        if kept(0.0) <= budget:
            return 0.0
        low, high = 0.0, float((d / unit).max()) + 1.0
        for _ in range(80):
            mid = (low + high) / 2
            low, high = (low, mid) if kept(mid) <= budget else (mid, high)
        for score, mask, u in zip(scores, masks, units, strict=True):
            score.sub_((high * u).to(score.device, score.dtype)).clamp_(min=0).mul_(mask)
        return high


def select(scores: list[torch.Tensor], masks: list[torch.Tensor], costs: list[int], units: list[torch.Tensor],
           caps: list[int], budget: float) -> list[torch.Tensor]:
    """New masks: the unpruned components of highest value ``d / unit`` (the θ at which the penalty
    would zero them) that fit in ``budget`` parameters, at most ``caps[j]`` and at least one per
    matrix (each matrix's best is taken first). Greedy by value, so no skipped component would still
    fit: the budget is spent, not wasted."""
    new = [torch.zeros_like(m) for m in masks]
    spent = 0.0
    counts = [0] * len(scores)
    values: list[float] = []
    owners: list[int] = []
    indices: list[int] = []
    for j, (d, m, u) in enumerate(zip(scores, masks, units, strict=True)):
        alive = torch.nonzero(m > 0).flatten().cpu()
        value = d.detach().double().cpu() / u
        ranked = alive[torch.argsort(value[alive], descending=True, stable=True)]
        if len(ranked):
            new[j][ranked[0]] = 1
            spent += costs[j]
            counts[j] = 1
        values += value[ranked[1:]].tolist()
        owners += [j] * (len(ranked) - 1)
        indices += ranked[1:].tolist()
    for k in sorted(range(len(values)), key=lambda k: (-values[k], owners[k], indices[k])):
        j = owners[k]
        if counts[j] < caps[j] and spent + costs[j] <= budget:
            new[j][indices[k]] = 1
            spent += costs[j]
            counts[j] += 1
    return new
