"""Weight quantisation maths (issue #33): uniform grids, round-to-nearest, GPTQ, and bit packing.

A ``Grid`` is ``bits`` per weight on a uniform grid per output row, over the whole row
(``group_size=None``: per channel) or per group of ``group_size`` input columns; asymmetric grids
carry a zero point, symmetric ones the fixed midpoint (GPTQ's quantiser). ``stored_bytes`` is the
one accounting of what a quantised matrix costs on disk, in the layout ``stored_tensors`` writes —
compressed-tensors' ``pack-quantized`` format (vLLM serves it; ``transformers`` loads it): codes
packed densely into int32 words per row, a float16 scale per (row, group), zero points packed along
the rows per group for asymmetric grids, and the int64 shape; ``stored_bytes`` equals the bytes of
those tensors (tested). ``pack`` is a plain bit stream (GPTVQ's codes).

**GPTQ** (Frantar et al. 2022; ``docs/methods.md``): with the input Gram ``H = E[x xᵀ]`` (capture
records it), damped by ``damp · mean(diag H)``, and the upper Cholesky factor ``U`` of ``H⁻¹``,
columns are quantised left to right, each column's error ``(w_j − q_j)/U_jj`` fed back into the
columns not yet quantised through ``U[j, j+1:]``; in blocks with lazy updates, which changes only
the order of the float64 additions. ``U`` comes from the Cholesky factor of the *reversed* ``H``
and one triangular solve: ``H⁻¹`` itself is never formed. Columns that no calibration input
reaches (``H_jj = 0``) get ``H_jj = 1`` and are counted in ``repairs``; their weights are kept and
quantised like the others (GPTQ zeroes them: here nothing is replaced silently).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

SCALE_BYTES = 2  # float16 scales


@dataclass(frozen=True)
class Grid:
    bits: int
    group_size: int | None = None  # None: one grid per output row (per channel)
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits: {self.bits} is not in 1..8")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size: {self.group_size} is not a positive number of columns")

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1  # the largest code

    def groups(self, n: int) -> int:
        return 1 if self.group_size is None else math.ceil(n / self.group_size)


def stored_bytes(m: int, n: int, grid: Grid) -> int:
    """Bytes of an ``m × n`` matrix quantised on ``grid`` as ``stored_tensors`` writes it: codes
    (``ceil(n·bits/32)`` int32 words per row), float16 scales per (row, group), zero points when
    asymmetric (``ceil(m·bits/32)`` words per group) and the int64 shape."""
    groups = grid.groups(n)
    codes = m * math.ceil(n * grid.bits / 32) * 4
    zeros = 0 if grid.symmetric else groups * math.ceil(m * grid.bits / 32) * 4
    return codes + m * groups * SCALE_BYTES + zeros + 2 * 8


def fit(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of ``w`` (rows × columns of one group), as GPTQ's quantiser: the range
    always contains 0; an all-zero row gets the range [−1, 1] (its codes dequantise to exact zeros).
    Scales are rounded to float16, the precision they are stored in."""
    origin = torch.zeros((), dtype=w.dtype, device=w.device)
    low, high = torch.minimum(w.min(dim=1).values, origin), torch.maximum(w.max(dim=1).values, origin)
    if grid.symmetric:
        high = torch.maximum(low.abs(), high)
        low = -high
    flat = (low == 0) & (high == 0)
    low, high = torch.where(flat, -1.0, low), torch.where(flat, 1.0, high)
    scale = ((high - low) / grid.levels).to(torch.float16).to(w.dtype)
    scale = torch.where(scale > 0, scale, torch.finfo(torch.float16).tiny)  # a range below float16's resolution
    zero = torch.full_like(scale, (grid.levels + 1) // 2) if grid.symmetric else torch.round(-low / scale).clamp(0, grid.levels)
    return scale, zero


def codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Integer codes of ``w`` (rows × columns) on per-row (scale, zero)."""
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, grid.levels)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero[:, None]) * scale[:, None]


@dataclass
class Quantized:
    """A quantised ``m × n`` matrix: codes (in the original column order), per-(row, group) scales
    and zeros (groups over ``order``'s columns), the dequantised weights, and what was repaired."""

    codes: torch.Tensor          # m × n, integers in [0, levels]
    scales: torch.Tensor         # m × groups
    zeros: torch.Tensor          # m × groups
    weight: torch.Tensor         # m × n, dequantised, float64
    grid: Grid
    order: torch.Tensor          # the column order groups follow (act-order), identity otherwise
    repairs: dict[str, Any] = field(default_factory=dict)

    def cpu(self) -> Quantized:
        """The same result with every tensor in host memory (what the stages store and check)."""
        return dataclasses.replace(self, codes=self.codes.cpu(), scales=self.scales.cpu(), zeros=self.zeros.cpu(),
                                   weight=self.weight.cpu(), order=self.order.cpu())

    def group_index(self) -> torch.Tensor:
        """Per original column, its group (compressed-tensors' ``g_idx``)."""
        n = self.codes.shape[1]
        g = torch.arange(n, device=self.order.device) // (self.grid.group_size or n)
        index = torch.empty(n, dtype=torch.long, device=self.order.device)
        index[self.order] = g
        return index


def rtn(w: torch.Tensor, grid: Grid) -> Quantized:
    """Round-to-nearest, group by group."""
    w = w.double()
    m, n = w.shape
    size = grid.group_size or n
    q, out, scales, zeros = torch.empty_like(w), torch.empty_like(w), [], []
    for start in range(0, n, size):
        part = w[:, start:start + size]
        scale, zero = fit(part, grid)
        q[:, start:start + size] = codes(part, scale, zero, grid)
        out[:, start:start + size] = dequantize(q[:, start:start + size], scale, zero)
        scales.append(scale)
        zeros.append(zero)
    return Quantized(q, torch.stack(scales, 1), torch.stack(zeros, 1), out, grid, torch.arange(n, device=w.device))


def relative_output_error(delta: torch.Tensor, gram: torch.Tensor, reference: torch.Tensor) -> float:
    """``tr(Δ G Δᵀ) / tr(W G Wᵀ)``: the output error a weight change ``Δ`` causes on inputs with second
    moment ``G``, relative to the output energy of ``W``."""
    return float(torch.trace(delta @ gram @ delta.T) / torch.trace(reference @ gram @ reference.T))


def inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper-triangular ``U`` with ``Uᵀ U = H⁻¹``, without forming ``H⁻¹``: with ``J`` the reversal,
    ``J H J = L Lᵀ`` gives ``U = J L⁻¹ J`` (one triangular solve)."""
    n = h.shape[0]
    lower = torch.linalg.cholesky(h.flip(0, 1))
    inv_lower = torch.linalg.solve_triangular(lower, torch.eye(n, dtype=h.dtype, device=h.device), upper=False)
    return inv_lower.flip(0, 1)


def gptq(w: torch.Tensor, gram: torch.Tensor, grid: Grid, damp: float = 0.01, act_order: bool = False,
         block: int = 128, static_scales: bool = False) -> Quantized:
    """GPTQ of ``w`` (``m × n``) for inputs with second moment ``gram`` (``n × n``), in float64.

    A group's scale is fitted when the sweep reaches it, on the weights as the error feedback has
    left them (the paper's code); ``static_scales`` fits every group on the original weights first
    (llm-compressor's GPTQModifier, whose observers set the scales before the sweep)."""
    w = w.double().clone()
    h = gram.double().clone()
    m, n = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    added = damp * float(torch.diag(h).mean())
    h += added * torch.eye(n, dtype=h.dtype, device=h.device)
    order = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(n, device=w.device)
    w, h = w[:, order], h[order][:, order]
    u = inverse_cholesky_upper(h)
    size = grid.group_size or n
    if grid.group_size is not None:
        block = max(block // size, 1) * size  # a group never straddles two blocks: its grid sees current weights
    q = torch.empty_like(w)
    out = torch.empty_like(w)
    scales, zeros = [], []
    scale = zero = None
    fixed = [fit(w[:, s:s + size], grid) for s in range(0, n, size)] if static_scales else None
    for start in range(0, n, block):
        end = min(start + block, n)
        part, errors = w[:, start:end].clone(), torch.empty(m, end - start, dtype=w.dtype, device=w.device)
        for i in range(end - start):
            j = start + i
            if j % size == 0:  # per channel: the whole row, before any update; per group: its current weights
                scale, zero = fixed[j // size] if fixed else fit(part[:, i:i + size] if grid.group_size else w, grid)
                scales.append(scale)
                zeros.append(zero)
            column = part[:, i:i + 1]
            q[:, j:j + 1] = codes(column, scale, zero, grid)
            out[:, j:j + 1] = dequantize(q[:, j:j + 1], scale, zero)
            error = (column - out[:, j:j + 1]) / u[j, j]
            part[:, i:] -= error * u[j, start + i:end][None, :]
            errors[:, i:i + 1] = error
        w[:, end:] -= errors @ u[start:end, end:]
    restore = torch.argsort(order)
    return Quantized(q[:, restore], torch.stack(scales, 1), torch.stack(zeros, 1), out[:, restore], grid, order,
                     {"dead_columns": int(dead.sum()), "damp_added": added})


# --------------------------------------------------------------------------- packing
def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers below ``2**bits`` as a little-endian bit stream in ``ceil(count·bits/8)``
    bytes (row-major order)."""
    flat = values.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"values outside [0, {1 << bits}) cannot be packed in {bits} bits")
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)
    stream = torch.cat([stream, torch.zeros((-stream.numel()) % 8, dtype=torch.int64)])
    weights = 1 << torch.arange(8, dtype=torch.int64)
    return (stream.reshape(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` ``bits``-bit integers of a stream ``pack`` wrote."""
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)
    stream = stream[: count * bits].reshape(count, bits)
    return (stream << torch.arange(bits, dtype=torch.int64)).sum(1)


def stored_tensors(quantized: Quantized) -> dict[str, torch.Tensor]:
    """A quantised matrix in compressed-tensors' ``pack-quantized`` layout, by parameter suffix:
    ``weight_packed`` (codes, signed around the grid's midpoint as compressed-tensors stores them,
    packed by its own ``pack_to_int32``), ``weight_scale`` (float16), ``weight_zero_point``
    (asymmetric) and ``weight_shape``; ``stored_bytes`` bytes. Groups are contiguous in the original
    column order (compressed-tensors' decompression ignores a group index, so act-order groups cannot be stored)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    grid, quantized = quantized.grid, quantized.cpu()
    offset = 1 << (grid.bits - 1)
    tensors = {"weight_packed": pack_to_int32((quantized.codes - offset).to(torch.int8), grid.bits),
               "weight_scale": quantized.scales.to(torch.float16).contiguous(),
               "weight_shape": torch.tensor(list(quantized.codes.shape), dtype=torch.int64)}
    if not grid.symmetric:
        tensors["weight_zero_point"] = pack_to_int32((quantized.zeros - offset).to(torch.int8), grid.bits, packed_dim=0)
    return tensors


def dequantize_stored(tensors: dict[str, torch.Tensor], grid: Grid) -> torch.Tensor:
    """The float64 weights ``stored_tensors`` wrote (unpacked by compressed-tensors' ``unpack_from_int32``)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    shape = torch.Size(tensors["weight_shape"].tolist())
    offset = 1 << (grid.bits - 1)
    codes = unpack_from_int32(tensors["weight_packed"], grid.bits, shape).to(torch.float64) + offset
    groups = grid.groups(shape[1])
    if "weight_zero_point" in tensors:
        zeros = unpack_from_int32(tensors["weight_zero_point"], grid.bits, torch.Size([shape[0], groups]),
                                  packed_dim=0).to(torch.float64) + offset
    else:
        zeros = torch.full((shape[0], groups), float(offset), dtype=torch.float64)
    index = torch.arange(shape[1]) // (grid.group_size or shape[1])
    return (codes - zeros[:, index]) * tensors["weight_scale"].to(torch.float64)[:, index]
