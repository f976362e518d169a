"""Weight quantisation of every target linear (issue #33): round-to-nearest and GPTQ.

Both keep the matrices dense on an integer grid (``stagepipe.quantize``: per channel or per group of
input columns, symmetric, float16 scales) and are written in compressed-tensors' ``pack-quantized``
format, which ``transformers`` loads and vLLM serves. GPTQ's Hessian is the input Gram ``E[x xᵀ]`` of
each linear, damped by ``damp · mean(diag H)``; optional act-order. As GPTQ's code and llm-compressor
do, block i's Grams are summed on the inputs the blocks below give once quantised (``inputs:
propagated``: ``quantize`` walks the blocks in order); ``inputs: dense`` reads capture's Grams of the
dense model instead, and the layers run independently.

Grids are symmetric: compressed-tensors 0.20 writes asymmetric zero points packed along the rows,
which ``transformers`` 5.24 refuses to load (a size mismatch), so an asymmetric grid would give a
model nobody can load.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from stagepipe.methods.base import CompensationOptions, MethodConfig, QuantizedMethod, register
from stagepipe.quantize import Grid, Quantized, dequantize_stored, gptq, rtn, stored_bytes, stored_tensors


class GridOptions(MethodConfig):
    bits: int = Field(4, ge=2, le=8, description="bits per code")
    group_size: int | None = Field(128, ge=1, description="input columns per scale (null: one scale per output row)")


class RTNConfig(GridOptions):
    name: Literal["rtn"]


class GPTQConfig(GridOptions):
    name: Literal["gptq"]
    damp: float = Field(0.01, ge=0, description="added to the Hessian's diagonal, relative to its mean")
    act_order: bool = Field(False, description="quantise columns in order of decreasing Hessian diagonal")
    block: int = Field(128, ge=1, description="columns per lazy-update block (changes only the order of additions)")
    inputs: Literal["propagated", "dense"] = Field(
        "propagated", description="each block's Hessian from the inputs the blocks below give once quantised (GPTQ's "
                                  "code, llm-compressor), or from the dense model's inputs (capture's Grams; the "
                                  "layers then run independently)")
    scales: Literal["sequential", "static"] = Field(
        "sequential", description="fit a group's scale when the sweep reaches it, on the updated weights (the paper's "
                                  "code), or every scale on the original weights first (llm-compressor's GPTQModifier)")
    compensate: CompensationOptions | None = Field(
        None, description="add back the quantisation error's rank-r part as float16 factors (LoRC / EoRA); the model "
                          "then loads through stagepipe's GridLinear (trust_remote_code), not compressed-tensors")

    @model_validator(mode="after")
    def _act_order_per_channel(self) -> GPTQConfig:
        if self.act_order and self.group_size is not None:
            raise ValueError("act_order: its groups would follow the act order and need a group index, which "
                             "compressed-tensors' decompression ignores; set group_size: null (per channel)")
        return self


class _GridMethod(QuantizedMethod):
    def grid(self) -> Grid:
        return Grid(self.cfg.bits, self.cfg.group_size, symmetric=True)

    def quantization_options(self) -> dict[str, Any]:
        return {"quantizer": self.name, "bits": self.cfg.bits, "group_size": self.cfg.group_size, "symmetric": True}

    def storage(self) -> str:
        return "quantized"

    def stored_bytes(self, m: int, n: int) -> int:
        return stored_bytes(m, n, self.grid())

    def stored_tensors(self, quantized: Quantized) -> dict[str, torch.Tensor]:
        return stored_tensors(quantized)

    def unpack_stored(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        return dequantize_stored(tensors, self.grid())

    def shape_problem(self, shapes: dict[str, tuple[int, int]]) -> str | None:
        group = self.cfg.group_size
        uneven = sorted({n for _, n in shapes.values() if group is not None and n % group})
        if uneven:
            return (f"method.group_size: {group} does not divide the targets' input sizes {uneven} "
                    "(compressed-tensors groups must); use a divisor or null (per channel)")
        return None

    def nominal_bits(self) -> float:
        return float(self.cfg.bits)

    def grid_summary(self) -> str:
        return f"{self.cfg.bits} bits, group {self.cfg.group_size}"

    def layout_spec(self, m: int, n: int) -> dict[str, Any]:
        return {"bits": self.cfg.bits, "group_size": self.cfg.group_size}


@register
class RTN(_GridMethod):
    """Round-to-nearest on a symmetric integer grid (no calibration statistics)."""

    name = "rtn"
    config = RTNConfig

    def quantize(self, w: torch.Tensor, gram: torch.Tensor | None) -> Quantized:
        return rtn(w, self.grid())


@register
class GPTQ(_GridMethod):
    """GPTQ: columns quantised in turn, each error fed back through the inverse Hessian's Cholesky factor."""

    name = "gptq"
    config = GPTQConfig
    right = "gram"

    def quantization_options(self) -> dict[str, Any]:
        options = {**super().quantization_options(), "damp": self.cfg.damp, "act_order": self.cfg.act_order,
                   "block": self.cfg.block, "inputs": self.cfg.inputs}
        if self.cfg.scales == "static":
            options["scales"] = "static"
        return {**options, **self.compensation_options()}

    def quantize(self, w: torch.Tensor, gram: torch.Tensor | None) -> Quantized:
        if gram is None:
            raise ValueError("gptq needs the input Gram")
        return gptq(w, gram, self.grid(), self.cfg.damp, self.cfg.act_order, self.cfg.block, self.cfg.scales == "static")
