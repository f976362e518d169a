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


def impart_for_budget(delta: torch.Tensor, budget: int, beta: float, exponent: float,
                      generator: torch.Generator) -> SparseFactors:
    """ImPart at the smallest sparsity ``α`` whose stored bytes are within ``budget`` (bisection; the
    bytes fall as ``α`` grows, and ``α`` near 1 stores nothing)."""
    m, n = delta.shape
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)  # one SVD: the rates searched are the rates used
    low, high = 0.0, 1.0 - 1e-9
    if impart_bytes_at(s, m, n, low, beta, exponent) > budget:
        for _ in range(50):
            middle = 0.5 * (low + high)
            low, high = (middle, high) if impart_bytes_at(s, m, n, middle, beta, exponent) > budget else (low, middle)
    else:
        high = low
    return _sparse_factors(u, s, vh, high, min(beta, high), exponent, generator)


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
