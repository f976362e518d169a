"""Delta compression maths (issue #34): ImPart, DARE, BitDelta and plain low rank on ``Δ = W_ft − W_base``.

- **ImPart** (ACL 2025, arXiv 2504.13237; from the paper — its repository has no licence): the SVD
  ``Δ = U diag(s) Vᵀ``; for an overall sparsity ``α = 1 − 1/CR`` the weakest fraction ``β`` of the
  components is dropped whole, the others get the drop rate ``p_i = γ (1 − (s_i/s_max)^C)`` with
  ``γ = (α − β)/(1 − β)``, and components are dropped from the tail until the mean rate reaches
  ``α``. Each kept component has a random share ``p_i`` of the entries of ``u_i`` and of ``v_i``
  zeroed and the survivors rescaled by ``1/(1 − p_i)``: in expectation the sparse delta is the
  truncated one (``tests/test_delta.py`` checks it statistically).
- **DARE**: each entry of ``Δ`` dropped with probability ``p``, survivors rescaled by ``1/(1 − p)``.
- **BitDelta**: ``sign(Δ)`` times one scale per matrix, the mean of ``|Δ|``.
- **Low rank**: the truncated SVD of ``Δ``.

Masks come from a generator seeded by ``mask_seed(seed, name)`` (the matrix's name and the
pipeline's seed), so a resumed run draws the same masks bit for bit. ``*_bytes`` is the one
accounting of what each stores (16-bit values, and for sparse vectors a bitmap or 16/32-bit
indices, whichever is smaller).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

VALUE_BYTES = 2  # 16-bit values


def mask_seed(seed: int, name: str) -> int:
    """A 63-bit seed per (pipeline seed, matrix name): the same masks on any machine and resume."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def impart_drop_rates(s: torch.Tensor, alpha: float, beta: float, exponent: float = 1.0) -> torch.Tensor:
    """Per component (``s`` descending) its drop rate; 1 means dropped whole."""
    if not 0 <= beta <= alpha < 1:
        raise ValueError(f"need 0 ≤ β ≤ α < 1, got α={alpha}, β={beta}")
    k = s.numel()
    gamma = (alpha - beta) / (1 - beta)
    rates = gamma * (1 - (s / s[0]) ** exponent)
    dropped = math.ceil(beta * k - 1e-12)
    if dropped:
        rates[k - dropped:] = 1.0
    tail = k - dropped
    while float(rates.mean()) < alpha - 1e-12 and tail > 0:  # from the tail until the budget is met
        tail -= 1
        rates[tail] = 1.0
    return rates


def sparsify(vector: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Zero a random share ``rate`` of the entries (each kept with probability ``1 − rate``) and
    rescale the survivors by ``1/(1 − rate)``."""
    if rate >= 1:
        return torch.zeros_like(vector)
    keep = torch.rand(vector.shape, generator=generator, dtype=torch.float64) >= rate
    return torch.where(keep, vector / (1 - rate), torch.zeros_like(vector))


@dataclass
class SparseFactors:
    """``Δ ≈ U' diag(s) V'ᵀ`` with sparse columns; ``rates`` per component (1: not stored)."""

    up: torch.Tensor    # m × k (u_i' · s_i)
    down: torch.Tensor  # k × n (v_i'ᵀ)
    rates: torch.Tensor

    def delta(self) -> torch.Tensor:
        return self.up @ self.down


def impart(delta: torch.Tensor, alpha: float, beta: float, exponent: float = 1.0,
           generator: torch.Generator | None = None) -> SparseFactors:
    """ImPart's sparse singular vectors of ``delta`` at overall sparsity ``alpha``."""
    generator = generator or torch.Generator().manual_seed(0)
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rates = impart_drop_rates(s, alpha, beta, exponent)
    kept = [i for i in range(s.numel()) if rates[i] < 1]
    up = torch.stack([sparsify(u[:, i], float(rates[i]), generator) * s[i] for i in kept], 1) if kept else u[:, :0]
    down = torch.stack([sparsify(vh[i], float(rates[i]), generator) for i in kept]) if kept else vh[:0]
    return SparseFactors(up, down, rates)


def dare(delta: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    return sparsify(delta.double(), rate, generator)


def bitdelta(delta: torch.Tensor) -> torch.Tensor:
    d = delta.double()
    return torch.sign(d) * d.abs().mean()


def low_rank(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


# --------------------------------------------------------------------------- bytes stored
def sparse_bytes(length: int, nonzeros: int) -> int:
    """A sparse vector or matrix of ``length`` entries: 16-bit values and the cheaper of a bitmap and
    16-bit (or 32-bit past 65,536 entries) indices — or all ``length`` values when that is cheaper."""
    index_bytes = 2 if length <= 1 << 16 else 4
    return min(length * VALUE_BYTES, nonzeros * VALUE_BYTES + min(math.ceil(length / 8), nonzeros * index_bytes))


def impart_bytes(factors: SparseFactors) -> int:
    return sum(sparse_bytes(col.numel(), int(torch.count_nonzero(col))) for col in factors.up.T) + \
        sum(sparse_bytes(row.numel(), int(torch.count_nonzero(row))) for row in factors.down)


def dense_delta_bytes(m: int, n: int) -> int:
    return m * n * VALUE_BYTES


def bitdelta_bytes(m: int, n: int) -> int:
    return math.ceil(m * n / 8) + VALUE_BYTES


def low_rank_bytes(m: int, n: int, rank: int) -> int:
    return rank * (m + n) * VALUE_BYTES
