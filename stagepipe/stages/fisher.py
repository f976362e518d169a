"""``fisher``: gradient statistics, computed one decoder block at a time, backwards.

Partition ``head`` takes the last block's outputs (from ``capture``), applies the final norm and
LM head, and back-propagates each window's mean next-token NLL to the last block's output.
Partition ``layer-i`` (run from the last block down) recomputes block i on its cached inputs with
autograd, back-propagates the incoming output gradient, stores the gradient w.r.t. its input for
block i-1, and reads each target linear's inputs ``X_k`` and output gradients ``D_k`` per window
(``stages.gradients``). Every partition runs as one job per shard of the windows
(``runtime.shards``, through ``Work.fan_out``: in process or as Ray tasks); the shards' float64
sums, including each half-sweep of the power iteration, are added here in shard order.

Per-sequence weight gradients ``G_k = D_kᵀ X_k`` are never averaged across sequences (optionally
one per ``chunk_tokens`` chunk). From them: the token-level K-FAC output factor ``Σ δ δᵀ``, the
squared per-sequence gradients, the input Grams when only fisher and decompose read them
(``Needs.gram_in_fisher``: capture's would wait on disk for the whole backward walk), and — for
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
from stagepipe.engine.stage import Context, PartitionRef, Stage, Work
from stagepipe.faults import kill_point
from stagepipe.kron import NKPResult, clean_factors, diagnostics, nkp_power_iteration
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linears, weight_matrix
from stagepipe.models.sources import DTYPES
from stagepipe.stages import artifacts, gradients
from stagepipe.stages.artifacts import CALIBRATION, HEAD, add_in_shard_order, layer_index, layer_partition
from stagepipe.stages.gradients import GradientJob
from stagepipe.stages.requirements import needs


def _grad_in(ctx: Context, index: int) -> PartitionRef:
    """Where block ``index``'s output gradient comes from: the head, or block ``index+1``."""
    last = int(ctx.model.num_hidden_layers) - 1
    return artifacts.ref("fisher", HEAD if index == last else layer_partition(index + 1))


class FisherStage(Stage):
    name = "fisher"
    version = 4
    description = "layer-wise backward: per-sequence gradients → K-FAC / Kronecker factors"

    def partitions(self, ctx: Context) -> list[str] | None:
        layers = artifacts.model_layers(ctx)
        return None if layers is None else [HEAD, *reversed(layers)]

    def dependencies(self, ctx: Context, partition: str) -> list[PartitionRef]:
        deps = [artifacts.ref("snapshot"), artifacts.ref("tokenize", CALIBRATION)]
        if partition == HEAD:
            return deps + [artifacts.ref("capture", int(ctx.model.num_hidden_layers) - 1)]
        index = layer_index(partition)
        deps += [_grad_in(ctx, index), artifacts.ref("capture", partition)]
        if index > 0:
            deps.append(artifacts.ref("capture", index - 1))
        return deps

    def transient(self, ctx: Context, partition: str) -> dict[str, list[PartitionRef]]:
        """The gradient at this partition's input (the head's: at the last block's output) is read
        only by the fisher partition of the block below: a hand-over, released once that is done;
        under a disk budget the layer's statistics too (``artifacts.statistics_handover``)."""
        if partition == HEAD:
            return {artifacts.GRAD: [artifacts.ref("fisher", layer_partition(int(ctx.model.num_hidden_layers) - 1))]}
        index = layer_index(partition)
        payloads = artifacts.statistics_handover(self.name, ctx, partition)  # under a disk budget: decompose's input
        return {**payloads, artifacts.GRAD: [artifacts.ref("fisher", layer_partition(index - 1))]} if index > 0 else payloads

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        cfg = ctx.config.method
        nkp = "nkp" in needs(ctx.config).method.gradient_stats
        # K-FAC and squared per-sequence gradients are always recorded (cheap next to the backward
        # pass), so methods that differ only in which of them they read share one fisher run.
        slice_: dict[str, Any] = {"nkp": nkp, "modules": ctx.config.target.modules,
                                  "batch_size": ctx.config.runtime.batch_size, "labels": cfg.fisher_labels}
        if needs(ctx.config).gram_in_fisher:
            slice_["grams"] = True
        if nkp:  # the options below shape only the Kronecker factors
            slice_["nkp"] = {k: getattr(cfg, k) for k in ("mode", "memory_budget_gb", "max_sweeps", "tol",
                                                          "warm_start", "factor_floor_rel", "chunk_tokens",
                                                          "regularizer")}
            if cfg.diagnostics:
                slice_["diagnostics"] = {"max_dim": cfg.diagnostics_max_dim, "floor_rel": cfg.floor_rel,
                                         "kept_fraction": ctx.config.target.kept_fraction,
                                         "align": ctx.config.allocation.align}
        return artifacts.with_shards(slice_, ctx)

    def fans_out(self, ctx: Context, partition: str) -> bool:
        return artifacts.sharded(ctx)

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        """One job per shard of the windows (``stages.gradients``), reduced here in shard order."""
        ids = artifacts.read_windows(work.input("tokenize", CALIBRATION))
        index = -1 if work.partition == HEAD else layer_index(work.partition)
        base = GradientJob(snapshot=artifacts.model_dir(work.input("snapshot")), tokens=work.input("tokenize", CALIBRATION),
                           index=index, rows=(0, 0), device=ctx.config.model.device, dtype=ctx.config.model.dtype,
                           batch=ctx.config.runtime.batch_size)
        ranges = artifacts.shard_ranges(len(ids), base.batch, ctx.config.runtime.shards)
        labels = [artifacts.shard_label(self.name, work.partition, i) for i in range(len(ranges))]
        try:
            if work.partition == HEAD:
                return self._run_head(ctx, ids, base, ranges, labels, work)
            return self._run_block(ctx, ids, base, ranges, labels, work)
        finally:
            gradients.release_collectors()

    # ------------------------------------------------------------------ head
    def _run_head(self, ctx: Context, ids: torch.Tensor, base: GradientJob, ranges, labels, work: Work) -> dict[str, Any]:
        hidden = work.input("capture", layer_partition(int(ctx.model.num_hidden_layers) - 1))
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
        need = needs(ctx.config)
        nkp = "nkp" in need.method.gradient_stats
        groups = artifacts.read_results(work.input("capture", work.partition))["groups"] if need.gram_in_fisher else {}
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


def _chained(sources: list[Callable[[], Iterator[Any]]]) -> Callable[[], Iterator[Any]]:
    """The shards' gradient sources one after another, as one source (in shard order)."""
    return lambda: (batch for source in sources for batch in source())


class SweepCheckpoint:
    """The power iteration's state after every sweep, in the partition's resume directory, so a
    crash loses at most one sweep.

    One file (``artifacts.write_checkpoint``): a kill at any moment leaves the previous sweep's
    state or this one's, never a mix of the two.
    """

    FILE = "state.safetensors"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.loaded_sweep = 0

    def save(self, sweep: int, results: dict[str, NKPResult]) -> None:
        tensors = {f"{n}.{k}": getattr(r, k) for n, r in results.items() for k in ("A", "B")}
        meta = {"sweep": sweep, "linears": {n: {"sweeps": r.sweeps, "rel_change": r.rel_change, "history": r.history}
                                            for n, r in results.items()}}
        artifacts.write_checkpoint(self.directory / self.FILE, tensors, meta)
        kill_point("sweep-saved")

    def load(self) -> dict[str, NKPResult] | None:
        found = artifacts.read_checkpoint(self.directory / self.FILE)
        if found is None:
            return None
        tensors, meta = found
        self.loaded_sweep = int(meta["sweep"])
        return {n: NKPResult(A=tensors[f"{n}.A"], B=tensors[f"{n}.B"], **m) for n, m in meta["linears"].items()}
