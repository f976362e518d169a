"""``anchor`` (per layer, in order; ``sequential`` methods — AA-SVD): the anchored layer objective on
shifted inputs, then optional block refinement.

Block i sees two input streams over the calibration windows: the dense model's block inputs
(``capture``) and the compressed model's (this stage's block i-1 output; the embeddings for block
0). Inside the block the linears are fitted in forward order, one input group at a time (q/k/v,
o, gate/up, down): for a group, the original block on the dense inputs gives the linears' dense
inputs ``Y`` and the block being compressed — with the groups before it already factored — gives
their shifted inputs ``Ŷ``. Float64 sums ``C = Σ y ŷᵀ`` and ``Ĝ = Σ ŷ ŷᵀ`` feed the closed form
``linalg.anchored_svd`` at the allocated rank; the floor of ``Ĝ`` is recorded per linear.

With ``closed_form: input_aware`` the closed form is the base pair's on the dense inputs (the
paper's objective ②: SVD-LLM's factors, as ``decompose`` computes them).

With ``refine_epochs > 0`` the block's factors (with ``refine_norms`` also its norm weights, with
``refine_dense`` the target linears kept dense, stored beside the factors) are then trained with Adam on the mean squared error between the compressed
block's output on the shifted inputs and the dense block's output on the dense inputs
(``capture``'s stored block outputs), linear warm-up then cosine decay to a tenth of the peak
rate, gradient-norm clipping. The calibration block-output
error is measured before training and after every epoch and the best state is kept, so
refinement never increases it. Adam steps float32 master copies (a bfloat16 block on a GPU gets
its gradients cast up and the result rounded back). The optimiser, the masters and the best state
are checkpointed after every epoch in the partition's resume directory: a crash loses at most one
epoch and a resumed run ends with the same factors (bit-identical on CPU).

The refined block's outputs on the shifted inputs are the next block's shifted inputs: the chain
over layers is inherent to the objective, as in ``refit``. Joins for a ``SequentialMethod``; its
factors (and refined norms) are each layer's final form.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from typing import Any

import torch

from stagepipe.engine.stage import Context, Read, Work
from stagepipe.errors import ConfigError, MetricError
from stagepipe.linalg import MetricCache, anchored_svd, weighted_svd
from stagepipe.methods import SequentialMethod
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linears, layout_for, weight_matrix
from stagepipe.models.modeling_lowrank import install_factors
from stagepipe.models.sources import DTYPES, resolve_device
from stagepipe.schedules import cosine_to_tenth
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import (
    ALLOCATION,
    ANCHOR,
    CALIBRATION,
    FISHER,
    GROUPS,
    HIDDEN,
    MODEL_DIR,
    REFINE_CHECKPOINT,
    STATS,
    TOKENS,
    layer_index,
)
from stagepipe.stagekit.base import register
from stagepipe.stagekit.checkpoints import ResumableAdam
from stagepipe.stagekit.cost import CostInputs, Estimate
from stagepipe.stagekit.streams import SequentialStage, Streams, stream_reads


@register
class AnchorStage(SequentialStage):
    name = "anchor"
    version = 2
    description = "anchored reduced-rank regression on shifted inputs (+ block refinement), layer by layer"
    writes = {ANCHOR: "per factored linear: up and down at its rank; the refined norm weights",
              HIDDEN: "the compressed block's outputs on the shifted inputs (the next block's shifted inputs)"}
    assembly_payload = ANCHOR

    @classmethod
    def joins(cls, choices) -> bool:
        return isinstance(choices.method, SequentialMethod)

    @classmethod
    def needs(cls, choices) -> dict[str, set[str]]:
        found = {"snapshot": {MODEL_DIR}, "tokenize": {TOKENS}, "allocate": {ALLOCATION},
                 "capture": {HIDDEN, STATS, GROUPS}, "anchor": {HIDDEN}}
        return {**found, "fisher": {FISHER}} if choices.method.needs_gradients else found

    @staticmethod
    def check(config: Any, model: Any | None) -> None:
        """Before anything runs: a refinement under the block-output Fisher needs the K-FAC factor
        of the block's last residual write, so ``target.modules`` must include that linear."""
        if getattr(config.method, "refine_metric", "euclidean") != "kfac_out" or model is None:
            return
        residual_out = layout_for(model.model_type).residual_out
        if residual_out is None:
            raise ConfigError(f"method.refine_metric: kfac_out needs a linear that writes the block output; in "
                              f"{model.model_type!r} a norm follows the last linear (use euclidean)")
        if not config.target.modules:
            return
        if not any(re.search(pattern, residual_out) for pattern in config.target.modules):
            raise ConfigError(f"method.refine_metric: kfac_out reads the K-FAC output factor of {residual_out!r} (the "
                              "block's last residual write); add it to target.modules")

    def reads(self, ctx: Context, partition: str) -> list[Read]:
        reads = [Read(artifacts.ref("snapshot"), MODEL_DIR), Read(artifacts.ref("tokenize", CALIBRATION), TOKENS),
                 Read(artifacts.ref("allocate"), ALLOCATION), Read(artifacts.ref("capture", partition), GROUPS),
                 Read(artifacts.ref("capture", partition), STATS)]
        if ctx.plan.method.needs_gradients:
            reads.append(Read(artifacts.ref("fisher", partition), FISHER))
        return reads + stream_reads(self.name, layer_index(partition), targets=True)

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        return {"method": ctx.plan.method.sequential_options(), "batch_size": ctx.config.runtime.batch_size,
                "modules": ctx.config.target.modules, "activation_dtype": ctx.config.runtime.activation_dtype}

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        """Original + compressed block, one pass pair per input group, the closed form's SVDs, and
        ``refine_epochs`` × (forward + backward + an error pass) of the block. FLOPs: input moments
        (≈2.5 passes: dense and compressed, stopped at each group's input), block error and outputs
        (2), per refinement epoch fwd + bwd + error (≈4); float64: the closed form's factorisations."""
        s = c.shapes
        epochs = getattr(c.config.method, "refine_epochs", 0)
        flops = s.layers * c.block_pass * (2.5 + 2 + 4 * epochs)
        flops64 = s.layers * sum(9 * (m**3 + n**3) + 4 * m * n * (m + n) + 14 * m * n * min(m, n) for m, n in s.linears)
        train = (s.block * 4 * 4 + c.batch_activations * 4) if epochs else 0  # fp32 factors + Adam moments + activations
        ram = c.model_ram + s.block * c.weight_bytes + 2 * c.batch_activations + train
        return Estimate(cls.name, s.layers * c.hidden, ram,
                        c.gpu(2 * s.block * c.weight_bytes + 2 * c.batch_activations + train),
                        f"{flops / 1e12:.1f} TFLOP of block linears ({epochs} refinement epochs); shifted block inputs",
                        flops=flops, flops64=flops64)

    @classmethod
    def layer_params(cls, ctx: Context, work: Work, layer: int) -> dict[str, torch.Tensor]:
        return artifacts.read_block_params(work.input(cls.name, artifacts.layer_partition(layer)), ANCHOR)

    @classmethod
    def summarize(cls, manifests) -> dict[str, Any]:
        """The floor each shifted-input Gram (and each output-side metric) needed, per matrix."""
        repairs = [{"matrix": f"{ref.partition}.{name}", "side": side, **item[side]}
                   for ref, manifest in sorted(manifests.items()) for name, item in manifest.diagnostics.get("linears", {}).items()
                   for side in ("left", "right") if item[side].get("n_floored")]
        return {"repairs": repairs}

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        method = ctx.plan.method
        cfg = ctx.config.method
        index = layer_index(work.partition)
        runner = BlockRunner(artifacts.model_dir(work.input("snapshot")), resolve_device(ctx.config.model.device),
                             DTYPES[ctx.config.model.dtype])
        ranks = artifacts.block_ranks(artifacts.read_ranks(work.input("allocate")), runner.layout.layer_prefix(index))
        original = runner.load_block(index)
        linears = block_linears(original, ctx.config.target.modules)
        groups = artifacts.read_results(work.input("capture", work.partition))["groups"]
        stats = artifacts.read_layer_stats(work.input("capture", work.partition),
                                           work.input("fisher", work.partition) if method.needs_gradients else None)
        metric = None
        if cfg.refine_epochs and cfg.refine_metric == "kfac_out":
            metric = _block_output_metric(stats, runner.layout.residual_out, work.partition, runner.device)
        streams = _AnchorStreams(runner, index, artifacts.read_windows(work.input("tokenize", CALIBRATION)), work,
                                 ctx.config.runtime.batch_size, metric)
        compressed = copy.deepcopy(original)
        factor = MetricCache(cfg.floor_rel, runner.device)
        info: dict[str, Any] = {}
        input_aware = cfg.closed_form == "input_aware"
        for group in dict.fromkeys(groups[name] for name in linears if name in ranks):
            members = [name for name in linears if name in ranks and groups[name] == group]
            if not input_aware:
                cross, shifted_gram = streams.input_moments(original, compressed, group)
                cross = cfg.anchor_weight * cross + (1 - cfg.anchor_weight) * shifted_gram
                right = factor(shifted_gram, f"{work.partition}.{group}.shifted_gram")
            for name in members:
                w = weight_matrix(linears[name]).detach().to(runner.device, torch.float64)
                pair = method.metrics(name, tuple(w.shape), stats)
                left = factor(pair.left, f"{work.partition}.{name}.left")
                if input_aware:  # ②: the base pair's closed form on the dense inputs, as decompose computes it
                    right = factor(pair.right, f"{work.partition}.{group}.gram")
                    result = weighted_svd(w, left, right, getattr(torch, cfg.svd_dtype))
                else:
                    result = anchored_svd(w, cross, left, right, getattr(torch, cfg.svd_dtype))
                up, down = result.factors(ranks[name])
                install_factors(compressed, name, up, down)
                info[name] = {"rank": ranks[name], "right": right.repair, "left": left.repair if left else {"kind": "identity"},
                              "dropped_weighted_energy_rel": result.dropped_energy(ranks[name]) / max(float((result.sigma**2).sum()), 1e-300)}
        # the final block's outputs on the shifted inputs are the next block's inputs: written by the
        # same pass that measures the final block error
        hidden_out = artifacts.create_hidden(work.out, streams.hidden_shape, ctx.config.runtime.activation_dtype,
                                             streams.batch)
        refined = bool(cfg.refine_epochs and ranks)
        dense_kept = [name for name in linears if name not in ranks] if refined and cfg.refine_dense else []
        if refined:
            closed_form = streams.block_error(compressed)
            block: dict[str, Any] = {"rel_err_closed_form": closed_form, "refined_dense": dense_kept,
                                     **_Refinement(cfg, compressed, list(ranks), streams, work, dense_kept).run(closed_form)}
            block["rel_err_final"] = streams.block_error(compressed, write_to=hidden_out)  # the best epoch's
        else:
            error = streams.block_error(compressed, write_to=hidden_out)
            block = {"rel_err_closed_form": error, "rel_err_final": error}
        factors = {}
        for name in ranks:
            module = compressed.get_submodule(name)
            factors[f"{name}.up"] = module.up.weight.detach().float().cpu()
            factors[f"{name}.down"] = module.down.weight.detach().float().cpu()
        if cfg.refine_norms:  # only with refine_epochs (the config says so)
            factors.update({name: param.detach().float().cpu() for name, param in norm_parameters(compressed)})
        for name in dense_kept:  # by block-relative name: assembled over the dense weight
            factors[f"{name}.weight"] = compressed.get_submodule(name).weight.detach().float().cpu()
        artifacts.write_factors(work.out, ANCHOR, factors)
        work.diagnostics.update(linears=info, block=block)  # repairs and block errors: measured, not read
        return {"ranks": dict(ranks)}


def norm_parameters(block: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The block's normalisation parameters (RMSNorm / LayerNorm weights and biases) by
    block-relative name, in module order: what ``refine_norms`` trains beside the factors."""
    return [(f"{module_name}.{name}", param) for module_name, module in block.named_modules()
            if "norm" in type(module).__name__.lower() for name, param in module.named_parameters(recurse=False)]


def _block_output_metric(stats: Any, residual_out: str, partition: str, device: torch.device) -> torch.Tensor:
    """``F·d/tr F`` (float32) with ``F = E[g gᵀ]`` the gradient at the block output: the K-FAC
    output factor of the block's last residual write (its output gradient *is* the block-output
    gradient). Scaled so that ``δᵀFδ/d`` is on the scale of the mean squared error."""
    factor = stats.fisher.get(residual_out, {}).get("kfac_out")
    if factor is None:
        raise MetricError(f"{partition}: refine_metric kfac_out needs the K-FAC output factor of {residual_out!r} "
                          "(the block's last residual write); add it to target.modules")
    return (factor * (factor.shape[0] / float(torch.trace(factor)))).to(device, torch.float32)


def _weighted_square(x: torch.Tensor, metric: torch.Tensor | None) -> torch.Tensor:
    """``x ⊙ x`` or, under a metric ``M``, ``(x M) ⊙ x`` (summed over the last axis: ``xᵀ M x``)."""
    return x * x if metric is None else (x @ metric) * x


class _Reached(Exception):
    """Raised by a forward pre-hook once the wanted linear's input is seen: stops the block pass."""


class _AnchorStreams(Streams):
    """The calibration windows of one block, batch by batch: dense inputs (``capture``), shifted
    inputs (``anchor`` of the block below) and dense outputs (``capture`` of this block), with the
    moments and the block error the objective and the refinement need."""

    def __init__(self, runner: BlockRunner, index: int, ids: torch.Tensor, work: Work, batch: int,
                 metric: torch.Tensor | None = None) -> None:
        super().__init__(runner, index, ids, work, batch, "anchor")
        self.metric = metric  # of the block-output error (None: Euclidean)

    def shifted(self, batch: int | None = None):
        return self.running(batch)

    @torch.no_grad()
    def input_moments(self, original: torch.nn.Module, compressed: torch.nn.Module,
                      linear: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(C = E[y ŷᵀ], Ĝ = E[ŷ ŷᵀ]) of ``linear``'s dense inputs y and shifted inputs ŷ, float64."""
        seen: dict[str, torch.Tensor] = {}

        def keep(key: str):
            def hook(module: torch.nn.Module, args: tuple) -> None:
                seen[key] = args[0]
                raise _Reached  # the rest of the block is not needed for this input group

            return hook

        hooks = [original.get_submodule(linear).register_forward_pre_hook(keep("y")),
                 compressed.get_submodule(linear).register_forward_pre_hook(keep("s"))]
        cross = gram = None
        tokens = 0
        try:
            for dense, shifted in self.pairs():
                for block, hidden in ((original, dense), (compressed, shifted)):
                    with contextlib.suppress(_Reached):
                        self.runner.run_block(block, hidden)
                y = seen["y"].reshape(-1, seen["y"].shape[-1]).double()
                s = seen["s"].reshape(-1, seen["s"].shape[-1]).double()
                cross = y.T @ s if cross is None else cross + y.T @ s
                gram = s.T @ s if gram is None else gram + s.T @ s
                tokens += len(y)
        finally:
            for hook in hooks:
                hook.remove()
        return cross / tokens, gram / tokens

    @torch.no_grad()
    def block_error(self, compressed: torch.nn.Module, write_to: Any | None = None) -> float:
        """``Σ‖f̂(ŷ) − f(y)‖² / Σ‖f(y)‖²`` over the calibration windows (float64 sums; norms under
        the refinement metric when there is one); with ``write_to`` (a hidden-state array) the outputs
        ``f̂(ŷ)`` are written there too."""
        error = norm = 0.0
        metric = None if self.metric is None else self.metric.double()
        for start, shifted in self.shifted():
            output = self.runner.run_block(compressed, shifted)
            if write_to is not None:
                artifacts.write_rows(write_to, start, output)
            out = output.float()
            target = self.target(start)
            error += float(_weighted_square((out - target).double(), metric).sum())
            norm += float(_weighted_square(target.double(), metric).sum())
        return error / norm


class _Refinement:
    """Adam on the block's factors (with ``refine_norms`` its norms, with ``refine_dense`` its
    dense-kept target linears) against the dense block output, best epoch kept, checkpointed.

    Adam (``ResumableAdam``) updates float32 *master* copies of the factors: for a float32 block
    they are the block's own parameters; for a bfloat16 block (GPU) the gradients are cast up, the
    step is taken in float32 and the result rounded into the block, so small updates are not lost
    to bf16 rounding.
    """

    def __init__(self, cfg: Any, block: torch.nn.Module, names: list[str], streams: _AnchorStreams, work: Work,
                 dense: list[str]) -> None:
        self.cfg, self.block, self.streams, self.work = cfg, block, streams, work
        self.params = [getattr(block.get_submodule(n), part).weight for n in names for part in ("up", "down")]
        self.params += [param for _, param in norm_parameters(block)] if cfg.refine_norms else []
        self.params += [block.get_submodule(n).weight for n in dense]  # the dense-kept targets (refine_dense)
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone() for p in self.params]
        self.batch = cfg.refine_batch or streams.batch
        self.steps_per_epoch = math.ceil(len(streams.ids) / self.batch)
        self.total = cfg.refine_epochs * self.steps_per_epoch

    def rate(self, step: int) -> float:
        """Linear warm-up to ``refine_lr``, then cosine decay to a tenth of it."""
        return cosine_to_tenth(self.cfg.refine_lr, step, 0, self.total, int(self.cfg.refine_warmup * self.total))

    def run(self, start_error: float) -> dict[str, Any]:
        for param in self.block.parameters():
            param.requires_grad_(False)
        for param in self.params:
            param.requires_grad_(True)
        adam = ResumableAdam(self.masters, self.cfg.refine_lr, self.work.resume / REFINE_CHECKPOINT, "refine-saved")
        epoch, history, best = self._resume(adam, start_error)
        while epoch < self.cfg.refine_epochs:
            for step, (start, shifted) in enumerate(self.streams.shifted(self.batch)):
                out = self.streams.runner.run_block(self.block, shifted).float()
                target = self.streams.target(start, self.batch)
                if self.streams.metric is None:
                    loss = torch.nn.functional.mse_loss(out, target)
                else:
                    loss = _weighted_square(out - target, self.streams.metric).mean()
                adam.zero_grad()
                loss.backward()
                for param, master in zip(self.params, self.masters, strict=True):
                    if master is not param:
                        master.grad, param.grad = param.grad.float(), None
                torch.nn.utils.clip_grad_norm_(self.masters, self.cfg.refine_clip)
                adam.step(self.rate(epoch * self.steps_per_epoch + step))
                self._load(self.masters)
            epoch += 1
            history.append(self.streams.block_error(self.block))
            if history[-1] < history[best["epoch"]]:
                best = {"epoch": epoch, "state": [m.detach().clone() for m in self.masters]}
            tensors = {f"param.{i}": m.detach() for i, m in enumerate(self.masters)}
            tensors.update({f"best.{i}": t for i, t in enumerate(best["state"])})
            adam.save(tensors, {"epoch": epoch, "history": history, "best_epoch": best["epoch"]})
        self._load(best["state"])
        for param in self.params:
            param.requires_grad_(False)
        return {"rel_err_refined": history[best["epoch"]], "refine_history": history, "refine_best_epoch": best["epoch"]}

    def _resume(self, adam: ResumableAdam, start_error: float) -> tuple[int, list[float], dict[str, Any]]:
        found = adam.resume()
        if found is None:
            return 0, [start_error], {"epoch": 0, "state": [m.detach().clone() for m in self.masters]}
        tensors, meta = found
        with torch.no_grad():
            for i, master in enumerate(self.masters):
                master.copy_(tensors[f"param.{i}"])
        self._load(self.masters)
        self.work.telemetry["resumed_from_epoch"] = meta["epoch"]
        best = {"epoch": meta["best_epoch"], "state": [tensors[f"best.{i}"] for i in range(len(self.params))]}
        return meta["epoch"], meta["history"], best

    def _load(self, values: list[torch.Tensor]) -> None:
        """Copy float32 values (masters or the best state) into the block's factors."""
        with torch.no_grad():
            for param, value in zip(self.params, values, strict=True):
                if value is not param:
                    param.copy_(value)
