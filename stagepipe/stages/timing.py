"""Wall-time estimates per stage for the plan: FLOP counts over stated throughputs (not measured).

Each stage's work is split into dense low-precision work (block forwards and backwards, at
``GPU_FLOPS`` on one 80 GB GPU in bf16 or ``CPU_FLOPS`` on the development CPU in fp32) and float64
work (Gram and Kronecker accumulations, eigen-decompositions, SVDs: at ``GPU_FP64_FLOPS`` and
``CPU_FP64_FLOPS``, rates cuSOLVER/LAPACK-bound code sustains, far below the tensor-core peaks).
Attention score FLOPs and the I/O-bound stages (snapshot, tokenize, allocate, assemble, report)
are counted as zero: their time is reading and writing, which the plan's disk column sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stagepipe.stages.estimate import (
    CPU_FLOPS,
    GPU_FLOPS,
    Shapes,
    _duration,
    anchor_flops,
    recomputed_captures,
    train_flops,
)
from stagepipe.stages.requirements import needs

#: sustained float64 throughputs assumed for solver- and accumulation-bound work (estimates)
GPU_FP64_FLOPS, CPU_FP64_FLOPS = 10e12, 50e9


@dataclass(frozen=True)
class Work:
    """FLOPs of one stage: low-precision (block passes) and float64 (statistics, factorisations)."""

    flops: float = 0.0
    flops64: float = 0.0

    def seconds(self, on_gpu: bool) -> float:
        if on_gpu:
            return self.flops / GPU_FLOPS + self.flops64 / GPU_FP64_FLOPS
        return self.flops / CPU_FLOPS + self.flops64 / CPU_FP64_FLOPS


def stage_work(config: Any, model_config: Any, interval: int = 1) -> dict[str, Work]:
    """FLOPs per stage of this pipeline (``interval``: capture's checkpoint interval, whose recomputed
    layer captures are added to capture's work)."""
    s = Shapes.of(model_config)
    need = needs(config)
    tokens = config.calibration.n_samples * config.calibration.seq_len
    block_pass = 2 * s.block * tokens  # one forward of one block over the calibration tokens (linears)
    grams = 2 * tokens * (3 * s.d**2 + s.ff**2) if "gram" in need.method.activation_stats else 0
    capture_layers = s.layers + recomputed_captures(config, s.layers, interval)
    work = {"capture": Work(capture_layers * block_pass, capture_layers * grams * ("gram" in need.capture_stats))}
    if need.fisher:  # the Grams in fisher's recording pass when it records them (``Needs.gram_in_fisher``)
        fisher = _fisher_work(config, s, need, tokens, block_pass)
        work["fisher"] = Work(fisher.flops, fisher.flops64 + s.layers * grams * need.gram_in_fisher)
    decompose64 = 0.0
    for m, n in s.linears:  # metric eigen-decompositions (≈9n³ each side), whitening products, one SVD
        decompose64 += 9 * (m**3 + n**3) + 4 * m * n * (m + n) + 14 * m * n * min(m, n)
    work["decompose"] = Work(0.0, s.layers * decompose64)
    ev = config.evaluation
    if ev.max_windows is not None:
        eval_tokens = ev.max_windows * ev.seq_len * len(ev.datasets)
        models = 2 if ev.dense_baseline else 1
        work["evaluate"] = Work(2 * s.params * eval_tokens * models)
    if need.learned:
        work["train"] = Work(train_flops(config, s))
    if need.anchor:
        work["anchor"] = Work(anchor_flops(config, s), s.layers * decompose64)
    if need.refit:
        work["refit"] = Work(s.layers * 2 * block_pass, s.layers * 2 * tokens * (3 * s.d**2 + s.ff**2))
    if need.sensitivity:
        alloc = config.allocation
        windows = min(alloc.sensitivity_windows or config.calibration.n_samples, config.calibration.n_samples)
        configs = 1 + len(s.linears) * len(alloc.candidates)
        runs = configs * s.layers * (s.layers + 1) // 2
        work["sensitivity"] = Work(runs * 2 * s.block * windows * config.calibration.seq_len)
    return work


def _fisher_work(config: Any, s: Shapes, need: Any, tokens: int, block_pass: float) -> Work:
    """Head (logits forward and backward), per layer a forward and a backward (3 block passes), K-FAC
    output factors and squared per-sequence gradients (float64); NKP metrics: up to ``2·max_sweeps``
    passes, each forming ``G B Gᵀ`` or ``Gᵀ A G`` for every chunk's gradient ``G`` (float32)."""
    windows = config.calibration.n_samples
    head = 6 * s.vocab * s.d * tokens
    flops64 = s.layers * sum(2 * m * m * tokens for m, _ in s.linears)  # K-FAC output factors, float64
    per_sequence = sum(2 * m * n * tokens for m, n in s.linears)  # per-sequence gradients for E[G⊙G], float32
    flops = head + s.layers * (3 * block_pass + per_sequence)
    if "nkp" in need.method.gradient_stats:  # float32 products, the cheaper route per chunk (``kron._products``)
        t = config.method.chunk_tokens or config.calibration.seq_len
        chunks = windows * -(-config.calibration.seq_len // t)
        per_pass = sum(2 * chunks * min(t * m * n + m * n * n + m * m * n, t * n * n + t * t * n + t * t * m + t * m * m)
                       for m, n in s.linears)
        flops += s.layers * 2 * config.method.max_sweeps * per_pass
    return Work(flops, flops64)


def duration(seconds: float) -> str:
    """``12 s``, ``3 min``, ``1.4 h`` (``—`` for nothing to compute)."""
    return _duration(seconds) if seconds > 0 else "—"
