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
from typing import Any

import torch

from stagepipe.quantize import Grid, fit, inverse_cholesky_upper, pack, unpack

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


def kept_pairs(s: torch.Tensor, m: int, n: int, alpha: float, beta: float, exponent: float) -> list[tuple[int, int]]:
    """Entries each stored component keeps of ``u_i`` (of m) and of ``v_i`` (of n) at sparsity ``alpha``, in
    singular-value order (known before any mask is drawn; what ``_sparse_factors`` keeps)."""
    rates = impart_drop_rates(s, alpha, min(beta, alpha), exponent)
    pairs = [(kept_count(m, float(r)), kept_count(n, float(r))) for r in rates]
    return [(a, b) for a, b in pairs if min(a, b) > 0]


def impart_bytes_at(s: torch.Tensor, m: int, n: int, alpha: float, beta: float, exponent: float) -> int:
    """What ImPart stores for an m×n delta with singular values ``s`` at sparsity ``alpha``."""
    pairs = kept_pairs(s, m, n, alpha, beta, exponent)
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


def position_format(length: int, nonzeros: int) -> tuple[int, int]:
    """(``BITMAP`` or ``INDEX``, bytes) of where a sparse vector's entries are: the cheaper of a bitmap and
    16-bit (32-bit past 65,536 entries) indices; a tie goes to the bitmap."""
    size, kind = min((math.ceil(length / 8), BITMAP), (nonzeros * _index_bytes(length), INDEX))
    return kind, size


def vector_format(length: int, nonzeros: int) -> tuple[int, int]:
    """(format, bytes of its payload) of one stored vector of 16-bit values: the cheaper of all its values
    (``DENSE``; on a tie) and its nonzero values with their positions (``position_format``)."""
    kind, where = position_format(length, nonzeros)
    size, kind = min((length * VALUE_BYTES, DENSE), (where + nonzeros * VALUE_BYTES, kind))
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


class _Positions:
    """Where the entries of a group of stored ``length``-vectors are, in the order the vectors come: each
    vector's bitmap (``bitmaps``, uint8) or indices (``indices``, uint16 or int32), nothing for a dense one.
    The one coder behind ``pack_sparse`` and ``pack_quantized_sparse`` and their unpacking."""

    def __init__(self, length: int, tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.length, self.bitmaps, self.indices = length, [], []
        if tensors is not None:  # reading: cursors into the stored streams
            self.stored_bitmaps, self.stored_indices = tensors["bitmaps"], tensors["indices"].to(torch.int64)
            self.at_bitmap = self.at_index = 0

    def add(self, kind: int, keep: torch.Tensor) -> None:
        if kind == BITMAP:
            self.bitmaps.append(pack(keep.to(torch.int64), 1))
        elif kind == INDEX:
            self.indices.append(torch.nonzero(keep).reshape(-1))

    def tensors(self) -> dict[str, torch.Tensor]:
        index_dtype = torch.int32 if _index_bytes(self.length) == 4 else torch.uint16
        return {"bitmaps": torch.cat(self.bitmaps) if self.bitmaps else torch.zeros(0, dtype=torch.uint8),
                "indices": (torch.cat(self.indices) if self.indices else torch.zeros(0, dtype=torch.int64)).to(index_dtype)}

    def take(self, kind: int, count: int) -> Any:
        """The next vector's positions, as an index into a row: all of it, a mask, or indices."""
        if kind == DENSE:
            return slice(None)
        if kind == BITMAP:
            size = math.ceil(self.length / 8)
            mask = unpack(self.stored_bitmaps[self.at_bitmap:self.at_bitmap + size], 1, self.length).bool()
            self.at_bitmap += size
            return mask
        found = self.stored_indices[self.at_index:self.at_index + count]
        self.at_index += count
        return found


def pack_sparse(vectors: torch.Tensor, what: str = "delta") -> dict[str, torch.Tensor]:
    """The rows of ``vectors`` (k × L) in their cheapest formats: ``values`` (float16), ``bitmaps``
    (uint8), ``indices`` (uint16 or int32), ``counts`` (int32) and ``formats`` (uint8)."""
    k, length = vectors.shape
    positions = _Positions(length)
    values, counts, formats = [], [], []
    for row in vectors:
        mask = row != 0
        nonzeros = int(mask.sum())
        kind, _ = vector_format(length, nonzeros)
        counts.append(nonzeros)
        formats.append(kind)
        values.append(row if kind == DENSE else row[mask])
        positions.add(kind, mask)
    if all(kind == DENSE for kind in formats):  # no layout: the values alone (``sparse_bytes``)
        return {"values": _f16(vectors.reshape(-1), what)}
    return {"values": _f16(torch.cat(values) if values else torch.zeros(0, dtype=torch.float64), what),
            **positions.tensors(), "counts": torch.tensor(counts, dtype=torch.int32).reshape(k),
            "formats": torch.tensor(formats, dtype=torch.uint8).reshape(k)}


def unpack_sparse(tensors: dict[str, torch.Tensor], length: int) -> torch.Tensor:
    """The k × ``length`` float64 vectors ``pack_sparse`` stored."""
    if "formats" not in tensors:  # every vector dense
        return tensors["values"].to(torch.float64).reshape(-1, length)
    counts, formats = tensors["counts"].tolist(), tensors["formats"].tolist()
    values = tensors["values"].to(torch.float64)
    positions = _Positions(length, tensors)
    out = torch.zeros(len(counts), length, dtype=torch.float64)
    at_value = 0
    for i, (count, kind) in enumerate(zip(counts, formats, strict=True)):
        count = length if kind == DENSE else count
        out[i, positions.take(kind, count)] = values[at_value:at_value + count]
        at_value += count
    return out


def two_sided(up: dict[str, torch.Tensor], down: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One matrix's stored factors as one dict: ``up.<name>`` and ``down.<name>`` (``sides`` splits it back)."""
    return {**{f"up.{key}": t for key, t in up.items()}, **{f"down.{key}": t for key, t in down.items()}}


def sides(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``two_sided``'s ``up`` and ``down`` tensors, by their own names."""
    def side(prefix: str) -> dict[str, torch.Tensor]:
        return {key.removeprefix(prefix): t for key, t in tensors.items() if key.startswith(prefix)}

    return side("up."), side("down.")


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
    """One stored vector of ``bits``-bit codes: where its nonzeros are (nothing when dense, else
    ``position_format``), the packed codes, a float16 scale, and its count, format and bits (6 bytes)."""
    where = 0 if nonzeros == length else position_format(length, nonzeros)[1]
    return where + math.ceil(nonzeros * bits / 8) + VALUE_BYTES + LAYOUT_BYTES + 1


def impart_qt_bytes_at(s: torch.Tensor, m: int, n: int, alpha: float, beta: float, exponent: float,
                       schedule: BitSchedule) -> int:
    """ImPart-Qt's stored bytes at sparsity ``alpha`` (both factors, each kept component at its bits)."""
    pairs = kept_pairs(s, m, n, alpha, beta, exponent)
    return sum(quantized_vector_bytes(m, a, schedule.of(i)) + quantized_vector_bytes(n, b, schedule.of(i))
               for i, (a, b) in enumerate(pairs))


def symmetric_scale(values: torch.Tensor, bits: int) -> float:
    """GPTQ's symmetric grid for a vector (``quantize.fit``: codes 0 … 2^b − 1 around 2^(b−1), the range covering
    max |value|, rounded to float16 as it is stored); 1 for a vector with no nonzero value."""
    if not bool((values != 0).any()):
        return 1.0
    return float(fit(values.reshape(1, -1).double(), Grid(bits, None, symmetric=True))[0][0])


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
    (byte-aligned), where they are (dense: nothing; else ``position_format``), its float16 scale, count, format
    and bits; ``quantized_vector_bytes`` per row (tested)."""
    k, length = codes.shape
    positions = _Positions(length)
    packed, counts, formats = [], [], []
    for row, keep, b in zip(codes, mask.bool(), bits, strict=True):
        nonzeros = int(keep.sum())
        kind = DENSE if nonzeros == length else position_format(length, nonzeros)[0]
        counts.append(nonzeros)
        formats.append(kind)
        packed.append(pack(row[keep].to(torch.int64), b))
        positions.add(kind, keep)
    return {"codes": torch.cat(packed) if packed else torch.zeros(0, dtype=torch.uint8), **positions.tensors(),
            "counts": torch.tensor(counts, dtype=torch.int32).reshape(k),
            "formats": torch.tensor(formats, dtype=torch.uint8).reshape(k),
            "bits": torch.tensor(bits, dtype=torch.uint8).reshape(k), "scales": _f16(scales.reshape(k), "scales")}


def unpack_quantized_sparse(tensors: dict[str, torch.Tensor], length: int) -> torch.Tensor:
    """The dequantised k × ``length`` float64 rows ``pack_quantized_sparse`` stored."""
    counts, formats, bits = tensors["counts"].tolist(), tensors["formats"].tolist(), tensors["bits"].tolist()
    scales = tensors["scales"].to(torch.float64)
    positions = _Positions(length, tensors)
    out = torch.zeros(len(counts), length, dtype=torch.float64)
    at_code = 0
    for i, (count, kind, b) in enumerate(zip(counts, formats, bits, strict=True)):
        size = math.ceil(count * b / 8)
        values = (unpack(tensors["codes"][at_code:at_code + size], b, count).double() - (1 << b) // 2) * scales[i]
        at_code += size
        out[i, positions.take(kind, count)] = values
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
        nothing = pack_quantized_sparse(empty, empty, [], torch.zeros(0, dtype=torch.float64))
        tensors = two_sided(nothing, nothing)
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
    tensors = two_sided(pack_quantized_sparse(up_codes.T, up_mask.T, bits, up_scale),
                        pack_quantized_sparse(down_codes, down_mask, bits, down_scale))
    return QuantizedSparseFactors(up_q, down_q, tensors, alpha, k)
