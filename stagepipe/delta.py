"""Delta compression maths (issue #34): ImPart, DARE, BitDelta and low rank on ``Δ = W_ft − W_base``.

- **ImPart** (ACL 2025, arXiv 2504.13237; from the paper — its repository has no licence): the SVD
  ``Δ = U diag(s) Vᵀ``; at an overall sparsity ``α`` the weakest fraction ``β`` of the components is
  dropped whole, the others get the drop rate ``p_i = γ (1 − (s_i/s_max)^C)`` with
  ``γ = (α − β)/(1 − β)``, and components are dropped from the tail until the mean rate reaches
  ``α``. Each kept component has a share ``p_i`` of the entries of ``u_i`` and of ``v_i`` zeroed and
  the survivors rescaled: in expectation the sparse delta is the truncated one (tested
  statistically). The paper sets ``α = 1 − 1/CR`` on parameter counts; here the budget is bytes with
  every index counted, so ``α`` is the smallest that meets it (``impart_for_budget``, bisection).
- **DARE**: each entry of ``Δ`` dropped with probability ``p``, survivors rescaled by ``1/(1 − p)``.
- **BitDelta**: ``sign(Δ)`` (zero counted as +) times one scale per matrix, the mean of ``|Δ|``.
- **Low rank**: the truncated SVD of ``Δ``, plain or whitened by the input Gram (``stagepipe.linalg``).

**Masks with exact counts.** A share ``p`` of an ``L``-vector is dropped as exactly
``L − round((1 − p)L)`` entries chosen uniformly at random, the ``k`` survivors rescaled by ``L/k``:
each entry survives with probability ``k/L``, so the result is unbiased as with independent draws,
and the stored bytes are known before drawing, so a budget is met exactly rather than on average.
Masks come from a generator seeded by ``mask_seed(seed, name)``: a resumed run draws the same bits.

**Stored form** (``pack_sparse``): each vector of a group (ImPart's ``u_i s_i`` and ``v_i``; DARE's
rows) as the cheapest of dense 16-bit values, a bitmap plus its nonzero values, or 16-bit (32-bit
past 65,536) indices plus values, with a 32-bit count and an 8-bit format per vector.
``sparse_bytes`` is the one accounting of these tensors (equal to their bytes, tested).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stagepipe.quantize import pack, unpack

VALUE_BYTES = 2  # float16 values
LAYOUT_BYTES = 5  # per stored vector: int32 count + uint8 format
DENSE, BITMAP, INDEX = 0, 1, 2


def mask_seed(seed: int, name: str) -> int:
    """A 63-bit seed per (pipeline seed, matrix name): the same masks on any machine and resume."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


# --------------------------------------------------------------------------- sparsification
def kept_count(length: int, rate: float) -> int:
    """Entries an ``length``-vector keeps at drop rate ``rate``."""
    return 0 if rate >= 1 else int(round((1 - rate) * length))


def sparsify(vector: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Keep ``kept_count`` entries of each row of ``vector`` (1-D or 2-D) chosen uniformly at random,
    rescaled by ``length/kept``; zero the rest."""
    rows = vector.reshape(1, -1) if vector.ndim == 1 else vector
    length = rows.shape[1]
    kept = kept_count(length, rate)
    if kept == 0:
        return torch.zeros_like(vector)
    order = torch.rand(rows.shape, generator=generator, dtype=torch.float64).argsort(dim=1)
    mask = torch.zeros(rows.shape, dtype=torch.bool).scatter_(1, order[:, :kept], True)
    return torch.where(mask, rows * (length / kept), torch.zeros_like(rows)).reshape(vector.shape)


def impart_drop_rates(s: torch.Tensor, alpha: float, beta: float, exponent: float = 1.0) -> torch.Tensor:
    """Per component (``s`` descending) its drop rate; 1 means dropped whole."""
    if not 0 <= beta <= alpha < 1:
        raise ValueError(f"need 0 ≤ β ≤ α < 1, got α={alpha}, β={beta}")
    k = s.numel()
    gamma = (alpha - beta) / (1 - beta)
    rates = gamma * (1 - (s / s[0]) ** exponent) if k and s[0] > 0 else torch.ones_like(s)
    dropped = math.ceil(beta * k - 1e-12)
    if dropped:
        rates[k - dropped:] = 1.0
    tail = k - dropped
    while float(rates.mean()) < alpha - 1e-12 and tail > 0:  # from the tail until the budget is met
        tail -= 1
        rates[tail] = 1.0
    return rates


@dataclass
class SparseFactors:
    """``Δ ≈ up · down`` with sparse rows of ``up``ᵀ (``u_i s_i``) and of ``down`` (``v_iᵀ``)."""

    up: torch.Tensor    # m × k
    down: torch.Tensor  # k × n
    rates: torch.Tensor  # per component of the SVD (1: not stored)
    alpha: float = 0.0

    def delta(self) -> torch.Tensor:
        return self.up @ self.down


def impart(delta: torch.Tensor, alpha: float, beta: float, exponent: float = 1.0,
           generator: torch.Generator | None = None) -> SparseFactors:
    """ImPart's sparse singular vectors of ``delta`` at overall sparsity ``alpha``."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return _sparse_factors(u, s, vh, alpha, beta, exponent, generator or torch.Generator().manual_seed(0))


def _sparse_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, alpha: float, beta: float, exponent: float,
                    generator: torch.Generator) -> SparseFactors:
    rates = impart_drop_rates(s, alpha, beta, exponent)
    kept = [i for i in range(s.numel()) if min(kept_count(u.shape[0], float(rates[i])),
                                                kept_count(vh.shape[1], float(rates[i]))) > 0]
    up = torch.stack([sparsify(u[:, i], float(rates[i]), generator) * s[i] for i in kept], 1) if kept else u[:, :0]
    down = torch.stack([sparsify(vh[i], float(rates[i]), generator) for i in kept]) if kept else vh[:0]
    return SparseFactors(up, down, rates, alpha)


def impart_bytes_at(s: torch.Tensor, m: int, n: int, alpha: float, beta: float, exponent: float) -> int:
    """What ImPart stores for an m×n delta with singular values ``s`` at sparsity ``alpha`` (known
    before any mask is drawn)."""
    rates = impart_drop_rates(s, alpha, min(beta, alpha), exponent)
    pairs = [(kept_count(m, float(r)), kept_count(n, float(r))) for r in rates]
    pairs = [(a, b) for a, b in pairs if min(a, b) > 0]
    return sparse_bytes(m, [a for a, _ in pairs]) + sparse_bytes(n, [b for _, b in pairs])


def smallest_alpha(cost, budget: int) -> float:
    """The smallest sparsity whose ``cost(α)`` bytes fit ``budget`` (bisection: the bytes fall as ``α``
    grows, and ``α`` near 1 stores nothing)."""
    low, high = 0.0, 1.0 - 1e-9
    if cost(low) <= budget:
        return low
    for _ in range(50):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if cost(middle) > budget else (low, middle)
    return high


def impart_for_budget(delta: torch.Tensor, budget: int, beta: float, exponent: float,
                      generator: torch.Generator) -> SparseFactors:
    """ImPart at the smallest sparsity ``α`` whose stored bytes are within ``budget``."""
    m, n = delta.shape
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)  # one SVD: the rates searched are the rates used
    alpha = smallest_alpha(lambda a: impart_bytes_at(s, m, n, a, beta, exponent), budget)
    return _sparse_factors(u, s, vh, alpha, min(beta, alpha), exponent, generator)


def dare(delta: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """DARE with the same count kept in every row (rows are what ``pack_sparse`` stores)."""
    return sparsify(delta.double(), rate, generator)


def dare_rate_for_budget(m: int, n: int, budget: int) -> float:
    """The smallest drop rate whose rows (``kept_count`` each) are stored within ``budget``."""
    best = next((keep for keep in range(n, -1, -1) if sparse_bytes(n, [keep] * m) <= budget), 0)
    return 1.0 - best / n


def bitdelta(delta: torch.Tensor) -> torch.Tensor:
    d = delta.double()
    return torch.where(d >= 0, 1.0, -1.0).to(torch.float64) * d.abs().mean()


def low_rank(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


# --------------------------------------------------------------------------- stored form and bytes
def _index_bytes(length: int) -> int:
    return 2 if length <= 1 << 16 else 4


def vector_format(length: int, nonzeros: int) -> tuple[int, int]:
    """(format, bytes of its payload) of one stored vector: the cheapest of dense values, a bitmap and
    the nonzero values, or indices and the nonzero values (ties: in that order)."""
    options = [(length * VALUE_BYTES, DENSE), (math.ceil(length / 8) + nonzeros * VALUE_BYTES, BITMAP),
               (nonzeros * (_index_bytes(length) + VALUE_BYTES), INDEX)]
    size, kind = min(options)
    return kind, size


def sparse_bytes(length: int, nonzeros: Sequence[int]) -> int:
    """Bytes of a group of ``length``-vectors with these nonzero counts, as ``pack_sparse`` stores them
    (a group whose every vector is stored dense is its values alone: ratio 1 costs exactly the dense delta)."""
    formats = [vector_format(length, k) for k in nonzeros]
    if all(kind == DENSE for kind, _ in formats):
        return len(formats) * length * VALUE_BYTES
    return sum(size + LAYOUT_BYTES for _, size in formats)


def _f16(values: torch.Tensor, what: str) -> torch.Tensor:
    half = values.to(torch.float16)
    if not bool(torch.isfinite(half).all()):
        raise ValueError(f"{what}: values outside float16's range cannot be stored")
    return half


def pack_sparse(vectors: torch.Tensor, what: str = "delta") -> dict[str, torch.Tensor]:
    """The rows of ``vectors`` (k × L) in their cheapest formats: ``values`` (float16), ``bitmaps``
    (uint8), ``indices`` (uint16 or int32), ``counts`` (int32) and ``formats`` (uint8)."""
    k, length = vectors.shape
    index_dtype = torch.int32 if _index_bytes(length) == 4 else torch.uint16
    values, bitmaps, indices, counts, formats = [], [], [], [], []
    for row in vectors:
        mask = row != 0
        nonzeros = int(mask.sum())
        kind, _ = vector_format(length, nonzeros)
        counts.append(nonzeros)
        formats.append(kind)
        if kind == DENSE:
            values.append(row)
            continue
        values.append(row[mask])
        if kind == BITMAP:
            bitmaps.append(pack(mask.to(torch.int64), 1))
        else:
            indices.append(torch.nonzero(mask).reshape(-1).to(torch.int64))
    cat = torch.cat
    if all(kind == DENSE for kind in formats):  # no layout: the values alone (``sparse_bytes``)
        return {"values": _f16(vectors.reshape(-1), what)}
    return {"values": _f16(cat(values) if values else torch.zeros(0, dtype=torch.float64), what),
            "bitmaps": cat(bitmaps) if bitmaps else torch.zeros(0, dtype=torch.uint8),
            "indices": (cat(indices) if indices else torch.zeros(0, dtype=torch.int64)).to(index_dtype),
            "counts": torch.tensor(counts, dtype=torch.int32).reshape(k),
            "formats": torch.tensor(formats, dtype=torch.uint8).reshape(k)}


def unpack_sparse(tensors: dict[str, torch.Tensor], length: int) -> torch.Tensor:
    """The k × ``length`` float64 vectors ``pack_sparse`` stored."""
    if "formats" not in tensors:  # every vector dense
        return tensors["values"].to(torch.float64).reshape(-1, length)
    counts, formats = tensors["counts"].tolist(), tensors["formats"].tolist()
    values = tensors["values"].to(torch.float64)
    indices = tensors["indices"].to(torch.int64)
    out = torch.zeros(len(counts), length, dtype=torch.float64)
    at_value = at_bitmap = at_index = 0
    bitmap_bytes = math.ceil(length / 8)
    for i, (count, kind) in enumerate(zip(counts, formats, strict=True)):
        if kind == DENSE:
            out[i] = values[at_value:at_value + length]
            at_value += length
            continue
        if kind == BITMAP:
            mask = unpack(tensors["bitmaps"][at_bitmap:at_bitmap + bitmap_bytes], 1, length).bool()
            at_bitmap += bitmap_bytes
            out[i, mask] = values[at_value:at_value + count]
        else:
            out[i, indices[at_index:at_index + count]] = values[at_value:at_value + count]
            at_index += count
        at_value += count
    return out


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes the tensors hold (what a safetensors file stores besides its header)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def dense_delta_bytes(m: int, n: int) -> int:
    return m * n * VALUE_BYTES


def bitdelta_bytes(m: int, n: int) -> int:
    return math.ceil(m * n / 8) + VALUE_BYTES


def low_rank_bytes(m: int, n: int, rank: int) -> int:
    return rank * (m + n) * VALUE_BYTES


def impart_bytes(factors: SparseFactors) -> int:
    """Bytes of ImPart's stored factors (``pack_sparse`` of ``up``ᵀ and ``down``)."""
    return (sparse_bytes(factors.up.shape[0], [int(torch.count_nonzero(c)) for c in factors.up.T])
            + sparse_bytes(factors.down.shape[1], [int(torch.count_nonzero(r)) for r in factors.down]))


# --------------------------------------------------------------------------- ImPart-Qt: the kept vectors quantised
@dataclass(frozen=True)
class BitSchedule:
    """Bits per kept component in singular-value order: ``bits[0]`` for the first ``counts[0]``, ``bits[1]``
    for the next ``counts[1]``, …, the last entry of ``bits`` for the rest (the paper: 8, 3, 2 after 2 and 32)."""

    bits: tuple[int, ...] = (8, 3, 2)
    counts: tuple[int, ...] = (2, 32)

    def of(self, rank: int) -> int:
        edge = 0
        for bits, count in zip(self.bits, self.counts, strict=False):
            edge += count
            if rank < edge:
                return bits
        return self.bits[-1]


def quantized_vector_bytes(length: int, nonzeros: int, bits: int) -> int:
    """One stored vector of ``bits``-bit codes: where its nonzeros are (nothing when dense, else the cheaper of a
    bitmap and indices), the packed codes, a float16 scale, and its count, format and bits (6 bytes)."""
    codes = math.ceil(nonzeros * bits / 8)
    where = 0 if nonzeros == length else min(math.ceil(length / 8), nonzeros * _index_bytes(length))
    return where + codes + VALUE_BYTES + LAYOUT_BYTES + 1


def impart_qt_bytes_at(s: torch.Tensor, m: int, n: int, alpha: float, beta: float, exponent: float,
                       schedule: BitSchedule) -> int:
    """ImPart-Qt's stored bytes at sparsity ``alpha`` (both factors, each kept component at its bits)."""
    rates = impart_drop_rates(s, alpha, min(beta, alpha), exponent)
    pairs = [(kept_count(m, float(r)), kept_count(n, float(r))) for r in rates]
    pairs = [(a, b) for a, b in pairs if min(a, b) > 0]
    return sum(quantized_vector_bytes(m, a, schedule.of(i)) + quantized_vector_bytes(n, b, schedule.of(i))
               for i, (a, b) in enumerate(pairs))


def symmetric_scale(values: torch.Tensor, bits: int) -> float:
    """GPTQ's symmetric grid for a vector: codes 0 … 2^b − 1 around 2^(b−1), the range covering max |value|;
    rounded to float16 (how it is stored)."""
    high = float(values.abs().max()) if values.numel() else 0.0
    scale = 2 * high / ((1 << bits) - 1) if high > 0 else 1.0
    return float(torch.tensor(scale, dtype=torch.float16)) or float(torch.finfo(torch.float16).tiny)


def quantize_values(values: torch.Tensor, scale: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Codes of ``values`` on per-entry (scale, bits) symmetric grids, as integers in [0, 2^b − 1]."""
    zero = (1 << bits.to(torch.int64)) // 2
    return torch.clamp(torch.round(values / scale) + zero, torch.zeros_like(zero), (1 << bits.to(torch.int64)) - 1)


def masked_gptq(w: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, bits: torch.Tensor,
                damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of ``w`` (rows × columns) whose zero pattern ``mask`` must stay: column by column, each entry on the
    symmetric grid of its (``scale``, ``bits``) (broadcast to ``w``'s shape), the error fed back to the later
    columns through the upper Cholesky factor of ``H⁻¹`` and only where ``mask`` keeps entries. (codes,
    dequantised), float64; ``H⁻¹`` itself is never formed."""
    from stagepipe.quantize import inverse_cholesky_upper

    w = (w.double() * mask).clone()
    h = hessian.double().clone()
    n = w.shape[1]
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0
    h += damp * float(torch.diag(h).mean()) * torch.eye(n, dtype=h.dtype)
    u = inverse_cholesky_upper(h)
    codes = torch.zeros_like(w)
    out = torch.zeros_like(w)
    zero = ((1 << bits.to(torch.int64)) // 2).to(w.dtype)
    for j in range(n):
        column = w[:, j]
        codes[:, j] = quantize_values(column, scale[:, j], bits[:, j]) * mask[:, j]
        out[:, j] = (codes[:, j] - zero[:, j]) * scale[:, j] * mask[:, j]
        error = (column - out[:, j]) / u[j, j]
        w[:, j + 1:] -= error[:, None] * u[j, j + 1:][None, :]
        w[:, j + 1:] *= mask[:, j + 1:]
    return codes, out


def pack_quantized_sparse(codes: torch.Tensor, mask: torch.Tensor, bits: list[int], scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows of ``codes`` (k × L integers) where ``mask`` keeps entries: each row's codes packed at its bits
    (byte-aligned), where they are (dense: nothing; else the cheaper of a bitmap and indices), its float16
    scale, count, format and bits; ``quantized_vector_bytes`` per row (tested)."""
    k, length = codes.shape
    index_dtype = torch.int32 if _index_bytes(length) == 4 else torch.uint16
    packed, bitmaps, indices, counts, formats = [], [], [], [], []
    for row, keep, b in zip(codes, mask.bool(), bits, strict=True):
        nonzeros = int(keep.sum())
        counts.append(nonzeros)
        packed.append(pack(row[keep].to(torch.int64), b))
        if nonzeros == length:
            formats.append(DENSE)
        elif math.ceil(length / 8) <= nonzeros * _index_bytes(length):
            formats.append(BITMAP)
            bitmaps.append(pack(keep.to(torch.int64), 1))
        else:
            formats.append(INDEX)
            indices.append(torch.nonzero(keep).reshape(-1))
    empty = torch.zeros(0, dtype=torch.uint8)
    return {"codes": torch.cat(packed) if packed else empty, "bitmaps": torch.cat(bitmaps) if bitmaps else empty,
            "indices": (torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64)).to(index_dtype),
            "counts": torch.tensor(counts, dtype=torch.int32).reshape(k),
            "formats": torch.tensor(formats, dtype=torch.uint8).reshape(k),
            "bits": torch.tensor(bits, dtype=torch.uint8).reshape(k), "scales": _f16(scales.reshape(k), "scales")}


def unpack_quantized_sparse(tensors: dict[str, torch.Tensor], length: int) -> torch.Tensor:
    """The dequantised k × ``length`` float64 rows ``pack_quantized_sparse`` stored."""
    counts, formats, bits = tensors["counts"].tolist(), tensors["formats"].tolist(), tensors["bits"].tolist()
    scales, indices = tensors["scales"].to(torch.float64), tensors["indices"].to(torch.int64)
    out = torch.zeros(len(counts), length, dtype=torch.float64)
    at_code = at_bitmap = at_index = 0
    bitmap_bytes = math.ceil(length / 8)
    for i, (count, kind, b) in enumerate(zip(counts, formats, bits, strict=True)):
        size = math.ceil(count * b / 8)
        values = (unpack(tensors["codes"][at_code:at_code + size], b, count).double() - (1 << b) // 2) * scales[i]
        at_code += size
        if kind == DENSE:
            out[i] = values
        elif kind == BITMAP:
            out[i, unpack(tensors["bitmaps"][at_bitmap:at_bitmap + bitmap_bytes], 1, length).bool()] = values
            at_bitmap += bitmap_bytes
        else:
            out[i, indices[at_index:at_index + count]] = values
            at_index += count
    return out


@dataclass
class QuantizedSparseFactors:
    """ImPart-Qt's stored factors: ``up`` (m × k) and ``down`` (k × n) dequantised, and their stored tensors."""

    up: torch.Tensor
    down: torch.Tensor
    tensors: dict[str, torch.Tensor]
    alpha: float
    components: int


def impart_qt_for_budget(delta: torch.Tensor, gram: torch.Tensor, budget: int, beta: float, exponent: float,
                         schedule: BitSchedule, damp: float, generator: torch.Generator) -> QuantizedSparseFactors:
    """ImPart-Qt: ImPart's sparse singular vectors at the smallest sparsity whose quantised form fits
    ``budget``, each kept component at its schedule's bits; ``down`` (components × inputs) by masked GPTQ
    under the input Gram ``H``, then ``up`` (outputs × components) under ``D_q H D_qᵀ``, the Hessian of its
    inputs once ``down`` is quantised (one scale per component and factor, fitted before the sweep)."""
    m, n = delta.shape
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    alpha = smallest_alpha(lambda a: impart_qt_bytes_at(s, m, n, a, beta, exponent, schedule), budget)
    factors = _sparse_factors(u, s, vh, alpha, min(beta, alpha), exponent, generator)
    k = factors.down.shape[0]
    if k == 0:  # the budget buys no component: an empty delta, stored as such
        empty = torch.zeros(0, 0, dtype=torch.float64)
        tensors = {f"{side}.{key}": t for side in ("down", "up") for key, t in pack_quantized_sparse(
            empty, empty, [], torch.zeros(0, dtype=torch.float64)).items()}
        return QuantizedSparseFactors(torch.zeros(m, 0, dtype=torch.float64), torch.zeros(0, n, dtype=torch.float64),
                                      tensors, alpha, 0)
    bits = [schedule.of(i) for i in range(k)]
    down_mask, up_mask = (factors.down != 0).double(), (factors.up != 0).double()
    down_scale = torch.tensor([symmetric_scale(r[r != 0], b) for r, b in zip(factors.down, bits, strict=True)],
                              dtype=torch.float64)
    up_scale = torch.tensor([symmetric_scale(c[c != 0], b) for c, b in zip(factors.up.T, bits, strict=True)],
                            dtype=torch.float64)
    bits_rows = torch.tensor(bits, dtype=torch.int64)
    down_codes, down_q = masked_gptq(factors.down, down_mask, gram, down_scale[:, None].expand(k, n),
                                     bits_rows[:, None].expand(k, n), damp)
    up_codes, up_q = masked_gptq(factors.up, up_mask, down_q @ gram.double() @ down_q.T,
                                 up_scale[None, :].expand(m, k), bits_rows[None, :].expand(m, k), damp)
    tensors = {**{f"down.{key}": t for key, t in pack_quantized_sparse(down_codes, down_mask, bits, down_scale).items()},
               **{f"up.{key}": t for key, t in pack_quantized_sparse(up_codes.T, up_mask.T, bits, up_scale).items()}}
    return QuantizedSparseFactors(up_q, down_q, tensors, alpha, k)
