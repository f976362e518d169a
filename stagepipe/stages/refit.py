"""``refit`` (per layer, in order; optional ``method.refit: true``): SVD-LLM's closed-form
least-squares update of each factored linear's ``up`` factor on calibration outputs.

Block i is run twice on the calibration windows: the original block on the original inputs
(``capture``) gives each linear's target outputs ``Y = W x``; the truncated block on the
*compressed* model's running inputs (this stage's block i-1 output) gives its inputs ``z``. With
``H = down · z`` the new ``up`` solves ``min ‖up · H − Y‖_F`` through float64 normal equations
``(Σ H Hᵀ) upᵀ = Σ H Yᵀ`` accumulated over tokens. All linears of a block are refitted from one
pass of the truncated block (their inputs are those of the un-refitted block); the refitted
block's outputs are the next block's inputs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from stagepipe.engine.stage import ALL, Context, PartitionRef, Stage, layer_index, layer_partition
from stagepipe.io import safetensors_io, zarr_io
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linears, weight_matrix
from stagepipe.models.modeling_lowrank import LowRankLinear, linear_shape
from stagepipe.models.sources import DTYPES, resolve_device
from stagepipe.stages.allocate import layer_ranks
from stagepipe.stages.capture import HIDDEN, block_inputs, calibration_ids
from stagepipe.stages.residual import allocated_factors
from stagepipe.stages.tokenize import CALIBRATION

UPDATES = "refit.safetensors"


class RefitStage(Stage):
    name = "refit"
    version = 1
    description = "least-squares refit of the up factors on sequentially propagated inputs"

    def partitions(self, ctx: Context) -> list[str] | None:
        return ctx.layer_partitions()

    def dependencies(self, ctx: Context, partition: str) -> list[PartitionRef]:
        index = layer_index(partition)
        deps = [PartitionRef("snapshot", ALL), PartitionRef("tokenize", CALIBRATION), PartitionRef("allocate", ALL),
                PartitionRef("decompose", partition), PartitionRef("residual", partition)]
        if index > 0:
            deps += [PartitionRef("capture", layer_partition(index - 1)), PartitionRef("refit", layer_partition(index - 1))]
        return deps

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        if not ctx.config.method.refit:
            return {"refit": False}
        return {"refit": True, "batch_size": ctx.config.runtime.batch_size, "modules": ctx.config.target.modules,
                "activation_dtype": ctx.config.runtime.activation_dtype}

    def skip_reason(self, ctx: Context, partition: str) -> str | None:
        return None if ctx.config.method.refit else "method.refit is off"

    def run(self, ctx: Context, partition: str, out: Path, inputs: dict[PartitionRef, Path]) -> dict[str, Any]:
        index = layer_index(partition)
        device = resolve_device(ctx.config.model.device)
        runner = BlockRunner(inputs[PartitionRef("snapshot", ALL)] / "model", device, DTYPES[ctx.config.model.dtype])
        ids = calibration_ids(inputs)
        batch = ctx.config.runtime.batch_size
        prefix = runner.layout.layer_prefix(index)
        ranks = layer_ranks(inputs[PartitionRef("allocate", ALL)], prefix)
        original = runner.load_block(index)
        linears = block_linears(original, ctx.config.target.modules)
        weights = {n: weight_matrix(linears[n]).detach().clone() for n in ranks}
        factors = allocated_factors(inputs[PartitionRef("decompose", partition)], inputs[PartitionRef("residual", partition)], ranks)

        # Per batch: the original block on the original inputs gives targets W x; the truncated
        # block on the compressed model's running inputs gives H = down · z. Sums in float64.
        compressed = self._swap(copy.deepcopy(original), linears, factors, runner.dtype)
        gram = {n: torch.zeros(r, r, dtype=torch.float64, device=device) for n, r in ranks.items()}
        cross = {n: torch.zeros(r, weights[n].shape[0], dtype=torch.float64, device=device) for n, r in ranks.items()}
        seen: dict[str, torch.Tensor] = {}
        hooks = [linears[n].register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].detach())) for n in ranks]
        hooks += [compressed.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: seen.__setitem__(f"z:{n}", m.down(a[0].detach()))) for n in ranks]
        with torch.no_grad():
            batches = zip(block_inputs(runner, index, ids, inputs, batch),
                          block_inputs(runner, index, ids, inputs, batch, stage="refit"), strict=True)
            for (_, hidden), (_, running) in batches:
                runner.run_block(original, hidden)
                runner.run_block(compressed, running)
                for name, rank in ranks.items():
                    x = seen[name].reshape(-1, seen[name].shape[-1]).double()
                    h = seen[f"z:{name}"].reshape(-1, rank).double()
                    gram[name].add_(h.T @ h)
                    cross[name].add_(h.T @ (x @ weights[name].double().T.to(x.device)))
        for h in hooks:
            h.remove()
        updates, info = {}, {}
        for name in ranks:
            before = factors[name][0]
            up = torch.linalg.solve(gram[name], cross[name]).T  # (m, r), float64 normal equations
            updates[f"{name}.up"] = up.float().cpu()
            compressed.get_submodule(name).up.weight.data.copy_(up.to(runner.dtype))
            info[name] = {"rank": ranks[name], "relative_change": float(torch.linalg.norm(up.cpu() - before) / torch.linalg.norm(before)),
                          "gram_cond": float(torch.linalg.cond(gram[name]))}

        # outputs of the refitted block: the next block's compressed-path inputs
        hidden_out = zarr_io.create_array(out / HIDDEN, "hidden", (len(ids), ids.shape[1], runner.config.hidden_size),
                                          ctx.config.runtime.activation_dtype, batch)
        with torch.no_grad():
            for start, hidden in block_inputs(runner, index, ids, inputs, batch, stage="refit"):
                zarr_io.write_rows(hidden_out, start, runner.run_block(compressed, hidden))
        safetensors_io.write_atomic(out / UPDATES, updates)
        return {"linears": info}

    @staticmethod
    def _swap(block: torch.nn.Module, linears: dict[str, torch.nn.Module], factors, dtype: torch.dtype) -> torch.nn.Module:
        for name, (up, down) in factors.items():
            old = linears[name]
            in_features, out_features, has_bias = linear_shape(old)
            new = LowRankLinear(in_features, out_features, up.shape[1], has_bias, dtype=dtype, device=old.weight.device)
            new.up.weight.data.copy_(up.to(dtype))
            new.down.weight.data.copy_(down.to(dtype))
            if has_bias:
                new.up.bias.data.copy_(old.bias.data)
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, new)
        return block
