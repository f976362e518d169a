"""GPTVQ: assignment and k-means against brute force, the byte accounting, error feedback, and a
codebook refinement that is never worse than its start."""

from __future__ import annotations

import itertools

import pytest
import torch

from stagepipe.gptvq import (
    VQGrid,
    assign,
    dequantize,
    dequantize_stored,
    gptvq,
    int8_codebook,
    kmeans,
    mahalanobis_init,
    stored_bytes,
    stored_tensors,
)
from stagepipe.quantize import pack


def correlated(m: int = 16, n: int = 32, tokens: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n, generator=g, dtype=torch.float64) @ torch.randn(n, tokens, generator=g, dtype=torch.float64)
    x += 0.3 * torch.randn(n, tokens, generator=g, dtype=torch.float64)
    return torch.randn(m, n, generator=g, dtype=torch.float64), x @ x.T / tokens


@pytest.mark.parametrize("chunk_elements", [1 << 18, 9 * 7, 1])  # one chunk; 7 rows a chunk (uneven tail); 1 row
def test_assignment_is_the_weighted_nearest_centroid_by_brute_force(chunk_elements: int) -> None:
    g = torch.Generator().manual_seed(0)
    x, centroids = torch.randn(50, 2, generator=g), torch.randn(9, 2, generator=g)
    weights = torch.rand(50, 2, generator=g) + 0.1
    index = assign(x, centroids, weights, chunk_elements)
    for n in range(50):
        costs = [float((weights[n] * (x[n] - c) ** 2).sum()) for c in centroids]
        assert index[n] == min(range(9), key=costs.__getitem__)


def test_chunked_assignment_of_batched_groups_equals_one_pass() -> None:
    """Groups in the leading dimension (k-means) and one codebook per row (the sweep): chunks change nothing."""
    g = torch.Generator().manual_seed(1)
    x, centroids = torch.randn(3, 40, 4, generator=g, dtype=torch.float64), torch.randn(3, 16, 4, generator=g, dtype=torch.float64)
    weights = torch.rand(3, 40, 4, generator=g, dtype=torch.float64)
    whole = assign(x, centroids, weights, chunk_elements=1 << 30)
    assert torch.equal(assign(x, centroids, weights, chunk_elements=3 * 16 * 6), whole)
    rows = torch.randn(40, 1, 4, generator=g, dtype=torch.float64)
    books = torch.randn(40, 16, 4, generator=g, dtype=torch.float64)
    assert torch.equal(assign(rows, books, weights[0, 0], chunk_elements=1), assign(rows, books, weights[0, 0], 1 << 30))


def test_kmeans_centroids_are_weighted_means_and_never_raise_the_cost() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 2, generator=g, dtype=torch.float64)
    weights = torch.rand(200, 2, generator=g, dtype=torch.float64) + 0.1
    start = mahalanobis_init(x, 8)

    def cost(c: torch.Tensor) -> float:
        return float((weights * (x - c[assign(x, c, weights)]) ** 2).sum())

    costs = [cost(kmeans(x, start, weights, iters)) for iters in range(6)]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(costs)) and costs[-1] < costs[0]
    once = kmeans(x, start, weights, 1)
    members = assign(x, start, weights) == 3
    torch.testing.assert_close(once[3], (weights[members] * x[members]).sum(0) / weights[members].sum(0))


def test_mahalanobis_seeds_are_data_points_spread_over_the_distance_order() -> None:
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seeds = mahalanobis_init(x, 4)
    assert all(any(torch.equal(s, p) for p in x) for s in seeds) and len({tuple(s.tolist()) for s in seeds}) == 4


def test_bits_per_weight_match_the_paper_accounting() -> None:
    """2D, 2 bits per dimension, 2,048 weights per int8 codebook: 2 + 16·2·8/2048 = 2.125 bits per
    weight, plus one float16 scale per codebook."""
    grid = VQGrid(dim=2, bits_per_dim=2, group_columns=256, group_weights=2048)
    m, n = 64, 512
    assert stored_bytes(m, n, grid) * 8 / (m * n) == pytest.approx(2.125 + 16 / 2048)


def test_stored_bytes_are_what_is_packed() -> None:
    w, h = correlated()
    grid = VQGrid(dim=2, bits_per_dim=2, group_columns=16, group_weights=64, kmeans_iters=5, refine_steps=3)
    result = gptvq(w, h, grid)
    codes = pack(result.codes, grid.bits_per_dim * grid.dim)
    books = result.codebooks.to(torch.int8)
    assert torch.equal(books.double(), result.codebooks)
    stored = codes.numel() + books.numel() + result.scales.numel() * 2
    assert stored == stored_bytes(16, 32, grid)
    torch.testing.assert_close(dequantize(result.codes, result.codebooks, result.scales, grid), result.weight)


@pytest.mark.parametrize("weighting", ["official", "hessian"])
def test_refinement_is_never_worse_and_error_feedback_pays(weighting: str) -> None:
    w, h = correlated()
    grid = VQGrid(dim=2, bits_per_dim=2, group_columns=16, group_weights=64, kmeans_iters=20, weighting=weighting)
    result = gptvq(w, h, grid, damp=0.01)
    assert result.refine["loss_after"] <= result.refine["loss_before"]

    def loss(q: torch.Tensor) -> float:
        return float(((w - q) @ h * (w - q)).sum())

    assert loss(result.weight) == pytest.approx(result.refine["loss_after"], rel=1e-9)
    # the same codebooks without error feedback (each vector to its nearest centroid): clearly worse
    per_group = grid.group_columns // grid.dim
    values = result.codebooks * result.scales[..., None, None]
    plain = torch.stack([assign(w[r:r + 1].reshape(-1, 2)[j:j + 1], values[r // 4, j // per_group], torch.ones(2))[0]
                         for r in range(16) for j in range(16)]).reshape(16, 16)
    assert loss(result.weight) < 0.9 * loss(dequantize(plain, result.codebooks, result.scales, grid))


def test_int8_codebook_round_trips_its_own_values() -> None:
    c = torch.tensor([[0.5, -1.0], [0.25, 0.0]], dtype=torch.float64)
    books, scale = int8_codebook(c, 8)
    assert books.abs().max() == 127 and torch.allclose(books * scale, c, atol=float(scale) / 2)


def test_a_matrix_that_does_not_split_into_groups_is_refused() -> None:
    w, h = correlated(m=12, n=32)
    with pytest.raises(ValueError, match="does not split"):
        gptvq(w, h, VQGrid(group_columns=16, group_weights=128))


def test_gptvq_on_a_gpu_stays_there_and_matches_the_host() -> None:
    """k-means, the sweep and the refinement follow the inputs' device; the stored form (host
    memory) decodes to the weights; the loss is the host's up to float64 rounding. Without a GPU
    the same calls run on the host."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    w, h = correlated(m=32, n=64, tokens=800)
    grid = VQGrid(dim=2, bits_per_dim=2, group_columns=32, group_weights=256, kmeans_iters=20)
    host = gptvq(w, h, grid)
    device = gptvq(w.to(device_type), h.to(device_type), grid)
    assert {t.device.type for t in (device.codes, device.codebooks, device.scales, device.weight)} == {device_type}
    assert torch.equal(dequantize_stored(stored_tensors(device), grid, tuple(w.shape)), device.weight.cpu())

    def loss(q: torch.Tensor) -> float:
        return float(((w - q) @ h * (w - q)).sum())

    assert loss(device.weight.cpu()) == pytest.approx(loss(host.weight), rel=0.05)
