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

from stagepipe.accounting import FillItem, water_fill
from stagepipe.errors import StagepipeError
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
    lr: float = Field(0.02, ge=0, description="Adam learning rate of the scores (which start at 1); 0: no learning, the "
                                              "control (with debias) that reproduces global_greedy at align 1 bit for bit")
    batch: int = Field(1, ge=1, description="calibration windows per step")
    prior: float = Field(2.0, ge=0, description="exponent of the weighted σ̃ in the penalty's per-component weight "
                                                 "c/σ̃^prior (2: the base method's global allocation order; 0: parameters only)")
    prior_scope: Literal["auto", "global", "matrix"] = Field(
        "auto", description="where the σ̃^prior are compared: across all matrices (global; the base's spectra are in "
                            "loss units: kfac_svd, fwsvd, gfwsvd) or only within each matrix (matrix; svdllm, asvd: "
                            "output units); auto: matrix when the base's left metric is the identity, else global")
    candidates: float = Field(1.0, gt=0, le=1, description="share of each matrix's components offered to training "
                                                           "(top by weighted σ; 1: all)")
    debias: bool = Field(True, description="reset the kept scores to 1 once the set is fixed (relaxed lasso: the tune "
                                           "phase starts from the plain truncation of the learned set, free of the L1 "
                                           "shrinkage); true over false on the validation split at kept 0.8 (docs/soco31)")
    guard: bool = Field(True, description="keep the start (global_greedy at start_align on the base's spectra: the base "
                                          "method's own row) unless the learned set is better on validation outside the "
                                          "noise")
    start_align: int = Field(8, ge=1, description="the guard's start is global_greedy at this align (8: the default "
                                                  "allocation's, so the start is the base row SoCo is compared with; 1: "
                                                  "what lr 0 assembles, the learned set's own granularity)")
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
                 "prior", "prior_scope", "batch", "candidates", "seed", "guard")
        options = {name: self.prior_scope() if name == "prior_scope" else getattr(self.cfg, name) for name in names}
        if self.cfg.guard:  # v3: the guard's start at an align (before: 1, the learned set's)
            options["start_align"] = self.cfg.start_align
        if self.cfg.debias:  # keyed only when set: outputs made without it keep their keys
            options["debias"] = True
        options["search_space"] = "dense"  # v2: a matrix may be kept dense (water_fill); values before shrinkage
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
        return _toward(start, target, self._done("explore", step))

    def hard_budget(self, step: int, start_cost: float, target_cost: float) -> float:
        """Parameters the kept components may cost after ``step`` of the sparsify phase: linear from
        ``start_cost`` to ``target_cost``, reached on its last step."""
        return _toward(start_cost, target_cost, self._done("sparsify", step))

    def _done(self, phase: str, step: int) -> float:
        """Share of ``phase`` finished after ``step`` (1 on its last step)."""
        first, stop = self.bounds(phase)
        return (step - first + 1) / max(1, stop - first)


def _toward(start: float, target: float, done: float) -> float:
    """Linear from ``start`` to ``target``; exactly ``target`` once ``done`` reaches 1 (no rounding
    left between the last budget and the target)."""
    return target if done >= 1 else start + (target - start) * done


def _owners(scores: list[torch.Tensor]) -> torch.Tensor:
    """For every component of the concatenated scores, the index of its matrix."""
    return torch.cat([torch.full((len(d),), j, dtype=torch.long) for j, d in enumerate(scores)])


def _matrix_cost(kept: torch.Tensor, owners: torch.Tensor, costs: list[int], sizes: list[int]) -> torch.Tensor:
    """Per matrix, ``min(c·Σ kept, mn)``: what its kept (soft) components cost, never more than
    the dense matrix (the knapsack's "keep it dense" option)."""
    count = torch.zeros(len(costs), dtype=torch.float64).index_add_(0, owners, kept)
    return torch.minimum(count * torch.tensor(costs, dtype=torch.float64), torch.tensor(sizes, dtype=torch.float64))


def soft_kept(scores: list[torch.Tensor], masks: list[torch.Tensor], costs: list[int], sizes: list[int],
              dense: float) -> float:
    """``κ(d) = Σ_matrices min(c · Σ clamp(d, 0, 1), mn) / Σ mn`` over the unpruned components: a
    score above 1 costs no more than 1, a matrix no more than dense (so κ = 1 with every score at 1)."""
    with torch.no_grad():
        d = torch.cat([(s.detach().double().cpu().clamp(0, 1) * m.double().cpu()) for s, m in zip(scores, masks, strict=True)])
        return float(_matrix_cost(d, _owners(scores), costs, sizes).sum()) / dense


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


def shrink_to_budget(scores: list[torch.Tensor], masks: list[torch.Tensor], costs: list[int], sizes: list[int],
                     units: list[torch.Tensor], dense: float, budget: float) -> float:
    """The proximal step of the weighted L1 penalty ``θ Σ unit·d``, with θ solved so that the soft
    kept fraction lands on ``budget``: ``d ← d − θ·unit`` on every unpruned score (the model uses
    ``max(0, d)``; a score kept below zero remembers how far past zero the penalty pushed it, so
    ``d/unit + Θ`` — Θ the sum of every θ so far — is each component's value before any shrinkage).

    θ = 0 when ``κ(d) ≤ budget`` already; otherwise the smallest θ with ``κ ≤ budget`` (bisection:
    κ falls monotonically in θ). Done outside the optimizer, so Adam's momentum cannot carry the
    kept fraction past the target, and Adam's normalisation cannot hide the penalty's scale.
    """
    with torch.no_grad():
        d = torch.cat([s.detach().double().cpu() for s in scores])
        live = torch.cat([m.double().cpu() for m in masks])
        unit = torch.cat(units).double().cpu()
        owners = _owners(scores)

        def kept(theta: float) -> float:
            return float(_matrix_cost((d - theta * unit).clamp(0, 1) * live, owners, costs, sizes).sum()) / dense

        if kept(0.0) <= budget:
            return 0.0
        low, high = 0.0, float((d.clamp(min=0) / unit).max()) + 1.0
        for _ in range(80):
            mid = (low + high) / 2
            low, high = (low, mid) if kept(mid) <= budget else (mid, high)
        for score, mask, u in zip(scores, masks, units, strict=True):
            score.sub_((high * u * mask.double().cpu()).to(score.device, score.dtype))
        return high


def select(scores: list[torch.Tensor], units: list[torch.Tensor], shapes: list[tuple[int, int]], shift: float,
           budget: float, align: int = 1) -> tuple[list[torch.Tensor], list[bool]]:
    """The kept components (new 0/1 masks) and which matrices are kept dense, within ``budget``
    parameters: ``accounting.water_fill`` (the ``global_greedy`` policy at ``align``; training
    selects at 1, component by component, the guard's start at ``start_align``) on each
    component's learned value ``d/unit + shift`` (``shift``: the penalty's accumulated θ, so the
    value is the score's before any shrinkage), each matrix's components bought in value order and
    its last step "keep it dense" (all components, ``mn`` parameters). Every offered component is a
    candidate, pruned or not, so without learning the choice at the target is exactly that policy's."""
    items, orders = [], []
    for j, (d, u, (m, n)) in enumerate(zip(scores, units, shapes, strict=True)):
        value = d.detach().double().cpu() / u.double().cpu() + shift
        order = torch.argsort(value, descending=True, stable=True)
        orders.append(order)
        items.append(FillItem(str(j), m, n, value[order] * (m + n), cap=len(value)))
    ranks = water_fill(items, budget, align)
    if ranks is None:
        raise StagepipeError(f"a budget of {budget:.0f} parameters cannot keep one component of every matrix")
    masks, dense = [], []
    for j, (d, order) in enumerate(zip(scores, orders, strict=True)):
        mask = torch.zeros_like(d)
        rank = ranks[str(j)]
        mask[order if rank is None else order[:rank]] = 1
        masks.append(mask)
        dense.append(rank is None)
    return masks, dense
