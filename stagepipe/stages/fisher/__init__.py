"""``fisher``: gradient statistics, computed one decoder block at a time, backwards.

Partition ``head`` takes the last block's outputs (from ``capture``), applies the final norm and
LM head, and back-propagates each window's mean next-token NLL to the last block's output.
Partition ``layer-i`` (run from the last block down) recomputes block i on its cached inputs with
autograd, back-propagates the incoming output gradient, stores the gradient w.r.t. its input for
block i-1, and reads each target linear's inputs ``X_k`` and output gradients ``D_k`` per window
(``stages.fisher.gradients``). Every partition runs as one job per shard of the windows
(``runtime.shards``, through ``Work.fan_out``: in process or as Ray tasks); the shards' float64
sums, including each half-sweep of the power iteration, are added here in shard order.

Per-sequence weight gradients ``G_k = D_kᵀ X_k`` are never averaged across sequences (optionally
one per ``chunk_tokens`` chunk). From them: the token-level K-FAC output factor ``Σ δ δᵀ``, the
squared per-sequence gradients, the input Grams when only fisher and decompose read them
(``Plan.gram_in_fisher``: capture's would wait on disk for the whole backward walk), and — for
methods whose metric pair needs them — the GFWSVD Kronecker factors (``stagepipe.kron``), either
from gradients stored in the task's scratch directory (``stored``) or recomputed per pass
(``streaming``); ``auto`` stores below the memory budget. The power iteration is checkpointed in the task's resume directory after every sweep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from stagepipe.accounting import rank_for_fraction
from stagepipe.engine.stage import Context, PartitionRef, Read, Work
from stagepipe.faults import kill_point
from stagepipe.kron import NKPResult, clean_factors, diagnostics, nkp_power_iteration
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linears, weight_matrix
from stagepipe.models.sources import DTYPES
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import (
    CALIBRATION,
    FISHER,
    GRAD,
    HEAD,
    HIDDEN,
    MODEL_DIR,
    STATS,
    SWEEP_CHECKPOINT,
    TOKENS,
    layer_index,
    layer_partition,
)
from stagepipe.stagekit.base import PipelineStage, register
from stagepipe.stagekit.checkpoints import read_checkpoint, write_checkpoint
from stagepipe.stagekit.cost import CostInputs, Estimate
from stagepipe.stagekit.plan import checkpoints
from stagepipe.stagekit.shards import add_in_shard_order, shard_label, shard_ranges, sharded, with_shards
from stagepipe.stages.fisher import gradients
from stagepipe.stages.fisher.gradients import GradientJob


def _grad_in(ctx: Context, index: int) -> PartitionRef:
    """Where block ``index``'s output gradient comes from: the head, or block ``index+1``."""
    last = artifacts.num_layers(ctx) - 1
    return artifacts.ref("fisher", HEAD if index == last else layer_partition(index + 1))


def _warm_from_capture(ctx: Context) -> bool:
    """The Kronecker factors' warm start reads capture's Grams (fisher does not record them)."""
    return "nkp" in ctx.plan.method.gradient_stats and ctx.config.method.warm_start == "kfac" and not ctx.plan.gram_in_fisher


@register
class FisherStage(PipelineStage):
    name = "fisher"
    version = 5
    description = "layer-wise backward: per-sequence gradients → K-FAC / Kronecker factors"
    writes = {GRAD: "∂loss/∂ the block's input over the calibration windows (the block below's output gradient)",
              FISHER: "per linear: K-FAC output factor, squared per-sequence gradients, Kronecker factors, "
                      "input Grams when fisher records them"}
    #: reads capture's Grams only for a warm start, and records them itself when only it and decompose read them
    takes_grams_from_fisher = True

    @classmethod
    def needs(cls, choices) -> dict[str, set[str]]:
        warm = "nkp" in choices.method.gradient_stats and choices.config.method.warm_start == "kfac"
        return {"snapshot": {MODEL_DIR}, "tokenize": {TOKENS}, "capture": {HIDDEN} | ({STATS} if warm else set()),
                "fisher": {GRAD}}

    def partitions(self, ctx: Context) -> list[str] | None:
        layers = artifacts.model_layers(ctx)
        return None if layers is None else [HEAD, *reversed(layers)]

    def reads(self, ctx: Context, partition: str) -> list[Read]:
        reads = [Read(artifacts.ref("snapshot"), MODEL_DIR), Read(artifacts.ref("tokenize", CALIBRATION), TOKENS)]
        if partition == HEAD:
            return reads + [Read(artifacts.ref("capture", artifacts.num_layers(ctx) - 1), HIDDEN)]
        index = layer_index(partition)
        reads += [Read(_grad_in(ctx, index), GRAD),
                  Read(artifacts.ref("capture", partition), STATS if _warm_from_capture(ctx) else None)]
        return reads + ([Read(artifacts.ref("capture", index - 1), HIDDEN)] if index > 0 else [])

    def handovers(self, ctx: Context, partition: str) -> set[str]:
        """The gradient at this partition's input (the head's: at the last block's output) is read
        only by the fisher partition of the block below: a hand-over; under a disk budget the
        layer's statistics too (read by its decompose, run right after)."""
        statistics = {FISHER} if ctx.config.runtime.disk_budget_gb is not None and partition != HEAD else set()
        return statistics | ({GRAD} if partition == HEAD or layer_index(partition) > 0 else set())

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        cfg = ctx.config.method
        nkp = "nkp" in ctx.plan.method.gradient_stats
        # K-FAC and squared per-sequence gradients are always recorded (cheap next to the backward
        # pass), so methods that differ only in which of them they read share one fisher run.
        slice_: dict[str, Any] = {"nkp": nkp, "modules": ctx.config.target.modules,
                                  "batch_size": ctx.config.runtime.batch_size, "labels": cfg.fisher_labels}
        if ctx.plan.gram_in_fisher:
            slice_["grams"] = True
        if nkp:  # the options below shape only the Kronecker factors
            slice_["nkp"] = {k: getattr(cfg, k) for k in ("mode", "memory_budget_gb", "max_sweeps", "tol",
                                                          "warm_start", "factor_floor_rel", "chunk_tokens",
                                                          "regularizer")}
            if cfg.diagnostics:
                slice_["diagnostics"] = {"max_dim": cfg.diagnostics_max_dim, "floor_rel": cfg.floor_rel,
                                         "kept_fraction": ctx.config.target.kept_fraction,
                                         "align": ctx.config.allocation.align}
        return with_shards(slice_, ctx)

    def fans_out(self, ctx: Context, partition: str) -> bool:
        return sharded(ctx)

    # ------------------------------------------------------------------ plan
    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        """Gradient statistics: K-FAC and squared gradients always; Kronecker factors for NKP metrics;
        the input Grams of one block when fisher records them. The ``head`` partition (loss gradient
        w.r.t. the last block's output) holds the logits of one batch and their gradient, and reads
        the embeddings/head twice for a moment. FLOPs: the head's logits forward and backward, per
        layer a forward and a backward (3 block passes), K-FAC output factors and squared
        per-sequence gradients (float64); NKP metrics up to ``2·max_sweeps`` passes, each forming
        ``G B Gᵀ`` or ``Gᵀ A G`` for every chunk's gradient ``G`` (float32)."""
        config, s, method = c.config, c.shapes, c.config.method
        k, t = config.calibration.n_samples, config.calibration.seq_len
        w = c.weight_bytes
        grams = c.grams if c.plan.gram_in_fisher else 0.0
        kfac = sum(m * m + m * n for m, n in s.linears) * 8 + grams  # E[δδᵀ] and E[G⊙G], float64 (+ Grams)
        # one boundary gradient per partition, in the model's dtype; released ones: at most the one read and the one written
        release, grad = config.runtime.releases, k * t * s.d * w
        disk, transient = s.layers * kfac + (0 if release else s.layers * grad), 2 * grad if release else 0.0
        kept = "2 boundary gradients at a time (released)" if release else f"{s.layers} boundary gradients kept"
        head = 2 * s.embed * w + 3 * config.runtime.batch_size * t * s.vocab * 4
        layer = c.model_ram + 4 * c.batch_activations + kfac * 2
        tokens = c.tokens
        flops64 = s.layers * sum(2 * m * m * tokens for m, _ in s.linears)  # K-FAC output factors, float64
        flops64 += s.layers * 2 * tokens * (3 * s.d**2 + s.ff**2) * c.plan.gram_in_fisher  # the Grams, when recorded here
        per_sequence = sum(2 * m * n * tokens for m, n in s.linears)  # per-sequence gradients for E[G⊙G], float32
        flops = 6 * s.vocab * s.d * tokens + s.layers * (3 * c.block_pass + per_sequence)
        if "nkp" not in c.method.gradient_stats:
            return Estimate(cls.name, disk, max(layer, head), c.gpu(s.block * w + 4 * c.batch_activations + kfac * 2),
                            f"one backward pass per layer: K-FAC output factor + squared gradients; {kept}", transient,
                            flops=flops, flops64=flops64)
        chunk = method.chunk_tokens or t  # float32 products, the cheaper route per chunk (``kron._products``)
        chunks = k * -(-t // chunk)
        per_pass = sum(2 * chunks * min(chunk * m * n + m * n * n + m * m * n,
                                        chunk * n * n + chunk * chunk * n + chunk * chunk * m + chunk * m * m)
                       for m, n in s.linears)
        flops += s.layers * 2 * method.max_sweeps * per_pass
        factors = _kronecker_bytes(s)
        mode, stored = _stored_gradients(c)
        layer += factors * 3 + stored  # a layer partition's Kronecker factors and (stored mode) gradients
        return Estimate(cls.name, disk + s.layers * factors, max(layer, head),
                        c.gpu(s.block * w + 4 * c.batch_activations + factors * 3),
                        f"{mode} gradients; {2 * method.max_sweeps} passes max per layer; {kept}", transient,
                        flops=flops, flops64=flops64)

    @classmethod
    def adjust(cls, rows: dict[str, Estimate], c: CostInputs) -> dict[str, Estimate]:
        """Under a disk budget a layer's statistics go once its decompose is done: ``live`` layers
        at a time (in process the driver runs consumers first, so one; a Ray executor may run the
        next fisher layer beside the decompose: two). With release on, the workspace's peak is
        worked out along the walk down the blocks (``_walk_peak``)."""
        config, layers = c.config, c.shapes.layers
        row = rows[cls.name]
        if config.runtime.disk_budget_gb is not None and "decompose" in rows:
            live = 1 if config.executor.kind == "local" else 2
            row = replace(row, disk=0.0, extra=((live * row.disk / layers, "decompose"),),
                          note=row.note + f"; statistics released after decompose ({live} layer{'s' if live > 1 else ''} at a time)")
        if config.runtime.releases and "decompose" in rows:
            row = replace(row, peak=_walk_peak({**rows, cls.name: row}, c))
        if config.runtime.shards > 1:  # same bytes; the work of a layer splits over the shards' workers
            row = replace(row, note=row.note + f"; {config.runtime.shards} shards per layer (time ÷ shards on as many workers)")
        return {**rows, cls.name: row}

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        """One job per shard of the windows (``stages.fisher.gradients``), reduced here in shard order."""
        ids = artifacts.read_windows(work.input("tokenize", CALIBRATION))
        index = -1 if work.partition == HEAD else layer_index(work.partition)
        base = GradientJob(snapshot=artifacts.model_dir(work.input("snapshot")), tokens=work.input("tokenize", CALIBRATION),
                           index=index, rows=(0, 0), device=ctx.config.model.device, dtype=ctx.config.model.dtype,
                           batch=ctx.config.runtime.batch_size)
        ranges = shard_ranges(len(ids), base.batch, ctx.config.runtime.shards)
        labels = [shard_label(self.name, work.partition, i) for i in range(len(ranges))]
        try:
            if work.partition == HEAD:
                return self._run_head(ctx, ids, base, ranges, labels, work)
            return self._run_block(ctx, ids, base, ranges, labels, work)
        finally:
            gradients.release_collectors()

    # ------------------------------------------------------------------ head
    def _run_head(self, ctx: Context, ids: torch.Tensor, base: GradientJob, ranges, labels, work: Work) -> dict[str, Any]:
        hidden = work.input("capture", layer_partition(artifacts.num_layers(ctx) - 1))
        artifacts.create_grad(work.out, tuple(artifacts.open_hidden(hidden).shape), base.batch, base.dtype)
        seed = ctx.config.calibration.seed if ctx.config.method.fisher_labels == "model" else None
        # sampled labels: one generator per shard (its seed offset by the shard), so they depend on
        # the number of shards (keyed), never on where a shard ran; one shard: the calibration seed
        jobs = [replace(base, rows=rows, hidden=hidden, grad_in=work.out,
                        labels_seed=None if seed is None else seed + shard) for shard, rows in enumerate(ranges)]
        losses = [loss for part in work.fan_out.map(gradients.head_shard, jobs, labels) for loss in part]
        work.diagnostics["mean_window_loss"] = sum(losses) / len(losses)
        return {"n_windows": len(losses)}

    # ------------------------------------------------------------------ one block
    def _run_block(self, ctx: Context, ids: torch.Tensor, base: GradientJob, ranges, labels, work: Work) -> dict[str, Any]:
        cfg = ctx.config.method
        index = base.index
        runner = BlockRunner(base.snapshot, torch.device("cpu"), DTYPES[ctx.config.model.dtype])
        linears = block_linears(runner.load_block(index), ctx.config.target.modules)
        shapes = {n: tuple(weight_matrix(m).shape) for n, m in linears.items()}
        del runner
        chunk = getattr(cfg, "chunk_tokens", None) or ids.shape[1]
        n_gradients = len(ids) * -(-ids.shape[1] // chunk)
        info: dict[str, Any] = {"K": n_gradients}
        measured: dict[str, Any] = {n: {} for n in linears}  # per linear: sweeps, convergence, repairs
        nkp = "nkp" in ctx.plan.method.gradient_stats
        groups = artifacts.read_results(work.input("capture", work.partition))["groups"] if ctx.plan.gram_in_fisher else {}
        mode = None
        if nkp:
            mode, grad_bytes = cfg.gradient_storage(len(ids), ids.shape[1], shapes.values())
            info.update(mode=mode, gradient_bytes=grad_bytes)
        grad_out = work.inputs[_grad_in(ctx, index)]
        if index > 0:
            artifacts.create_grad(work.out, tuple(artifacts.open_grad(grad_out).shape), base.batch, base.dtype)
        jobs = [replace(base, rows=rows, modules=ctx.config.target.modules, chunk=chunk,
                        below=None if index == 0 else work.input("capture", layer_partition(index - 1)),
                        grad_out=grad_out, grad_in=work.out if index > 0 else None, mode=mode,
                        scratch=work.scratch / f"shard-{shard}", keep_device=work.fan_out.in_process,
                        grams=tuple(sorted(set(groups.values()))))
                for shard, rows in enumerate(ranges)]
        parts = work.fan_out.map(gradients.record_shard, jobs, labels)
        tokens, windows = sum(p.tokens for p in parts), sum(p.windows for p in parts)
        totals = add_in_shard_order([p.sums for p in parts])
        tensors: dict[str, torch.Tensor] = {}
        if nkp:
            def sums(other: dict[str, torch.Tensor], side: str) -> tuple[dict[str, torch.Tensor], int]:
                found = work.fan_out.map(gradients.product_shard, [(job, other, side) for job in jobs], labels)
                return add_in_shard_order([acc for acc, _ in found]), sum(count for _, count in found)

            warm = self._warm_start(ctx, work, linears, shapes, {n: totals[f"gram.{g}"] / tokens for n, g in groups.items()})
            checkpoint = SweepCheckpoint(work.resume)
            results = nkp_power_iteration(None, warm, cfg.max_sweeps, cfg.tol, on_sweep=checkpoint.save,
                                          start=checkpoint.load(), sums=sums)
            work.telemetry["resumed_from_sweep"] = checkpoint.loaded_sweep
            for name, (a, b, clean) in zip(results, self._clean(ctx, work, results), strict=True):
                res = results[name]
                tensors.update({f"{name}.{k}": v for k, v in (("A", a), ("B", b)) if v is not None})
                measured[name] = {"sweeps": res.sweeps, "rel_change": res.rel_change, "history": res.history, **clean}
            if cfg.diagnostics:  # needs the gradients: before the scratch directory goes
                self._diagnose(ctx, _chained([gradients.shard_source(job) for job in jobs]), linears, shapes, tensors,
                               measured)
        for key, value in totals.items():  # Grams stay sums, as capture stores them (``read_layer_stats``)
            kind, _, name = key.partition(".")
            tensors[f"{name}.{kind}"] = value if kind == "gram" else value / (tokens if kind == "kfac_out" else windows)
        info.update(tokens=tokens, windows=windows)
        if groups:
            info["gram_groups"] = groups
        artifacts.write_fisher(work.out, tensors)
        work.diagnostics["linears"] = measured  # read back only for the notes of a fallback (``read_layer_stats``)
        return info

    def _clean(self, ctx: Context, work: Work, results: dict[str, NKPResult]) -> list[tuple[Any, Any, dict[str, Any]]]:
        """``clean_factors`` of every linear: here, on the device the factors are on, or — when the
        partition's jobs are shipped (Ray) — one job per linear, so the float64 clean-ups of a layer
        run side by side on the workers (on their GPUs) instead of one after another in this task."""
        cfg = ctx.config.method
        if work.fan_out.in_process:
            return [clean_factors(r.A, r.B, cfg.factor_floor_rel, cfg.regularizer) for r in results.values()]
        jobs = [(ctx.config.model.device, r.A, r.B, cfg.factor_floor_rel, cfg.regularizer) for r in results.values()]
        return work.fan_out.map(gradients.clean_job, jobs, [f"{self.name}@{work.partition}#clean-{n}" for n in results])

    @staticmethod
    def _diagnose(ctx: Context, source, linears, shapes, tensors, measured) -> None:
        """Full-Fisher diagnostics for linears with m·n ≤ diagnostics_max_dim (see kron.diagnostics)."""
        cfg = ctx.config.method
        small = [n for n in linears if shapes[n][0] * shapes[n][1] <= cfg.diagnostics_max_dim
                 and f"{n}.A" in tensors and f"{n}.B" in tensors]
        if not small:
            return
        grads: dict[str, list[torch.Tensor]] = {n: [] for n in small}
        for batch in source():
            for n in small:
                d, x = batch[n]
                grads[n].append((d.transpose(1, 2) @ x).cpu())
        for n in small:
            m, k = shapes[n]
            rank = rank_for_fraction(m, k, ctx.config.target.kept_fraction, ctx.config.allocation.align) or min(m, k)
            weight = weight_matrix(linears[n]).detach().double().cpu()
            measured[n]["diagnostics"] = diagnostics(torch.cat(grads[n]), tensors[f"{n}.A"], tensors[f"{n}.B"],
                                                            weight, rank, cfg.floor_rel)

    @staticmethod
    def _warm_start(ctx: Context, work: Work, linears, shapes, grams: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """K-FAC input factor ``E[x xᵀ]`` (so 2–5 sweeps suffice): from this partition's recording
        pass (``grams``, when fisher records them) or from ``capture``; or identity."""
        if ctx.config.method.warm_start == "identity":
            return {n: torch.eye(shapes[n][1], dtype=torch.float64) for n in linears}
        if grams:
            return {n: grams[n] for n in linears}
        stats = artifacts.read_input_stats(work.input("capture", work.partition))
        return {n: stats.gram[n] / stats.tokens[n] for n in linears}


def _walk_peak(rows: dict[str, Estimate], c: CostInputs) -> float:
    """The workspace's peak along fisher's walk down the blocks, while each layer's ``decompose``
    runs right after it (consumers first), so decompose's outputs grow while capture's stored
    block outputs go. While fisher runs block j, the workspace holds what the stages before fisher
    left, the checkpoints below j and the restored segment up to block j−1's outputs, the boundary
    gradient it reads and the one it writes, its scratch (``_scratch``), the statistics that wait
    for a decompose (capture's released Grams of blocks ≤ j — kept ones are in capture's outputs;
    fisher's of ``live`` layers, or of every layer from j up when none is released) and
    decompose's outputs of the blocks above j. While decompose j runs right after, the gradient
    fisher j read is gone and decompose j's outputs are there. A Ray executor may run them side by
    side: both at once."""
    config, layers, hidden, names = c.config, c.shapes.layers, c.hidden, list(rows)
    base = sum(rows[n].disk for n in names[: names.index("fisher")])
    fisher, capture = rows["fisher"], rows["capture"]
    budget = config.runtime.disk_budget_gb is not None
    grams = sum(size for size, until in capture.extra if until == "fisher") / layers
    per_decompose = rows["decompose"].disk / layers
    per_fisher = fisher.extra[0][0] if budget else fisher.disk / layers  # released: ``live`` layers' worth
    grad = fisher.transient / 2  # with releases on: read one, write one
    side_by_side = config.executor.kind != "local"
    kept = checkpoints(layers, c.plan.interval)
    scratch = _scratch(c)
    peak = 0.0
    for j in range(layers - 1, -1, -1):
        below = [k for k in kept if k <= j - 1]
        restored = j - 1 - (below[-1] if below else -1)  # the segment from the checkpoint to block j−1's outputs
        held = base + (len(below) + restored) * hidden + grams * (j + 1) + (per_fisher if budget else per_fisher * (layers - j))
        written = grad if j > 0 else 0.0  # block 0 writes no input gradient
        during_fisher = grad + written + scratch + per_decompose * (layers - 1 - j)
        during_decompose = written + per_decompose * (layers - j)
        peak = max(peak, held + (during_fisher + per_decompose + grad if side_by_side else max(during_fisher, during_decompose)))
    return peak


def _scratch(c: CostInputs) -> float:
    """Disk a fisher layer partition holds beside its outputs while it runs, for the Kronecker
    factors: the stored gradient factors (``stored`` mode's scratch) and the sweep checkpoint in
    its resume directory (both factors of every linear, float64; kept until the partition commits,
    so beside its finished statistics; while a sweep is written, the old one and the new one,
    which is less)."""
    if "nkp" not in c.method.gradient_stats:
        return 0.0
    return _stored_gradients(c)[1] + _kronecker_bytes(c.shapes)


def _kronecker_bytes(s: Any) -> float:
    """Both Kronecker factors of every linear of one block, float64 (fisher's output, its sweep checkpoint)."""
    return sum(m * m + n * n for m, n in s.linears) * 8


def _stored_gradients(c: CostInputs) -> tuple[str | None, float]:
    """(mode, bytes of one layer's stored gradient factors in the scratch directory: 0 when
    streaming) for the Kronecker factors; (None, 0) for methods without them."""
    if "nkp" not in c.method.gradient_stats:
        return None, 0.0
    mode, stored = c.config.method.gradient_storage(c.config.calibration.n_samples, c.config.calibration.seq_len,
                                                    c.shapes.linears)
    return mode, float(stored) if mode == "stored" else 0.0


def _chained(sources: list[Callable[[], Iterator[Any]]]) -> Callable[[], Iterator[Any]]:
    """The shards' gradient sources one after another, as one source (in shard order)."""
    return lambda: (batch for source in sources for batch in source())


class SweepCheckpoint:
    """The power iteration's state after every sweep, in the partition's resume directory, so a
    crash loses at most one sweep.

    One file (``artifacts.write_checkpoint``): a kill at any moment leaves the previous sweep's
    state or this one's, never a mix of the two.
    """

    FILE = SWEEP_CHECKPOINT

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.loaded_sweep = 0

    def save(self, sweep: int, results: dict[str, NKPResult]) -> None:
        tensors = {f"{n}.{k}": getattr(r, k) for n, r in results.items() for k in ("A", "B")}
        meta = {"sweep": sweep, "linears": {n: {"sweeps": r.sweeps, "rel_change": r.rel_change, "history": r.history}
                                            for n, r in results.items()}}
        write_checkpoint(self.directory / self.FILE, tensors, meta)
        kill_point("sweep-saved")

    def load(self) -> dict[str, NKPResult] | None:
        found = read_checkpoint(self.directory / self.FILE)
        if found is None:
            return None
        tensors, meta = found
        self.loaded_sweep = int(meta["sweep"])
        return {n: NKPResult(A=tensors[f"{n}.A"], B=tensors[f"{n}.B"], **m) for n, m in meta["linears"].items()}
