"""GPTVQ (van Baalen et al. 2024; code Qualcomm-AI-research/gptvq): every target linear kept dense,
``dim`` consecutive weights of a row quantised jointly against an int8 codebook per group, with
GPTQ's error feedback (the maths: ``stagepipe.gptvq``). Stored as packed indices, int8 codebooks
and float16 scales, which ``modeling_lowrank.VQLinear`` decodes (compressed-tensors has no vector
format).

Defaults are the official script's 2-D rows of its big table (``--vq-dim 2 --wbits 2 --groupsize
2048 --columns-per-group 256 --kmeans-iters 100 --kmeans-init-method mahalanobis
--hessian-weighted-lookups --include-m-step --codebook-bitwidth 8 --quantize-per-codebook``):
2.125 bits per weight plus a float16 scale per codebook. 3 bits: ``bits_per_dim: 3, group_weights:
8192``. A group must tile every target: SmolLM2's 576 inputs need ``group_columns: 64`` (or 192),
Gemma-3's 640 need 128 (or 64). ``group_columns`` may also list candidates, in order of preference:
each matrix takes the first that tiles it with ``group_weights`` per codebook (ours, for models whose
shapes no single group tiles: Gemma-3's 640 × 1024 and 1024 × 640 need 128 × 256 and 256 × 128
groups of 32,768). The codebooks per weight, so the bits, are the same whichever a matrix takes; the
shape each took is in the assembled config (``lowrank_vq``) and in its codebooks' shape.

Like GPTQ, ``inputs: propagated`` (default, as the official code) sums each block's Hessians on the
inputs the quantised blocks below give; ``inputs: dense`` reads capture's Grams.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt, model_validator

from stagepipe.gptvq import VectorQuantized, VQGrid, dequantize_stored, gptvq, stored_bytes, stored_tensors
from stagepipe.methods.base import CompensationOptions, MethodConfig, QuantizedMethod, register


class GPTVQConfig(MethodConfig):
    name: Literal["gptvq"]
    dim: Literal[1, 2, 4] = Field(2, description="weights per vector (consecutive input columns of a row)")
    bits_per_dim: int = Field(2, ge=1, le=4, description="index bits per weight: 2**(bits_per_dim·dim) centroids")
    group_columns: PositiveInt | list[PositiveInt] = Field(
        256, description="input columns a codebook covers (--columns-per-group); a list: candidates, the first that "
                         "tiles a matrix is its group")
    group_weights: int = Field(2048, ge=1, description="weights per codebook (--groupsize); rows = this / group_columns")
    codebook_bits: int = Field(8, ge=2, le=8, description="integer bits of each centroid coordinate (one float16 scale per codebook)")
    kmeans_iters: int = Field(100, ge=0)
    refine_steps: int = Field(25, ge=0, description="Adam steps on the centroids with the assignments fixed (the M-step)")
    weighting: Literal["official", "hessian"] = Field(
        "official", description="k-means and assignment weights: the official code's (U_jj, 1/U_jj) or GPTQ's loss's 1/U_jj²")
    damp: float = Field(0.01, ge=0, description="added to the Hessian's diagonal, relative to its mean")
    inputs: Literal["propagated", "dense"] = Field(
        "propagated", description="each block's Hessian from the inputs the quantised blocks below give, or capture's Grams")
    compensate: CompensationOptions | None = Field(
        None, description="add back the quantisation error's rank-r part as float16 factors (LoRC / EoRA)")

    @model_validator(mode="after")
    def _whole_groups(self) -> GPTVQConfig:
        if not self.column_candidates():
            raise ValueError("group_columns: the list of candidates is empty")
        for columns in self.column_candidates():
            if self.group_weights % columns or columns % self.dim:
                raise ValueError(f"group_weights: {self.group_weights} must be whole rows of group_columns "
                                 f"{columns}, itself whole vectors of dim {self.dim}")
        if self.group_weights // self.dim < 1 << (self.bits_per_dim * self.dim):
            raise ValueError(f"group_weights: {self.group_weights} holds fewer vectors than the codebook's "
                             f"{1 << (self.bits_per_dim * self.dim)} centroids")
        return self

    def column_candidates(self) -> list[int]:
        """``group_columns`` as a list, in order of preference."""
        return [self.group_columns] if isinstance(self.group_columns, int) else list(self.group_columns)


@register
class GPTVQ(QuantizedMethod):
    """GPTVQ: vectors of ``dim`` weights against Hessian-weighted k-means codebooks, GPTQ's error
    feedback, centroids refined with the assignments fixed (never worse than their start)."""

    name = "gptvq"
    config = GPTVQConfig
    right = "gram"

    def grid(self) -> VQGrid:
        """The grid with the first ``group_columns`` candidate (every matrix's when there is one)."""
        return self._grid(self.cfg.column_candidates()[0])

    def _grid(self, columns: int) -> VQGrid:
        c = self.cfg
        return VQGrid(c.dim, c.bits_per_dim, columns, c.group_weights, c.codebook_bits, c.kmeans_iters,
                      c.refine_steps, c.weighting)

    def grid_for(self, m: int, n: int) -> VQGrid:
        """The grid of an ``m × n`` matrix: the first ``group_columns`` candidate whose groups tile it
        (``ValueError`` when none does; ``shape_problem`` says so before anything runs)."""
        grid = self._tiling(m, n)
        if grid is None:
            raise ValueError(self.shape_problem({"": (m, n)}))
        return grid

    def _tiling(self, m: int, n: int) -> VQGrid | None:
        return next((g for g in map(self._grid, self.cfg.column_candidates()) if g.fits(m, n)), None)

    def quantization_options(self) -> dict[str, Any]:
        c = self.cfg
        return {"quantizer": self.name, "dim": c.dim, "bits_per_dim": c.bits_per_dim, "group_columns": c.group_columns,
                "group_weights": c.group_weights, "codebook_bits": c.codebook_bits, "kmeans_iters": c.kmeans_iters,
                "refine_steps": c.refine_steps, "weighting": c.weighting, "damp": c.damp, "inputs": c.inputs,
                **self.compensation_options()}

    def storage(self) -> str:
        return "vq"

    def quantize(self, w: torch.Tensor, gram: torch.Tensor | None) -> VectorQuantized:
        if gram is None:
            raise ValueError("gptvq needs the input Gram")
        return gptvq(w, gram, self.grid_for(*w.shape), self.cfg.damp)

    def stored_bytes(self, m: int, n: int) -> int:
        return stored_bytes(m, n, self.grid_for(m, n))

    def stored_tensors(self, quantized: VectorQuantized) -> dict[str, torch.Tensor]:
        return stored_tensors(quantized)

    def unpack_stored(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        return dequantize_stored(tensors, self.grid_for(*shape), shape)

    def shape_problem(self, shapes: dict[str, tuple[int, int]]) -> str | None:
        bad = sorted({(m, n) for m, n in shapes.values() if self._tiling(m, n) is None})
        if bad:
            grids = [self._grid(columns) for columns in self.cfg.column_candidates()]
            groups = " or ".join(f"{grid.group_rows} rows × {grid.group_columns} columns" for grid in grids)
            return (f"method.group_columns/group_weights: groups of {groups} of {grids[0].dim}-vectors do not tile "
                    f"the target shapes {bad}; choose group_columns dividing every input size and rows dividing "
                    "every output size (a list of candidates may give each shape its own)")
        return None

    def nominal_bits(self) -> float:
        return float(self.cfg.bits_per_dim)

    #: k-means rounds are many small batched products: each costs about 5 ms on a 2-core CPU beyond its
    #: arithmetic (measured on SmolLM2's gate_proj), counted as this many FLOPs at the plan's CPU rate
    ROUND_OVERHEAD_FLOPS = 2.5e8

    def cost_flops64(self, m: int, n: int) -> float:
        """GPTQ's sweep plus, per column group, ``kmeans_iters`` rounds over every row group's vectors
        (assignment: ``4·D·K`` FLOPs per vector) and the M-step's Adam steps (a ``tr(ΔW H ΔWᵀ)`` each)."""
        grid = self._tiling(m, n) or self.grid()  # an estimate: a shape no group tiles fails its check later
        rounds = (n // grid.group_columns) * grid.kmeans_iters
        kmeans = rounds * (m * grid.group_columns // grid.dim * grid.centroids * 4 * grid.dim + self.ROUND_OVERHEAD_FLOPS)
        return super().cost_flops64(m, n) + kmeans + grid.refine_steps * 4 * m * n * n

    def grid_summary(self) -> str:
        c = self.cfg
        return f"{c.dim}-D vectors, {c.bits_per_dim} bits per dimension, {c.group_weights} weights per codebook"

    def layout_spec(self, m: int, n: int) -> dict[str, int]:
        """``VQLinear``'s fields (``config.lowrank_vq`` per linear) for an ``m × n`` target."""
        grid = self.grid_for(m, n)
        return {"dim": grid.dim, "bits_per_dim": grid.bits_per_dim, "group_rows": grid.group_rows,
                "group_columns": grid.group_columns}
