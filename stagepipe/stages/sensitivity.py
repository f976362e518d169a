"""``sensitivity`` (per layer, independent; only for policies that read it, e.g. ``asvd_search``):
ASVD's per-matrix sensitivity table — perplexity with *only* that matrix truncated, for every
candidate kept fraction (docs/methods.md), on the ``validation`` windows when the pipeline has
``calibration.validation`` (held-out articles: the choice is not fitted to the statistics' own
text), else on the first calibration windows as ASVD does; the manifest says which.

Candidate ranks are exactly the ranks the policy would assign (``rank_for_fraction`` with the
allocation's alignment); candidates whose aligned rank coincides are evaluated once, and a matrix
with no rank below break-even gets no entries (it stays dense). The truncation is the configured
method's own (its weighted SVD, or a post-allocation method's own factors such as ResSVD's), so the table ranks the
approximations that will actually be used.

Blocks before layer i are unchanged, so the stage starts from block i's stored inputs
(``capture@layer-(i−1)``, or the embeddings; validation windows have no stored inputs, so the dense
blocks 0..i−1 run on them first) and runs blocks i..N−1 and the head, one block in
memory at a time: all candidates of the layer are propagated together through each block, in
groups that fit ``allocation.sensitivity_memory_gb``. Perplexities are fp32 token means over the
windows; a non-finite window makes that entry ``inf``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from stagepipe.accounting import rank_for_fraction
from stagepipe.engine.stage import Context, Read, Work
from stagepipe.linalg import MetricCache
from stagepipe.methods import RankDependentMethod
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linears, set_weight_matrix, weight_matrix
from stagepipe.models.sources import resolve_device
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import (
    CALIBRATION,
    GROUPS,
    HIDDEN,
    MODEL_DIR,
    SENSITIVITY,
    STATS,
    TOKENS,
    VALIDATION,
    WEIGHTED_SVD,
    layer_index,
)
from stagepipe.stagekit.base import PipelineStage, register
from stagepipe.stagekit.cost import CostInputs, Estimate
from stagepipe.stagekit.streams import block_input_rows

BASE = ""  # the configuration with nothing truncated


def _windows(ctx: Context) -> str:
    """Which tokenize partition the perplexities are measured on."""
    return VALIDATION if ctx.config.calibration.validation else CALIBRATION


def _forward(runner: BlockRunner, block: torch.nn.Module, hidden: torch.Tensor, batch: int) -> torch.Tensor:
    """``block``'s outputs for all rows of ``hidden``, ``batch`` windows at a time."""
    return torch.cat([runner.run_block(block, hidden[s : s + batch]) for s in range(0, len(hidden), batch)])


def _dense_inputs(runner: BlockRunner, index: int, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """Block ``index``'s inputs for windows capture never saw: the dense blocks ``0..index−1``."""
    with torch.no_grad():
        runner.prepare(ids)
        hidden = torch.cat([runner.embed(ids[s : s + batch]).float() for s in range(0, len(ids), batch)])
        for j in range(index):
            hidden = _forward(runner, runner.load_block(j), hidden, batch)
    return hidden


@register
class SensitivityStage(PipelineStage):
    name = "sensitivity"
    version = 3
    description = "perplexity with one matrix truncated per candidate ratio (asvd_search; validation windows if set)"
    writes = {SENSITIVITY: "per matrix: each candidate kept fraction, its rank and the perplexity with only it truncated"}

    @classmethod
    def needs(cls, choices) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {"snapshot": {MODEL_DIR}, "tokenize": {TOKENS}, "decompose": {WEIGHTED_SVD}}
        capture = set() if choices.config.calibration.validation else {HIDDEN}
        if isinstance(choices.method, RankDependentMethod):
            capture |= {STATS, GROUPS}  # the method's own input statistics
        return {**found, "capture": capture} if capture else found

    def partitions(self, ctx: Context) -> list[str] | None:
        return artifacts.model_layers(ctx)

    def reads(self, ctx: Context, partition: str) -> list[Read]:
        index, windows = layer_index(partition), _windows(ctx)
        reads = [Read(artifacts.ref("snapshot"), MODEL_DIR), Read(artifacts.ref("tokenize", windows), TOKENS),
                 Read(artifacts.ref("decompose", partition), WEIGHTED_SVD)]
        if index > 0 and windows == CALIBRATION:
            reads.append(Read(artifacts.ref("capture", index - 1), HIDDEN))
        if isinstance(ctx.plan.method, RankDependentMethod):
            reads += [Read(artifacts.ref("capture", partition), STATS), Read(artifacts.ref("capture", partition), GROUPS)]
        return reads

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        alloc = ctx.config.allocation
        method = ctx.plan.method
        options = method.rank_options() if isinstance(method, RankDependentMethod) else {}
        return {"candidates": alloc.candidates, "align": alloc.align, "windows": alloc.sensitivity_windows,
                "modules": ctx.config.target.modules, "method": options}

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        """All candidates of a layer propagated together through the blocks above, in groups that fit
        ``sensitivity_memory_gb``: ≤ 1 + linears × candidates perplexities per layer."""
        config, s = c.config, c.shapes
        alloc = config.allocation
        k, t = config.calibration.n_samples, config.calibration.seq_len
        windows = min(alloc.sensitivity_windows or k, k)
        state = windows * t * s.d * 4
        configs = 1 + len(s.linears) * len(alloc.candidates)
        held = min(configs * state, max(state, alloc.sensitivity_memory_gb * 2**30))
        ram = s.block * 4 + s.embed * 4 + held + c.batch_activations
        runs = configs * s.layers * (s.layers + 1) // 2
        return Estimate(cls.name, s.layers * 1e5, ram, c.gpu(ram - s.embed * 4),
                        f"≤ {configs} perplexities per layer; ≤ {runs} block passes of {windows} windows in all",
                        flops=runs * 2 * s.block * windows * t)

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        alloc = ctx.config.allocation
        index = layer_index(work.partition)
        runner = BlockRunner(artifacts.model_dir(work.input("snapshot")), resolve_device(ctx.config.model.device),
                             torch.float32)
        windows = _windows(ctx)
        ids = artifacts.read_windows(work.input("tokenize", windows))[: alloc.sensitivity_windows]
        batch = ctx.config.runtime.batch_size
        if windows == CALIBRATION:
            below = None if index == 0 else work.input("capture", artifacts.layer_partition(index - 1))
            start = torch.cat([h.to(runner.device, torch.float32) for _, h in block_input_rows(runner, ids, below, batch)])
        else:
            start = _dense_inputs(runner, index, ids, batch)
        prefix = runner.layout.layer_prefix(index)
        linears = block_linears(runner.load_block(index), ctx.config.target.modules)
        weights = {n: weight_matrix(m).detach().to(torch.float64).clone() for n, m in linears.items()}
        shapes = {n: tuple(w.shape) for n, w in weights.items()}
        kept_by_rank: dict[tuple[str, int], list[float]] = {}
        for name, (m, n) in shapes.items():
            for kept in alloc.candidates:
                rank = rank_for_fraction(m, n, kept, alloc.align)
                if rank is not None:
                    kept_by_rank.setdefault((name, rank), []).append(kept)
        configs: list[tuple[str, int]] = [(BASE, 0), *kept_by_rank]
        approximate = self._approximations(ctx, work, weights)
        per_state = start.numel() * start.element_size()
        group = max(1, int(alloc.sensitivity_memory_gb * 2**30 // per_state))
        ppl: dict[tuple[str, int], float] = {}
        for first in range(0, len(configs), group):
            chunk = configs[first : first + group]
            ppl.update(zip(chunk, self._perplexities(runner, index, ids, start, chunk, approximate, batch, linears, weights), strict=True))
        table: dict[str, list[dict[str, Any]]] = {}
        for (name, rank), kepts in kept_by_rank.items():
            table.setdefault(prefix + name, []).extend({"kept": k, "rank": rank, "ppl": ppl[(name, rank)]} for k in kepts)
        artifacts.write_sensitivity(work.out, ppl[(BASE, 0)], table)  # the table is what allocate reads
        work.diagnostics.update(base_ppl=ppl[(BASE, 0)],
                                most_sensitive=max(((v, k) for k, v in ppl.items() if k[0]), default=(None, None))[1])
        return {"evaluations": len(configs), "windows": len(ids), "windows_from": windows}

    @staticmethod
    def _approximations(ctx: Context, work: Work, weights: dict[str, torch.Tensor]):
        """``approximate(name, rank)``: the dense m×n matrix the method's rank-r factors stand for."""
        method = ctx.plan.method
        spectra = artifacts.read_weighted_svd(work.input("decompose", work.partition), list(weights))
        if not isinstance(method, RankDependentMethod):
            return lambda name, rank: spectra[name].reconstruct(rank)
        stats = artifacts.read_input_stats(work.input("capture", work.partition))
        roots: dict[str, Any] = {}  # input-side metric root per matrix, factorised once for all its candidates
        factor = MetricCache(ctx.config.method.floor_rel, torch.device("cpu"))  # and once per distinct metric

        def own_factors(name: str, rank: int) -> torch.Tensor:
            w = weights[name].cpu()  # beside the statistics and the roots (the block may sit on the GPU)
            if name not in roots:
                roots[name] = factor(method.metrics(name, tuple(w.shape), stats).right, name)
            up, down, _ = method.factors(w, roots[name], rank)
            return up @ down

        return own_factors

    @staticmethod
    def _perplexities(runner: BlockRunner, index: int, ids: torch.Tensor, start: torch.Tensor,
                      configs: list[tuple[str, int]], approximate, batch: int, linears: dict[str, torch.nn.Module],
                      weights: dict[str, torch.Tensor]) -> list[float]:
        """Perplexity of each configuration on ``ids``, propagating all of them block by block."""
        states = []
        with torch.no_grad():
            block = runner.load_block(index)  # ``linears`` are this block's modules
            for name, rank in configs:
                if name == BASE:
                    states.append(_forward(runner, block, start, batch))
                    continue
                set_weight_matrix(linears[name], approximate(name, rank))
                states.append(_forward(runner, block, start, batch))
                set_weight_matrix(linears[name], weights[name])
            for j in range(index + 1, runner.num_layers):
                block = runner.load_block(j)
                states = [_forward(runner, block, hidden, batch) for hidden in states]
            result = []
            for hidden in states:
                nll = torch.cat([runner.window_losses(hidden[s : s + batch], ids[s : s + batch])
                                 for s in range(0, len(hidden), batch)])
                mean = float(nll.double().mean())
                result.append(math.exp(mean) if math.isfinite(mean) and mean < 700 else math.inf)
        return result
