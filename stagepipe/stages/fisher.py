"""``fisher``: gradient statistics, computed one decoder block at a time, backwards.

Partition ``head`` takes the last block's outputs (from ``capture``), applies the final norm and
LM head, and back-propagates each window's mean next-token NLL to the last block's output.
Partition ``layer-i`` (run from the last block down) recomputes block i on its cached inputs with
autograd, back-propagates the incoming output gradient, stores the gradient w.r.t. its input for
block i-1, and reads each target linear's inputs ``X_k`` and output gradients ``D_k`` per window
(``GradientCollector``).

Per-sequence weight gradients ``G_k = D_kᵀ X_k`` are never averaged across sequences (optionally
one per ``chunk_tokens`` chunk). From them: the token-level K-FAC output factor ``Σ δ δᵀ``, the
squared per-sequence gradients, and — for methods whose metric pair needs them — the GFWSVD
Kronecker factors (``stagepipe.kron``), either from gradients stored in the task's scratch
directory (``stored``) or recomputed per pass (``streaming``); ``auto`` stores below the memory
budget. The power iteration is checkpointed in the task's resume directory after every sweep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from stagepipe.accounting import rank_for_fraction
from stagepipe.engine.stage import Context, PartitionRef, Stage, Work
from stagepipe.faults import kill_point
from stagepipe.io import zarr_io
from stagepipe.kron import NKPResult, clean_factors, diagnostics, nkp_power_iteration
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linears, weight_matrix
from stagepipe.models.sources import DTYPES, resolve_device
from stagepipe.stages import artifacts
from stagepipe.stages.artifacts import CALIBRATION, HEAD, layer_index, layer_partition
from stagepipe.stages.requirements import needs

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # linear → (D, X) per window or chunk


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
        if nkp:  # the options below shape only the Kronecker factors
            slice_["nkp"] = {k: getattr(cfg, k) for k in ("mode", "memory_budget_gb", "max_sweeps", "tol",
                                                          "warm_start", "factor_floor_rel", "chunk_tokens",
                                                          "regularizer")}
            if cfg.diagnostics:
                slice_["diagnostics"] = {"max_dim": cfg.diagnostics_max_dim, "floor_rel": cfg.floor_rel,
                                         "kept_fraction": ctx.config.target.kept_fraction,
                                         "align": ctx.config.allocation.align}
        return slice_

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        device = resolve_device(ctx.config.model.device)
        runner = BlockRunner(artifacts.model_dir(work.input("snapshot")), device, DTYPES[ctx.config.model.dtype])
        ids = artifacts.read_windows(work.input("tokenize", CALIBRATION))
        if work.partition == HEAD:
            return self._run_head(ctx, runner, ids, work)
        return self._run_block(ctx, runner, layer_index(work.partition), ids, work)

    # ------------------------------------------------------------------ head
    def _run_head(self, ctx: Context, runner: BlockRunner, ids: torch.Tensor, work: Work) -> dict[str, Any]:
        batch = ctx.config.runtime.batch_size
        last = artifacts.open_hidden(work.input("capture", layer_partition(runner.num_layers - 1)))
        grads = artifacts.create_grad(work.out, tuple(last.shape), batch)
        losses = []
        sampler = None
        if ctx.config.method.fisher_labels == "model":
            sampler = torch.Generator().manual_seed(ctx.config.calibration.seed)
        for start in range(0, len(ids), batch):
            hidden = artifacts.read_rows(last, start, start + batch).to(runner.device).float().requires_grad_(True)
            loss = runner.window_losses(hidden, ids[start : start + batch], sample_from=sampler)
            (grad,) = torch.autograd.grad(loss.sum(), hidden)
            artifacts.write_rows(grads, start, grad.float())
            losses.extend(loss.tolist())
        return {"mean_window_loss": sum(losses) / len(losses), "n_windows": len(losses)}

    # ------------------------------------------------------------------ one block
    def _run_block(self, ctx: Context, runner: BlockRunner, index: int, ids: torch.Tensor, work: Work) -> dict[str, Any]:
        cfg = ctx.config.method
        block = runner.load_block(index)
        linears = block_linears(block, ctx.config.target.modules)
        shapes = {n: tuple(weight_matrix(m).shape) for n, m in linears.items()}
        collector = GradientCollector(runner, block, index, linears, ids, ctx.config.runtime.batch_size,
                                      getattr(cfg, "chunk_tokens", None) or ids.shape[1],
                                      work=work,
                                      grad_out=work.inputs[_grad_in(ctx, index)],
                                      grad_in_dir=work.out if index > 0 else None)
        info: dict[str, Any] = {"K": collector.n_gradients, "linears": {n: {} for n in linears}}
        tensors: dict[str, torch.Tensor] = {}
        try:
            if "nkp" in needs(ctx.config).method.gradient_stats:
                source = collector.source(cfg.mode, cfg.memory_budget_gb, work.scratch, shapes, info)
                warm = self._warm_start(ctx, work, linears, shapes)
                checkpoint = SweepCheckpoint(work.resume)
                results = nkp_power_iteration(source, warm, cfg.max_sweeps, cfg.tol, on_sweep=checkpoint.save,
                                              start=checkpoint.load())
                work.telemetry["resumed_from_sweep"] = checkpoint.loaded_sweep
                for name, res in results.items():
                    a, b, clean = clean_factors(res.A, res.B, cfg.factor_floor_rel, cfg.regularizer)
                    tensors.update({f"{name}.{k}": v for k, v in (("A", a), ("B", b)) if v is not None})
                    info["linears"][name] = {"sweeps": res.sweeps, "rel_change": res.rel_change, "history": res.history, **clean}
                if cfg.diagnostics:  # needs the gradients: before the scratch directory goes
                    self._diagnose(ctx, source, linears, shapes, tensors, info)
            else:
                collector.record()
        finally:
            collector.close()
        tensors.update(collector.statistics())
        info.update(collector.counts)
        artifacts.write_fisher(work.out, tensors)
        return info

    @staticmethod
    def _diagnose(ctx: Context, source, linears, shapes, tensors, info) -> None:
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
            info["linears"][n]["diagnostics"] = diagnostics(torch.cat(grads[n]), tensors[f"{n}.A"], tensors[f"{n}.B"],
                                                            weight, rank, cfg.floor_rel)

    @staticmethod
    def _warm_start(ctx: Context, work: Work, linears, shapes) -> dict[str, torch.Tensor]:
        """K-FAC input factor ``E[x xᵀ]`` from ``capture`` (so 2–5 sweeps suffice), or identity."""
        if ctx.config.method.warm_start == "identity":
            return {n: torch.eye(shapes[n][1], dtype=torch.float64) for n in linears}
        stats = artifacts.read_input_stats(work.input("capture", work.partition))
        return {n: stats.gram[n] / stats.tokens[n] for n in linears}


class GradientCollector:
    """Per-sequence gradient factors of one block's linears, recomputed batch by batch.

    Each pass runs the block forward on its cached inputs and backward from the stored output
    gradient; hooks read every linear's input ``X`` and output gradient ``D``. ``batches(record=True)``
    also accumulates the K-FAC output factor and the squared per-sequence gradients and writes the
    gradient w.r.t. the block's input (block i−1's output gradient).
    """

    def __init__(self, runner: BlockRunner, block: torch.nn.Module, index: int, linears: dict[str, torch.nn.Module],
                 ids: torch.Tensor, batch: int, chunk: int, work: Work, grad_out: Path,
                 grad_in_dir: Path | None) -> None:
        self.runner, self.block, self.index, self.linears = runner, block, index, linears
        self.ids, self.batch, self.chunk = ids, batch, chunk
        self.work = work
        self.grad_out = artifacts.open_grad(grad_out)
        self.grad_in = None if grad_in_dir is None else artifacts.create_grad(grad_in_dir, tuple(self.grad_out.shape), batch)
        self.n_chunks = -(-ids.shape[1] // chunk)
        self.n_gradients = len(ids) * self.n_chunks
        self.sums: dict[str, torch.Tensor] = {}  # kfac_out.<name>, grad_sq.<name>, float64
        self.counts = {"tokens": 0, "windows": 0}
        self._captured: dict[str, dict[str, torch.Tensor]] = {n: {} for n in linears}
        self._handles = [m.register_forward_hook(lambda mod, a, o, n=n: self._hook(n, a, o)) for n, m in linears.items()]

    def _hook(self, name: str, args: tuple, output: torch.Tensor) -> None:
        self._captured[name]["x"] = args[0].detach()
        output.register_hook(lambda g: self._captured[name].__setitem__("d", g.detach()))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def batches(self, record: bool) -> Iterator[Factors]:
        """Per batch of windows: ``{linear: (D, X)}`` split into ``chunk``-token pieces (``G_k = D_kᵀ X_k``)."""
        runner = self.runner
        for start, hidden in artifacts.block_inputs(runner, self.index, self.ids, self.work, self.batch):
            hidden = hidden.to(runner.device, runner.dtype).requires_grad_(True)
            output = runner.run_block(self.block, hidden)
            upstream = artifacts.read_rows(self.grad_out, start, start + self.batch).to(output.device, output.dtype)
            output.backward(upstream)
            if record and self.grad_in is not None:
                artifacts.write_rows(self.grad_in, start, hidden.grad.float())
            result = {}
            for name, got in self._captured.items():
                x, d = got["x"].float(), got["d"].float()
                if record:
                    _add(self.sums, f"kfac_out.{name}", _gram(d.reshape(-1, d.shape[-1])))
                    _add(self.sums, f"grad_sq.{name}", ((d.transpose(1, 2) @ x) ** 2).double().sum(0))
                result[name] = (_chunks(d, self.chunk), _chunks(x, self.chunk))
            if record:
                self.counts["tokens"] += x.shape[0] * x.shape[1]
                self.counts["windows"] += x.shape[0]
            yield result

    def record(self) -> None:
        """One recording pass (statistics and input gradients), discarding the factors."""
        for _ in self.batches(record=True):
            pass

    def statistics(self) -> dict[str, torch.Tensor]:
        """``<linear>.kfac_out`` (token mean of ``δ δᵀ``) and ``<linear>.grad_sq`` (window mean of ``G ⊙ G``)."""
        out = {}
        for key, value in self.sums.items():
            kind, _, name = key.partition(".")
            out[f"{name}.{kind}"] = value / (self.counts["tokens"] if kind == "kfac_out" else self.counts["windows"])
        return out

    def source(self, mode: str, budget_gb: float, scratch: Path, shapes: dict[str, tuple[int, int]],
               info: dict[str, Any]) -> Callable[[], Iterator[Factors]]:
        """Run the recording pass and return a re-iterable source of ``(D, X)`` batches: read back
        from a zarr in ``scratch`` (``stored``) or recomputed per pass (``streaming``)."""
        grad_bytes = self.n_gradients * self.chunk * sum(m + n for m, n in shapes.values()) * 4
        if mode == "auto":
            mode = "stored" if grad_bytes <= budget_gb * 2**30 else "streaming"
        info.update(mode=mode, gradient_bytes=grad_bytes)
        if mode == "streaming":
            self.record()
            return lambda: self.batches(record=False)
        rows, step = self.n_gradients, self.batch * self.n_chunks
        stored = {(n, k): zarr_io.create_array(scratch / "grads.zarr", f"{n}.{k}",
                                               (rows, self.chunk, shapes[n][0 if k == "d" else 1]), "float32", step)
                  for n in self.linears for k in ("d", "x")}
        for i, factors in enumerate(self.batches(record=True)):
            for n, (d, x) in factors.items():
                zarr_io.write_rows(stored[n, "d"], i * step, d)
                zarr_io.write_rows(stored[n, "x"], i * step, x)
        device = self.runner.device

        def read_back() -> Iterator[Factors]:
            for start in range(0, rows, step):
                yield {n: (zarr_io.read_rows(stored[n, "d"], start, start + step).to(device),
                           zarr_io.read_rows(stored[n, "x"], start, start + step).to(device)) for n in self.linears}

        return read_back


def _chunks(values: torch.Tensor, chunk: int) -> torch.Tensor:
    """(b, T, c) → (b·⌈T/chunk⌉, chunk, c); the tail is zero-padded, which leaves ``Dᵀ X`` exact."""
    b, t, c = values.shape
    pad = -t % chunk
    if pad:
        values = torch.cat([values, values.new_zeros(b, pad, c)], dim=1)
    return values.reshape(b * (t + pad) // chunk, chunk, c)


def _gram(flat: torch.Tensor) -> torch.Tensor:
    return (flat.T @ flat).double()  # float32 per batch, float64 across batches


def _add(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    sums[key] = sums[key] + value if key in sums else value


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
