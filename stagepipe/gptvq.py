"""GPTVQ (van Baalen et al. 2024; code Qualcomm-AI-research/gptvq): GPTQ's sweep with ``dim``
columns quantised jointly as vectors against a codebook per group of weights (issue #33).

A group is ``group_weights / group_columns`` consecutive rows × ``group_columns`` consecutive
columns, as the official script's ``--groupsize`` (weights per codebook) and
``--columns-per-group``; a codebook holds ``k = 2**(bits_per_dim·dim)`` centroids (the official
``--wbits`` is bits *per dimension*). When the sweep reaches a group's first column, each group's
codebook is initialised on the current, error-updated weights — Mahalanobis seeding (vectors
ordered by their Mahalanobis distance to the mean, ``k`` evenly spaced) and ``kmeans_iters``
rounds of weighted k-means — and stored in int8 with one float16 scale per codebook. Each vector is
assigned to its weighted-nearest centroid, its error divided by ``U_jj`` (the upper Cholesky
factor of ``H⁻¹``, ``quantize.inverse_cholesky_upper``) and fed forward to the columns not yet
quantised. After the sweep the centroids are refined with the assignments fixed, minimising
``tr(ΔW H ΔWᵀ)`` by Adam (25 steps, lr 1e-3, restarted at a tenth of the rate whenever the loss
rises above where it started: never worse than its start), then stored in int8 again.

``weighting="official"`` reproduces the official code's weights: k-means weighs each coordinate
by ``U_jj`` and the sweep's assignment by ``1/U_jj``. ``weighting="hessian"`` (ours, a separate
option) uses ``1/U_jj²`` in both, the weight GPTQ's own loss ``(w − q)²/U_jj²`` gives a column.
Deviation kept on purpose: the official code fits a codebook on weights that lack the updates of
the current 128-column block; here the block is the group's columns, so the fit sees current
weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from stagepipe.quantize import SCALE_BYTES, inverse_cholesky_upper, pack, unpack


@dataclass(frozen=True)
class VQGrid:
    dim: int = 2
    bits_per_dim: int = 2
    group_columns: int = 256
    group_weights: int = 2048
    codebook_bits: int = 8
    kmeans_iters: int = 100
    refine_steps: int = 25
    weighting: Literal["official", "hessian"] = "official"

    @property
    def centroids(self) -> int:
        return 1 << (self.bits_per_dim * self.dim)

    @property
    def group_rows(self) -> int:
        return max(self.group_weights // self.group_columns, 1)

    def fits(self, m: int, n: int) -> bool:
        return not (n % self.group_columns or self.group_columns % self.dim or m % self.group_rows)

    def check(self, m: int, n: int) -> None:
        if not self.fits(m, n):
            raise ValueError(f"a {m} × {n} matrix does not split into {self.group_rows} × {self.group_columns} groups "
                             f"of {self.dim}-dimensional vectors")


def stored_bytes(m: int, n: int, grid: VQGrid) -> int:
    """Packed codes (``bits_per_dim·dim`` bits per vector), int8 codebooks and a float16 scale each."""
    groups = (m // grid.group_rows) * (n // grid.group_columns)
    vectors = m * n // grid.dim
    codes = math.ceil(vectors * grid.bits_per_dim * grid.dim / 8)
    return codes + groups * (grid.centroids * grid.dim * grid.codebook_bits // 8 + SCALE_BYTES)


def stored_tensors(quantized: VectorQuantized) -> dict[str, torch.Tensor]:
    """What a vector-quantised linear stores, by parameter suffix (``modeling_lowrank.VQLinear``
    loads them): ``weight_codes`` (the centroid indices as one little-endian bit stream of
    ``bits_per_dim·dim`` bits each, row-major, uint8), ``weight_codebooks`` (int8, row groups ×
    column groups × K × D) and ``weight_scales`` (float16 per codebook): ``stored_bytes`` bytes."""
    grid, codebooks = quantized.grid, quantized.codebooks.cpu()
    books = codebooks.to(torch.int8)
    if not torch.equal(books.double(), codebooks):
        raise ValueError("codebooks are not integers in int8's range")
    return {"weight_codes": pack(quantized.codes.cpu(), grid.bits_per_dim * grid.dim), "weight_codebooks": books.contiguous(),
            "weight_scales": quantized.scales.cpu().to(torch.float16).contiguous()}


def dequantize_stored(tensors: dict[str, torch.Tensor], grid: VQGrid, shape: tuple[int, int]) -> torch.Tensor:
    """The float64 ``shape`` weights ``stored_tensors`` wrote."""
    m, n = shape
    codes = unpack(tensors["weight_codes"], grid.bits_per_dim * grid.dim, m * n // grid.dim).reshape(m, n // grid.dim)
    return dequantize(codes, tensors["weight_codebooks"].double(), tensors["weight_scales"].double(), grid)


#: distances computed per chunk of vectors: leading groups × rows × K at most this many (2 MB in float64), so
#: the N × K distance matrix stays in cache — a whole ``gptvq`` call takes ×0.31 (4-D 2-bit) to ×0.58 (2-D 3-bit)
#: the time of one pass over all N, 1 thread (benchmarks/gptvq_assign.py, docs/gptvq_speed.json), with the same
#: numbers (each row's products are the same products)
ASSIGN_CHUNK_ELEMENTS = 1 << 18
#: on a GPU small chunks only add kernel launches — chunks of 2^18 took ×1.6 to ×3.1 the time of one pass on
#: an H200 (docs/gptvq_speed_cuda.json) — so there a chunk is bounded by memory alone (1 GiB of float64)
DEVICE_CHUNK_ELEMENTS = 1 << 27


def chunk_elements_for(device: torch.device) -> int:
    """Distances per chunk on ``device``: cache-sized on the CPU, memory-sized on an accelerator."""
    return ASSIGN_CHUNK_ELEMENTS if device.type == "cpu" else DEVICE_CHUNK_ELEMENTS


def assign(x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor,
           chunk_elements: int | None = None) -> torch.Tensor:
    """Index of each vector's nearest centroid under ``Σ_d w_d (x_d − c_d)²`` (``x``: … × N × D,
    ``centroids``: … × K × D, ``weights``: … × N × D or D; leading dimensions batch independent
    groups); ties to the lowest index. Computed as ``Σ_d w_d c_d² − 2 Σ_d w_d x_d c_d`` (the
    vector's own ``Σ w x²`` does not change its argmin): two matrix products, no N × K × D tensor,
    over chunks of the N vectors of at most ``chunk_elements`` distances (``chunk_elements_for`` the device)."""
    weights = weights.to(x.dtype).expand_as(x)
    squares, transposed = (centroids ** 2).transpose(-1, -2), centroids.transpose(-1, -2)
    rows = max(1, (chunk_elements or chunk_elements_for(x.device)) // (x[..., 0, 0].numel() * centroids.shape[-2]))
    index = torch.empty(x.shape[:-1], dtype=torch.long, device=x.device)
    for start in range(0, x.shape[-2], rows):
        w, v = weights[..., start:start + rows, :], x[..., start:start + rows, :]
        index[..., start:start + rows] = (w @ squares - 2 * (w * v) @ transposed).argmin(-1)
    return index


def mahalanobis_init(x: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` vectors evenly spaced in the order of their Mahalanobis distance to the mean (per group
    of the leading dimensions)."""
    centred = x - x.mean(-2, keepdim=True)
    sigma = centred.transpose(-1, -2) @ centred
    distance = (centred * torch.linalg.solve(sigma, centred.transpose(-1, -2)).transpose(-1, -2)).sum(-1)
    picks = torch.round(torch.linspace(0, x.shape[-2] - 1, k, device=x.device)).long()
    chosen = torch.argsort(distance, dim=-1, stable=True)[..., picks]
    return torch.take_along_dim(x, chosen[..., None], dim=-2).clone()


def kmeans(x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor, iters: int) -> torch.Tensor:
    """Weighted k-means: assign, then each centroid's coordinate the weighted mean of its vectors'
    (a centroid with no vector keeps its place). Leading dimensions batch independent groups; a group
    whose assignments stop changing has reached a fixed point (further rounds would return the same
    centroids) and leaves the batch, so the result equals ``iters`` rounds for every group."""
    if x.ndim == 2:
        return kmeans(x[None], centroids[None], weights[None] if weights.ndim == 2 else weights, iters)[0]
    weights = weights.to(x.dtype).expand_as(x)
    centroids = centroids.clone()
    active = torch.arange(x.shape[0], device=x.device)
    previous = torch.full(x.shape[:2], -1, dtype=torch.long, device=x.device)
    k, d = centroids.shape[-2], x.shape[-1]
    for _ in range(iters):
        xs, ws = x[active], weights[active]
        index = assign(xs, centroids[active], ws)
        moved = (index != previous[active]).any(-1)
        active, index, xs, ws = active[moved], index[moved], xs[moved], ws[moved]
        if not len(active):
            break
        previous[active] = index
        slots = index[..., None].expand(-1, -1, d)
        mass = torch.zeros(len(active), k, d, dtype=x.dtype, device=x.device).scatter_add_(1, slots, ws)
        total = torch.zeros(len(active), k, d, dtype=x.dtype, device=x.device).scatter_add_(1, slots, ws * xs)
        centroids[active] = torch.where(mass > 0, total / mass.clamp_min(1e-300), centroids[active])
    return centroids


def int8_codebook(centroids: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer codebook, float16 scale): symmetric, one scale per codebook (the official
    ``quantize_centroids`` with ``per_codebook``)."""
    top = (1 << (bits - 1)) - 1
    scale = (centroids.abs().max() / top).to(torch.float16).to(centroids.dtype).clamp_min(torch.finfo(torch.float16).tiny)
    return torch.clamp(torch.round(centroids / scale), -top - 1, top), scale


@dataclass
class VectorQuantized:
    codes: torch.Tensor       # m × n/dim centroid indices
    codebooks: torch.Tensor   # row groups × column groups × K × D, integers
    scales: torch.Tensor      # row groups × column groups
    weight: torch.Tensor      # m × n, dequantised float64
    grid: VQGrid
    repairs: dict[str, Any] = field(default_factory=dict)  # dead columns, damping, and the M-step's ``refine``

    @property
    def refine(self) -> dict[str, float]:
        """The codebook refinement's loss before and after, and the rate it kept."""
        return self.repairs["refine"]


def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, grid: VQGrid) -> torch.Tensor:
    m = codes.shape[0]
    per_group = grid.group_columns // grid.dim
    rows = torch.arange(m, device=codes.device) // grid.group_rows
    columns = torch.arange(codes.shape[1], device=codes.device) // per_group
    values = codebooks * scales[..., None, None]                                  # R × C × K × D
    picked = values[rows[:, None], columns[None, :], codes]                       # m × n/dim × D
    return picked.reshape(m, -1)


def gptvq(w: torch.Tensor, gram: torch.Tensor, grid: VQGrid, damp: float = 0.01) -> VectorQuantized:
    """GPTVQ of ``w`` (``m × n``) for inputs with second moment ``gram``, in float64."""
    w0, h0 = w.double(), gram.double()
    m, n = w0.shape
    grid.check(m, n)
    w = w0.clone()
    h = h0.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    added = damp * float(torch.diag(h).mean())
    device = w.device
    h += added * torch.eye(n, dtype=h.dtype, device=device)
    u = inverse_cholesky_upper(h)
    diag_u = torch.diag(u)
    fit_weight, assign_weight = (diag_u, 1 / diag_u) if grid.weighting == "official" else (diag_u ** -2, diag_u ** -2)
    d, row_groups, col_groups = grid.dim, m // grid.group_rows, n // grid.group_columns
    codes = torch.empty(m, n // d, dtype=torch.long, device=device)
    codebooks = torch.empty(row_groups, col_groups, grid.centroids, d, dtype=torch.float64, device=device)
    scales = torch.empty(row_groups, col_groups, dtype=torch.float64, device=device)
    row_group, every_row = torch.arange(m, device=device) // grid.group_rows, torch.arange(m, device=device)
    for c in range(col_groups):
        start, end = c * grid.group_columns, (c + 1) * grid.group_columns
        part, errors = w[:, start:end].clone(), torch.empty(m, end - start, dtype=w.dtype, device=device)
        # every row group's codebook at once, on the current weights: R × (rows·columns/d) × d
        x = part.reshape(row_groups, -1, d)
        weights = fit_weight[start:end].reshape(-1, d).repeat(grid.group_rows, 1)  # the same for every row group
        centroids = kmeans(x, mahalanobis_init(x, grid.centroids), weights, grid.kmeans_iters)
        for r in range(row_groups):
            codebooks[r, c], scales[r, c] = int8_codebook(centroids[r], grid.codebook_bits)
        values = (codebooks[:, c] * scales[:, c, None, None])[row_group]          # m × K × D: each row's codebook
        for i in range(0, end - start, d):
            cols = slice(start + i, start + i + d)
            vectors = part[:, i:i + d]
            codes[:, (start + i) // d] = assign(vectors[:, None, :], values, assign_weight[cols])[:, 0]
            q = values[every_row, codes[:, (start + i) // d]]                 # m × D
            error = (vectors - q) / diag_u[cols]
            part[:, i + d:] -= error @ u[cols, start + i + d:end]
            errors[:, i:i + d] = error
        w[:, end:] -= errors @ u[start:end, end:]
    codebooks, scales, refine = refine_codebooks(w0, h0, codes, codebooks, scales, grid)
    return VectorQuantized(codes, codebooks, scales, dequantize(codes, codebooks, scales, grid), grid,
                           {"dead_columns": int(dead.sum()), "damp_added": added, "refine": refine})


def refine_codebooks(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                     scales: torch.Tensor, grid: VQGrid) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """The official M-step: Adam on the float centroids against ``tr(ΔW H ΔWᵀ)`` with the
    assignments fixed, restarted at a tenth of the rate when the loss rises above its start; the
    refined codebooks are kept only if, back in int8, they are no worse than the ones they replace."""
    def loss(values: torch.Tensor) -> torch.Tensor:
        error = w - dequantize(codes, values, torch.ones_like(scales), grid)
        return (error @ h * error).sum()

    start_values = codebooks * scales[..., None, None]
    before = float(loss(start_values))
    lr = 1e-3
    for _ in range(6):  # each restart divides the rate by 10
        values = start_values.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([values], lr=lr)
        restart = False
        for _ in range(grid.refine_steps):
            optimizer.zero_grad()
            current = loss(values)
            if not torch.isfinite(current) or float(current.detach()) > before:
                restart = True
                break
            current.backward()
            optimizer.step()
        if not restart:
            pairs = [int8_codebook(v, grid.codebook_bits) for v in values.detach().reshape(-1, *values.shape[2:])]
            books = torch.stack([p[0] for p in pairs]).reshape(codebooks.shape)
            new_scales = torch.stack([p[1] for p in pairs]).reshape(scales.shape)
            after = float(loss(books * new_scales[..., None, None]))
            if after <= before:
                return books, new_scales, {"loss_before": before, "loss_after": after, "lr": lr}
        lr /= 10
    return codebooks, scales, {"loss_before": before, "loss_after": before, "lr": 0.0}
