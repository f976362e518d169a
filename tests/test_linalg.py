"""weighted_svd against brute force: exactness, loss identity, optimality, singular metrics."""

from __future__ import annotations

import itertools

import pytest
import torch

from stagepipe.errors import MetricError
from stagepipe.linalg import MetricCache, eigen_root, factor_metric, weighted_loss, weighted_svd

torch.manual_seed(0)


def spd(n: int, cond: float = 10.0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    return (q * torch.logspace(0, torch.log10(torch.tensor(cond)), n, dtype=torch.float64)) @ q.T


@pytest.mark.parametrize("m,n", [(7, 5), (5, 7), (6, 6)])
@pytest.mark.parametrize("kind", ["identity", "diagonal", "dense"])
def test_full_rank_reproduces_w(m: int, n: int, kind: str) -> None:
    w = torch.randn(m, n, dtype=torch.float64)
    metrics = {"identity": (None, None), "diagonal": (torch.rand(m) + 0.1, torch.rand(n) + 0.1),
               "dense": (spd(m), spd(n))}[kind]
    left, right = (factor_metric(x, 1e-12) for x in metrics)
    result = weighted_svd(w, left, right)
    rel = torch.linalg.norm(result.reconstruct(min(m, n)) - w) / torch.linalg.norm(w)
    assert rel < 1e-8
    up, down = result.factors(min(m, n))
    assert torch.allclose(up @ down, w, atol=1e-10)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_loss_equals_dropped_sigma_squared(rank: int) -> None:
    w = torch.randn(6, 5, dtype=torch.float64)
    left, right = factor_metric(spd(6), 1e-12), factor_metric(spd(5), 1e-12)
    result = weighted_svd(w, left, right)
    loss = weighted_loss(w - result.reconstruct(rank), left, right)
    assert loss == pytest.approx(result.dropped_energy(rank), rel=1e-9)


def test_output_side_root_enters_transposed() -> None:
    """The metric form tr(Δᵀ A Δ B) must equal ‖Pᵀ Δ Q‖² (it would not with P instead of Pᵀ)."""
    a, b = spd(4, 50), spd(3, 50)
    delta = torch.randn(4, 3, dtype=torch.float64)
    left, right = factor_metric(a, 1e-12), factor_metric(b, 1e-12)
    assert weighted_loss(delta, left, right) == pytest.approx(float(torch.trace(delta.T @ a @ delta @ b)), rel=1e-10)


def test_svdllm_loss_is_output_error() -> None:
    w = torch.randn(5, 8, dtype=torch.float64)
    x = torch.randn(8, 40, dtype=torch.float64)
    right = factor_metric(x @ x.T, 1e-12)
    result = weighted_svd(w, None, right)
    for rank in range(1, 5):
        err = float(torch.linalg.norm((w - result.reconstruct(rank)) @ x) ** 2)
        assert err == pytest.approx(result.dropped_energy(rank), rel=1e-9)


def test_brute_force_optimality_on_tiny_matrices() -> None:
    """No rank-1 matrix from a dense random search beats the closed form in the weighted metric,
    and an explicit least-squares refit from the optimum cannot lower the loss."""
    w = torch.randn(3, 3, dtype=torch.float64)
    left, right = factor_metric(spd(3, 20), 1e-12), factor_metric(spd(3, 20), 1e-12)
    best = weighted_loss(w - weighted_svd(w, left, right).reconstruct(1), left, right)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3000):
        u, v = torch.randn(3, 1, generator=gen, dtype=torch.float64), torch.randn(1, 3, generator=gen, dtype=torch.float64)
        # optimal scale of the candidate direction pair in the weighted metric (1-D least squares)
        cand = u @ v
        num = float(torch.trace(cand.T @ left.matrix() @ w @ right.matrix()))
        den = float(torch.trace(cand.T @ left.matrix() @ cand @ right.matrix()))
        assert weighted_loss(w - (num / den) * cand, left, right) >= best - 1e-9
    # full-vector least squares over all (u, v) pairs on a grid of directions is too costly; instead
    # check the explicit normal equations: vec(Ŵ) minimises over the rank-1 manifold locally.
    a, b = left.matrix(), right.matrix()
    kron = torch.kron(b, a)  # column-major vec metric
    vec = lambda m: m.T.reshape(-1)  # noqa: E731
    optimum = weighted_svd(w, left, right).reconstruct(1)
    assert float(vec(w - optimum) @ kron @ vec(w - optimum)) == pytest.approx(best, rel=1e-9)


def test_rank_deficient_gram_is_floored_and_recorded() -> None:
    x = torch.randn(8, 3, dtype=torch.float64)  # 3 tokens for 8 channels: rank 3
    right = factor_metric(x @ x.T, 1e-6)
    assert right.repair["n_floored"] == 5
    assert right.repair["cond_after"] == pytest.approx(1e6, rel=1e-6)
    w = torch.randn(4, 8, dtype=torch.float64)
    result = weighted_svd(w, None, right)
    assert torch.allclose(result.reconstruct(4), w, atol=1e-8)  # floored metric is still invertible


@pytest.mark.parametrize("cond", [10.0, 1e4, 1e5])
def test_cholesky_root_gives_the_eigen_roots_weighted_svd_when_the_floor_cannot_bite(cond: float) -> None:
    """Any square root of the same metric gives the same truncation: the certified Cholesky root
    (taken when M − floor·‖M‖_F·I is positive definite) against the eigen route, at every rank."""
    w = torch.randn(9, 7, dtype=torch.float64)
    a, b = spd(9, cond), spd(7, cond)
    left, right = factor_metric(a, 1e-6), factor_metric(b, 1e-6)
    assert left.kind == right.kind == "cholesky" and left.repair["n_floored"] == 0
    assert torch.allclose(left.matrix(), a, atol=1e-12 * cond)
    by_chol = weighted_svd(w, left, right)
    by_eigen = weighted_svd(w, eigen_root(a, 1e-6), eigen_root(b, 1e-6))
    assert torch.allclose(by_chol.sigma, by_eigen.sigma, rtol=1e-9)
    for rank in range(1, 8):
        assert torch.allclose(by_chol.reconstruct(rank), by_eigen.reconstruct(rank), atol=1e-8 * cond)
    assert torch.allclose(by_chol.reconstruct(7), w, atol=1e-8 * cond)


def test_a_metric_the_floor_touches_takes_the_eigen_route() -> None:
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    barely = (q * torch.tensor([1e-7, 5e-7, 1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)) @ q.T  # λ_min < 1e-6 λ_max
    root = factor_metric(barely, 1e-6)
    assert root.kind == "dense" and root.repair["n_floored"] == 2


def test_metric_cache_factorises_each_distinct_metric_once() -> None:
    gram = spd(5)
    cache = MetricCache(1e-6, torch.device("cpu"))
    first = cache(gram, "q.right")
    assert cache(gram.clone(), "k.right") is first  # equal by value: q/k/v share their input Gram
    other = cache(spd(5), "o.right")
    assert other is not first and cache.computed == 2 and cache(None, "left") is None
    assert torch.equal(first.matrix(), factor_metric(gram, 1e-6).matrix())


def test_unusable_metric_raises_instead_of_identity() -> None:
    with pytest.raises(MetricError):
        factor_metric(-spd(4), 1e-6)
    with pytest.raises(MetricError):
        factor_metric(torch.full((3, 3), float("nan")), 1e-6)


def test_identity_metrics_equal_plain_svd() -> None:
    w = torch.randn(6, 4, dtype=torch.float64)
    result = weighted_svd(w, None, None)
    assert torch.allclose(result.sigma, torch.linalg.svdvals(w))
    for r, s in itertools.product(range(1, 4), [result]):
        assert s.dropped_energy(r) == pytest.approx(float((torch.linalg.svdvals(w)[r:] ** 2).sum()))


# --------------------------------------------------------------------------- anchored (AA-SVD) reduced-rank regression
def _anchored_problem(seed: int = 0, m: int = 5, n: int = 4, tokens: int = 40):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    y = torch.randn(n, tokens, generator=g, dtype=torch.float64)  # dense inputs, one column per token
    shifted = y + 0.3 * torch.randn(n, tokens, generator=g, dtype=torch.float64)  # inputs after compression below
    a = torch.randn(m, m, generator=g, dtype=torch.float64)
    return w, y, shifted, a @ a.T + 0.1 * torch.eye(m, dtype=torch.float64)


def _anchored_loss(w, y, shifted, approx, left_metric=None) -> float:
    residual = w @ y - approx @ shifted
    if left_metric is None:
        return float((residual**2).sum())
    return float(torch.trace(residual.T @ left_metric @ residual))


def test_anchored_svd_full_rank_is_the_least_squares_regression() -> None:
    from stagepipe.linalg import anchored_svd

    w, y, shifted, _ = _anchored_problem()
    result = anchored_svd(w, y @ shifted.T, None, factor_metric(shifted @ shifted.T, 1e-12))
    lstsq = torch.linalg.lstsq(shifted.T, (w @ y).T).solution.T  # every row's least squares, explicitly
    assert torch.allclose(result.reconstruct(len(result.sigma)), lstsq, atol=1e-10)


@pytest.mark.parametrize("weighted", [False, True], ids=["identity-left", "metric-left"])
def test_anchored_svd_loss_is_regression_residual_plus_dropped_sigma(weighted: bool) -> None:
    from stagepipe.linalg import anchored_svd

    w, y, shifted, left_metric = _anchored_problem(1)
    left = factor_metric(left_metric, 1e-12) if weighted else None
    metric = left_metric if weighted else None
    result = anchored_svd(w, y @ shifted.T, left, factor_metric(shifted @ shifted.T, 1e-12))
    floor = _anchored_loss(w, y, shifted, result.reconstruct(4), metric)  # full rank: the regression residual
    for rank in range(5):
        loss = _anchored_loss(w, y, shifted, result.reconstruct(rank), metric)
        assert loss == pytest.approx(floor + result.dropped_energy(rank), rel=1e-10, abs=1e-9)


def test_anchored_svd_beats_every_rank_k_found_by_brute_force() -> None:
    """Alternating least squares over rank-2 products from many starts never finds a lower
    anchored loss than the closed form, and its best start reaches it."""
    from stagepipe.linalg import anchored_svd

    w, y, shifted, _ = _anchored_problem(2)
    rank = 2
    closed = _anchored_loss(w, y, shifted, anchored_svd(w, y @ shifted.T, None, factor_metric(shifted @ shifted.T, 1e-12))
                            .reconstruct(rank))
    target = w @ y
    found = []
    g = torch.Generator().manual_seed(3)
    for _ in range(8):
        up = torch.randn(w.shape[0], rank, generator=g, dtype=torch.float64)
        for _ in range(300):
            # down: min ‖T − up·down·Ŷ‖ (vec form); up: min ‖T − up·(down·Ŷ)‖ (row-wise least squares)
            design = torch.kron(shifted.T.contiguous(), up)
            down = torch.linalg.lstsq(design, target.T.reshape(-1, 1)).solution.reshape(w.shape[1], rank).T
            up = torch.linalg.lstsq((down @ shifted).T, target.T).solution.T
        found.append(_anchored_loss(w, y, shifted, up @ down))
    assert min(found) >= closed - 1e-9 * closed
    assert min(found) == pytest.approx(closed, rel=1e-8)


def test_anchored_svd_on_unshifted_inputs_is_svdllm() -> None:
    from stagepipe.linalg import anchored_svd

    w, y, _, _ = _anchored_problem(4)
    gram = y @ y.T
    right = factor_metric(gram, 1e-12)
    anchored, svdllm = anchored_svd(w, gram, None, right), weighted_svd(w, None, right)
    assert torch.allclose(anchored.sigma, svdllm.sigma, rtol=1e-12)
    for rank in range(1, 5):
        up_a, down_a = anchored.factors(rank)
        up_s, down_s = svdllm.factors(rank)
        assert torch.allclose(up_a @ down_a, up_s @ down_s, atol=1e-12)
        assert torch.allclose(up_a.abs(), up_s.abs(), atol=1e-10)  # the same factors up to signs


def test_anchored_svd_is_the_same_for_every_root_of_the_shifted_gram() -> None:
    """Cholesky, eigen (dense) and diagonal roots whiten the cross term alike (``X Q^{-T}``)."""
    from stagepipe.linalg import anchored_svd

    w, y, shifted, _ = _anchored_problem(5)
    cross, gram = y @ shifted.T, shifted @ shifted.T
    cholesky, dense = factor_metric(gram, 1e-12), eigen_root(gram, 1e-12)
    assert (cholesky.kind, dense.kind) == ("cholesky", "dense")
    a, b = anchored_svd(w, cross, None, cholesky), anchored_svd(w, cross, None, dense)
    assert torch.allclose(a.reconstruct(2), b.reconstruct(2), atol=1e-10)
    diagonal_gram = torch.diag(gram.diagonal())
    c = anchored_svd(w, cross, None, factor_metric(gram.diagonal(), 1e-12))
    d = anchored_svd(w, cross, None, eigen_root(diagonal_gram, 1e-12))
    assert torch.allclose(c.reconstruct(2), d.reconstruct(2), atol=1e-10)
