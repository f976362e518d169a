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
from typing import Any

import torch

from stagepipe.engine.stage import Context, PartitionRef, Stage, Work
from stagepipe.linalg import single_threaded
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linears, weight_matrix
from stagepipe.models.modeling_lowrank import install_factors
from stagepipe.models.sources import DTYPES, resolve_device
from stagepipe.stages import artifacts
from stagepipe.stages.artifacts import CALIBRATION, layer_index
from stagepipe.stages.requirements import needs


class RefitStage(Stage):
    name = "refit"
    version = 2
    description = "least-squares refit of the up factors on sequentially propagated inputs"

    def partitions(self, ctx: Context) -> list[str] | None:
        return artifacts.model_layers(ctx)

    def dependencies(self, ctx: Context, partition: str) -> list[PartitionRef]:
        index = layer_index(partition)
        deps = [artifacts.ref("snapshot"), artifacts.ref("tokenize", CALIBRATION), artifacts.ref("allocate"),
                artifacts.ref("decompose", partition)]
        if needs(ctx.config).residual:
            deps.append(artifacts.ref("residual", partition))
        if index > 0:
            deps += [artifacts.ref("capture", index - 1), artifacts.ref("refit", index - 1)]
        return deps

    def transient(self, ctx: Context, partition: str) -> dict[str, list[PartitionRef]]:
        """The stored block outputs are a hand-over to the partitions that read them."""
        return artifacts.hidden_handover(self.name, ctx, partition)

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        return {"batch_size": ctx.config.runtime.batch_size, "modules": ctx.config.target.modules,
                "activation_dtype": ctx.config.runtime.activation_dtype}

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        index = layer_index(work.partition)
        device = resolve_device(ctx.config.model.device)
        runner = BlockRunner(artifacts.model_dir(work.input("snapshot")), device, DTYPES[ctx.config.model.dtype])
        ids = artifacts.read_windows(work.input("tokenize", CALIBRATION))
        batch = ctx.config.runtime.batch_size
        prefix = runner.layout.layer_prefix(index)
        ranks = artifacts.block_ranks(artifacts.read_ranks(work.input("allocate")), prefix)
        original = runner.load_block(index)
        linears = block_linears(original, ctx.config.target.modules)
        weights = {n: weight_matrix(linears[n]).detach().clone() for n in ranks}
        residual = work.inputs.get(artifacts.ref("residual", work.partition))
        factors = artifacts.allocated_factors(work.input("decompose", work.partition), residual, ranks)

        # Per batch: the original block on the original inputs gives targets W x; the truncated
        # block on the compressed model's running inputs gives H = down · z. Sums in float64.
        compressed = copy.deepcopy(original)
        for name, (up, down) in factors.items():
            install_factors(compressed, name, up, down)
        gram = {n: torch.zeros(r, r, dtype=torch.float64, device=device) for n, r in ranks.items()}
        cross = {n: torch.zeros(r, weights[n].shape[0], dtype=torch.float64, device=device) for n, r in ranks.items()}
        seen: dict[str, torch.Tensor] = {}
        hooks = [linears[n].register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].detach())) for n in ranks]
        hooks += [compressed.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: seen.__setitem__(f"z:{n}", m.down(a[0].detach()))) for n in ranks]
        with torch.no_grad():
            batches = zip(artifacts.block_inputs(runner, index, ids, work, batch, source="capture"),
                          artifacts.block_inputs(runner, index, ids, work, batch, source="refit"), strict=True)
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
            with single_threaded():  # LAPACK: the same bits with any thread count
                up = torch.linalg.solve(gram[name], cross[name]).T  # (m, r), float64 normal equations
            updates[f"{name}.up"] = up.float().cpu()
            compressed.get_submodule(name).up.weight.data.copy_(up.to(runner.dtype))
            info[name] = {"rank": ranks[name], "relative_change": float(torch.linalg.norm(up.cpu() - before) / torch.linalg.norm(before)),
                          "gram_cond": float(torch.linalg.cond(gram[name]))}

        # outputs of the refitted block: the next block's compressed-path inputs
        hidden_out = artifacts.create_hidden(work.out, (len(ids), ids.shape[1], runner.config.hidden_size),
                                             ctx.config.runtime.activation_dtype, batch)
        with torch.no_grad():
            for start, hidden in artifacts.block_inputs(runner, index, ids, work, batch, source="refit"):
                artifacts.write_rows(hidden_out, start, runner.run_block(compressed, hidden))
        artifacts.write_factors(work.out, artifacts.REFIT, updates)
        work.diagnostics["linears"] = info  # how far each up factor moved, and its conditioning
        return {"ranks": dict(ranks)}
