"""``fisher``: gradient statistics, computed one decoder block at a time, backwards.

Partition ``head`` takes the last block's outputs (from ``capture``), applies the final norm and
LM head, and back-propagates each window's mean next-token NLL to the last block's output.
Partition ``layer-i`` (run from the last block down) recomputes block i on its cached inputs with
autograd, back-propagates the incoming output gradient, stores the gradient w.r.t. its input for
block i-1, and reads each target linear's inputs ``X_k`` and output gradients ``D_k`` per window.

Per-sequence weight gradients ``G_k = D_kᵀ X_k`` are never averaged across sequences (optionally
one per ``chunk_tokens`` chunk). From them: token-level K-FAC output factor ``Σ δ δᵀ`` (fallback)
and the GFWSVD Kronecker factors (``stagepipe.kron``), either from gradients stored in a scratch
zarr (``stored``) or recomputed per pass (``streaming``); ``auto`` stores below the memory budget.
For methods that need no gradients every partition is an explicit no-op.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from stagepipe.accounting import rank_for_fraction
from stagepipe.engine.stage import ALL, Context, PartitionRef, Stage, layer_index, layer_partition
from stagepipe.engine.workspace import read_json, resume_dir, write_json
from stagepipe.io import safetensors_io, zarr_io
from stagepipe.kron import NKPResult, clean_factors, diagnostics, nkp_power_iteration
from stagepipe.methods import make_method
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linears, weight_matrix
from stagepipe.models.sources import DTYPES, resolve_device
from stagepipe.stages.capture import HIDDEN, block_inputs, calibration_ids, load_input_stats
from stagepipe.stages.tokenize import CALIBRATION

HEAD = "head"
GRAD = "grad.zarr"  # gradient of the loss w.r.t. this partition's *input* hidden states


def _grad_in_ref(ctx: Context, index: int) -> PartitionRef:
    last = ctx.num_layers - 1
    return PartitionRef("fisher", HEAD if index == last else layer_partition(index + 1))


class FisherStage(Stage):
    name = "fisher"
    version = 3
    description = "layer-wise backward: per-sequence gradients → K-FAC / Kronecker factors"

    def partitions(self, ctx: Context) -> list[str] | None:
        layers = ctx.layer_partitions()
        return None if layers is None else [HEAD, *reversed(layers)]

    def dependencies(self, ctx: Context, partition: str) -> list[PartitionRef]:
        deps = [PartitionRef("snapshot", ALL), PartitionRef("tokenize", CALIBRATION)]
        if partition == HEAD:
            return deps + [PartitionRef("capture", layer_partition(ctx.num_layers - 1))]
        index = layer_index(partition)
        deps += [_grad_in_ref(ctx, index), PartitionRef("capture", partition)]
        if index > 0:
            deps.append(PartitionRef("capture", layer_partition(index - 1)))
        return deps

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        method = make_method(ctx.config.method)
        if not method.needs_gradients:
            return {"needed": False}
        cfg = ctx.config.method
        # K-FAC and squared per-sequence gradients are always recorded (cheap next to the backward
        # pass), so methods that differ only in which of them they read share one fisher run.
        slice_: dict[str, Any] = {"nkp": "nkp" in method.gradient_stats, "modules": ctx.config.target.modules,
                                  "batch_size": ctx.config.runtime.batch_size, "labels": cfg.fisher_labels}
        if "nkp" in method.gradient_stats:  # the options below shape only the Kronecker factors
            slice_["nkp"] = {k: getattr(cfg, k) for k in ("mode", "memory_budget_gb", "max_sweeps", "tol",
                                                          "warm_start", "factor_floor_rel", "chunk_tokens")}
            if cfg.diagnostics:
                slice_["diagnostics"] = {"max_dim": cfg.diagnostics_max_dim, "floor_rel": cfg.floor_rel,
                                         "kept_fraction": ctx.config.target.kept_fraction,
                                         "align": ctx.config.allocation.align}
        return slice_

    def skip_reason(self, ctx: Context, partition: str) -> str | None:
        if not make_method(ctx.config.method).needs_gradients:
            return f"method {ctx.config.method.name} uses no gradient statistics"
        return None

    def run(self, ctx: Context, partition: str, out: Path, inputs: dict[PartitionRef, Path]) -> dict[str, Any]:
        device = resolve_device(ctx.config.model.device)
        runner = BlockRunner(inputs[PartitionRef("snapshot", ALL)] / "model", device, DTYPES[ctx.config.model.dtype])
        ids = calibration_ids(inputs)
        if partition == HEAD:
            return self._run_head(ctx, runner, ids, out, inputs)
        return self._run_block(ctx, runner, layer_index(partition), ids, out, inputs)

    # ------------------------------------------------------------------ head
    def _run_head(self, ctx, runner: BlockRunner, ids, out: Path, inputs) -> dict[str, Any]:
        batch = ctx.config.runtime.batch_size
        last = zarr_io.open_array(inputs[PartitionRef("capture", layer_partition(runner.num_layers - 1))] / HIDDEN, "hidden")
        grads = zarr_io.create_array(out / GRAD, "grad", tuple(last.shape), "float32", batch)
        losses = []
        sampler = None
        if ctx.config.method.fisher_labels == "model":
            sampler = torch.Generator().manual_seed(ctx.config.calibration.seed)
        for start in range(0, len(ids), batch):
            hidden = zarr_io.read_rows(last, start, start + batch).to(runner.device).float().requires_grad_(True)
            loss = runner.window_losses(hidden, ids[start : start + batch], sample_from=sampler)
            (grad,) = torch.autograd.grad(loss.sum(), hidden)
            zarr_io.write_rows(grads, start, grad.float())
            losses.extend(loss.tolist())
        return {"mean_window_loss": sum(losses) / len(losses), "n_windows": len(losses)}

    # ------------------------------------------------------------------ one block
    def _run_block(self, ctx, runner: BlockRunner, index: int, ids, out: Path, inputs) -> dict[str, Any]:
        cfg = ctx.config.method
        batch = ctx.config.runtime.batch_size
        block = runner.load_block(index)
        linears = block_linears(block, ctx.config.target.modules)
        grad_out = zarr_io.open_array(inputs[_grad_in_ref(ctx, index)] / GRAD, "grad")
        grad_in = None
        if index > 0:
            grad_in = zarr_io.create_array(out / GRAD, "grad", tuple(grad_out.shape), "float32", batch)
        captured: dict[str, dict[str, torch.Tensor]] = {n: {} for n in linears}

        def forward_hook(mod, args, output, name):
            captured[name]["x"] = args[0].detach()
            output.register_hook(lambda g: captured[name].__setitem__("d", g.detach()))

        handles = [m.register_forward_hook(lambda mod, a, o, n=n: forward_hook(mod, a, o, n)) for n, m in linears.items()]
        needed = make_method(cfg).gradient_stats
        shapes = {n: tuple(weight_matrix(m).shape) for n, m in linears.items()}
        chunk = getattr(cfg, "chunk_tokens", None) or ids.shape[1]
        chunks = -(-ids.shape[1] // chunk)
        sums: dict[str, torch.Tensor] = {}  # kfac_out.<name>, grad_sq.<name>, float64
        counts = {"tokens": 0, "windows": 0}

        def gradient_batches(record: bool) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
            """Recompute the block forward+backward per batch; yield per-sequence gradient factors
            ``(D, X)`` (``G_k = D_kᵀ X_k``), one per window or per ``chunk_tokens`` chunk. The
            recording pass also accumulates K-FAC and squared per-sequence gradients."""
            for start, hidden in block_inputs(runner, index, ids, inputs, batch):
                hidden = hidden.to(runner.device, runner.dtype).requires_grad_(True)
                output = runner.run_block(block, hidden)
                upstream = zarr_io.read_rows(grad_out, start, start + batch).to(output.device, output.dtype)
                output.backward(upstream)
                if record and grad_in is not None:
                    zarr_io.write_rows(grad_in, start, hidden.grad.float())
                result = {}
                for name, got in captured.items():
                    x, d = got["x"].float(), got["d"].float()
                    if record:
                        _add(sums, f"kfac_out.{name}", _gram(d.reshape(-1, d.shape[-1])))
                        _add(sums, f"grad_sq.{name}", ((d.transpose(1, 2) @ x) ** 2).double().sum(0))
                    result[name] = (_chunks(d, chunk), _chunks(x, chunk))
                if record:
                    counts["tokens"] += x.shape[0] * x.shape[1]
                    counts["windows"] += x.shape[0]
                yield result

        info: dict[str, Any] = {"K": len(ids) * chunks, "linears": {n: {} for n in linears}}
        tensors: dict[str, torch.Tensor] = {}
        scratch = out.parent / f".scratch-{out.name}"
        try:
            if "nkp" in needed:
                source = self._gradient_source(cfg, gradient_batches, scratch, linears, shapes, len(ids), chunk, batch, info,
                                              runner.device)
                warm = self._warm_start(ctx, index, inputs, linears, shapes)
                checkpoint = SweepCheckpoint(resume_dir(out))
                results = nkp_power_iteration(source, warm, cfg.max_sweeps, cfg.tol, on_sweep=checkpoint.save,
                                              start=checkpoint.load())
                info["resumed_from_sweep"] = checkpoint.loaded_sweep
                for name, res in results.items():
                    a, b, clean = clean_factors(res.A, res.B, cfg.factor_floor_rel)
                    tensors.update({f"{name}.{k}": v for k, v in (("A", a), ("B", b)) if v is not None})
                    info["linears"][name] = {"sweeps": res.sweeps, "rel_change": res.rel_change, "history": res.history, **clean}
                if cfg.diagnostics:  # needs the gradients: before the scratch directory goes
                    self._diagnose(ctx, source, linears, shapes, tensors, info)
            else:
                for _ in gradient_batches(record=True):
                    pass
        finally:
            for h in handles:
                h.remove()
            shutil.rmtree(scratch, ignore_errors=True)
        for key, value in sums.items():
            kind, _, name = key.partition(".")
            tensors[f"{name}.{kind}"] = value / (counts["tokens"] if kind == "kfac_out" else counts["windows"])
        info.update(counts)
        safetensors_io.write_atomic(out / "factors.safetensors", {k: v.cpu().contiguous() for k, v in tensors.items()})
        return info

    @staticmethod
    def _gradient_source(cfg, gradient_batches, scratch: Path, linears, shapes, n_windows: int, chunk: int,
                         batch: int, info: dict[str, Any], device: torch.device):
        """Run the recording pass and return a re-iterable source of ``(D, X)`` batches: read back
        from a scratch zarr (``stored``) or recomputed per pass (``streaming``)."""
        chunks = -(-info["K"] // n_windows)
        grad_bytes = n_windows * chunks * chunk * sum(m + n for m, n in shapes.values()) * 4
        mode = cfg.mode if cfg.mode != "auto" else ("stored" if grad_bytes <= cfg.memory_budget_gb * 2**30 else "streaming")
        info.update(mode=mode, gradient_bytes=grad_bytes)
        if mode == "streaming":
            for _ in gradient_batches(record=True):
                pass
            return lambda: gradient_batches(record=False)
        rows, step = n_windows * chunks, batch * chunks
        stored = {(n, k): zarr_io.create_array(scratch / "grads.zarr", f"{n}.{k}", (rows, chunk, shapes[n][0 if k == "d" else 1]),
                                               "float32", step)
                  for n in linears for k in ("d", "x")}
        for i, factors in enumerate(gradient_batches(record=True)):
            for n, (d, x) in factors.items():
                zarr_io.write_rows(stored[n, "d"], i * step, d)
                zarr_io.write_rows(stored[n, "x"], i * step, x)

        def source() -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
            for start in range(0, rows, step):
                yield {n: (zarr_io.read_rows(stored[n, "d"], start, start + step).to(device),
                           zarr_io.read_rows(stored[n, "x"], start, start + step).to(device)) for n in linears}

        return source

    @staticmethod
    def _diagnose(ctx, source, linears, shapes, tensors, info) -> None:
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

    def _warm_start(self, ctx, index: int, inputs, linears, shapes) -> dict[str, torch.Tensor]:
        """K-FAC input factor ``E[x xᵀ]`` from ``capture`` (so 2–5 sweeps suffice), or identity."""
        if ctx.config.method.warm_start == "identity":
            return {n: torch.eye(shapes[n][1], dtype=torch.float64) for n in linears}
        stats = load_input_stats(inputs[PartitionRef("capture", layer_partition(index))])
        return {n: stats.gram[n] / stats.tokens[n] for n in linears}


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
    """The power iteration's state after every sweep, kept beside the partition (keyed like it), so
    a crash loses at most one sweep; removed once the partition is committed."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.loaded_sweep = 0

    def save(self, sweep: int, results: dict[str, NKPResult]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"{n}.{k}": getattr(r, k) for n, r in results.items() for k in ("A", "B")}
        meta = {n: {"sweeps": r.sweeps, "rel_change": r.rel_change, "history": r.history} for n, r in results.items()}
        safetensors_io.write_atomic(self.directory / "state.safetensors", tensors)
        write_json(self.directory / "state.json", {"sweep": sweep, "linears": meta})

    def load(self) -> dict[str, NKPResult] | None:
        meta = read_json(self.directory / "state.json")
        if not meta or not (self.directory / "state.safetensors").is_file():
            return None
        tensors = safetensors_io.read(self.directory / "state.safetensors")
        if any(f"{n}.A" not in tensors for n in meta["linears"]):
            return None  # the two files are from different sweeps: start over
        self.loaded_sweep = int(meta["sweep"])
        return {n: NKPResult(A=tensors[f"{n}.A"], B=tensors[f"{n}.B"], **m) for n, m in meta["linears"].items()}
