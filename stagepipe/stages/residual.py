"""``residual`` (per layer, independent; only for methods whose factors depend on the allocated
rank, i.e. ``ressvd``): the two-stage ResSVD factors at each matrix's allocated rank.

Also home of ``allocated_factors``, the one function that turns a layer's stored factors and its
allocated ranks into (up, down) pairs; ``refit`` and ``assemble`` both read factors through it.
Per matrix the manifest records r₁/r₂, the stage-1 relative error, the activation loss
``‖(W − Ŵ) X‖²/N`` of the two-stage result and the one-shot SVD-LLM optimum at the same rank
(``decompose``'s dropped whitened σ²), so the cost of the heuristic is visible, never hidden.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stagepipe.engine.stage import ALL, Context, PartitionRef, Stage, layer_index
from stagepipe.io import safetensors_io
from stagepipe.linalg import factor_metric
from stagepipe.methods import make_method
from stagepipe.methods.ressvd import residual_factors
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linears, weight_matrix
from stagepipe.models.sources import DTYPES
from stagepipe.stages.allocate import layer_ranks
from stagepipe.stages.capture import load_input_stats
from stagepipe.stages.decompose import decomposed_spectra

RESIDUAL = "residual.safetensors"


def allocated_factors(decomposed: Path, residual: Path | None,
                      ranks: dict[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(up, down) per block-relative linear at its allocated rank: ``residual``'s two-stage factors
    where that stage ran, else ``decompose``'s weighted SVD truncated to the rank."""
    if residual is not None and (residual / RESIDUAL).is_file():
        raw = safetensors_io.read(residual / RESIDUAL, [f"{n}.{k}" for n in ranks for k in ("up", "down")])
        return {n: (raw[f"{n}.up"].double(), raw[f"{n}.down"].double()) for n in ranks}
    spectra = decomposed_spectra(decomposed, list(ranks))
    return {n: spectra[n].factors(r) for n, r in ranks.items()}


class ResidualStage(Stage):
    name = "residual"
    version = 1
    description = "ResSVD two-stage factors at the allocated ranks"

    def partitions(self, ctx: Context) -> list[str] | None:
        return ctx.layer_partitions()

    def dependencies(self, ctx: Context, partition: str) -> list[PartitionRef]:
        return [PartitionRef("snapshot", ALL), PartitionRef("capture", partition), PartitionRef("decompose", partition),
                PartitionRef("allocate", ALL)]

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        method = ctx.config.method
        if not make_method(method).post_allocation:
            return {"residual": False}
        return {"residual": True, "split": method.split, "floor_rel": method.floor_rel, "modules": ctx.config.target.modules}

    def skip_reason(self, ctx: Context, partition: str) -> str | None:
        method = make_method(ctx.config.method)
        return None if method.post_allocation else f"method {method.name} has rank-independent factors"

    def run(self, ctx: Context, partition: str, out: Path, inputs: dict[PartitionRef, Path]) -> dict[str, Any]:
        cfg = ctx.config.method
        method = make_method(cfg)
        runner = BlockRunner(inputs[PartitionRef("snapshot", ALL)] / "model", torch.device("cpu"), DTYPES[ctx.config.model.dtype])
        index = layer_index(partition)
        linears = block_linears(runner.load_block(index), ctx.config.target.modules)
        ranks = layer_ranks(inputs[PartitionRef("allocate", ALL)], runner.layout.layer_prefix(index))
        stats = load_input_stats(inputs[PartitionRef("capture", partition)])
        one_shot = decomposed_spectra(inputs[PartitionRef("decompose", partition)], list(ranks))
        tensors: dict[str, torch.Tensor] = {}
        report: dict[str, Any] = {}
        for name, rank in ranks.items():
            w = weight_matrix(linears[name]).detach().to(torch.float64)
            pair = method.metrics(name, tuple(w.shape), stats)
            right = factor_metric(pair.right, cfg.floor_rel, f"{partition}.{name}.right")
            up, down, info = residual_factors(w, right, rank, cfg.split)
            tensors[f"{name}.up"], tensors[f"{name}.down"] = up.float(), down.float()
            optimum = one_shot[name].dropped_energy(rank)
            report[name] = {"rank": rank, **info, "one_shot_loss": optimum,
                            "loss_over_one_shot": info["activation_loss"] / optimum if optimum > 0 else None}
        safetensors_io.write_atomic(out / RESIDUAL, tensors)
        return {"linears": report, "split": cfg.split}
