"""Every method against its own objective, written independently of the metric machinery."""

from __future__ import annotations

import pytest
import torch

from stagepipe.linalg import factor_metric, weighted_loss, weighted_svd
from stagepipe.methods import METHODS, LayerStats, make_method

SVDMethod, SVDLLMMethod, SVDLLMV2Method, ASVDMethod, ResSVDMethod, FWSVDMethod, KFACSVDMethod, GFWSVDMethod, MixedMethod = (
    METHODS[name].config for name in ("svd", "svdllm", "svdllm_v2", "asvd", "ressvd", "fwsvd", "kfac_svd", "gfwsvd", "mixed"))

M, N, TOKENS, K = 6, 5, 40, 12
g = torch.Generator().manual_seed(0)
W = torch.randn(M, N, dtype=torch.float64, generator=g)
X = torch.randn(N, TOKENS, dtype=torch.float64, generator=g) * torch.linspace(0.2, 3, N, dtype=torch.float64)[:, None]
D = torch.randn(M, TOKENS, dtype=torch.float64, generator=g)
GRADS = torch.randn(K, M, N, dtype=torch.float64, generator=g)
A = (lambda a: a @ a.T + torch.eye(M, dtype=torch.float64))(torch.randn(M, M, dtype=torch.float64, generator=g))
B = (lambda b: b @ b.T + torch.eye(N, dtype=torch.float64))(torch.randn(N, N, dtype=torch.float64, generator=g))


def stats() -> LayerStats:
    s = LayerStats()
    s.gram["w"], s.tokens["w"] = X @ X.T, TOKENS
    s.abs_sum["w"], s.abs_max["w"] = X.abs().sum(1), X.abs().max(1).values
    s.fisher["w"] = {"A": A, "B": B, "kfac_out": D @ D.T / TOKENS, "grad_sq": (GRADS**2).mean(0)}
    return s


def frob(delta: torch.Tensor) -> float:
    return float((delta**2).sum())


fsq = (GRADS**2).mean(0)
OBJECTIVES = {
    "svd": (SVDMethod(name="svd"), frob),
    "svdllm": (SVDLLMMethod(name="svdllm"), lambda d: frob(d @ X) / TOKENS),
    "svdllm_v2": (SVDLLMV2Method(name="svdllm_v2"), lambda d: frob(d @ X) / TOKENS),
    "asvd_mean": (ASVDMethod(name="asvd", alpha=0.5), lambda d: frob(d * ((X.abs().mean(1)) ** 0.5)[None, :])),
    "asvd_max": (ASVDMethod(name="asvd", alpha=1.0, scale="max"), lambda d: frob(d * X.abs().max(1).values[None, :])),
    "fwsvd": (FWSVDMethod(name="fwsvd"), lambda d: float((fsq.sum(0)[None, :] * d**2).sum())),
    "fwsvd_both": (FWSVDMethod(name="fwsvd", sides="both"),
                   lambda d: float((fsq.sum(1)[:, None] * fsq.sum(0)[None, :] * d**2).sum())),
    "kfac_svd": (KFACSVDMethod(name="kfac_svd"), lambda d: float(torch.trace(d.T @ (D @ D.T / TOKENS) @ d @ (X @ X.T / TOKENS)))),
    "gfwsvd": (GFWSVDMethod(name="gfwsvd"), lambda d: float(d.T.reshape(-1) @ torch.kron(B, A) @ d.T.reshape(-1))),
    "ressvd": (ResSVDMethod(name="ressvd"), lambda d: frob(d @ X) / TOKENS),  # its one-shot (decompose) spectrum
    "mixed": (MixedMethod(name="mixed", left="fisher_nkp", right="gram"),
              lambda d: float(torch.trace(d.T @ A @ d @ (X @ X.T / TOKENS)))),
}


@pytest.mark.parametrize("key", sorted(OBJECTIVES))
def test_method_closed_form_is_the_weighted_least_squares_optimum(key: str) -> None:
    cfg, objective = OBJECTIVES[key]
    pair = make_method(cfg).metrics("w", (M, N), stats())
    left, right = factor_metric(pair.left, 1e-12), factor_metric(pair.right, 1e-12)
    result = weighted_svd(W, left, right)
    assert torch.allclose(result.reconstruct(min(M, N)), W, atol=1e-9)  # full rank reproduces W
    for rank in (1, 2, 3):
        delta = W - result.reconstruct(rank)
        # the method's own objective, written independently, equals Σ dropped σ²
        assert objective(delta) == pytest.approx(result.dropped_energy(rank), rel=1e-8)
        # explicit weighted least squares for the left factor given the right one: U = W B Vᵀ (V B Vᵀ)⁻¹
        up, down = result.factors(rank)
        b = right.matrix() if right else torch.eye(N, dtype=torch.float64)
        u_ls = torch.linalg.solve((down @ b @ down.T).T, (W @ b @ down.T).T).T
        assert torch.allclose(u_ls @ down, up @ down, atol=1e-8)
        # and no nearby rank-r matrix does better
        for _ in range(50):
            du = 0.1 * torch.randn(M, rank, dtype=torch.float64, generator=g)
            dv = 0.1 * torch.randn(rank, N, dtype=torch.float64, generator=g)
            assert weighted_loss(W - (up + du) @ (down + dv), left, right) >= weighted_loss(delta, left, right) - 1e-9


def test_kfac_shrinkage_moves_both_metrics_toward_their_mean_eigenvalue_and_is_recorded() -> None:
    plain = make_method(KFACSVDMethod(name="kfac_svd")).metrics("w", (M, N), stats())
    pair = make_method(KFACSVDMethod(name="kfac_svd", shrinkage=0.3)).metrics("w", (M, N), stats())
    assert pair.notes["shrinkage"] == 0.3 and "shrinkage" not in plain.notes
    for shrunk, metric, dim in ((pair.left, D @ D.T / TOKENS, M), (pair.right, X @ X.T / TOKENS, N)):
        expected = 0.7 * metric + 0.3 * torch.trace(metric) / dim * torch.eye(dim, dtype=torch.float64)
        assert torch.allclose(shrunk, expected, atol=1e-12)
        assert not torch.allclose(shrunk, metric, atol=1e-3)
        # the spread of the spectrum shrinks by exactly 1 − λ
        spread = lambda x: float(torch.linalg.eigvalsh(x).max() - torch.linalg.eigvalsh(x).min())  # noqa: E731
        assert spread(shrunk) == pytest.approx(0.7 * spread(metric), rel=1e-9)


def test_gfwsvd_unusable_side_falls_back_and_says_so() -> None:
    s = stats()
    del s.fisher["w"]["A"]
    s.fisher_info["w"] = {"A_unusable": "trace -1e-3 after sign fix"}
    pair = make_method(GFWSVDMethod(name="gfwsvd")).metrics("w", (M, N), s)
    assert "K-FAC" in pair.notes["left_fallback"] and torch.allclose(pair.left, D @ D.T / TOKENS)


def test_methods_declare_the_statistics_they_need() -> None:
    assert make_method(SVDMethod(name="svd")).activation_stats == frozenset()
    assert make_method(ASVDMethod(name="asvd")).activation_stats == {"abs"}
    assert make_method(FWSVDMethod(name="fwsvd")).gradient_stats == {"grad_sq"}
    assert make_method(GFWSVDMethod(name="gfwsvd")).gradient_stats == {"nkp", "kfac_out"}
    assert make_method(MixedMethod(name="mixed", left="kfac_out", right="act_max")).activation_stats == {"abs"}


def _best_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Eckart–Young: the best rank-r approximation in the Frobenius norm, by a plain SVD."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


@pytest.mark.parametrize("split", [0.0, 0.25, 0.5, 1.0])
def test_ressvd_is_plain_svd_then_whitened_svd_of_the_residual(split: float) -> None:
    from stagepipe.methods.ressvd import residual_factors, stage_ranks

    cfg = ResSVDMethod(name="ressvd", split=split)
    pair = make_method(cfg).metrics("w", (M, N), stats())
    right = factor_metric(pair.right, 1e-12)
    up, down, _ = residual_factors(W, right, min(M, N), split)
    assert torch.allclose(up @ down, W, atol=1e-9)  # full rank reproduces W, whatever the split
    for rank in (1, 2, 3, 4):
        r1, r2 = stage_ranks(rank, split)
        up, down, info = residual_factors(W, right, rank, split)
        assert up.shape == (M, rank) and down.shape == (rank, N) and (info["r1"], info["r2"]) == (r1, r2)
        first = _best_rank(W, r1)  # stage 1, written independently
        residual = W - first
        # stage 2: the activation-norm optimum of the residual, explicitly: SVD_r2(R X) X⁺ (X has full row rank)
        second = torch.linalg.lstsq(X.T, _best_rank(residual @ X, r2).T).solution.T
        assert torch.allclose(up @ down, first + second, atol=1e-8)
        assert info["activation_loss"] == pytest.approx(frob((W - up @ down) @ X) / TOKENS, rel=1e-8)
        # Eckart–Young: under ‖·X‖ one-shot SVD-LLM is never beaten
        assert info["activation_loss"] >= frob((W - torch.linalg.lstsq(X.T, _best_rank(W @ X, rank).T).solution.T) @ X) / TOKENS - 1e-9


def test_ressvd_extreme_splits_are_svdllm_and_svd() -> None:
    from stagepipe.methods.ressvd import residual_factors

    right = factor_metric(X @ X.T / TOKENS, 1e-12)
    svdllm = weighted_svd(W, None, right).reconstruct(3)
    up, down, _ = residual_factors(W, right, 3, 0.0)
    assert torch.allclose(up @ down, svdllm, atol=1e-9)
    up, down, _ = residual_factors(W, right, 3, 1.0)
    assert torch.allclose(up @ down, _best_rank(W, 3), atol=1e-9)
