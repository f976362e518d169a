"""The training of a learned method (SoCo, Dobi-SVD) on the whole model, and its trainers' registry.

A trainer is method-specific (``stages/train/<method>.py``): it swaps the target linears of the
model for trainable modules, names its parameters, its learning rate per step, its steps per epoch
and in all, does what follows each Adam step (SoCo: the budget's proximal step or pruning;
Dobi-SVD: the projection onto the budget), saves and loads its own state for the checkpoint, and
writes its outputs. It registers itself for its method class (``@trains(SoCo)``). The loop here
owns everything else: the windows, the loss, Adam (``ResumableAdam``), checkpoints, the progress bar.

**Never worse than its start** (``validation_guard``): a trainer that names ``candidates`` (Dobi-SVD:
``start``, its uniform allocation hard-truncated, and ``learned``) turns the model into each one as
it will be assembled (``use``) and measures it on the validation windows (held-out articles; the
calibration windows when the pipeline has none, and the record says so); the learned candidate is
kept only when it is better than the start outside the noise, and ``finish`` writes what is kept.
Both perplexities and their paired ratio go into the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from stagepipe.engine.stage import Work
from stagepipe.intervals import compare
from stagepipe.methods import LearnedMethod
from stagepipe.models.spectral import dense_mode
from stagepipe.perplexity import perplexity
from stagepipe.stagekit.artifacts import TRAIN_CHECKPOINT
from stagepipe.stagekit.checkpoints import ResumableAdam
from stagepipe.stagekit.cost import CostInputs


@dataclass(frozen=True)
class TrainingShape:
    """What a trainer adds to the ``train`` stage's cost row (``TrainStage.cost``)."""

    offered: list[int]  # components offered per linear of a block (0: none, the trainer keeps no factors)
    epochs: int  # epochs over the calibration windows
    student_weights: float  # weights in the student's forward
    window_flops: float = 0.0  # per step, beyond the student's passes (Dobi-SVD: SVDs of each window's activations)
    window_memory: float = 0.0  # activations of one block beyond the block's own (Dobi-SVD: those SVDs)
    extra_memory: float = 0.0  # what the trainer holds beside the model (factors, scores, Adam's moments)
    factor_disk: float = 0.0  # factors it writes
    load_memory: float = 0.0  # extra while loading (one layer's float64 factors)


class Trainer(Protocol):
    """What the loop needs of a learned method's trainer."""

    params: list[torch.nn.Parameter]
    modules: dict[str, torch.nn.Module]
    steps_per_epoch: int
    total: int
    candidates: tuple[str, ...]  # what ``validation_guard`` chooses among, the start first; () for none

    def __init__(self, cfg: Any, model: torch.nn.Module, targets: dict[str, tuple[int, str, Path]], target: float,
                 windows: int, dtype: torch.dtype) -> None: ...

    def rate(self, step: int) -> float: ...

    def begin(self) -> None: ...

    def before_step(self, step: int) -> None: ...

    def after_step(self, step: int, loss: float) -> dict[str, Any]: ...

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...

    def load(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None: ...

    def use(self, candidate: str) -> None:
        """Make the model compute ``candidate`` exactly as it will be assembled (after training)."""
        ...

    def finish(self, out: Path, history: list[dict[str, Any]], chosen: str | None) -> dict[str, Any]:
        """Write the trainer's outputs (of the ``chosen`` candidate); return ``{"ranks": …, "steps": …}``
        and its summary."""
        ...

    @classmethod
    def plan(cls, c: CostInputs) -> TrainingShape:
        """What this trainer adds to the stage's cost row."""
        ...


#: trainer class by learned method class (``trains`` fills it when a trainer module is imported)
TRAINERS: dict[type[LearnedMethod], type[Trainer]] = {}


def trains(method: type[LearnedMethod]):
    """Class decorator: the trainer of ``method``."""

    def register(cls: type[Trainer]) -> type[Trainer]:
        TRAINERS[method] = cls
        return cls

    return register


def trainer_for(method: LearnedMethod) -> type[Trainer]:
    for cls in type(method).__mro__:
        if cls in TRAINERS:
            return TRAINERS[cls]
    raise TypeError(f"no trainer is registered for {type(method).__name__} (stages/train/<method>.py)")


class TrainingLoop:
    """Adam on the trainer's parameters, checkpointed every ``checkpoint_every`` steps: a crash loses
    at most that many steps, and the resumed run ends with the same outputs (bit-identical on CPU:
    the window order is a function of the seed and the epoch, and the RNG state is checkpointed)."""

    def __init__(self, cfg: Any, model: torch.nn.Module, trainer: Trainer, windows: torch.Tensor, work: Work,
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
        adam = ResumableAdam(trainer.params, self.cfg.lr, self.work.resume / TRAIN_CHECKPOINT, "train-saved")
        step = self._resume(adam)
        trainer.begin()
        bar = tqdm(total=trainer.total, initial=step, desc="train", unit="step", disable=None, leave=False, dynamic_ncols=True)
        while step < trainer.total:
            trainer.before_step(step)
            loss = self.loss(self.batch(step))
            adam.zero_grad()
            loss.backward()
            adam.step(trainer.rate(step))
            record = trainer.after_step(step, float(loss.detach()))
            self.history.append(record)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", kept=f"{record['kept_soft']:.3f}")
            if step % self.cfg.checkpoint_every == 0 or step == trainer.total:
                tensors, trainer_meta = trainer.state()
                adam.save({**tensors, "rng": torch.get_rng_state()},
                          {"step": step, "trainer": trainer_meta, "history": self.history})
        bar.close()

    def _resume(self, adam: ResumableAdam) -> int:
        found = adam.resume()
        if found is None:
            return 0
        tensors, meta = found
        torch.set_rng_state(tensors.pop("rng"))
        self.trainer.load(tensors, meta["trainer"])
        self.history = meta["history"]
        self.work.telemetry["resumed_from_step"] = meta["step"]
        return meta["step"]


def validation_guard(trainer: Trainer, model: torch.nn.Module, windows: torch.Tensor, source: str, batch: int,
                     device: torch.device) -> tuple[str | None, dict[str, Any]]:
    """The trainer's candidate to keep, and the record of the choice.

    Each candidate's perplexity on ``windows`` (fp32, every window counted) and its paired ratio to
    the first, the start (``intervals.compare``). A candidate replaces the start only when its
    perplexity is lower *outside the noise* (the ratio's 95 % interval below 1); among several
    such, the lowest. A gain inside the noise is no evidence that training helped, and on the
    test split it can turn out a loss (Dobi-SVD at 128 windows, kept 0.8: ×0.981 [0.951, 1.014] on
    validation, ×1.037 [1.020, 1.053] on test), so the start — the simpler model — is kept."""
    if not trainer.candidates:
        return None, {"guard": "off: the trainer offers no candidates (nothing checked against its start)"}
    results = {}
    for candidate in trainer.candidates:
        trainer.use(candidate)
        results[candidate] = perplexity(model, windows, batch, device)
    start = trainer.candidates[0]
    ratios = {c: compare(results[c].window_nll, results[start].window_nll, windows.shape[1] - 1)
              for c in trainer.candidates[1:]}
    better = [c for c, r in ratios.items() if r.resolved and r.ratio < 1]
    chosen = min(better, key=lambda c: results[c].nll) if better else start
    return chosen, {"guard": {
        "windows": source, "n_windows": len(windows), "chosen": chosen,
        "rule": "a candidate replaces the start only when lower outside the noise (paired 95 % interval below 1)",
        "ppl": {c: r.ppl for c, r in results.items()},
        "interval": {c: [r.ppl_low, r.ppl_high] for c, r in results.items()},
        **{f"{c}_over_{start}": r.to_dict() for c, r in ratios.items()}}}
