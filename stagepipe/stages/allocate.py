"""``allocate``: ranks for every target matrix from the weighted spectra and the target.

The configured policy (``stagepipe.allocation``) allocates from decompose's spectra (and, for a
policy that reads it, the sensitivity table), unless a method kind's stage replaces the policy
(``PipelineStage.allocates``: a learned method's trained ranks, a structured method's inner
dimensions); then that stage's ``allocation`` runs here on what it reads. Also the one place the
achieved kept fractions are computed (after rank rounding), by ``accounting.ratio_report``: over
the target matrices, all block linears and the model; with a storage other than 16-bit factors
(Dobi-SVD's remapping) also the memory fraction (``accounting.memory_report``) under ``ratios.memory``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from stagepipe.accounting import ratio_report
from stagepipe.allocation import Candidate, MatrixSpectrum, make_policy
from stagepipe.allocation.base import layer_of
from stagepipe.engine.stage import Context, Read, Work
from stagepipe.errors import ConfigError, StagepipeError
from stagepipe.linalg import MetricCache, weighted_relative_error
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linear_shapes, block_linears, weight_matrix
from stagepipe.models.sources import DTYPES
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import (
    ALLOCATION,
    MODEL_DIR,
    SENSITIVITY,
    WEIGHTED_SVD,
    layer_index,
)
from stagepipe.stagekit.base import STAGES, PipelineStage, register
from stagepipe.stagekit.cost import CostInputs, Estimate
from stagepipe.stagekit.plan import allocator_of


@register
class AllocateStage(PipelineStage):
    name = "allocate"
    version = 2
    description = "ranks per matrix and achieved kept fractions"
    writes = {ALLOCATION: "ranks per matrix (or inner dimensions per block), dropped weighted energy, achieved fractions"}
    #: with a policy that allocates bits it reads the input Grams as decompose does (``read_layer_stats``)
    takes_grams_from_fisher = True

    @classmethod
    def needs(cls, choices) -> dict[str, set[str]]:
        allocator = allocator_of(choices)
        if allocator is not None:
            return {"snapshot": {MODEL_DIR}, **STAGES[allocator].allocation_needs(choices)}
        found = {"snapshot": {MODEL_DIR}, "decompose": {WEIGHTED_SVD}}
        if choices.policy.allocates_bits:  # quantisation errors under each layer's input Gram
            found.update(artifacts.layer_stats_needs(choices.method))
        return {**found, "sensitivity": {SENSITIVITY}} if choices.policy.needs_sensitivity else found

    @staticmethod
    def check(config: Any, model: Any | None) -> None:
        """Before anything runs: a policy that measures quantisation errors needs the input Grams."""
        from stagepipe.allocation import POLICIES
        from stagepipe.methods import make_method

        method = make_method(config.method)
        if POLICIES[config.allocation.policy].allocates_bits and "gram" not in method.activation_stats:
            raise ConfigError(f"allocation.policy: {config.allocation.policy} measures each matrix's quantisation error "
                              f"under its input Gram; {config.method.name} records none (svdllm, kfac_svd, gfwsvd do)")

    def reads(self, ctx: Context, partition: str) -> list[Read]:
        reads = [Read(artifacts.ref("snapshot"), MODEL_DIR)]  # its config; the parameter count in its results
        if ctx.plan.allocator is not None:
            return reads + ctx.plan.stage_class(ctx.plan.allocator).allocation_reads(ctx)
        layers = artifacts.model_layers(ctx) or []
        reads += [Read(artifacts.ref("decompose", p), WEIGHTED_SVD) for p in layers]
        if ctx.plan.policy.needs_sensitivity:
            reads += [Read(artifacts.ref("sensitivity", p), SENSITIVITY) for p in layers]
        if ctx.plan.policy.allocates_bits:  # the input Grams, read as decompose reads them
            reads += [read for p in layers for read in artifacts.layer_stats_reads(ctx.plan, p)]
        return reads

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        slice_ = {"kept_fraction": ctx.config.target.kept_fraction, "allocation": ctx.config.allocation.model_dump()}
        if ctx.plan.allocator is not None:
            slice_.update(ctx.plan.stage_class(ctx.plan.allocator).allocation_slice(ctx))
        if ctx.plan.policy.allocates_bits:  # a byte budget on the quantize_factors grid
            slice_.update(bits_per_weight=ctx.config.target.bits_per_weight,
                          group_size=ctx.config.method.quantize_factors.group_size,
                          error_metric="the method's metric pair")  # was the input Gram alone
        storage = ctx.plan.method.storage()
        if storage != "16-bit":  # keyed only when set: 16-bit outputs keep their keys
            slice_["storage"] = storage
        return slice_

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        """The spectra; with a policy that allocates bits, also one block, its Grams and one matrix's GPTQ
        in float64 in RAM, and three GPTQ sweeps (down, up, dense) per matrix and width."""
        s = c.shapes
        ram = 1e7 + s.layers * sum(min(m, n) for m, n in s.linears) * 8
        if not c.plan.policy.allocates_bits:
            return Estimate(cls.name, 1e6, ram, 0)
        widths = len(c.config.allocation.bits)
        return Estimate(cls.name, 1e6, ram + s.block * c.weight_bytes + c.grams + 4 * 8 * max(m * n + n * n for m, n in s.linears),
                        0, "GPTQ of every matrix at every width (its error model)",
                        flops64=s.layers * widths * sum(3 * (n**3 + 2 * m * n * n) for m, n in s.linears))

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        shapes = block_linear_shapes(ctx.facts)
        n_params = artifacts.read_results(work.input("snapshot"))["n_params"]
        if ctx.plan.allocator is not None:
            return ctx.plan.stage_class(ctx.plan.allocator).allocation(ctx, work, shapes, n_params)
        spectra = []
        sensitivity: list[Candidate] | None = [] if ctx.plan.policy.needs_sensitivity else None
        for ref, directory in sorted(work.inputs.items()):
            if ref.stage == "decompose":
                prefix = ctx.plan.layout.layer_prefix(layer_index(ref.partition))
                spectra += [MatrixSpectrum(prefix + name, m, n, sigma)
                            for name, (m, n, sigma) in artifacts.read_spectra(directory).items()]
            elif ref.stage == "sensitivity":
                sensitivity += [Candidate(matrix, entry["kept"], entry["rank"], entry["ppl"])
                                for matrix, entries in artifacts.read_sensitivity(directory).items() for entry in entries]
        policy = make_policy(ctx.config.allocation, sensitivity)
        bits = None
        if policy.allocates_bits:
            spectra = grid_errors(ctx, work, spectra, policy.bits)
            work.diagnostics["grid_errors"] = {  # (factors, dense) relative errors per width: for reports and tests
                s.name: {str(b): list(e) for b, e in s.grid_errors.items()} for s in spectra}
            qf = ctx.config.method.quantize_factors
            ranks, bits = policy.allocate_with_bits(spectra, ctx.config.target.bits_per_weight, qf.group_size)
        else:
            ranks = policy.allocate(spectra, ctx.config.target.kept_fraction)
        report = ratio_report(shapes, ranks, n_params, ctx.config.target.kept_fraction)
        dropped = {s.name: float((s.sigma[ranks[s.name]:] ** 2).sum()) if ranks[s.name] is not None else 0.0
                   for s in spectra}
        details = policy.details()
        artifacts.write_allocation(work.out, ranks, dropped, report.model_dump(), details, bits=bits)
        return {"ratios": report.model_dump(), "policy": policy.name, "search": details,
                "dense_targets": sorted(n for n, r in ranks.items() if r is None)}

    @classmethod
    def summarize(cls, manifests) -> dict[str, Any]:
        """The achieved fractions, the matrices left dense and what the policy decided beyond the ranks."""
        (manifest,) = manifests.values()
        info = manifest.info
        return {"ratios": info["ratios"], "dense_targets": info["dense_targets"], "search": info.get("search")}

    @classmethod
    def plot(cls, report: dict[str, Any], outputs: dict, out: Path, plt: Any) -> list[str]:
        """The allocated rank per layer and matrix type, beside each layer's cumulative weighted σ²."""
        ranks = artifacts.read_ranks(outputs[artifacts.ref(cls.name)])
        if not any(r is not None for r in ranks.values()):  # structured dimensions (its stage plots them), or no ranks
            return []
        by_type: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for name, rank in ranks.items():
            parts = name.split(".")
            layer = next(int(p) for p in parts if p.isdigit())
            by_type[parts[-1]].append((layer, rank if rank is not None else -1))
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
        for kind, points in sorted(by_type.items()):
            points.sort()
            ax1.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=kind)
        ax1.set(title="allocated rank per layer (-1 = dense)", xlabel="layer", ylabel="rank")
        ax1.legend(fontsize=7)
        for ref, path in sorted(outputs.items()):
            if ref.stage != "decompose":
                continue
            for key, (_, _, value) in artifacts.read_spectra(path).items():
                energy = (value.double() ** 2).cumsum(0) / (value.double() ** 2).sum()
                ax2.plot(energy.numpy(), alpha=0.3, color="C0" if "mlp" in key else "C1")
        ax2.set(title="cumulative weighted σ² (blue mlp, orange attention)", xlabel="rank", ylabel="fraction kept")
        return [artifacts.save_figure(fig, out / artifacts.PLOTS["ranks"], plt)]


def grid_errors(ctx: Context, work: Work, spectra: list[MatrixSpectrum], widths: list[int]) -> list[MatrixSpectrum]:
    """Each spectrum with its measured relative errors at every width, by ``quantize_factors``' own
    quantiser and grid (``rank_bits``' loss model): of its factors at the stored rank (``down`` under the
    input Gram ``H``, then ``up`` under ``D_q H D_qᵀ``, as that stage does) and of the dense matrix.

    Errors are measured in the currency of the spectra: the method's own metric pair, rooted as
    ``decompose`` roots it (``MetricCache``, the same floor), so ``ε·Σσ̃²`` of a dense option *is* its
    weighted loss ``‖Pᵀ E Q‖²`` (for K-FAC: the output-gradient factor on the left too — measuring under
    ``H`` alone priced quantisation ×1.2–4 too high on Gemma-3's attention, docs/quantize). One decoder
    layer in memory at a time."""
    options, method = ctx.config.method.quantize_factors, ctx.plan.method
    runner = BlockRunner(artifacts.model_dir(work.input("snapshot")), torch.device("cpu"), DTYPES[ctx.config.model.dtype])
    by_layer: dict[int, list[MatrixSpectrum]] = defaultdict(list)
    for s in spectra:
        by_layer[layer_of(s.name)].append(s)
    measured = {}
    for index, items in sorted(by_layer.items()):
        prefix, partition = ctx.plan.layout.layer_prefix(index), artifacts.layer_partition(index)
        weights = {name: weight_matrix(m).detach().double()
                   for name, m in block_linears(runner.load_block(index), ctx.config.target.modules).items()}
        names = [s.name[len(prefix):] for s in items]
        found = artifacts.read_weighted_svd(work.input("decompose", partition), names)
        stats = artifacts.read_layer_stats(work.inputs.get(artifacts.ref("capture", partition)),
                                           work.inputs.get(artifacts.ref("fisher", partition)))
        roots = MetricCache(ctx.config.method.floor_rel, torch.device("cpu"))
        for s, name in zip(items, names, strict=True):
            if name not in stats.gram:
                raise StagepipeError(f"{s.name}: rank_bits measures quantisation error under the input Gram, "
                                     "which this method's statistics do not hold")
            h, w, result = stats.gram[name].double(), weights[name], found[name]
            pair = method.metrics(name, tuple(w.shape), stats)
            left, right = roots(pair.left, f"{partition}.{name}.left"), roots(pair.right, f"{partition}.{name}.right")
            up, down = result.factors(result.left.shape[1])
            product = up @ down
            errors = {}
            for b in widths:
                down_q = options.quantize(down, h, b).weight
                up_q = options.quantize(up, down_q @ h @ down_q.T, b).weight
                errors[b] = (weighted_relative_error(up_q @ down_q - product, product, left, right),
                             weighted_relative_error(options.quantize(w, h, b).weight - w, w, left, right))
            measured[s.name] = replace(s, stored_rank=result.left.shape[1], grid_errors=errors)
    return [measured[s.name] for s in spectra]
