"""The method base class, its config, the statistics it reads, the kinds that add one stage each
(rank-dependent, sequential, structured, learned) and the registry ``METHODS``. The quantising and
delta kinds, which replace the factorisation altogether, live beside it (``quantized``, ``delta``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from stagepipe.accounting import max_stored_rank
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


METHODS: dict[str, type[Method]] = {}


#: class decorator: add a method to ``METHODS`` under its config's ``name`` literal
register = registrar(METHODS, "name")
