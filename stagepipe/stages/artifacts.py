"""Every on-disk output of the stages: partition names, file names, readers and writers.

A stage imports this module, never a sibling stage: what ``refit`` reads is the list of functions
it calls here. Layout of one finished partition ``stages/<stage>/<partition>/<key16>/``:

==============  ======================  ====================================================
stage           partition(s)            files
==============  ======================  ====================================================
snapshot        all                     ``model/`` (HF directory: config, safetensors, tokenizer)
tokenize        calibration, eval-<d>   ``tokens.zarr`` (``input_ids`` n×T; ``offsets`` for calibration)
capture         layer-NNN               ``hidden.zarr`` (block outputs n×T×d), ``groups.json``
                                        (linear → first linear with the same input), ``stats.zarr``
                                        (``gram.<g>``, ``abs_sum.<g>``, ``abs_max.<g>``; attr ``tokens``)
fisher          head, layer-NNN         ``grad.zarr`` (∂loss/∂block input, n×T×d; not for layer 0),
                                        ``fisher.safetensors`` (``<linear>.A|B|kfac_out|grad_sq``)
decompose       layer-NNN               ``svd.safetensors`` (``<linear>.left|right|sigma``: full-rank
                                        un-whitened factors and the weighted spectrum)
sensitivity     layer-NNN               ``sensitivity.json`` (per matrix: kept, rank, ppl)
train           all                     ``learned/layer-NNN.safetensors`` (``<linear>.up|down`` of the
                                        components a learned method kept), ``history.json``
allocate        all                     ``allocation.json`` (ranks, dropped energy, ratios)
residual        layer-NNN               ``residual.safetensors`` (``<linear>.up|down`` at the rank)
anchor          layer-NNN               ``anchor.safetensors`` (``<linear>.up|down`` at the rank),
                                        ``hidden.zarr`` (the compressed model's block outputs)
refit           layer-NNN               ``refit.safetensors`` (``<linear>.up``), ``hidden.zarr``
                                        (the compressed model's block outputs)
assemble        all                     ``model/`` (the low-rank HF directory)
evaluate        dense, compressed       ``results.json``
report          all                     ``report.json``, ``*.png``
==============  ======================  ====================================================

Each directory also holds ``manifest.json`` (written last); its ``info`` is part of the content
that downstream keys hash, and ``read_results`` is how a stage reads another stage's ``info``.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from stagepipe.engine.stage import ALL, PartitionRef, Work
from stagepipe.io import manifest as manifest_io
from stagepipe.io import safetensors_io, zarr_io
from stagepipe.linalg import WeightedSVD
from stagepipe.methods import LayerStats
from stagepipe.models.blocks import BlockRunner
from stagepipe.stages.requirements import needs

# --------------------------------------------------------------------------- partitions
CALIBRATION = "calibration"
VALIDATION = "validation"  # held-out windows for choosing hyperparameters (calibration.validation)
HEAD = "head"
DENSE, COMPRESSED = "dense", "compressed"


def layer_partition(index: int) -> str:
    return f"layer-{index:03d}"


def layer_index(partition: str) -> int:
    return int(partition.split("-")[1])


def layer_partitions(num_layers: int) -> list[str]:
    return [layer_partition(i) for i in range(num_layers)]


def model_layers(ctx: Any) -> list[str] | None:
    """One partition per decoder layer, or ``None`` while the model's facts are unknown."""
    return None if ctx.model is None else layer_partitions(int(ctx.model.num_hidden_layers))


def eval_partition(name: str) -> str:
    return f"eval-{name}"


def ref(stage: str, partition: str | int = ALL) -> PartitionRef:
    """A partition of a stage; an ``int`` names a decoder layer."""
    return PartitionRef(stage, layer_partition(partition) if isinstance(partition, int) else partition)


def read_results(directory: Path) -> dict[str, Any]:
    """The results (``info``) a stage returned for one finished partition."""
    return manifest_io.read(directory).info


def read_diagnostics(directory: Path) -> dict[str, Any]:
    """The diagnostics a stage measured for one finished partition (repairs, errors, losses): for
    reports and tests; no stage computes with them, so they are outside the content digest."""
    return manifest_io.read(directory).diagnostics


def read_manifest(directory: Path) -> manifest_io.Manifest:
    """A finished partition's whole manifest: results and run facts (timings, peak memory)."""
    return manifest_io.read(directory)


# --------------------------------------------------------------------------- snapshot / assemble
MODEL_DIR = "model"


def model_dir(output: Path) -> Path:
    """The HF model directory inside a ``snapshot`` or ``assemble`` output."""
    return output / MODEL_DIR


# --------------------------------------------------------------------------- tokenize
TOKENS = "tokens.zarr"


def write_windows(out: Path, windows: Any, offsets: Any | None = None) -> None:
    arrays = {"input_ids": windows} if offsets is None else {"input_ids": windows, "offsets": offsets}
    zarr_io.write_atomic(out / TOKENS, arrays)


def read_windows(tokenize_output: Path) -> torch.Tensor:
    """Token windows (n × T, int64) of a ``tokenize`` partition."""
    return torch.from_numpy(zarr_io.read(tokenize_output / TOKENS, "input_ids"))


# --------------------------------------------------------------------------- capture / refit hidden states
HIDDEN = "hidden.zarr"
STATS = "stats.zarr"
GROUPS = "groups.json"


def create_hidden(out: Path, shape: tuple[int, ...], dtype: str, batch: int) -> Any:
    """The array of one block's outputs (the next block's inputs), written batch by batch."""
    return zarr_io.create_array(out / HIDDEN, "hidden", shape, dtype, batch)


def block_inputs(runner: BlockRunner, index: int, ids: torch.Tensor, work: Work, batch: int,
                 source: str = "capture") -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, hidden inputs of block ``index``) per batch of windows: the embeddings for
    block 0, else the outputs of block ``index-1`` as ``source`` stored them among the task's inputs
    (``capture``: the original model; ``refit``: the compressed model's running inputs)."""
    below = None if index == 0 else work.input(source, layer_partition(index - 1))
    return block_input_rows(runner, ids, below, batch)


def block_input_rows(runner: BlockRunner, ids: torch.Tensor, below: Path | None, batch: int,
                     offset: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """``block_inputs`` for windows ``ids`` = rows ``offset:offset+len(ids)`` of the calibration
    (one shard): the embeddings when ``below`` is ``None`` (block 0), else the stored outputs of
    the block below (an output directory holding ``HIDDEN``). ``start`` is the row in the whole set."""
    runner.prepare(ids)
    if below is None:
        for start in range(0, len(ids), batch):
            yield offset + start, runner.embed(ids[start : start + batch])
        return
    array = open_hidden(below)
    for start in range(offset, offset + len(ids), batch):
        yield start, zarr_io.read_rows(array, start, min(start + batch, offset + len(ids)))


def sharded(ctx: Any) -> bool:
    """Whether capture and fisher split their windows (``runtime.shards`` > 1): their partitions
    then fan out (``Stage.fans_out``) and the shard count enters their keys."""
    return ctx.config.runtime.shards > 1


def with_shards(config_slice: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """A sharded stage's config slice: ``runtime.shards`` enters the key only when it is > 1 (the
    sums associate differently), so runs without shards keep their keys."""
    return {**config_slice, "shards": ctx.config.runtime.shards} if sharded(ctx) else config_slice


def shard_label(stage: str, partition: str, shard: int) -> str:
    """A shard job's name (telemetry, test hooks): ``stage@partition#shard-i``."""
    return f"{stage}@{partition}#shard-{shard}"


def add_in_shard_order(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Shards' float64 sums added in shard order (one shard: its sums, untouched); capture's
    per-channel maxima (``abs_max.*``) take the maximum instead."""
    total = dict(parts[0])
    for part in parts[1:]:
        for key, value in part.items():
            total[key] = torch.maximum(total[key], value) if key.startswith("abs_max.") else total[key] + value
    return total


def add_gram(sums: dict[str, torch.Tensor], key: str, x: torch.Tensor) -> None:
    """Add one batch's ``Σ x xᵀ`` (float64, from the inputs as the block computed them) to ``sums[key]``:
    the one way capture and fisher sum an input Gram, so either one's Grams are the same floats."""
    term = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    sums[key] = sums[key] + term.T @ term if key in sums else 0 + term.T @ term


def shard_ranges(n_windows: int, batch: int, shards: int) -> list[tuple[int, int]]:
    """``runtime.shards`` contiguous window ranges of whole batches, as even as batches allow.

    Whole batches keep every batch (and so every float32 product) what it is without shards, and
    make each shard's rows whole chunks of the per-layer arrays, so shards never write one chunk.
    """
    n_batches = -(-n_windows // batch)
    if shards > n_batches:
        raise ValueError(f"runtime.shards: {shards} shards need at least {shards} batches; {n_windows} windows "
                         f"in batches of runtime.batch_size {batch} make {n_batches}")
    base, extra = divmod(n_batches, shards)
    ranges, start = [], 0
    for shard in range(shards):
        stop = min(n_windows, start + (base + (shard < extra)) * batch)
        ranges.append((start, stop))
        start = stop
    return ranges


def open_hidden(output: Path, writable: bool = False) -> Any:
    return zarr_io.open_array(output / HIDDEN, "hidden", writable)


def hidden_readers(stage: str, index: int, num_layers: int, stages: Collection[str]) -> list[PartitionRef]:
    """The partitions that read block ``index``'s outputs as ``stage`` stored them (``HIDDEN``), among
    ``stages`` (those of the pipeline): through ``block_inputs`` the next block's capture, fisher,
    refit, anchor and sensitivity; through ``open_hidden`` anchor's targets and fisher's head. Refit
    and anchor store the compressed model's running inputs, read by their own next partition. A
    transient ``HIDDEN`` is released once these are done and restored when one must run again."""
    following = [] if index == num_layers - 1 else [ref(stage, index + 1)]
    if stage == "capture":
        following = [ref(s, index + 1) for s in ("capture", "fisher", "refit", "anchor", "sensitivity")] if following else []
        following += [ref("anchor", index)] + ([ref("fisher", HEAD)] if index == num_layers - 1 else [])
    return [r for r in following if r.stage in stages]


def hidden_handover(stage: str, ctx: Any, partition: str) -> dict[str, list[PartitionRef]]:
    """``Stage.transient`` of a stage that stores block outputs: ``HIDDEN``, handed over to its
    ``hidden_readers`` among the stages this pipeline runs."""
    readers = hidden_readers(stage, layer_index(partition), int(ctx.model.num_hidden_layers), needs(ctx.config).stage_names())
    return {HIDDEN: readers}


#: per-layer readers of capture's input statistics and of fisher's statistics (same layer)
STATS_READERS = {"capture": ("fisher", "structure", "anchor", "sensitivity", "decompose", "residual"),
                 "fisher": ("decompose", "anchor")}


def statistics_handover(stage: str, ctx: Any, partition: str) -> dict[str, list[PartitionRef]]:
    """Under ``runtime.disk_budget_gb`` a layer's statistics (capture's ``STATS``, fisher's
    ``FISHER``) are hand-overs too: released once the same layer's readers among this pipeline's
    stages are done (restored by running the producer again if one must run again)."""
    if ctx.config.runtime.disk_budget_gb is None:
        return {}
    stages = needs(ctx.config).stage_names()
    readers = [ref(s, partition) for s in STATS_READERS[stage] if s in stages]
    return {STATS if stage == "capture" else FISHER: readers} if readers else {}


def write_input_stats(out: Path, stats: Mapping[str, torch.Tensor], tokens: int, groups: Mapping[str, str]) -> None:
    if stats:
        zarr_io.write_atomic(out / STATS, {k: v.cpu() for k, v in stats.items()}, attrs={"tokens": tokens})
    (out / GROUPS).write_text(json.dumps(groups, indent=1, sort_keys=True))


def read_input_stats(capture_output: Path) -> LayerStats:
    """Input statistics of one block, keyed by every linear (shared tensors for shared inputs)."""
    groups = json.loads((capture_output / GROUPS).read_text())
    stats = LayerStats()
    if not (capture_output / STATS).exists():
        return stats
    tokens = int(zarr_io.attrs(capture_output / STATS)["tokens"])
    arrays = {k: torch.from_numpy(v) for k, v in zarr_io.read(capture_output / STATS).items()}
    for name, group in groups.items():
        stats.tokens[name] = tokens
        for kind, target in (("gram", stats.gram), ("abs_sum", stats.abs_sum), ("abs_max", stats.abs_max)):
            if f"{kind}.{group}" in arrays:
                target[name] = arrays[f"{kind}.{group}"]
    return stats


# --------------------------------------------------------------------------- fisher
GRAD = "grad.zarr"  # gradient of the loss w.r.t. the partition's *input* hidden states
FISHER = "fisher.safetensors"


def create_grad(out: Path, shape: tuple[int, ...], batch: int, dtype: str) -> Any:
    """The gradient at a block boundary, stored in the dtype the block's backward runs in (the
    model's): its reader casts it to that dtype anyway, so a 16-bit model's gradient loses nothing
    in 16 bits and takes half the disk of float32."""
    return zarr_io.create_array(out / GRAD, "grad", shape, dtype, batch)


def open_grad(output: Path, writable: bool = False) -> Any:
    return zarr_io.open_array(output / GRAD, "grad", writable)


def write_fisher(out: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    safetensors_io.write_atomic(out / FISHER, {k: v.cpu().contiguous() for k, v in tensors.items()})


def read_fisher(fisher_output: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """(statistics per linear ``{A, B, kfac_out, grad_sq}``, per-linear diagnostics such as why a
    side is unusable); input Grams that fisher recorded are ``read_layer_stats``'s."""
    return _per_linear(safetensors_io.read(fisher_output / FISHER)), read_diagnostics(fisher_output).get("linears", {})


def _per_linear(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    fisher: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, kind = key.rpartition(".")
        if kind != "gram":
            fisher.setdefault(name, {})[kind] = value
    return fisher


def read_layer_stats(capture_output: Path | None, fisher_output: Path | None) -> LayerStats:
    """One block's statistics for a method: capture's input statistics, fisher's gradient
    statistics, and the input Grams from whichever of the two recorded them (``Needs.gram_in_fisher``:
    fisher stores ``<first linear of an input group>.gram`` and the groups in its results)."""
    stats = read_input_stats(capture_output) if capture_output is not None else LayerStats()
    if fisher_output is None:
        return stats
    tensors, results = safetensors_io.read(fisher_output / FISHER), read_results(fisher_output)
    # a missing Kronecker side is in the file; why it is missing (for the fallback's note) is a diagnostic
    stats.fisher, stats.fisher_info = _per_linear(tensors), read_diagnostics(fisher_output).get("linears", {})
    for name, group in results.get("gram_groups", {}).items():
        stats.gram[name] = tensors[f"{group}.gram"]
        stats.tokens[name] = int(results["tokens"])
    return stats


# --------------------------------------------------------------------------- decompose
WEIGHTED_SVD = "svd.safetensors"


def write_weighted_svd(out: Path, results: Mapping[str, WeightedSVD], stored: Mapping[str, int]) -> None:
    """Each linear's weighted σ in full and its factors' first ``stored[name]`` components (float32)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, result in results.items():
        rank = stored[name]
        tensors[f"{name}.left"] = result.left[:, :rank].float().cpu().contiguous()
        tensors[f"{name}.right"] = result.right[:rank].float().cpu().contiguous()
        tensors[f"{name}.sigma"] = result.sigma.cpu()
    safetensors_io.write_atomic(out / WEIGHTED_SVD, tensors)


def read_weighted_svd(decompose_output: Path, names: list[str]) -> dict[str, WeightedSVD]:
    """The weighted SVD of each named linear as ``decompose`` stored it (float64): σ in full, the
    factors up to the method's ``stored_rank``."""
    raw = safetensors_io.read(decompose_output / WEIGHTED_SVD, [f"{n}.{k}" for n in names for k in ("left", "right", "sigma")])
    return {n: WeightedSVD(sigma=raw[f"{n}.sigma"].double(), left=raw[f"{n}.left"].double(),
                           right=raw[f"{n}.right"].double()) for n in names}


def read_spectra(decompose_output: Path) -> dict[str, tuple[int, int, torch.Tensor]]:
    """(m, n, weighted σ) of every linear of one layer, in name order."""
    linears = read_results(decompose_output)["linears"]
    sigmas = safetensors_io.read(decompose_output / WEIGHTED_SVD, [f"{n}.sigma" for n in linears])
    return {name: (*linears[name]["shape"], sigmas[f"{name}.sigma"]) for name in sorted(linears)}


# --------------------------------------------------------------------------- sensitivity
SENSITIVITY = "sensitivity.json"


def write_sensitivity(out: Path, base_ppl: float, table: Mapping[str, list[dict[str, Any]]]) -> None:
    (out / SENSITIVITY).write_text(json.dumps({"base_ppl": base_ppl, "matrices": table}, indent=1, sort_keys=True))


def read_sensitivity(sensitivity_output: Path) -> dict[str, list[dict[str, Any]]]:
    """Per full matrix name: ``[{kept, rank, ppl}, …]``."""
    return json.loads((sensitivity_output / SENSITIVITY).read_text())["matrices"]


# --------------------------------------------------------------------------- allocate
ALLOCATION = "allocation.json"


def write_allocation(out: Path, ranks: Mapping[str, int | None], dropped: Mapping[str, float],
                     ratios: dict[str, Any], details: dict[str, Any] | None,
                     dims: list[dict[str, int]] | None = None) -> None:
    """Ranks per target matrix, or for a structured method (no matrix factored, ``ranks`` empty) the
    inner dimensions per block (``dims``)."""
    data = {"ranks": ranks, "dropped_energy": dropped, "ratios": ratios, "search": details}
    if dims is not None:
        data["dims"] = dims
    (out / ALLOCATION).write_text(json.dumps(data, indent=1, sort_keys=True))


def read_structure_dims(allocate_output: Path) -> list[dict[str, int]]:
    """Inner dimensions of every block (``intermediate_size``, ``qk_dim``, ``vo_dim``)."""
    return json.loads((allocate_output / ALLOCATION).read_text())["dims"]


def read_ranks(allocate_output: Path) -> dict[str, int | None]:
    """Rank per target matrix (full names; ``None`` = left dense)."""
    return json.loads((allocate_output / ALLOCATION).read_text())["ranks"]


def block_ranks(ranks: Mapping[str, int | None], prefix: str) -> dict[str, int]:
    """The factored linears of one block (full names under ``prefix``), keyed relative to the block."""
    return {full[len(prefix):]: r for full, r in ranks.items() if full.startswith(prefix) and r is not None}


# --------------------------------------------------------------------------- residual / anchor / refit: final factors
RESIDUAL = "residual.safetensors"
ANCHOR = "anchor.safetensors"
REFIT = "refit.safetensors"
STRUCTURE = "block.safetensors"  # a structured method's reduced block (``structure``)


def write_factors(out: Path, file: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """``<linear>.up`` / ``<linear>.down`` tensors of ``residual`` (``RESIDUAL``), ``refit`` (``REFIT``) or
    ``anchor`` (``ANCHOR``; with the refined norm weights under their block-relative names)."""
    safetensors_io.write_atomic(out / file, tensors)


def allocated_factors(decomposed: Path, residual: Path | None,
                      ranks: Mapping[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(up, down) per block-relative linear at its allocated rank: ``residual``'s factors where that
    stage ran, else ``decompose``'s weighted SVD truncated to the rank. The one reader of final
    factors before ``refit``."""
    if residual is not None:
        raw = safetensors_io.read(residual / RESIDUAL, [f"{n}.{k}" for n in ranks for k in ("up", "down")])
        return {n: (raw[f"{n}.up"].double(), raw[f"{n}.down"].double()) for n in ranks}
    spectra = read_weighted_svd(decomposed, list(ranks))
    return {n: spectra[n].factors(r) for n, r in ranks.items()}


def _factor_pairs(raw: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``<linear>.up`` / ``<linear>.down`` tensors as (up, down) per linear (float64)."""
    return {key.removesuffix(".up"): (raw[key].double(), raw[key.removesuffix(".up") + ".down"].double())
            for key in raw if key.endswith(".up")}


def read_anchored(anchor_output: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(up, down) per block-relative linear as the ``anchor`` stage fitted them (float64)."""
    return _factor_pairs(safetensors_io.read(anchor_output / ANCHOR))


def read_anchored_params(anchor_output: Path) -> dict[str, torch.Tensor]:
    """The block's other tensors the ``anchor`` refinement trained (``refine_norms``: the norm
    weights), by block-relative name; empty when it trained only factors."""
    path = anchor_output / ANCHOR
    return safetensors_io.read(path, [k for k in safetensors_io.keys(path) if not k.endswith((".up", ".down"))])


def read_structure(structure_output: Path) -> dict[str, torch.Tensor]:
    """The reduced block's tensors by name relative to the block (``structure``)."""
    return safetensors_io.read(structure_output / STRUCTURE)


def read_refit(refit_output: Path) -> dict[str, torch.Tensor]:
    """Refitted ``up`` factors per block-relative linear."""
    return {key.removesuffix(".up"): value.double() for key, value in safetensors_io.read(refit_output / REFIT).items()}


# --------------------------------------------------------------------------- train: a learned method's factors
LEARNED = "learned"
HISTORY = "history.json"


def write_learned(out: Path, index: int, tensors: Mapping[str, torch.Tensor]) -> None:
    """One layer's ``<linear>.up`` / ``<linear>.down`` as the ``train`` stage learned them."""
    (out / LEARNED).mkdir(exist_ok=True)
    safetensors_io.write_atomic(out / LEARNED / f"{layer_partition(index)}.safetensors", tensors)


def read_learned(train_output: Path, index: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(up, down) per block-relative linear of layer ``index`` (float64)."""
    return _factor_pairs(safetensors_io.read(train_output / LEARNED / f"{layer_partition(index)}.safetensors"))


def read_learned_ranks(train_output: Path) -> dict[str, int]:
    """The learned rank of every target matrix (full names)."""
    return read_results(train_output)["ranks"]


def write_history(out: Path, history: list[dict[str, Any]]) -> None:
    (out / HISTORY).write_text(json.dumps(history))


def read_history(train_output: Path) -> list[dict[str, Any]]:
    """Per training step: phase, loss, soft and hard kept fraction, budget weight, learning rate."""
    return json.loads((train_output / HISTORY).read_text())


# --------------------------------------------------------------------------- checkpoints inside a partition
_META = "__meta__"


def write_checkpoint(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Tensors and JSON metadata as one safetensors file (the metadata rides along as ``uint8``),
    written by temp file + rename: a kill at any moment leaves the previous checkpoint or this one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
    safetensors_io.write_atomic(path, {**tensors, _META: blob})


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Adam's moments as checkpoint tensors (``adam.<i>.<key>``) and its parameter groups (JSON)."""
    state = optimizer.state_dict()
    tensors = {f"adam.{i}.{key}": value.cpu() for i, s in state["state"].items() for key, value in s.items()}
    return tensors, state["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                   param_groups: list[dict[str, Any]], count: int) -> None:
    """Restore what ``optimizer_tensors`` saved for ``count`` parameters (those that had a step)."""
    state = {i: {key: tensors[f"adam.{i}.{key}"] for key in ("step", "exp_avg", "exp_avg_sq")}
             for i in range(count) if f"adam.{i}.step" in tensors}
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, metadata) of a checkpoint, or ``None`` when there is none yet."""
    if not path.is_file():
        return None
    tensors = safetensors_io.read(path)
    meta = json.loads(bytes(tensors.pop(_META).tolist()).decode())
    return tensors, meta


# --------------------------------------------------------------------------- evaluate / report
RESULTS = "results.json"
REPORT = "report.json"


def write_rows(array: Any, start: int, value: torch.Tensor) -> None:
    """Write one batch of rows (hidden states or gradients) into an array made here."""
    zarr_io.write_rows(array, start, value)


def read_rows(array: Any, start: int, stop: int) -> torch.Tensor:
    return zarr_io.read_rows(array, start, stop)
