"""``refit`` (per layer, in order; optional ``method.refit: true``): SVD-LLM's closed-form
least-squares update of each factored linear's ``up`` factor on calibration outputs.

Block i is run twice on the calibration windows: the original block on the original inputs
(``capture``) gives each linear's target outputs ``Y = W x``; the truncated block on the
*compressed* model's running inputs (this stage's block i-1 output) gives its inputs ``z``. With
``H = down · z`` the new ``up`` solves ``min ‖up · H − Y‖_F`` through float64 normal equations
``(Σ H Hᵀ) upᵀ = Σ H Yᵀ`` accumulated over tokens. All linears of a block are refitted from one
pass of the truncated block (their inputs are those of the un-refitted block); the refitted
block's outputs are the next block's inputs. It refits the factors of the stage that would
otherwise be each layer's final form (decompose's at the ranks, or a rank-dependent method's) and
stores both factors, so its outputs are the layers' final form.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from stagepipe.engine.stage import Context, Read, Work
from stagepipe.linalg import single_threaded
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linears, weight_matrix
from stagepipe.models.modeling_lowrank import install_factors
from stagepipe.models.sources import DTYPES, resolve_device
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import (
    ALLOCATION,
    CALIBRATION,
    HIDDEN,
    MODEL_DIR,
    REFIT,
    TOKENS,
    layer_index,
)
from stagepipe.stagekit.base import STAGES, register
from stagepipe.stagekit.cost import CostInputs, Estimate
from stagepipe.stagekit.plan import source_of
from stagepipe.stagekit.streams import SequentialStage, Streams, stream_reads


@register
class RefitStage(SequentialStage):
    name = "refit"
    version = 3
    description = "least-squares refit of the up factors on sequentially propagated inputs"
    writes = {REFIT: "per factored linear: the refitted up and the down it was fitted with",
              HIDDEN: "the refitted block's outputs on the running inputs (the next block's running inputs)"}
    assembly_payload = REFIT

    @classmethod
    def joins(cls, choices) -> bool:
        return bool(choices.config.method.refit)

    @classmethod
    def needs(cls, choices) -> dict[str, set[str]]:
        source = source_of(choices, cls.name)
        return {"snapshot": {MODEL_DIR}, "tokenize": {TOKENS}, "allocate": {ALLOCATION}, "capture": {HIDDEN},
                "refit": {HIDDEN}, source: {STAGES[source].assembly_payload}}

    def reads(self, ctx: Context, partition: str) -> list[Read]:
        index = layer_index(partition)
        source = STAGES[source_of(ctx.plan.choices, RefitStage.name)]
        return [Read(artifacts.ref("snapshot"), MODEL_DIR), Read(artifacts.ref("tokenize", CALIBRATION), TOKENS),
                Read(artifacts.ref("allocate"), ALLOCATION), *source.assembly_reads(ctx, index),
                *stream_reads(self.name, index)]

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        return {"batch_size": ctx.config.runtime.batch_size, "modules": ctx.config.target.modules,
                "activation_dtype": ctx.config.runtime.activation_dtype}

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        """Original + truncated block per layer; the compressed path's block inputs."""
        s = c.shapes
        return Estimate(cls.name, s.layers * c.hidden, c.model_ram * 2 + c.batch_activations * 2,
                        c.gpu(s.block * c.weight_bytes * 2 + c.batch_activations * 2),
                        "original + truncated block per layer; compressed-path block inputs",
                        flops=s.layers * 2 * c.block_pass, flops64=s.layers * 2 * c.tokens * (3 * s.d**2 + s.ff**2))

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        index = layer_index(work.partition)
        device = resolve_device(ctx.config.model.device)
        runner = BlockRunner(artifacts.model_dir(work.input("snapshot")), device, DTYPES[ctx.config.model.dtype])
        streams = Streams(runner, index, artifacts.read_windows(work.input("tokenize", CALIBRATION)), work,
                          ctx.config.runtime.batch_size, self.name)
        ranks = artifacts.block_ranks(artifacts.read_ranks(work.input("allocate")), runner.layout.layer_prefix(index))
        original = runner.load_block(index)
        linears = block_linears(original, ctx.config.target.modules)
        weights = {n: weight_matrix(linears[n]).detach().clone() for n in ranks}
        factors = STAGES[source_of(ctx.plan.choices, RefitStage.name)].layer_factors(ctx, work, index, ranks)

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
            for hidden, running in streams.pairs():
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
            before, down = factors[name]
            with single_threaded():  # LAPACK: the same bits with any thread count
                up = torch.linalg.solve(gram[name], cross[name]).T  # (m, r), float64 normal equations
            # down as it came (float64): assembled, it is rounded once to the model's dtype, as without refit
            updates[f"{name}.up"], updates[f"{name}.down"] = up.float().cpu(), down.cpu()
            compressed.get_submodule(name).up.weight.data.copy_(up.to(runner.dtype))
            info[name] = {"rank": ranks[name], "relative_change": float(torch.linalg.norm(up.cpu() - before) / torch.linalg.norm(before)),
                          "gram_cond": float(torch.linalg.cond(gram[name]))}
        streams.write_outputs(compressed, work.out, ctx.config.runtime.activation_dtype)  # the next block's inputs
        artifacts.write_factors(work.out, REFIT, updates)
        work.diagnostics["linears"] = info  # how far each up factor moved, and its conditioning
        return {"ranks": dict(ranks)}
