"""A method is a pair of metrics: how its left (output-side) and right (input-side) weighting
matrices are built from the statistics that ``capture`` and ``fisher`` stored.

``decompose`` factorises both metrics (float64, relative eigenvalue floor) and calls the one core
``weighted_svd``; a method never touches the SVD itself.

A method is one module: its config model (a subclass of ``MethodConfig`` whose ``name`` is a
``Literal``) and its ``Method`` subclass decorated with ``@register``. The pipeline schema and
the CLI's list are built from ``METHODS``; stages ask the method object what it needs
(``activation_stats``, ``gradient_stats``), never its name.

**Kinds.** A method that is more than a metric pair subclasses the base of its kind; the stage
that serves that kind joins the pipeline for it (``stagepipe/stages``: it says so itself) and
brings what the kind needs — its own step, its share of allocation or assembly, its cost:

- ``RankDependentMethod``: factors that depend on the allocated rank (ResSVD) — ``rank_factors``;
- ``SequentialMethod``: factors fitted layer by layer on the compressed model's inputs (AA-SVD) — ``anchor``;
- ``StructuredMethod``: smaller dense matrices instead of two factors (MoDeGPT) — ``structure``;
- ``LearnedMethod``: ranks learned on the whole model (SoCo, Dobi-SVD) — ``train``, with the
  method's trainer (``stages/train/<method>.py``);
- ``QuantizedMethod``: every target linear kept dense and quantised — on an integer grid (RTN, GPTQ;
  stored as compressed-tensors) or against codebooks (GPTVQ; stored for ``modeling_lowrank.VQLinear``)
  — ``quantize``; the budget is bytes (``target.bits_per_weight``), not ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from stagepipe.accounting import max_stored_rank
from stagepipe.compensate import compensate
from stagepipe.gptvq import VectorQuantized, VQGrid
from stagepipe.linalg import factor_metric
from stagepipe.quantize import Grid, Quantized, gptq, rtn
from stagepipe.schema import Strict, registrar


class FactorGridOptions(Strict):
    """Quantise the final form of every target (issue #33 item 4b): each factored linear's two factors
    and each target kept dense, on one symmetric integer grid — by GPTQ on the compressed model's own
    inputs (``down``'s Hessian is the input Gram ``H``, ``up``'s is ``D_q H D_qᵀ``: its input is the
    quantised ``down``'s output) or by round-to-nearest."""

    bits: int = Field(4, ge=2, le=8)
    group_size: int | None = Field(64, ge=1, description="input columns per scale (the last group of a factor may be shorter)")
    quantizer: Literal["gptq", "rtn"] = "gptq"
    damp: float = Field(0.01, ge=0)

    def grid(self, bits: int | None = None) -> Grid:
        """The grid, at ``bits`` when a joint allocation gave the matrix its own width."""
        return Grid(bits or self.bits, self.group_size, symmetric=True)

    def quantize(self, w: torch.Tensor, hessian: torch.Tensor, bits: int | None = None) -> Quantized:
        """``w`` on the grid by the chosen quantiser (GPTQ with ``hessian``, float64)."""
        grid = self.grid(bits)
        return gptq(w, hessian, grid, self.damp) if self.quantizer == "gptq" else rtn(w, grid)


class MethodConfig(Strict):
    """Options every method has."""

    name: str
    floor_rel: float = Field(1e-6, gt=0, lt=1, description="relative eigenvalue floor of each metric")
    svd_dtype: Literal["float64", "float32"] = Field(
        "float64", description="precision of the SVD of the whitened matrix (metrics are always factorised in float64)")
    refit: bool = Field(False, description="SVD-LLM least-squares refit of the up factors on propagated inputs")
    quantize_factors: FactorGridOptions | None = Field(
        None, description="store the final factors (and dense-kept targets) on an integer grid: the quantize_factors stage")


class GradientOptions(MethodConfig):
    """Options of the ``fisher`` stage, shared by every method that needs gradient statistics."""

    fisher_labels: Literal["empirical", "model"] = Field(
        "empirical", description="next tokens of the text (empirical Fisher) or sampled from the model (true Fisher)")
    mode: Literal["auto", "stored", "streaming"] = "auto"
    memory_budget_gb: float = Field(4.0, gt=0, description="auto mode stores gradients below this")
    max_sweeps: int = Field(5, ge=1)
    tol: float = Field(1e-4, gt=0)
    warm_start: Literal["kfac", "identity"] = "kfac"
    factor_floor_rel: float = Field(1e-6, gt=0, lt=1)
    regularizer: Literal["floor", "official_alpha"] = Field(
        "floor", description="repair of the Kronecker factors: relative eigenvalue floor, or the official "
                             "code's shrink-toward-mean-diagonal until Cholesky passes (α from 1e-5, ×10 per try)")
    chunk_tokens: int | None = Field(None, ge=1, description="per-chunk gradients (raises K)")
    diagnostics: bool = False
    diagnostics_max_dim: int = Field(4096, ge=1)

    def gradient_storage(self, windows: int, seq_len: int, shapes: Iterable[tuple[int, int]]) -> tuple[str, int]:
        """(mode, bytes) of one layer's per-window gradient factors ``(D, X)`` for the Kronecker
        sweeps: ``auto`` stores them in the partition's scratch directory when they fit
        ``memory_budget_gb``, else recomputes them per pass (``streaming``). The one sizing that
        ``fisher`` runs by and ``estimate`` plans with."""
        chunk = self.chunk_tokens or seq_len
        stored = windows * -(-seq_len // chunk) * chunk * sum(m + n for m, n in shapes) * 4
        if self.mode != "auto":
            return self.mode, stored
        return ("stored" if stored <= self.memory_budget_gb * 2**30 else "streaming"), stored


@dataclass
class LayerStats:
    """Statistics of one decoder block, keyed by linear name (relative to the block).

    ``fisher[name]`` may hold ``A``/``B`` (cleaned Kronecker factors), ``kfac_out`` (``E[δδᵀ]``,
    token mean) and ``grad_sq`` (``(1/K) Σ_k G_k ⊙ G_k``, per-sequence gradients).
    """

    gram: dict[str, torch.Tensor] = field(default_factory=dict)  # input Gram Σ x xᵀ (n×n), shared per input
    abs_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # Σ |x| per input channel
    abs_max: dict[str, torch.Tensor] = field(default_factory=dict)  # max |x| per input channel
    tokens: dict[str, int] = field(default_factory=dict)  # tokens behind each input statistic
    fisher: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # per-linear gradient statistics
    fisher_info: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class MetricPair:
    left: torch.Tensor | None  # m×m (or m-vector), None = identity
    right: torch.Tensor | None  # n×n (or n-vector), None = identity
    notes: dict[str, Any] = field(default_factory=dict)  # fallbacks and provenance, for the manifest


class Method(ABC):
    """A pair of named metrics (``stagepipe.methods.metrics``): ``left`` acts on the output side,
    ``right`` on the input side. The statistics ``capture`` and ``fisher`` must accumulate follow
    from the pair: ``activation_stats`` ⊆ {gram, abs}, ``gradient_stats`` ⊆ {nkp, kfac_out, grad_sq}.
    """

    name: ClassVar[str]
    config: ClassVar[type[MethodConfig]]
    left: ClassVar[str] = "identity"
    right: ClassVar[str] = "identity"
    #: the ``target`` key this kind spends (a policy that allocates bits spends ``bits_per_weight`` instead)
    budget: ClassVar[str] = "kept_fraction"

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]

    @classmethod
    def kind(cls) -> type[Method] | None:
        """The kind this method is of — the nearest base class between it and ``Method`` that is
        not a registered method itself nor private (``SequentialMethod``, or a kind defined anywhere
        else) — or ``None`` for a metric pair."""
        registered = set(METHODS.values())
        return next((k for k in cls.__mro__[1:] if issubclass(k, Method) and k is not Method and k not in registered
                     and not k.__name__.startswith("_")), None)  # a private helper base is not a kind

    @classmethod
    def is_metric_pair(cls) -> bool:
        """Whether its factors are decompose's weighted SVD of a fixed metric pair (no kind)."""
        return cls.kind() is None

    @classmethod
    def check_pipeline(cls, config: Any, default_allocation: Any) -> None:
        """Refuse, with one ``ValueError`` line naming the key, a pipeline this kind of method cannot
        run (the config's validation calls it with the ``allocation`` block a pipeline gets when it
        names none; a metric pair runs with any pipeline)."""
        return None

    def pair(self) -> tuple[str, str]:
        return self.left, self.right

    @property
    def activation_stats(self) -> frozenset[str]:
        from stagepipe.methods.metrics import NEEDS

        return frozenset().union(*(NEEDS[n][0] for n in self.pair()))

    @property
    def gradient_stats(self) -> frozenset[str]:
        from stagepipe.methods.metrics import NEEDS

        return frozenset().union(*(NEEDS[n][1] for n in self.pair()))

    @property
    def needs_gradients(self) -> bool:
        return bool(self.gradient_stats)

    def key_options(self) -> dict[str, Any]:
        """What decides this method's factors given its statistics (``decompose``'s key): the metric
        pair and the options that shape it, not the method's name, so equal pairs share results."""
        pair = self.pair()
        options: dict[str, Any] = {"pair": list(pair), "floor_rel": self.cfg.floor_rel}
        if self.cfg.svd_dtype != "float64":  # keyed only when set: float64 outputs keep their keys
            options["svd_dtype"] = self.cfg.svd_dtype
        if any(name.startswith("act_") for name in pair):
            options["alpha"] = self.cfg.alpha
        return options

    def storage(self) -> str:
        """How ``assemble`` stores factored matrices (``accounting.STORAGES``); the budget is a
        memory fraction when this is not ``16-bit``."""
        return "16-bit"

    def stored_rank(self, m: int, n: int) -> int:
        """Components of an m×n matrix's weighted SVD that ``decompose`` stores factors for (its σ
        are stored in full): the most any later stage reads. Every allocation and trainer stops
        below the break-even rank of the method's storage (``accounting.max_stored_rank``), so the
        factors' further columns — a third of a 7B block's factor bytes — would never be read."""
        return max_stored_rank(m, n, self.storage())

    def stored_options(self) -> dict[str, Any]:
        """What decides ``stored_rank`` (part of ``decompose``'s key)."""
        return {"storage": self.storage()}

    def metrics(self, linear: str, shape: tuple[int, int], stats: LayerStats) -> MetricPair:
        from stagepipe.methods.metrics import LEFT, RIGHT

        left_name, right_name = self.pair()
        options = {"alpha": getattr(self.cfg, "alpha", 0.5)}
        left, left_notes = LEFT[left_name](stats, linear, **options)
        right, right_notes = RIGHT[right_name](stats, linear, **options)
        return MetricPair(left, right, {"metrics": f"{left_name} × {right_name}", **left_notes, **right_notes})


class RankDependentMethod(Method):
    """Factors that depend on the allocated rank (ResSVD): the ``rank_factors`` stage computes them at each
    matrix's rank after ``allocate``; decompose's one-shot spectrum is what the policies see."""

    @abstractmethod
    def factors(self, w: torch.Tensor, right: Any, rank: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """(up, down, info) at ``rank``, given the input-side metric root ``right``."""

    def rank_options(self) -> dict[str, Any]:
        """Options that shape the rank-dependent factors (their stages' keys)."""
        return {}


class SequentialMethod(Method):
    """Factors fitted layer by layer on the compressed model's propagated inputs (AA-SVD): the
    ``anchor`` stage, after ``allocate``."""

    @abstractmethod
    def sequential_options(self) -> dict[str, Any]:
        """Options that shape the fitted factors beyond the ranks (the ``anchor`` stage's key)."""


class StructuredMethod(Method):
    """Smaller dense matrices instead of two factors (MoDeGPT): the ``structure`` stage replaces
    ``decompose``, and the allocation is per layer, from each block's influence ``1 − cos``."""

    @abstractmethod
    def layer_kept(self, influence: list[float], kept: float) -> list[float]:
        """The kept fraction of each layer from each block's influence."""

    def allocation_options(self) -> dict[str, Any]:
        """Options of the per-layer allocation (``allocate``'s key)."""
        return {}

    @classmethod
    def check_pipeline(cls, config: Any, default_allocation: Any) -> None:
        if config.allocation.policy != default_allocation.policy:
            raise ValueError(f"allocation.policy: {cls.name} chooses per-layer fractions itself (method.layer_allocation); "
                             f"use policy {default_allocation.policy!r} (its align rounds intermediate sizes)")
        if config.target.modules is not None:
            raise ValueError(f"target.modules: {cls.name} rewrites every linear of each block; remove modules")
        if config.method.quantize_factors is not None:
            raise ValueError(f"method.quantize_factors: {cls.name} stores smaller dense matrices, not factors; remove it")


class LearnedMethod(Method):
    """Ranks learned on the whole model (SoCo, Dobi-SVD): the ``train`` stage runs the method's
    trainer after ``decompose``, and ``allocate`` accounts for the learned ranks (no policy)."""

    #: the trainer also writes the final factors (SoCo); else they are decompose's at the learned ranks
    learned_factors: ClassVar[bool] = False

    @abstractmethod
    def training_options(self) -> dict[str, Any]:
        """Options that shape the training (the ``train`` stage's key)."""

    @classmethod
    def check_pipeline(cls, config: Any, default_allocation: Any) -> None:
        if config.allocation != default_allocation:
            raise ValueError(f"allocation: {cls.name} learns its ranks by training (no policy, no alignment); "
                             "remove the allocation block")
        if config.method.refit and cls.learned_factors:
            raise ValueError(f"method.refit: not supported with {cls.name} (its learned factors are final); remove refit")


class CompensationOptions(Strict):
    """Low-rank compensation of a quantising method's error (LoRC / EoRA; ``stagepipe.compensate``):
    ``W ≈ Q + U D`` with ``U D`` the rank-``rank`` SVD of ``W − Q`` in the metric ``metric``, stored
    as float16 factors beside the quantised matrix."""

    rank: int = Field(ge=1, description="rank of the compensation (capped at each matrix's smaller side)")
    metric: Literal["plain", "whitened"] = Field(
        "whitened", description="plain SVD of the error (LoRC) or weighted by the input Gram's root (EoRA: the "
                                "error the layer's outputs see)")
    rounds: int = Field(1, ge=1, description="alternations Q ← quant(W − U D), U D ← SVD(W − Q) (CALDERA's); the "
                                             "round with the lowest loss is kept (never worse than one round)")


@dataclass
class QuantizedLinear:
    """One target linear as the stage stores it: its tensors (by parameter suffix), the float64
    weights they decode to, and what was measured or repaired."""

    weight: torch.Tensor
    tensors: dict[str, torch.Tensor]
    repairs: dict[str, Any]

    def cpu(self) -> QuantizedLinear:
        """The same result in host memory (a quantiser run on a GPU; the stored tensors already are)."""
        return QuantizedLinear(self.weight.cpu(), {k: t.cpu() for k, t in self.tensors.items()}, self.repairs)


#: parameter suffixes of a compensation's float16 factors (``up``: m × r, ``down``: r × n)
LOWRANK_SUFFIXES = ("lowrank_up", "lowrank_down")


class QuantizedMethod(Method):
    """Every target linear kept dense and quantised (RTN, GPTQ, GPTVQ): the ``quantize`` stage replaces
    ``decompose`` and the allocation (no ranks); the metric pair says which statistics it reads (GPTQ's
    Hessian is the input Gram: ``right = "gram"``). A method owns its stored form: what a quantised
    matrix stores (``stored_tensors``, read back by ``unpack_stored``), what that costs
    (``stored_bytes``, the one accounting) and which shapes it can store (``shape_problem``);
    ``storage()`` names the model family the assembly writes ("quantized": compressed-tensors, "vq":
    ``modeling_lowrank.VQLinear``)."""

    budget = "bits_per_weight"

    @abstractmethod
    def grid(self) -> Grid | VQGrid:
        """The grid (integer levels or codebooks) every target matrix is quantised on."""

    @abstractmethod
    def quantize(self, w: torch.Tensor, gram: torch.Tensor | None) -> Quantized | VectorQuantized:
        """``w`` quantised (float64 maths), given the input Gram when the method reads one."""

    @abstractmethod
    def quantization_options(self) -> dict[str, Any]:
        """What decides the quantised matrices besides the weights and statistics (``quantize``'s key)."""

    @abstractmethod
    def stored_bytes(self, m: int, n: int) -> int:
        """Bytes an ``m × n`` matrix stores (equal to its ``stored_tensors``' bytes)."""

    @abstractmethod
    def stored_tensors(self, quantized: Any) -> dict[str, torch.Tensor]:
        """The tensors a quantised linear is stored as, by parameter suffix."""

    @abstractmethod
    def unpack_stored(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """The float64 weights ``stored_tensors`` wrote (the stage checks they are the quantised ones)."""

    @abstractmethod
    def shape_problem(self, shapes: dict[str, tuple[int, int]]) -> str | None:
        """Why some target shapes cannot be stored (one line naming the option), or None."""

    @abstractmethod
    def nominal_bits(self) -> float:
        """Bits per weight of the codes alone (the cost model's estimate)."""

    def cost_flops64(self, m: int, n: int) -> float:
        """Float64 work of quantising one ``m × n`` matrix (the plan's time estimate): GPTQ's Cholesky
        and solve (n³) and its error feedback (2 m n²)."""
        return n**3 + 2 * m * n * n

    @abstractmethod
    def layout_spec(self, m: int, n: int) -> dict[str, Any]:
        """The fields stagepipe's own linear for this storage takes for an ``m × n`` target
        (``modeling_lowrank.VQLinear`` / ``GridLinear``: ``config.lowrank_vq`` / ``lowrank_grid`` per
        linear, with ``rank`` when compensated)."""

    @abstractmethod
    def grid_summary(self) -> str:
        """The grid in a few words, for messages ("3 bits, group 64")."""

    def key_options(self) -> dict[str, Any]:
        return {"pair": list(self.pair()), **self.quantization_options()}

    def compensation(self) -> CompensationOptions | None:
        return getattr(self.cfg, "compensate", None)

    def compensation_options(self) -> dict[str, Any]:
        """The compensation's part of ``quantization_options`` (absent without one: earlier keys stay)."""
        options = self.compensation()
        return {} if options is None else {"compensate": {**options.model_dump(), "floor_rel": self.cfg.floor_rel}}

    def quantize_linear(self, w: torch.Tensor, gram: torch.Tensor | None) -> QuantizedLinear:
        """``w`` quantised and, with ``compensate``, its error's rank-r part added back as float16
        factors (their rounding included in ``weight``, which is what the stored tensors decode to)."""
        options = self.compensation()
        if options is None:
            quantized = self.quantize(w, gram)
            return QuantizedLinear(quantized.weight, self.stored_tensors(quantized), dict(quantized.repairs))
        if options.metric == "whitened" and gram is None:
            raise ValueError(f"{self.name}: a whitened compensation needs the input Gram")
        right = factor_metric(gram, self.cfg.floor_rel, "input Gram") if options.metric == "whitened" else None
        result = compensate(w.double(), lambda target: self.quantize(target, gram), min(options.rank, *w.shape),
                            None, right, options.rounds)
        # in host memory: the weight is the product the stored float16 factors decode to, computed where they are decoded
        up, down = result.up.to(torch.float16).cpu(), result.down.to(torch.float16).cpu()
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise ValueError(f"{self.name}: a compensation factor does not fit float16")
        tensors = {**self.stored_tensors(result.quantized), "lowrank_up": up.contiguous(), "lowrank_down": down.contiguous()}
        return QuantizedLinear(result.quantized.weight.cpu() + up.double() @ down.double(), tensors,
                               {**result.quantized.repairs, "compensation_losses": result.losses,
                                "best_round": result.best_round, **({"metric_repair": right.repair} if right else {})})

    def unpack_linear(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """The float64 weights ``quantize_linear``'s tensors decode to."""
        weight = self.unpack_stored({k: t for k, t in tensors.items() if k not in LOWRANK_SUFFIXES}, shape)
        if "lowrank_up" in tensors:
            weight = weight + tensors["lowrank_up"].double() @ tensors["lowrank_down"].double()
        return weight

    def linear_bytes(self, m: int, n: int) -> int:
        """Bytes one ``m × n`` target stores: the quantised matrix and any compensation's float16 factors."""
        options = self.compensation()
        return self.stored_bytes(m, n) + (2 * min(options.rank, m, n) * (m + n) if options else 0)

    def propagates(self) -> bool:
        """Whether each block's statistics come from the quantised model's own inputs (the blocks below
        already quantised, as GPTQ's code and llm-compressor calibrate), not from the dense model's: a
        method with the option ``inputs: propagated``."""
        return getattr(self.cfg, "inputs", None) == "propagated"

    @property
    def activation_stats(self) -> frozenset[str]:
        """Capture's statistics only for inputs that are not propagated (those are summed inside ``quantize``)."""
        return frozenset() if self.propagates() else super().activation_stats

    @classmethod
    def check_pipeline(cls, config: Any, default_allocation: Any) -> None:
        if config.allocation != default_allocation:
            raise ValueError(f"allocation: {cls.name} keeps every target dense on one grid (no ranks); "
                             "remove the allocation block")
        if config.target.kept_fraction != 1.0:
            raise ValueError(f"target.kept_fraction: {cls.name} keeps every parameter (its budget is "
                             "target.bits_per_weight); remove kept_fraction")
        if config.method.refit:
            raise ValueError(f"method.refit: {cls.name} has no factors to refit; remove refit")
        if config.method.quantize_factors is not None:
            raise ValueError(f"method.quantize_factors: {cls.name} has no factors; its own grid is the method's options")


class DeltaMethod(Method):
    """Compresses the difference ``Δ = W_model − W_base`` of each target matrix between a fine-tuned
    model and its base (``pipeline.base``): the ``delta`` stage, budget ``target.delta_ratio``."""

    budget = "delta_ratio"

    @abstractmethod
    def compress(self, delta: torch.Tensor, budget: int, generator: torch.Generator,
                 gram: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(stored tensors of at most ``budget`` bytes, diagnostics and repairs) for one float64 ``delta``."""

    @abstractmethod
    def decode(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """The float64 delta the stored tensors hold."""

    def least_bytes(self, m: int, n: int) -> int:
        """The fewest bytes it can store an m×n delta in (a budget below is refused before anything runs)."""
        return 0

    def delta_options(self) -> dict[str, Any]:
        """What shapes the stored delta (the ``delta`` stage's key)."""
        return self.cfg.model_dump(mode="json", exclude={"floor_rel", "svd_dtype", "refit", "quantize_factors"})

    def key_options(self) -> dict[str, Any]:
        return self.delta_options()

    def pair(self) -> tuple[str, str]:
        return "identity", "identity"

    @classmethod
    def check_pipeline(cls, config: Any, default_allocation: Any) -> None:
        if config.base is None:
            raise ValueError(f"base: {cls.name} compresses model − base; name the base model (base: {{source: …}})")
        if config.target.delta_ratio is None:
            raise ValueError(f"target.delta_ratio: {cls.name} needs its budget, the dense 16-bit delta's bytes over "
                             "the stored bytes (e.g. 32)")
        if config.target.kept_fraction != 1.0:
            raise ValueError(f"target.kept_fraction: {cls.name} keeps every parameter of the model (its budget is "
                             "target.delta_ratio); remove kept_fraction")
        if config.allocation != default_allocation:
            raise ValueError(f"allocation: {cls.name} spends target.delta_ratio on every matrix alike (no ranks); "
                             "remove the allocation block")
        if config.method.refit or config.method.quantize_factors is not None:
            raise ValueError(f"method: {cls.name} stores a delta, not factors to refit or quantise; remove refit / "
                             "quantize_factors")


METHODS: dict[str, type[Method]] = {}


#: class decorator: add a method to ``METHODS`` under its config's ``name`` literal
register = registrar(METHODS, "name")
