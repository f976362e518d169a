"""The one mathematical core: two-sided weighted truncated SVD from a pair of metrics.

For a weight ``W`` (m×n, out×in), a left metric ``A`` (m×m, output side) and a right metric ``B``
(n×n, input side) with square roots ``A = P Pᵀ`` and ``B = Q Qᵀ``, the rank-r minimiser of
``‖Pᵀ (W − Ŵ) Q‖_F²`` is ``Ŵ_r = P^{-T} U_r Σ_r V_rᵀ Q^{-1}`` where ``Pᵀ W Q = U Σ Vᵀ``; its loss is
the sum of the dropped σ². The output-side root enters *transposed* (docs/methods.md).

Metrics are factorised in float64 by a symmetric eigen-decomposition with a *relative* eigenvalue
floor (``λ ← max(λ, floor_rel·λ_max)``), which handles PSD-singular metrics such as a rank-deficient
``X Xᵀ``. The floor is a repair and is returned for the manifest. Inverses are never formed:
``P = U diag(√λ)`` is inverted analytically as ``diag(1/√λ) Uᵀ``.

When the floor provably does not bite — ``M − floor_rel·‖M‖_F·I`` passes Cholesky, so
``λ_min > floor_rel·‖M‖_F ≥ floor_rel·λ_max`` — the floored metric *is* ``M`` and its Cholesky
factor ``P = L`` is used instead (triangular solves, about 10× cheaper than the eigensolver for
n = 1536). Every square root of the same metric gives the same weighted SVD (roots differ by an
orthogonal factor), so the result is the eigen route's up to rounding; tested.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from stagepipe.errors import MetricError

Tensor = torch.Tensor
F = TypeVar("F", bound=Callable[..., Any])


#: ``benchmarks/reproducibility.py`` switches it off to measure what one thread costs
PIN_THREADS = True


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run CPU linear algebra in one thread. LAPACK's eigen- and singular-value solvers,
    Cholesky and triangular solves (MKL) return other last bits with another thread count (seen:
    ``eigh`` of a 64×64 matrix, 1 vs 2 threads), so an output made in a process with all cores
    and the same output made in a one-CPU Ray task would differ, and every downstream key with
    them. Matrix products keep their bits across thread counts and are left alone elsewhere.
    What it costs on two cores: docs/reproducibility.md; GPUs are unaffected."""
    before = torch.get_num_threads()
    pin = PIN_THREADS and before != 1
    if pin:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if pin:
            torch.set_num_threads(before)


def reproducible(fn: F) -> F:
    """``fn`` under ``single_threaded``: its factorisations give the same bits in any process."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with single_threaded():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class MetricRoot:
    """A square root ``P`` (``M = P Pᵀ``) of a floored SPD metric, with the repair it needed.

    ``kind`` is ``identity`` (P = I), ``diagonal`` (P = diag(scale)), ``dense``
    (P = basis · diag(scale), basis orthogonal) or ``cholesky`` (P = lower, lower triangular).
    """

    dim: int
    kind: str
    scale: Tensor | None = None
    basis: Tensor | None = None
    repair: dict[str, Any] = field(default_factory=dict)
    lower: Tensor | None = None

    def apply_left(self, w: Tensor) -> Tensor:
        """``Pᵀ W`` (this metric on the output side of ``W``)."""
        if self.kind == "identity":
            return w
        if self.kind == "diagonal":
            return self.scale[:, None] * w
        if self.kind == "cholesky":
            return self.lower.T @ w
        return self.scale[:, None] * (self.basis.T @ w)

    def apply_right(self, w: Tensor) -> Tensor:
        """``W Q`` (this metric on the input side of ``W``)."""
        if self.kind == "identity":
            return w
        if self.kind == "diagonal":
            return w * self.scale[None, :]
        if self.kind == "cholesky":
            return w @ self.lower
        return (w @ self.basis) * self.scale[None, :]

    def solve_left(self, x: Tensor) -> Tensor:
        """``P^{-T} X``: undo the output-side whitening."""
        if self.kind == "identity":
            return x
        if self.kind == "diagonal":
            return x / self.scale[:, None]
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.lower.T, x, upper=True)
        return self.basis @ (x / self.scale[:, None])

    def solve_right(self, x: Tensor) -> Tensor:
        """``X Q^{-1}``: undo the input-side whitening."""
        if self.kind == "identity":
            return x
        if self.kind == "diagonal":
            return x / self.scale[None, :]
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.lower, x, upper=False, left=False)
        return (x / self.scale[None, :]) @ self.basis.T

    def solve_right_transposed(self, x: Tensor) -> Tensor:
        """``X Q^{-T}``: whiten a cross term ``W C`` against this input-side metric (AA-SVD's
        ``W C Q^{-T}``, the whitened regression target ``W C M^{-1}`` times ``Q``)."""
        if self.kind == "identity":
            return x
        if self.kind == "diagonal":
            return x / self.scale[None, :]
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.lower.T, x, upper=True, left=False)
        return (x @ self.basis) / self.scale[None, :]

    def matrix(self) -> Tensor:
        """The floored metric ``P Pᵀ`` itself (tests and diagnostics)."""
        if self.kind == "identity":
            return torch.eye(self.dim, dtype=torch.float64)
        if self.kind == "diagonal":
            return torch.diag(self.scale**2)
        if self.kind == "cholesky":
            return self.lower @ self.lower.T
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


@reproducible
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
    return _cholesky_root(sym, floor_rel) or eigen_root(sym, floor_rel, name)


def eigen_root(sym: Tensor, floor_rel: float, name: str = "metric") -> MetricRoot:
    """``P = U diag(√max(λ, floor_rel·λ_max))`` from the eigen-decomposition of a symmetric metric."""
    eigenvalues, basis = torch.linalg.eigh(sym)
    repaired, repair = floor_eigenvalues(eigenvalues, floor_rel, name)
    return MetricRoot(dim=sym.shape[0], kind="dense", scale=repaired.sqrt(), basis=basis,
                      repair={"kind": "dense", **repair})


def _cholesky_root(sym: Tensor, floor_rel: float) -> MetricRoot | None:
    """``P = chol(M)`` when ``M − floor_rel·‖M‖_F·I`` is positive definite (the floor cannot bite),
    else ``None`` (the eigen route decides and records the floor)."""
    bound = float(torch.linalg.matrix_norm(sym))  # ‖M‖_F ≥ λ_max; ``factor_metric`` checked finiteness
    if not bound > 0:
        return None
    shift = floor_rel * bound
    eye = torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device)
    if int(torch.linalg.cholesky_ex(sym - shift * eye).info) != 0:
        return None
    lower, info = torch.linalg.cholesky_ex(sym)
    if int(info) != 0:
        return None
    return MetricRoot(dim=sym.shape[0], kind="cholesky", lower=lower,
                      repair={"kind": "cholesky", "floor_rel": floor_rel, "n_floored": 0, "floored_fraction": 0.0,
                              "eig_min_above": shift, "frobenius": bound})


class MetricCache:
    """Factorise each distinct metric of a layer once: linears fed the same input (q/k/v, gate/up)
    share their input Gram, so its root is reused (bit-identical, found by value). Used by every
    stage that factorises a layer's metrics (decompose, rank_factors, sensitivity)."""

    reuse = True  # benchmarks/decompose.py switches it off to measure what sharing saves

    def __init__(self, floor_rel: float, device: torch.device) -> None:
        self.floor_rel, self.device = floor_rel, device
        self.seen: list[tuple[torch.Tensor, MetricRoot]] = []
        self.computed = 0

    def __call__(self, metric: torch.Tensor | None, name: str) -> MetricRoot | None:
        if metric is None:
            return None
        for known, root in self.seen if self.reuse else ():
            if known.shape == metric.shape and torch.equal(known, metric.to(known.device)):  # callers may mix devices
                return root
        root = factor_metric(metric.to(self.device), self.floor_rel, name)
        self.seen.append((metric, root))
        self.computed += 1
        return root


@reproducible
def psd_floor(matrix: Tensor, floor_rel: float, name: str = "matrix") -> tuple[Tensor, dict[str, Any]]:
    """The symmetric ``matrix`` projected onto the PSD cone with a relative eigenvalue floor
    (``U diag(max(λ, floor)) Uᵀ``), and the repair."""
    eigenvalues, basis = torch.linalg.eigh(matrix)
    repaired, repair = floor_eigenvalues(eigenvalues, floor_rel, name)
    return (basis * repaired) @ basis.T, repair


@reproducible
def official_alpha(matrix: Tensor, name: str = "matrix", start: float = 1e-5, factor: float = 10.0,
                   tries: int = 10) -> tuple[Tensor, dict[str, Any]]:
    """The official GFWSVD regulariser (``sayankotor/FisherKronecker``, LLaMA-2 scripts): a matrix
    that passes Cholesky is used untouched; otherwise ``α ← α·factor`` (from ``start``) and
    ``M ← (1−α) M + α·mean(diag M)·I``, retried up to ``tries`` times. Unlike the official code a
    matrix that never passes is an error, not a silent switch to plain SVD."""
    if not torch.isfinite(matrix).all():
        raise MetricError(f"{name}: metric has non-finite entries")
    mean_diag = max(float(matrix.diagonal().mean()), 1e-6)
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
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
    """Full weighted spectrum and un-whitened factors: ``Ŵ_r = left[:, :r] diag(σ_r) right[:r]``
    (as ``decompose`` stores them, the factors stop at the method's ``stored_rank``)."""

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


@reproducible
def weighted_svd(w: Tensor, left: MetricRoot | None, right: MetricRoot | None,
                 svd_dtype: torch.dtype = torch.float64) -> WeightedSVD:
    """Two-sided weighted SVD of ``w`` (m×n); ``None`` metrics mean identity.

    Whitening and un-whitening are float64; ``svd_dtype=float32`` runs only the SVD of the
    whitened matrix in single precision (about 2× faster on CPU; its rounding, ~1e-7 of σ₁, is
    far below what truncation drops; ``benchmarks/official_whitening.py`` measures both)."""
    w64 = w.detach().to(dtype=torch.float64)
    left, right = _sized(w64.shape, left, right)
    return _svd_of_whitened(right.apply_right(left.apply_left(w64)), left, right, svd_dtype)


@reproducible
def anchored_svd(w: Tensor, cross: Tensor, left: MetricRoot | None, right: MetricRoot,
                 svd_dtype: torch.dtype = torch.float64) -> WeightedSVD:
    """Reduced-rank regression (AA-SVD's anchored objective): the rank-r minimiser of
    ``‖Pᵀ (W Y − Ŵ Ŷ)‖_F²`` for the dense inputs ``Y`` and shifted inputs ``Ŷ`` of a linear.

    With ``C = Y Ŷᵀ`` (``cross``, n×n) and ``right`` a root ``Q`` of ``Ĝ = Ŷ Ŷᵀ``:
    ``‖Pᵀ(WY − ŴŶ)‖² = ‖Pᵀ(WY − W*Ŷ)‖² + ‖Pᵀ(W* − Ŵ) Q‖²`` with the regression target
    ``W* = W C Ĝ⁻¹`` (its rows solve the least-squares problems). So the answer is the weighted SVD
    of ``W*`` under ``(P, Q)``, whose whitened matrix ``Pᵀ W* Q = Pᵀ W C Q^{-T}`` is formed by a
    triangular solve, never an inverse. ``C = Ĝ`` (``Ŷ = Y``) gives ``weighted_svd(W, P, Q)``:
    SVD-LLM with the identity on the left. A floored ``Ĝ`` regresses against the floored metric
    (the repair is ``right.repair``)."""
    w64 = w.detach().to(dtype=torch.float64)
    left, right = _sized(w64.shape, left, right)
    if cross.shape != (right.dim, right.dim):
        raise MetricError(f"cross term of shape {tuple(cross.shape)} does not match input size {right.dim}")
    target = right.solve_right_transposed(w64 @ cross.to(dtype=torch.float64, device=w64.device))
    return _svd_of_whitened(left.apply_left(target), left, right, svd_dtype)


def _sized(shape: torch.Size, left: MetricRoot | None, right: MetricRoot | None) -> tuple[MetricRoot, MetricRoot]:
    m, n = shape
    left = left or identity_root(m)
    right = right or identity_root(n)
    if left.dim != m or right.dim != n:
        raise MetricError(f"metric sizes ({left.dim}, {right.dim}) do not match weight shape ({m}, {n})")
    return left, right


def _svd_of_whitened(whitened: Tensor, left: MetricRoot, right: MetricRoot, svd_dtype: torch.dtype) -> WeightedSVD:
    u, sigma, vh = (t.to(torch.float64) for t in torch.linalg.svd(whitened.to(svd_dtype), full_matrices=False))
    return WeightedSVD(sigma=sigma, left=left.solve_left(u), right=right.solve_right(vh))


def weighted_loss(delta: Tensor, left: MetricRoot | None, right: MetricRoot | None) -> float:
    """``‖Pᵀ Δ Q‖_F²`` for a weight difference ``Δ`` (of a weight matrix itself: its ``Σσ̃²``)."""
    d = delta.to(torch.float64)
    left = left or identity_root(d.shape[0])
    right = right or identity_root(d.shape[1])
    return float((right.apply_right(left.apply_left(d)) ** 2).sum())


def weighted_relative_error(delta: Tensor, reference: Tensor, left: MetricRoot | None, right: MetricRoot | None) -> float:
    """``‖Pᵀ Δ Q‖² / ‖Pᵀ W Q‖²``: a change ``Δ`` of ``W`` relative to ``W``, in one metric pair."""
    return weighted_loss(delta, left, right) / weighted_loss(reference, left, right)
