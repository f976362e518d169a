"""Kronecker-factored Fisher for GFWSVD: nearest Kronecker product and factor clean-up.

The empirical Fisher of a linear (m×n) from K per-sequence weight gradients ``G_k`` is
``F = (1/K) Σ vec(G_k) vec(G_k)ᵀ`` (column-major vec). Its nearest Kronecker product
``F ≈ B ⊗ A`` (A: m×m output side, B: n×n input side) is the top singular pair of the rearranged
operator ``R = (1/K) Σ G_k ⊗ G_k``, found by alternating power iteration with matrix-free products
(docs/methods.md)::

    A ← (1/K) Σ G_k B G_kᵀ ;  A ← A / ‖A‖_F
    B ← (1/K) Σ G_kᵀ A G_k          (then F ≈ B ⊗ A with ‖A‖_F = 1)

Gradients arrive through a *source*: a callable returning an iterator over batches
``{linear: G (b, m, n)}`` or ``{linear: (D (b, T, m), X (b, T, n))}`` with ``G_k = D_kᵀ X_k``.
With ``T = 1`` (``chunk_tokens: 1``, the per-token Fisher ``F = (1/K) Σ_t (x_t x_tᵀ) ⊗ (d_t d_tᵀ)``)
each gradient has rank one and the products become weighted Grams (``_token_products``). A stored source reads them back from zarr; a streaming source
recomputes them by a forward+backward of the block, so the K gradients are never all held.
Both feed this same code, so both modes give the same factors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from stagepipe.linalg import factor_metric, official_alpha, psd_floor, reproducible, weighted_svd

GradientBatch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # G (b, m, n) or (D, X)
GradientSource = Callable[[], Iterator[dict[str, GradientBatch]]]


@dataclass
class NKPResult:
    A: torch.Tensor  # m×m, ‖A‖_F = 1 before clean-up
    B: torch.Tensor  # n×n, carries the scale σ₁
    sweeps: int
    rel_change: float
    history: list[float] = field(default_factory=list)


def _products(value: GradientBatch, y: torch.Tensor, side: str) -> torch.Tensor:
    """Σ over the batch of ``G Y Gᵀ`` (side 'A') or ``Gᵀ Y G`` (side 'B'), float32 per term.

    ``value`` is either the gradients ``G`` (b, m, n) or their factors ``(D, X)`` with
    ``G = Dᵀ X`` (D: b×T×m output gradients, X: b×T×n inputs). With factors the cheaper of
    ``Dᵀ (X Y Xᵀ) D`` and the explicit route is used (T < m, n makes the factored route cheaper).
    """
    if isinstance(value, torch.Tensor):
        g = value.float()
        prod = g @ y @ g.transpose(1, 2) if side == "A" else g.transpose(1, 2) @ y @ g
        return prod.double().sum(0)
    if value[0].shape[1] == 1:
        return _token_products(value[0][:, 0], value[1][:, 0], y, side)
    d, x = value[0].float(), value[1].float()
    t, m, n = d.shape[1], d.shape[2], x.shape[2]
    explicit = t * m * n + m * n * n + m * m * n
    factored = t * n * n + t * t * n + t * t * m + t * m * m
    if explicit < factored:
        return _products(d.transpose(1, 2) @ x, y, side)
    if side == "A":  # G Y Gᵀ = Dᵀ (X Y Xᵀ) D
        inner = x @ y @ x.transpose(1, 2)
        prod = d.transpose(1, 2) @ inner @ d
    else:  # Gᵀ Y G = Xᵀ (D Y Dᵀ) X
        inner = d @ y @ d.transpose(1, 2)
        prod = x.transpose(1, 2) @ inner @ x
    return prod.double().sum(0)


def _token_products(d: torch.Tensor, x: torch.Tensor, y: torch.Tensor, side: str) -> torch.Tensor:
    """Per-token gradients ``G_t = d_t x_tᵀ`` (rank one): the weighted NKP products,
    ``Σ_t G_t Y G_tᵀ = Dᵀ diag(w) D`` with ``w_t = x_tᵀ Y x_t`` (side 'A') and
    ``Σ_t G_tᵀ Y G_t = Xᵀ diag(u) X`` with ``u_t = d_tᵀ Y d_t`` (side 'B').

    Costs O(K (m² + n²)) and memory O(K (m + n)); no (K, m, m) or (K, m, n) tensor is formed.
    One batch is a float32 product (like the per-sequence route), batches add in float64.
    """
    d, x, y = d.float(), x.float(), y.float()
    if side == "A":
        weights = ((x @ y) * x).sum(1)
        return ((d * weights[:, None]).T @ d).double()
    weights = ((d @ y) * d).sum(1)
    return ((x * weights[:, None]).T @ x).double()


def product_sums(source: GradientSource, other: dict[str, torch.Tensor], side: str) -> tuple[dict[str, torch.Tensor], int]:
    """One pass over the gradients: ``Σ G Y Gᵀ`` (side 'A') or ``Σ Gᵀ Y G`` (side 'B') and the
    number of gradients, not yet divided, so that shards of the gradients can be added first.

    ``Y`` is normalised (‖A‖_F = 1) or a scaled Gram, so float32 products are well within range;
    the K terms are accumulated in float64.
    """
    acc: dict[str, torch.Tensor] = {}
    count = 0
    for batch in source():
        size = 0
        for name, value in batch.items():
            sample = value if isinstance(value, torch.Tensor) else value[0]
            y = other[name].to(sample.device, torch.float32)
            prod = _products(value, y, side)
            acc[name] = acc[name] + prod if name in acc else prod
            size = sample.shape[0]
        count += size
    return acc, count


#: ``sums(Y, side) -> (Σ products, K)``: one half-sweep over all the gradients (``product_sums``
#: of one source, or the ordered sum of shards' ``product_sums``)
ProductSums = Callable[[dict[str, torch.Tensor], str], tuple[dict[str, torch.Tensor], int]]


def _apply(sums: ProductSums, other: dict[str, torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    """``(1/K) Σ G Y Gᵀ`` (side 'A') or ``(1/K) Σ Gᵀ Y G`` (side 'B')."""
    acc, count = sums(other, side)
    return {name: value / count for name, value in acc.items()}


def nkp_power_iteration(source: GradientSource | None, warm_b: dict[str, torch.Tensor], max_sweeps: int, tol: float,
                        on_sweep: Callable[[int, dict[str, NKPResult]], None] | None = None,
                        start: dict[str, NKPResult] | None = None, sums: ProductSums | None = None) -> dict[str, NKPResult]:
    """Alternating power iteration for every linear in ``warm_b`` at once.

    A sweep is two passes over the gradients (``source``, or ``sums`` when the gradients are split
    into shards). Stops when the largest relative change of A (sign aligned) drops below ``tol`` or
    after ``max_sweeps``. ``start`` resumes from a saved sweep.
    """
    if sums is None:
        assert source is not None
        sums = partial(product_sums, source)
    results = dict(start or {})
    b = {name: (results[name].B if name in results else warm_b[name]).to(torch.float64) for name in warm_b}
    prev_a = {name: results[name].A for name in results}
    first = max((r.sweeps for r in results.values()), default=0)
    for sweep in range(first + 1, max_sweeps + 1):
        a = _apply(sums, b, "A")
        a = {n: v / torch.linalg.norm(v) for n, v in a.items()}
        b = _apply(sums, a, "B")
        for name, value in a.items():
            change = float("inf")
            if name in prev_a:  # ‖A‖_F = 1, so this is already relative; align the joint sign first
                old = prev_a[name].to(value.device)
                sign = 1.0 if float((old * value).sum()) >= 0 else -1.0
                change = float(torch.linalg.norm(value - sign * old))
            history = results[name].history + [change] if name in results else [change]
            results[name] = NKPResult(A=value, B=b[name], sweeps=sweep, rel_change=change, history=history)
        prev_a = a
        if on_sweep is not None:
            on_sweep(sweep, results)
        if max(r.rel_change for r in results.values()) < tol:
            break
    return results


@reproducible
def clean_factors(a: torch.Tensor, b: torch.Tensor, floor_rel: float,
                  regularizer: str = "floor") -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, Any]]:
    """Symmetrise, fix the joint sign (tr A > 0), normalise tr A = m (scale moved into B) and repair
    each factor: ``floor`` projects it onto the PSD cone with a relative eigenvalue floor;
    ``official_alpha`` applies the official code's shrink-until-Cholesky rule (``linalg.official_alpha``).

    Returns ``None`` for a side that is unusable (non-finite, or no positive mass after the sign
    fix), with the reason in the info; the caller falls back for that side and says so.
    """
    info: dict[str, Any] = {"floor_rel": floor_rel, "regularizer": regularizer}

    def repair(matrix: torch.Tensor, name: str) -> tuple[torch.Tensor, dict[str, Any]]:
        return official_alpha(matrix, name) if regularizer == "official_alpha" else psd_floor(matrix, floor_rel, name)

    a = 0.5 * (a + a.T).to(torch.float64)
    b = 0.5 * (b + b.T).to(torch.float64)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        info["unusable"] = "non-finite factor"
        return None, None, info
    if float(torch.trace(a)) < 0:
        a, b = -a, -b
        info["sign_flipped"] = True
    trace_a = float(torch.trace(a))
    out_a: torch.Tensor | None = None
    out_b: torch.Tensor | None = None
    if trace_a > 0:
        scale = trace_a / a.shape[0]
        a, b = a / scale, b * scale
        out_a, info["A"] = repair(a, "A")
    else:
        info["A_unusable"] = f"trace {trace_a:.3e} after sign fix"
    if float(torch.trace(b)) > 0 and float(torch.linalg.eigvalsh(b).max()) > 0:
        out_b, info["B"] = repair(b, "B")
    else:
        info["B_unusable"] = f"trace {float(torch.trace(b)):.3e}: no positive mass"
    return out_a, out_b, info


def full_fisher(grads: torch.Tensor) -> torch.Tensor:
    """``(1/K) Σ vec(G_k) vec(G_k)ᵀ`` with column-major vec, for tiny layers (diagnostics, tests)."""
    vecs = grads.to(torch.float64).transpose(1, 2).reshape(grads.shape[0], -1)  # column-major
    return vecs.T @ vecs / grads.shape[0]


def diagnostics(grads: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, rank: int,
                floor_rel: float) -> dict[str, float]:
    """For a small layer: how good is ``B ⊗ A`` as a Fisher, and does it predict the truncation loss?

    Returns ``‖F − B⊗A‖/‖F‖`` for the full empirical Fisher ``F``, and for the rank-``rank``
    GFWSVD truncation ``Δ``: the Kronecker-predicted loss increase ``½ Σ dropped σ̃²`` against the
    full-Fisher quadratic ``½ vec(Δ)ᵀ F vec(Δ)``, plus the same full-Fisher quadratic for plain SVD.
    """
    grads, b, weight = grads.to(a.device), b.to(a.device), weight.to(a.device)  # the factors' device (CUDA or CPU)
    fisher = full_fisher(grads)
    kron = torch.kron(b.double(), a.double())
    result = weighted_svd(weight, factor_metric(a, floor_rel), factor_metric(b, floor_rel))
    w = weight.double()

    def quadratic(delta: torch.Tensor) -> float:
        vec = delta.T.reshape(-1)
        return 0.5 * float(vec @ fisher @ vec)

    return {
        "nkp_rel_error": float(torch.linalg.norm(fisher - kron) / torch.linalg.norm(fisher)),
        "rank": rank,
        "predicted_loss_increase": 0.5 * result.dropped_energy(rank),
        "full_fisher_loss_increase": quadratic(w - result.reconstruct(rank)),
        "full_fisher_loss_increase_plain_svd": quadratic(w - weighted_svd(w, None, None).reconstruct(rank)),
    }
