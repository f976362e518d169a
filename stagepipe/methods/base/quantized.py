"""The quantising kind (RTN, GPTQ, GPTVQ): every target linear kept dense on a grid or against
codebooks, optionally with a low-rank compensation of its error; its stored form and its bytes."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field

from stagepipe.compensate import compensate
from stagepipe.gptvq import VectorQuantized, VQGrid
from stagepipe.linalg import factor_metric
from stagepipe.methods.base.core import Method
from stagepipe.quantize import Grid, Quantized
from stagepipe.schema import Strict


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
