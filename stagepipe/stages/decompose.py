"""``decompose`` (per layer, independent): the full weighted SVD of every target linear.

Builds the method's metric pair from the stored statistics, factorises both metrics in float64
with a relative eigenvalue floor (the repair is recorded per matrix), and stores the *full-rank*
un-whitened factors and the weighted spectrum, so ``allocate`` can pick any rank without redoing
an SVD. Each layer checks that its full-rank factors reproduce ``W``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stagepipe.engine.stage import ALL, Context, PartitionRef, Stage, layer_index
from stagepipe.io import safetensors_io
from stagepipe.linalg import WeightedSVD, factor_metric, weighted_svd
from stagepipe.methods import LayerStats, make_method
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linears, weight_matrix
from stagepipe.models.sources import DTYPES, resolve_device
from stagepipe.stages.capture import load_input_stats

FACTORS = "factors.safetensors"


def load_fisher(fisher_dir: Path, manifest_info: dict[str, Any] | None = None) -> tuple[dict, dict]:
    path = fisher_dir / "factors.safetensors"
    if not path.is_file():
        return {}, {}
    tensors = safetensors_io.read(path)
    fisher: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, kind = key.rpartition(".")
        fisher.setdefault(name, {})[kind] = value
    return fisher, (manifest_info or {}).get("linears", {})


def decomposed_spectra(decomposed: Path, names: list[str]) -> dict[str, WeightedSVD]:
    """The full weighted SVD of each named linear, as ``decompose`` stored it (float64)."""
    raw = safetensors_io.read(decomposed / FACTORS, [f"{n}.{k}" for n in names for k in ("left", "right", "sigma")])
    return {n: WeightedSVD(sigma=raw[f"{n}.sigma"].double(), left=raw[f"{n}.left"].double(),
                           right=raw[f"{n}.right"].double()) for n in names}


class DecomposeStage(Stage):
    name = "decompose"
    version = 1
    description = "full weighted SVD per target linear (factors + spectrum)"

    def partitions(self, ctx: Context) -> list[str] | None:
        return ctx.layer_partitions()

    def dependencies(self, ctx: Context, partition: str) -> list[PartitionRef]:
        return [PartitionRef("snapshot", ALL), PartitionRef("capture", partition), PartitionRef("fisher", partition)]

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        return {"method": make_method(ctx.config.method).key_options(), "modules": ctx.config.target.modules}

    def run(self, ctx: Context, partition: str, out: Path, inputs: dict[PartitionRef, Path]) -> dict[str, Any]:
        from stagepipe.io import manifest as manifest_io

        index = layer_index(partition)
        method = make_method(ctx.config.method)
        device = resolve_device(ctx.config.model.device)
        runner = BlockRunner(inputs[PartitionRef("snapshot", ALL)] / "model", torch.device("cpu"), DTYPES[ctx.config.model.dtype])
        block = runner.load_block(index)
        linears = block_linears(block, ctx.config.target.modules)
        stats = load_input_stats(inputs[PartitionRef("capture", partition)]) if method.activation_stats else LayerStats()
        if method.needs_gradients:
            fisher_dir = inputs[PartitionRef("fisher", partition)]
            stats.fisher, stats.fisher_info = load_fisher(fisher_dir, manifest_io.read(fisher_dir).info)
        floor = ctx.config.method.floor_rel
        tensors: dict[str, torch.Tensor] = {}
        report: dict[str, Any] = {}
        for name, module in linears.items():
            w = weight_matrix(module).detach().to(device, torch.float64)
            pair = method.metrics(name, tuple(w.shape), stats)
            left = factor_metric(None if pair.left is None else pair.left.to(device), floor, f"{partition}.{name}.left")
            right = factor_metric(None if pair.right is None else pair.right.to(device), floor, f"{partition}.{name}.right")
            result = weighted_svd(w, left, right)
            full = result.reconstruct(len(result.sigma))
            rel_err = float(torch.linalg.norm(full - w) / torch.linalg.norm(w))
            tensors[f"{name}.left"] = result.left.float().cpu()
            tensors[f"{name}.right"] = result.right.float().cpu()
            tensors[f"{name}.sigma"] = result.sigma.cpu()
            report[name] = {
                "shape": list(w.shape), "full_rank_rel_err": rel_err,
                "left": left.repair if left else {"kind": "identity"},
                "right": right.repair if right else {"kind": "identity"},
                **pair.notes,
            }
        safetensors_io.write_atomic(out / FACTORS, tensors)
        return {"linears": report, "method": method.name}
