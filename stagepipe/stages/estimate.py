"""Predicted disk, RAM and GPU memory per stage, from the model's shapes (``run --dry-run``).

One row per stage that ``run`` would execute (``requirements.needs``, the same list the engine
gets), so the plan cannot drift from the DAG. Order-of-magnitude planning, not a promise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from stagepipe.stages.artifacts import hidden_readers
from stagepipe.stages.requirements import needs

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Estimate:
    stage: str
    disk: float
    ram: float
    gpu: float
    note: str = ""
    #: bytes of released hand-over payloads on disk at their peak, and the last stage that reads them
    #: (``None``: this stage); ``disk`` is what stays at the end
    transient: float = 0.0
    until: str | None = None
    #: more released payloads: (bytes on disk at their peak, the last stage that reads them)
    extra: tuple[tuple[float, str], ...] = ()
    #: the workspace's peak while this stage runs, when the plan works it out stage by stage (0: not)
    peak: float = 0.0


@dataclass(frozen=True)
class Shapes:
    """What the estimates need to know about the model and the run."""

    d: int
    ff: int
    layers: int
    embed: int
    linears: list[tuple[int, int]]  # (m, n) of one block's linears
    vocab: int = 0

    @classmethod
    def of(cls, model_config: Any) -> Shapes:
        d = int(model_config.hidden_size)
        ff = int(getattr(model_config, "intermediate_size", None) or getattr(model_config, "n_inner", None) or 4 * d)
        heads = int(model_config.num_attention_heads)
        kv = int(getattr(model_config, "num_key_value_heads", heads) or heads)
        kv_dim = d // heads * kv
        tied = getattr(model_config, "tie_word_embeddings", False)
        return cls(d=d, ff=ff, layers=int(model_config.num_hidden_layers),
                   embed=int(model_config.vocab_size) * d * (1 if tied else 2), vocab=int(model_config.vocab_size),
                   linears=[(d, d), (kv_dim, d), (kv_dim, d), (d, d), (ff, d), (ff, d), (d, ff)])

    @property
    def block(self) -> int:
        return sum(m * n for m, n in self.linears)

    @property
    def params(self) -> int:
        return self.layers * self.block + self.embed


def estimate(config: Any, model_config: Any, interval: int | None = None) -> list[Estimate]:
    """One ``Estimate`` per stage of ``needs(config).stage_names()``, in that order; ``interval``:
    capture's checkpoint interval (default: ``capture_interval``)."""
    s = Shapes.of(model_config)
    need = needs(config)
    w, act = BYTES[config.model.dtype], BYTES[config.runtime.activation_dtype]
    k, t, b = config.calibration.n_samples, config.calibration.seq_len, config.runtime.batch_size
    on_gpu = config.model.device != "cpu"
    gpu = (lambda value: value) if on_gpu else (lambda value: 0)
    hidden = k * t * s.d * act
    grams = (s.d * s.d * 3 + s.ff * s.ff) * 8  # distinct inputs: attn-in, o-in, mlp-in, down-in
    captured_grams = grams if "gram" in need.capture_stats else 0.0  # else fisher's (``Needs.gram_in_fisher``)
    batch_act = b * t * (3 * s.d + 2 * s.ff) * 4
    model_ram = s.block * w + s.embed * w
    # reading the embeddings/head into the one-block model holds them twice for a moment (the read
    # tensors and the parameters they are copied into): every stage that runs the head or embeds pays it
    rest_load = 2 * s.embed * w
    svd_ram = 8 * 8 * max(s.ff, s.d) ** 2
    factors = sum((m + n) * min(m, n) for m, n in s.linears) * 8  # one block's full float64 factors
    ev = config.evaluation
    logits = ev.batch_size * ev.seq_len * s.vocab * 4  # fp32 logits of one evaluation batch (+ log-softmax)
    rows: dict[str, Estimate] = {
        "snapshot": Estimate("snapshot", s.params * w, s.params * w * 2, 0, f"{s.params / 1e9:.2f} B parameters"),
        "tokenize": Estimate("tokenize", k * t * 8, 3e8, 0, "byte-level BPE: 1 MB chunks; other tokenizers: ~130 B per text character"),
        "capture": Estimate("capture", s.layers * (hidden + captured_grams), rest_load + s.block * w + batch_act + captured_grams,
                            gpu(s.block * w + batch_act + captured_grams), f"{s.layers} × block inputs {hidden / 2**20:.0f} MB"),
        "decompose": Estimate("decompose", s.layers * sum((m + n) * need.method.stored_rank(m, n) * 4 + min(m, n) * 8
                                                          for m, n in s.linears),
                              s.block * w + svd_ram + 3 * grams + 3 * factors, gpu(svd_ram),
                              "float64 eigh + SVD of the largest matrix"),
        "allocate": Estimate("allocate", 1e6, 1e7 + s.layers * sum(min(m, n) for m, n in s.linears) * 8, 0),
        "assemble": Estimate("assemble", s.params * w * config.target.kept_fraction, rest_load + 2 * s.block * w, 0),
        "evaluate": Estimate("evaluate", 1e5, s.params * 4 * 2 + 2 * logits, gpu(s.params * 4 + 2 * logits),
                             "full model in fp32 (loaded: twice) + logits of one batch"),
        "report": Estimate("report", 1e6, 3e7, 0, "report.json + plots"),
    }
    if need.fisher:
        rows["fisher"] = _fisher(config, s, need, batch_act, model_ram, w, gpu, grams if need.gram_in_fisher else 0.0)
    if need.sensitivity:
        alloc = config.allocation
        windows = min(alloc.sensitivity_windows or k, k)
        state = windows * t * s.d * 4
        configs = 1 + len(s.linears) * len(alloc.candidates)
        held = min(configs * state, max(state, alloc.sensitivity_memory_gb * 2**30))
        ram = s.block * 4 + s.embed * 4 + held + batch_act
        runs = configs * s.layers * (s.layers + 1) // 2
        rows["sensitivity"] = Estimate("sensitivity", s.layers * 1e5, ram, gpu(ram - s.embed * 4),
                                       f"≤ {configs} perplexities per layer; ≤ {runs} block passes of {windows} windows in all")
    if need.residual:
        rank_bytes = sum(m * n * config.target.kept_fraction * 4 for m, n in s.linears)
        rows["residual"] = Estimate("residual", s.layers * rank_bytes, model_ram + svd_ram, gpu(svd_ram),
                                    "two SVDs per matrix at the allocated rank")
    if need.structure:
        # the block in the runner and its state dict, its weights in float64, the reduced block in float64
        # and as stored, the Grams, and the eigen-decomposition of the MLP intermediate Gram (input,
        # symmetrised copy, eigenvectors, workspace); no embeddings
        rows["structure"] = Estimate("structure", s.block * w * config.target.kept_fraction * s.layers,
                                     grams + 2 * s.block * w + 3 * s.block * 8 + 4 * s.ff * s.ff * 8, 0,
                                     "float64 eigh of the MLP Gram, SVD per KV group")
    if need.anchor:
        rows["anchor"] = _anchor(config, s, hidden, batch_act, model_ram, w, gpu)
    if need.learned:
        rows["train"] = _train(config, s, w, on_gpu)
    if need.refit:
        rows["refit"] = Estimate("refit", s.layers * hidden, model_ram * 2 + batch_act * 2, gpu(s.block * w * 2 + batch_act * 2),
                                 "original + truncated block per layer; compressed-path block inputs")
    names = need.stage_names()
    if config.runtime.releases:
        if interval is None:
            interval = capture_interval(config, model_config)
        _release_hidden(rows, config, s.layers, hidden, interval)
    if config.runtime.disk_budget_gb is not None and "decompose" in rows:
        _release_statistics(rows, names, s.layers, captured_grams, 1 if config.executor.kind == "local" else 2)
    if config.runtime.releases and "fisher" in rows and "decompose" in rows:
        rows["fisher"] = _backward_walk(rows, config, s, hidden, interval or 1, _fisher_scratch(config, s))
    if config.runtime.shards > 1:  # same bytes; the work of a layer splits over the shards' workers
        for name in ("capture", "fisher"):
            if name in rows:
                rows[name] = replace(rows[name], note=rows[name].note + f"; {config.runtime.shards} shards per layer "
                                                                        "(time ÷ shards on as many workers)")
    return [rows[name] for name in names]


def _release_statistics(rows: dict[str, Estimate], names: list[str], layers: int, grams: float, live: int) -> None:
    """Under a disk budget a layer's statistics go once its decompose is done (``artifacts.statistics_handover``):
    fisher's, ``live`` layers at a time (in process the driver runs consumers first, so one; a Ray
    executor may run the next fisher layer beside the decompose: two); capture's Grams, all of them
    when fisher starts (it needs every block's inputs first), then consumed by the decompose that
    follows each fisher layer (``_backward_walk``), else two at a time."""
    if "fisher" in rows:
        fisher = rows["fisher"]
        per_layer = fisher.disk / layers
        rows["fisher"] = replace(fisher, disk=0.0, extra=((live * per_layer, "decompose"),),
                                 note=fisher.note + f"; statistics released after decompose ({live} layer"
                                                    f"{'s' if live > 1 else ''} at a time)")
    if grams and "anchor" not in names and "structure" not in names:
        capture = rows["capture"]
        live, until = (layers, "fisher") if "fisher" in rows else (2, "decompose")
        rows["capture"] = replace(capture, disk=capture.disk - layers * grams, extra=((live * grams, until),),
                                  note=capture.note + f"; Grams released after decompose ({live} at a time)")


def later_readers(config: Any, layers: int) -> list[str]:
    """Stages after ``capture`` that read its stored block outputs (``artifacts.hidden_readers``)."""
    names = needs(config).stage_names()
    return sorted({r.stage for r in hidden_readers("capture", 0, layers, names)} - {"capture"}, key=names.index)


def checkpoints(layers: int, interval: int) -> list[int]:
    """Layers whose stored block outputs stay (besides the last layer's): every ``interval``-th."""
    return [i for i in range(layers - 1) if (i + 1) % interval == 0]


def recomputed_captures(config: Any, layers: int, interval: int) -> int:
    """Layer captures run again to restore released block outputs: every non-checkpoint layer's
    (the last one's stays) once for each later stage that reads them."""
    if interval == 1:
        return 0
    return (layers - 1 - len(checkpoints(layers, interval))) * len(later_readers(config, layers))


def capture_interval(config: Any, model_config: Any) -> int:
    """Every how many layers capture keeps its block outputs: 1 (all of them) without a disk budget
    or when no later stage reads them, else the smallest interval whose predicted peak fits the
    budget (the least recompute), or the one of the lowest peak when none fits."""
    budget = config.runtime.disk_budget_gb
    layers = int(model_config.num_hidden_layers)
    if budget is None or not later_readers(config, layers):
        return 1
    peaks = {k: peak_disk(estimate(config, model_config, k))[1] for k in range(1, layers + 1)}
    fitting = [k for k, peak in peaks.items() if peak <= budget * 2**30]
    return fitting[0] if fitting else min(peaks, key=lambda k: (peaks[k], k))


def _release_hidden(rows: dict[str, Estimate], config: Any, layers: int, hidden: float, interval: int) -> None:
    """With release on, the stored block outputs are hand-overs (``artifacts.hidden_readers``):
    capture's live until the last stage that reads them (all at once if a later stage does and
    ``interval`` is 1; else the checkpoints plus one restored segment of ``interval − 1``; two at a
    time if no later stage reads them); anchor's and refit's two at a time; the last layer's stays."""
    later = later_readers(config, layers)
    until = later[-1] if later else None
    capture = rows["capture"]
    kept = len(checkpoints(layers, interval))
    live = min(kept + interval - 1, layers - 1)
    note = f" (released after {until or 'the next block'})"
    if until and interval > 1:
        note = (f"; block outputs kept every {interval} layers ({kept} + the last), "
                f"{recomputed_captures(config, layers, interval)} layer captures recomputed for {', '.join(later)}")
    rows["capture"] = replace(capture, disk=capture.disk - (layers - 1) * hidden,
                              transient=live * hidden if until else hidden, until=until, note=capture.note + note)
    for name in ("anchor", "refit"):
        if name in rows:
            rows[name] = replace(rows[name], disk=rows[name].disk - (layers - 1) * hidden, transient=hidden)


def peak_disk(rows: list[Estimate]) -> tuple[float, float]:
    """(workspace bytes at the end, peak while running): every stage's outputs stay, and released
    payloads are on disk from their stage through the last stage that reads them; a stage that
    works out its own peak (``Estimate.peak``: fisher's walk down the blocks) counts that too."""
    order = {row.stage: i for i, row in enumerate(rows)}
    total = peak = 0.0
    for i, row in enumerate(rows):
        total += row.disk
        live = sum(r.transient for r in rows[: i + 1] if order.get(r.until or r.stage, 0) >= i)
        live += sum(size for r in rows[: i + 1] for size, until in r.extra if order.get(until, 0) >= i)
        peak = max(peak, total + live, row.peak)
    return total, peak


def _backward_walk(rows: dict[str, Estimate], config: Any, s: Shapes, hidden: float, interval: int,
                   scratch: float) -> Estimate:
    """Fisher's peak, worked out layer by layer: it walks the blocks down while each layer's
    ``decompose`` runs right after it (consumers first), so decompose's outputs grow while capture's
    stored block outputs go. While fisher runs block j, the workspace holds what the stages before
    fisher left, the checkpoints below j and the restored segment up to block j−1's outputs, the
    boundary gradient it reads and the one it writes, its ``scratch`` (``_fisher_scratch``), the
    statistics that wait for a decompose (capture's released Grams of blocks ≤ j — kept ones are in
    capture's outputs; fisher's of ``live`` layers, or of every layer from j up when none is
    released) and decompose's outputs of the blocks above j. While decompose j runs right after,
    the gradient fisher j read is gone and decompose j's outputs are there. A Ray executor may run
    them side by side: both at once."""
    names = needs(config).stage_names()
    base = sum(rows[n].disk for n in names[: names.index("fisher")])
    fisher, capture, layers = rows["fisher"], rows["capture"], s.layers
    budget = config.runtime.disk_budget_gb is not None
    grams = sum(size for size, until in capture.extra if until == "fisher") / layers
    per_decompose = rows["decompose"].disk / layers
    per_fisher = fisher.extra[0][0] if budget else fisher.disk / layers  # released: ``live`` layers' worth
    grad = fisher.transient / 2  # with releases on: read one, write one
    side_by_side = config.executor.kind != "local"
    kept = checkpoints(layers, interval)
    peak = 0.0
    for j in range(layers - 1, -1, -1):
        below = [c for c in kept if c <= j - 1]
        restored = j - 1 - (below[-1] if below else -1)  # the segment from the checkpoint to block j−1's outputs
        held = base + (len(below) + restored) * hidden + grams * (j + 1) + (per_fisher if budget else per_fisher * (layers - j))
        written = grad if j > 0 else 0.0  # block 0 writes no input gradient
        during_fisher = grad + written + scratch + per_decompose * (layers - 1 - j)
        during_decompose = written + per_decompose * (layers - j)
        peak = max(peak, held + (during_fisher + per_decompose + grad if side_by_side else max(during_fisher, during_decompose)))
    return replace(fisher, peak=peak)


def _fisher(config: Any, s: Shapes, need: Any, batch_act: float, model_ram: float, w: int, gpu,
            grams: float) -> Estimate:
    """Gradient statistics: K-FAC and squared gradients always; Kronecker factors for NKP metrics;
    ``grams``: the input Grams of one block when fisher records them.
    The ``head`` partition (loss gradient w.r.t. the last block's output) holds the logits of one
    batch and their gradient, and reads the embeddings/head twice for a moment."""
    method = config.method
    k, t = config.calibration.n_samples, config.calibration.seq_len
    kfac = sum(m * m + m * n for m, n in s.linears) * 8 + grams  # E[δδᵀ] and E[G⊙G], float64 (+ Grams)
    # one boundary gradient per partition, in the model's dtype; released ones: at most the one read and the one written
    release, grad = config.runtime.releases, k * t * s.d * w
    disk, transient = s.layers * kfac + (0 if release else s.layers * grad), 2 * grad if release else 0.0
    kept = "2 boundary gradients at a time (released)" if release else f"{s.layers} boundary gradients kept"
    head = 2 * s.embed * w + 3 * config.runtime.batch_size * t * s.vocab * 4
    layer = model_ram + 4 * batch_act + kfac * 2
    if "nkp" not in need.method.gradient_stats:
        return Estimate("fisher", disk, max(layer, head), gpu(s.block * w + 4 * batch_act + kfac * 2),
                        f"one backward pass per layer: K-FAC output factor + squared gradients; {kept}", transient)
    factors = _kronecker_bytes(s)
    mode, stored = _stored_gradients(config, s)
    layer += factors * 3 + stored  # a layer partition's Kronecker factors and (stored mode) gradients
    return Estimate("fisher", disk + s.layers * factors, max(layer, head), gpu(s.block * w + 4 * batch_act + factors * 3),
                    f"{mode} gradients; {2 * method.max_sweeps} passes max per layer; {kept}", transient)


def _fisher_scratch(config: Any, s: Shapes) -> float:
    """Disk a fisher layer partition holds beside its outputs while it runs, for the Kronecker
    factors: the stored gradient factors (``stored`` mode's scratch) and the sweep checkpoint in
    its resume directory (both factors of every linear, float64; kept until the partition commits,
    so beside its finished statistics; while a sweep is written, the old one and the new one,
    which is less)."""
    if "nkp" not in needs(config).method.gradient_stats:
        return 0.0
    return _stored_gradients(config, s)[1] + _kronecker_bytes(s)


def _kronecker_bytes(s: Shapes) -> float:
    """Both Kronecker factors of every linear of one block, float64 (fisher's output, its sweep checkpoint)."""
    return sum(m * m + n * n for m, n in s.linears) * 8


def _stored_gradients(config: Any, s: Shapes) -> tuple[str | None, float]:
    """(mode, bytes of one layer's stored gradient factors in fisher's scratch directory: 0 when
    streaming) for the Kronecker factors; (None, 0) for methods without them."""
    method = config.method
    if "nkp" not in needs(config).method.gradient_stats:
        return None, 0.0
    mode, stored = method.gradient_storage(config.calibration.n_samples, config.calibration.seq_len, s.linears)
    return mode, float(stored) if mode == "stored" else 0.0


#: assumed sustained throughputs for the wall-time estimates (not measured by the plan): one 80 GB
#: A100/H100-class GPU in bf16, and the 2-core AVX-512 CPU this project is developed on in fp32
#: (SmolLM2-135M forward + backward of 256 tokens took 1.46 s there: ≈140 GFLOP/s)
GPU_FLOPS, CPU_FLOPS = 150e12, 100e9
#: resident size of a Python process with torch and transformers imported, before any tensor (measured: ~0.5 GB)
INTERPRETER = 5e8


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds < 1:
        return "<1 s"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _train(config: Any, s: Shapes, w: int, on_gpu: bool) -> Estimate:
    """A learned method on the whole model, one step = ``batch`` windows: the model, what the trainer
    adds (SoCo: every target's offered components in the model dtype, scores with Adam's moments;
    Dobi-SVD: one SVD of each window's activations per target, forward and backward), one step's
    activations (every block's, or one block's plus the block inputs with gradient checkpointing)
    and fp32 logits (teacher, student, their gradients), on top of the interpreter. The dense weights
    stay for the KL teacher. SoCo on SmolLM2: 2.24 GB planned, 3.18 GB peak RSS measured in a grid
    process that had run other stages before."""
    cfg = config.method
    t = config.calibration.seq_len
    tokens = cfg.batch * t
    soco, offered, factors = _offered(config, s)
    extra = factors * w + s.layers * sum(offered) * 4 * 4  # SoCo: factors; scores, gradient, two Adam moments
    block_act = tokens * (12 * s.d + 4 * s.ff + 2 * max(offered)) * w
    if not soco:  # Dobi-SVD: each target's activations, U, V and the backward's square matrices, float32
        block_act += sum(cfg.batch * (3 * t * m + 3 * min(t, m) ** 2) * 4 for m, _ in s.linears)
    acts = tokens * s.d * w * s.layers + block_act if cfg.gradient_checkpointing else block_act * s.layers
    logits = 6 * tokens * s.vocab * 4  # student logits, their float copy and log-softmax, the teacher's, two gradients
    memory = INTERPRETER + s.params * w + extra + acts + logits
    steps = _train_steps(config)
    flops = train_flops(config, s)
    note = (f"{steps} steps, {flops / 1e12:.0f} TFLOP: ≈{_duration(flops / GPU_FLOPS)} on one 80 GB GPU at "
            f"{GPU_FLOPS / 1e12:.0f} TFLOP/s, ≈{_duration(flops / CPU_FLOPS)} on CPU at {CPU_FLOPS / 1e9:.0f} GFLOP/s (estimates)")
    factor_disk = config.target.kept_fraction * s.layers * s.block * 4 if soco else 0  # Dobi-SVD writes ranks only
    disk = factor_disk + 200 * steps  # + the history
    load = s.params * w * 2 + (8 * max((m + n) * min(m, n) for m, n in s.linears) if soco else 0)
    cuda = config.model.device == "cuda"  # "auto" may resolve to the CPU: plan host RAM for it
    return Estimate("train", disk, load if cuda else max(load, memory), memory if on_gpu else 0, note)


def _offered(config: Any, s: Shapes) -> tuple[bool, list[int], int]:
    """(SoCo?, components offered per linear of a block, factor weights of all of them in the model)."""
    soco = needs(config).method.learned == "scores"
    offered = [math.ceil(config.method.candidates * min(m, n)) if soco else 0 for m, n in s.linears]
    return soco, offered, s.layers * sum(c * (m + n) for c, (m, n) in zip(offered, s.linears, strict=True))


def _train_steps(config: Any) -> int:
    cfg = config.method
    soco = needs(config).method.learned == "scores"
    epochs = (cfg.explore_epochs + cfg.refine_epochs + cfg.sparsify_epochs + cfg.tune_epochs) if soco else cfg.epochs
    return epochs * math.ceil(config.calibration.n_samples / cfg.batch)


def train_flops(config: Any, s: Shapes) -> float:
    """FLOPs of a learned method's training: per step the teacher's forward (KL), the student's
    forward and input-gradient backward (+ a recompute with gradient checkpointing), and for
    Dobi-SVD one SVD of each window's activations per target, forward and backward."""
    cfg = config.method
    t = config.calibration.seq_len
    tokens = cfg.batch * t
    soco, _, factors = _offered(config, s)
    student = (factors + s.embed) if soco else s.params
    passes = 2 + (1 if cfg.gradient_checkpointing else 0)  # student forward, input-gradient backward, recompute
    svd = 0 if soco else s.layers * sum(cfg.batch * 14 * t * m * min(t, m) for m, _ in s.linears)  # fwd + bwd
    return _train_steps(config) * (2 * tokens * ((s.params if cfg.objective == "kl" else 0) + passes * student) + passes * svd)


def anchor_flops(config: Any, s: Shapes) -> float:
    """FLOPs of AA-SVD's block passes: input moments (≈2.5 passes: dense and compressed, stopped at
    each group's input), block error and outputs (2), and per refinement epoch fwd + bwd + error (≈4)."""
    forward = 2 * s.block * config.calibration.n_samples * config.calibration.seq_len
    return s.layers * forward * (2.5 + 2 + 4 * getattr(config.method, "refine_epochs", 0))


def _anchor(config: Any, s: Shapes, hidden: float, batch_act: float, model_ram: float, w: int, gpu) -> Estimate:
    """AA-SVD per layer: original + compressed block, one pass pair per input group, the closed
    form's SVDs, and ``refine_epochs`` × (forward + backward + an error pass) of the block."""
    epochs = getattr(config.method, "refine_epochs", 0)
    flops = anchor_flops(config, s)
    train = (s.block * 4 * 4 + batch_act * 4) if epochs else 0  # fp32 factors + Adam moments + activations
    ram = model_ram + s.block * w + 2 * batch_act + train
    return Estimate("anchor", s.layers * hidden, ram, gpu(2 * s.block * w + 2 * batch_act + train),
                    f"{flops / 1e12:.1f} TFLOP of block linears ({epochs} refinement epochs); shifted block inputs")
