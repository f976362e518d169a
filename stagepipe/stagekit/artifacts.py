"""The name, writer and reader of every file a stage leaves on disk.

A stage imports this module, never a sibling stage: what ``refit`` reads is the list of functions
it calls here. Layout of one finished partition ``stages/<stage>/<partition>/<key16>/``:

==============  ======================  ====================================================
stage           partition(s)            files
==============  ======================  ====================================================
snapshot        all                     ``model/`` (HF directory: config, safetensors, tokenizer)
tokenize        calibration,            ``tokens.zarr`` (``input_ids`` n×T; ``offsets`` for calibration)
                validation, eval-<d>
capture         layer-NNN               ``hidden.zarr`` (block outputs n×T×d), ``groups.json``
                                        (linear → first linear with the same input), ``stats.zarr``
                                        (``gram.<g>``, ``abs_sum.<g>``, ``abs_max.<g>``; attr ``tokens``)
fisher          head, layer-NNN         ``grad.zarr`` (∂loss/∂block input, n×T×d; not for layer 0),
                                        ``fisher.safetensors`` (``<linear>.A|B|kfac_out|grad_sq``,
                                        ``<linear>.gram`` when fisher records the Grams)
decompose       layer-NNN               ``svd.safetensors`` (``<linear>.left|right|sigma``: un-whitened
                                        factors up to the stored rank and the full weighted spectrum)
sensitivity     layer-NNN               ``sensitivity.json`` (per matrix: kept, rank, ppl)
train           all                     ``learned/layer-NNN.safetensors`` (``<linear>.up|down`` of the
                                        components a learned method kept), ``history.json``
allocate        all                     ``allocation.json`` (ranks or inner dims, dropped energy, ratios)
rank_factors    layer-NNN               ``rank_factors.safetensors`` (``<linear>.up|down`` at the rank)
structure       layer-NNN               ``structured_block.safetensors`` (the block's smaller matrices)
quantize        layer-NNN               ``quantized.safetensors`` (``<linear>.weight_packed|weight_scale|
                                        weight_shape``: compressed-tensors' pack-quantized layout)
anchor          layer-NNN               ``anchor.safetensors`` (``<linear>.up|down`` at the rank, refined
                                        norm weights), ``hidden.zarr`` (the compressed model's block outputs)
refit           layer-NNN               ``refit.safetensors`` (``<linear>.up|down``: refitted up),
                                        ``hidden.zarr`` (the compressed model's block outputs)
assemble        all                     ``model/`` (the compressed HF directory: ``layer-NNN.safetensors``,
                                        ``rest.safetensors``, the index, ``config.json``, the modeling file)
evaluate        dense, compressed       ``results.json``
zeroshot        dense-<task>,           ``results.json`` (lm-eval's metrics and standard errors, chance,
                compressed-<task>       per-document scores)
report          all                     ``report.json``, ``ranks_spectra.png`` | ``structure.png``,
                                        ``perplexity.png``, ``training.png``
==============  ======================  ====================================================

Inside a partition's resume directory (``Work.resume``, while it runs and after a crash):
fisher's ``sweeps.safetensors``, anchor's ``refine.safetensors``, train's ``train.safetensors``.
Each output directory also holds ``manifest.json`` (written last) and ``.stamps.json`` (``io.manifest``);
the manifest's ``info`` is part of the content that downstream keys hash, and ``read_results`` is how
a stage reads another stage's ``info``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from stagepipe.engine.stage import ALL, PartitionRef, Read
from stagepipe.io import manifest as manifest_io
from stagepipe.io import safetensors_io, zarr_io
from stagepipe.linalg import WeightedSVD
from stagepipe.methods import LayerStats

# --------------------------------------------------------------------------- partitions
CALIBRATION = "calibration"
VALIDATION = "validation"  # held-out windows for choosing hyperparameters (calibration.validation)
HEAD = "head"
DENSE, COMPRESSED, BASE = "dense", "compressed", "base"
#: the stage whose model directory each evaluated model is (``base``: the model a fine-tune started from)
MODEL_STAGE = {DENSE: "snapshot", BASE: "base", COMPRESSED: "assemble"}


def layer_partition(index: int) -> str:
    return f"layer-{index:03d}"


def layer_index(partition: str) -> int:
    return int(partition.split("-")[1])


def layer_partitions(num_layers: int) -> list[str]:
    return [layer_partition(i) for i in range(num_layers)]


def model_layers(ctx: Any) -> list[str] | None:
    """One partition per decoder layer, or ``None`` while the model's facts are unknown."""
    return None if ctx.facts is None else layer_partitions(num_layers(ctx))


def num_layers(ctx: Any) -> int:
    return int(ctx.facts.num_hidden_layers)


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
MODEL_INDEX = "model.safetensors.index.json"
MODEL_CONFIG = "config.json"
REST_SHARD = "rest.safetensors"  # the assembled model's tensors outside the blocks
#: the snapshot's files an assembled model copies: tokenizer and generation settings
TOKENIZER_FILES = ("tokenizer", "special_tokens", "generation_config", "vocab", "merges")


def model_dir(output: Path) -> Path:
    """The HF model directory inside a ``snapshot`` or ``assemble`` output."""
    return output / MODEL_DIR


def layer_shard_name(index: int) -> str:
    """The assembled model's shard of decoder block ``index``."""
    return f"{layer_partition(index)}.safetensors"


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


def open_hidden(output: Path, writable: bool = False) -> Any:
    return zarr_io.open_array(output / HIDDEN, "hidden", writable)


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


def layer_stats_needs(method: Any) -> dict[str, set[str]]:
    """What ``read_layer_stats`` reads for a method, as a stage's ``needs``: capture's statistics and
    groups, fisher's file (which holds the input Grams when ``Plan.gram_in_fisher``)."""
    found: dict[str, set[str]] = {}
    if method.activation_stats:
        found["capture"] = {STATS, GROUPS}
    if method.needs_gradients:
        found["fisher"] = {FISHER}
    return found


def layer_stats_reads(plan: Any, partition: str) -> list[Read]:
    """``layer_stats_needs``' reads of one layer: capture's statistics only when capture records some."""
    method = plan.method
    reads = []
    if method.activation_stats:
        reads.append(Read(ref("capture", partition), GROUPS))
        if plan.capture_stats:
            reads.append(Read(ref("capture", partition), STATS))
    if method.needs_gradients:
        reads.append(Read(ref("fisher", partition), FISHER))
    return reads


def read_layer_stats(capture_output: Path | None, fisher_output: Path | None) -> LayerStats:
    """One block's statistics for a method: capture's input statistics, fisher's gradient
    statistics, and the input Grams from whichever of the two recorded them (``Plan.gram_in_fisher``:
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


# --------------------------------------------------------------------------- grid_errors
GRID_ERRORS = "grid_errors.json"
#: the metrics a grid error is measured in: the method's own pair (the spectra's currency), the input Gram alone
ERROR_METRICS = ("method", "input_gram")
Errors = dict[int, tuple[float, float]]  # width → (factors' relative error, dense relative error)


def write_grid_errors(out: Path, measured: Mapping[str, tuple[int, Mapping[str, Errors]]]) -> None:
    """Per linear (relative to its block): the stored rank its factors were measured at, and per
    metric and width the relative errors ``(factors, dense)`` on the grid (``rank_bits``' loss model)."""
    data = {name: {"stored_rank": rank,
                   "errors": {metric: {str(b): list(e) for b, e in table.items()} for metric, table in errors.items()}}
            for name, (rank, errors) in measured.items()}
    (out / GRID_ERRORS).write_text(json.dumps(data, indent=1, sort_keys=True))


def read_grid_errors(grid_errors_output: Path, metric: str) -> dict[str, tuple[int, Errors]]:
    """``write_grid_errors``' table in one metric: name → (stored rank, width → (factors', dense error))."""
    data = json.loads((grid_errors_output / GRID_ERRORS).read_text())
    return {name: (entry["stored_rank"], {int(b): (e[0], e[1]) for b, e in entry["errors"][metric].items()})
            for name, entry in data.items()}


# --------------------------------------------------------------------------- allocate
ALLOCATION = "allocation.json"


def write_allocation(out: Path, ranks: Mapping[str, int | None], dropped: Mapping[str, float],
                     ratios: dict[str, Any], details: dict[str, Any] | None,
                     dims: list[dict[str, int]] | None = None, bits: Mapping[str, int] | None = None) -> None:
    """Ranks per target matrix, or for a structured method (no matrix factored, ``ranks`` empty) the
    inner dimensions per block (``dims``); with a policy that allocates bits, each matrix's width."""
    data = {"ranks": ranks, "dropped_energy": dropped, "ratios": ratios, "search": details}
    if dims is not None:
        data["dims"] = dims
    if bits is not None:
        data["bits"] = bits
    (out / ALLOCATION).write_text(json.dumps(data, indent=1, sort_keys=True))


def read_structure_dims(allocate_output: Path) -> list[dict[str, int]]:
    """Inner dimensions of every block (``intermediate_size``, ``qk_dim``, ``vo_dim``)."""
    return json.loads((allocate_output / ALLOCATION).read_text())["dims"]


def read_ranks(allocate_output: Path) -> dict[str, int | None]:
    """Rank per target matrix (full names; ``None`` = left dense)."""
    return json.loads((allocate_output / ALLOCATION).read_text())["ranks"]


def read_bits(allocate_output: Path) -> dict[str, int]:
    """Bit width per target matrix (full names) when the policy chose them (``rank_bits``), else empty."""
    return json.loads((allocate_output / ALLOCATION).read_text()).get("bits") or {}


def block_ranks(ranks: Mapping[str, int | None], prefix: str) -> dict[str, int]:
    """The factored linears of one block (full names under ``prefix``), keyed relative to the block."""
    return {full[len(prefix):]: r for full, r in ranks.items() if full.startswith(prefix) and r is not None}


# --------------------------------------------------------------------------- final factors: rank_factors / anchor / refit / structure
RANK_FACTORS = "rank_factors.safetensors"
ANCHOR = "anchor.safetensors"
REFIT = "refit.safetensors"
STRUCTURED_BLOCK = "structured_block.safetensors"  # a structured method's smaller block (``structure``)
QUANTIZED = "quantized.safetensors"  # a quantising method's packed linears (``quantize``)
QUANTIZED_FACTORS = "quantized_factors.safetensors"  # the final factors on an integer grid (``quantize_factors``)


def write_factors(out: Path, file: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """``<linear>.up`` / ``<linear>.down`` tensors (and, for ``anchor``, the refined norm weights
    under their block-relative names) of ``rank_factors``, ``anchor`` or ``refit``; a structured
    block's tensors (``STRUCTURED_BLOCK``)."""
    safetensors_io.write_atomic(out / file, tensors)


def truncated_factors(decompose_output: Path, ranks: Mapping[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(up, down) per block-relative linear: ``decompose``'s weighted SVD truncated at each rank."""
    spectra = read_weighted_svd(decompose_output, list(ranks))
    return {n: spectra[n].factors(r) for n, r in ranks.items()}


def read_factors(output: Path, file: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(up, down) per block-relative linear of a factor file (float64)."""
    raw = safetensors_io.read(output / file)
    return {key.removesuffix(".up"): (raw[key].double(), raw[key.removesuffix(".up") + ".down"].double())
            for key in raw if key.endswith(".up")}


def read_block_params(output: Path, file: str) -> dict[str, torch.Tensor]:
    """A factor file's other tensors, by block-relative name (``anchor``'s refined norm weights);
    empty when it holds only factors."""
    path = output / file
    return safetensors_io.read(path, [k for k in safetensors_io.keys(path) if not k.endswith((".up", ".down"))])


def read_structured_block(structure_output: Path) -> dict[str, torch.Tensor]:
    """The smaller block's tensors by name relative to the block (``structure``)."""
    return safetensors_io.read(structure_output / STRUCTURED_BLOCK)


def read_quantized(quantize_output: Path, file: str = QUANTIZED) -> dict[str, torch.Tensor]:
    """A block's quantised linears by block-relative ``<linear>.<compressed-tensors parameter>``
    (``quantize``; ``quantize_factors``: ``<linear>.down.<parameter>`` / ``<linear>.up.<parameter>`` for
    a factored linear)."""
    return safetensors_io.read(quantize_output / file)


# --------------------------------------------------------------------------- train: a learned method's factors
LEARNED = "learned"
HISTORY = "history.json"


def write_learned(out: Path, index: int, tensors: Mapping[str, torch.Tensor]) -> None:
    """One layer's ``<linear>.up`` / ``<linear>.down`` as the ``train`` stage learned them."""
    (out / LEARNED).mkdir(exist_ok=True)
    safetensors_io.write_atomic(out / LEARNED / f"{layer_partition(index)}.safetensors", tensors)


def read_learned(train_output: Path, index: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(up, down) per block-relative linear of layer ``index`` (float64)."""
    return read_factors(train_output / LEARNED, f"{layer_partition(index)}.safetensors")


def read_learned_params(train_output: Path, index: int) -> dict[str, torch.Tensor]:
    """Layer ``index``'s other learned tensors by block-relative name (SoCo's dense-kept ``<linear>.weight``);
    empty for a layer with no target."""
    file = f"{layer_partition(index)}.safetensors"
    return read_block_params(train_output / LEARNED, file) if (train_output / LEARNED / file).exists() else {}


def read_learned_ranks(train_output: Path) -> dict[str, int | None]:
    """The learned rank of every target matrix (full names; ``None``: kept dense)."""
    return read_results(train_output)["ranks"]


def write_history(out: Path, history: list[dict[str, Any]]) -> None:
    (out / HISTORY).write_text(json.dumps(history))


def read_history(train_output: Path) -> list[dict[str, Any]]:
    """Per training step: phase, loss, soft and hard kept fraction, budget weight, learning rate."""
    return json.loads((train_output / HISTORY).read_text())


# --------------------------------------------------------------------------- resume files (inside ``Work.resume``)
SWEEP_CHECKPOINT = "sweeps.safetensors"  # fisher: the power iteration's state after each sweep
REFINE_CHECKPOINT = "refine.safetensors"  # anchor: the block refinement after each epoch
TRAIN_CHECKPOINT = "train.safetensors"  # train: the trainer's and Adam's state every few steps


# --------------------------------------------------------------------------- evaluate / report
RESULTS = "results.json"
REPORT = "report.json"
PLOTS = {"ranks": "ranks_spectra.png", "structure": "structure.png", "perplexity": "perplexity.png",
         "training": "training.png"}


def save_figure(fig: Any, path: Path, plt: Any) -> str:
    """Lay out, write (100 dpi) and close a report figure; its file name."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def write_rows(array: Any, start: int, value: torch.Tensor) -> None:
    """Write one batch of rows (hidden states or gradients) into an array made here."""
    zarr_io.write_rows(array, start, value)


def read_rows(array: Any, start: int, stop: int) -> torch.Tensor:
    return zarr_io.read_rows(array, start, stop)
