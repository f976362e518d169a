"""The one mathematical core: two-sided weighted truncated SVD from a pair of metrics.

For a weight ``W`` (m×n, out×in), a left metric ``A`` (m×m, output side) and a right metric ``B``
(n×n, input side) with square roots ``A = P Pᵀ`` and ``B = Q Qᵀ``, the rank-r minimiser of
``‖Pᵀ (W − Ŵ) Q‖_F²`` is ``Ŵ_r = P^{-T} U_r Σ_r V_rᵀ Q^{-1}`` where ``Pᵀ W Q = U Σ Vᵀ``; its loss is
the sum of the dropped σ². The output-side root enters *transposed* (docs/methods.md).

Metrics are factorised in float64 by a symmetric eigen-decomposition with a *relative* eigenvalue
floor (``λ ← max(λ, floor_rel·λ_max)``), which handles PSD-singular metrics such as a rank-deficient
``X Xᵀ``. The floor is a repair and is returned for the manifest. Inverses are never formed:
``P = U diag(√λ)`` is inverted analytically as ``diag(1/√λ) Uᵀ``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from stagepipe.errors import MetricError

Tensor = torch.Tensor


@dataclass(frozen=True)
class MetricRoot:
    """A square root ``P`` (``M = P Pᵀ``) of a floored SPD metric, with the repair it needed.

    ``kind`` is ``identity`` (P = I), ``diagonal`` (P = diag(scale)) or ``dense``
    (P = basis · diag(scale), basis orthogonal).
    """

    dim: int
    kind: str
    scale: Tensor | None = None
    basis: Tensor | None = None
    repair: dict[str, Any] = field(default_factory=dict)

    def apply_left(self, w: Tensor) -> Tensor:
        """``Pᵀ W`` (this metric on the output side of ``W``)."""
        if self.kind == "identity":
            return w
        if self.kind == "diagonal":
            return self.scale[:, None] * w
        return self.scale[:, None] * (self.basis.T @ w)

    def apply_right(self, w: Tensor) -> Tensor:
        """``W Q`` (this metric on the input side of ``W``)."""
        if self.kind == "identity":
            return w
        if self.kind == "diagonal":
            return w * self.scale[None, :]
        return (w @ self.basis) * self.scale[None, :]

    def solve_left(self, x: Tensor) -> Tensor:
        """``P^{-T} X``: undo the output-side whitening."""
        if self.kind == "identity":
            return x
        if self.kind == "diagonal":
            return x / self.scale[:, None]
        return self.basis @ (x / self.scale[:, None])

    def solve_right(self, x: Tensor) -> Tensor:
        """``X Q^{-1}``: undo the input-side whitening."""
        if self.kind == "identity":
            return x
        if self.kind == "diagonal":
            return x / self.scale[None, :]
        return (x / self.scale[None, :]) @ self.basis.T

    def matrix(self) -> Tensor:
        """The floored metric ``P Pᵀ`` itself (tests and diagnostics)."""
        if self.kind == "identity":
            return torch.eye(self.dim, dtype=torch.float64)
        if self.kind == "diagonal":
            return torch.diag(self.scale**2)
        return (self.basis * self.scale**2) @ self.basis.T


def identity_root(dim: int) -> MetricRoot:
    return MetricRoot(dim=dim, kind="identity", repair={"kind": "identity"})


def floor_eigenvalues(eigenvalues: Tensor, floor_rel: float, name: str) -> tuple[Tensor, dict[str, Any]]:
    """``λ ← max(λ, floor_rel·λ_max)``, with the repair described for the manifest."""
    if not torch.isfinite(eigenvalues).all():
        raise MetricError(f"{name}: metric has non-finite entries")
    lam_max = float(eigenvalues.max())
    if not lam_max > 0:
        raise MetricError(f"{name}: metric has no positive mass (largest eigenvalue {lam_max:.3e})")
    lam_min = float(eigenvalues.min())
    floor = floor_rel * lam_max
    floored = eigenvalues < floor
    repaired = eigenvalues.clamp(min=floor)
    repair = {
        "floor_rel": floor_rel,
        "n_floored": int(floored.sum()),
        "floored_fraction": float(floored.float().mean()),
        "n_negative": int((eigenvalues < 0).sum()),
        "eig_max": lam_max,
        "eig_min": lam_min,
        "cond_before": lam_max / lam_min if lam_min > 0 else float("inf"),
        "cond_after": lam_max / float(repaired.min()),
    }
    return repaired, repair


def factor_metric(metric: Tensor | None, floor_rel: float, name: str = "metric") -> MetricRoot | None:
    """Square root of a metric given as ``None`` (identity), a vector (diagonal) or a matrix.

    Returns ``None`` for ``None`` so callers can size the identity from ``W``.
    """
    if metric is None:
        return None
    m = metric.detach().to(dtype=torch.float64)
    if m.ndim == 1:
        repaired, repair = floor_eigenvalues(m, floor_rel, name)
        return MetricRoot(dim=m.numel(), kind="diagonal", scale=repaired.sqrt(), repair={"kind": "diagonal", **repair})
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise MetricError(f"{name}: expected a square matrix or a vector, got shape {tuple(m.shape)}")
    if not torch.isfinite(m).all():
        raise MetricError(f"{name}: metric has non-finite entries")
    sym = 0.5 * (m + m.T)
    eigenvalues, basis = torch.linalg.eigh(sym)
    repaired, repair = floor_eigenvalues(eigenvalues, floor_rel, name)
    return MetricRoot(dim=m.shape[0], kind="dense", scale=repaired.sqrt(), basis=basis,
                      repair={"kind": "dense", **repair})


def psd_floor(matrix: Tensor, floor_rel: float, name: str = "matrix") -> tuple[Tensor, dict[str, Any]]:
    """The symmetric ``matrix`` projected onto the PSD cone with a relative eigenvalue floor
    (``U diag(max(λ, floor)) Uᵀ``), and the repair."""
    eigenvalues, basis = torch.linalg.eigh(matrix)
    repaired, repair = floor_eigenvalues(eigenvalues, floor_rel, name)
    return (basis * repaired) @ basis.T, repair


def official_alpha(matrix: Tensor, name: str = "matrix", start: float = 1e-5, factor: float = 10.0,
                   tries: int = 10) -> tuple[Tensor, dict[str, Any]]:
    """The official GFWSVD regulariser (``sayankotor/FisherKronecker``, LLaMA-2 scripts): a matrix
    that passes Cholesky is used untouched; otherwise ``α ← α·factor`` (from ``start``) and
    ``M ← (1−α) M + α·mean(diag M)·I``, retried up to ``tries`` times. Unlike the official code a
    matrix that never passes is an error, not a silent switch to plain SVD."""
    if not torch.isfinite(matrix).all():
        raise MetricError(f"{name}: metric has non-finite entries")
    mean_diag = max(float(matrix.diagonal().mean()), 1e-6)
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype)
    current, alpha = matrix, start
    for attempt in range(tries + 1):
        if torch.linalg.cholesky_ex(current).info == 0:
            return current, {"kind": "official_alpha", "alpha": 0.0 if attempt == 0 else alpha, "tries": attempt}
        if attempt == tries:
            break
        alpha *= factor
        current = (1 - alpha) * matrix + alpha * mean_diag * eye
    raise MetricError(f"{name}: not positive definite after {tries} official_alpha tries (α up to {alpha:.1e})")


@dataclass(frozen=True)
class WeightedSVD:
    """Full weighted spectrum and un-whitened factors: ``Ŵ_r = left[:, :r] diag(σ_r) right[:r]``."""

    sigma: Tensor  # (k,) descending, k = min(m, n)
    left: Tensor  # (m, k) = P^{-T} U
    right: Tensor  # (k, n) = Vᵀ Q^{-1}

    def reconstruct(self, rank: int) -> Tensor:
        return (self.left[:, :rank] * self.sigma[:rank]) @ self.right[:rank]

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """Two-factor storage with Σ split symmetrically: ``up`` (m×r) and ``down`` (r×n)."""
        root = self.sigma[:rank].sqrt()
        return self.left[:, :rank] * root, root[:, None] * self.right[:rank]

    def dropped_energy(self, rank: int) -> float:
        """Weighted truncation loss of rank ``rank``: the sum of the dropped σ²."""
        return float((self.sigma[rank:] ** 2).sum())


def weighted_svd(w: Tensor, left: MetricRoot | None, right: MetricRoot | None) -> WeightedSVD:
    """Two-sided weighted SVD of ``w`` (m×n) in float64; ``None`` metrics mean identity."""
    w64 = w.detach().to(dtype=torch.float64)
    m, n = w64.shape
    left = left or identity_root(m)
    right = right or identity_root(n)
    if left.dim != m or right.dim != n:
        raise MetricError(f"metric sizes ({left.dim}, {right.dim}) do not match weight shape ({m}, {n})")
    whitened = right.apply_right(left.apply_left(w64))
    u, sigma, vh = torch.linalg.svd(whitened, full_matrices=False)
    return WeightedSVD(sigma=sigma, left=left.solve_left(u), right=right.solve_right(vh))


def weighted_loss(delta: Tensor, left: MetricRoot | None, right: MetricRoot | None) -> float:
    """``‖Pᵀ Δ Q‖_F²`` for a weight difference ``Δ``."""
    d = delta.to(torch.float64)
    left = left or identity_root(d.shape[0])
    right = right or identity_root(d.shape[1])
    return float((right.apply_right(left.apply_left(d)) ** 2).sum())
