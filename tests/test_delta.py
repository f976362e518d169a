"""Delta compression: ImPart's drop rates and rescaling against the paper's formulas on a hand-made
delta, its sparse delta unbiased for the truncated one, DARE and BitDelta, ratio 1 exact, bytes."""

from __future__ import annotations

import pytest
import torch

from stagepipe.delta import (
    bitdelta,
    bitdelta_bytes,
    dare,
    dense_delta_bytes,
    impart,
    impart_bytes,
    impart_drop_rates,
    low_rank,
    mask_seed,
    sparse_bytes,
    sparsify,
)


def hand_made_delta() -> torch.Tensor:
    """Δ = U diag(10, 8, 5, 2, 1) Vᵀ with orthonormal U (6×5) and V (7×5)."""
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(6, 5, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(7, 5, generator=g, dtype=torch.float64)).Q
    return u @ torch.diag(torch.tensor([10.0, 8, 5, 2, 1], dtype=torch.float64)) @ v.T


def test_drop_rates_follow_the_paper() -> None:
    s = torch.tensor([10.0, 8, 5, 2, 1], dtype=torch.float64)
    # α = 0.5, β = 0.2: the weakest component dropped whole, γ = (0.5 − 0.2)/0.8 = 0.375 for the rest,
    # then components from the tail until the mean drop rate is ≥ α
    gamma = 0.375
    expected = gamma * (1 - s / 10)
    expected[4] = 1.0
    assert float(expected.mean()) < 0.5
    expected[3] = 1.0  # mean (0 + .075 + .1875 + 1 + 1)/5 = 0.4525 < 0.5, so one more
    expected[2] = 1.0
    rates = impart_drop_rates(s, 0.5, 0.2)
    torch.testing.assert_close(rates, expected)
    assert float(rates.mean()) >= 0.5
    squared = impart_drop_rates(s, 0.3, 0.0, exponent=0.5)
    assert squared[0] == 0 and squared[1] == pytest.approx(0.3 * (1 - (0.8) ** 0.5))
    with pytest.raises(ValueError, match="α"):
        impart_drop_rates(s, 0.2, 0.5)


def test_survivors_are_rescaled_by_one_over_keep() -> None:
    v = torch.arange(1.0, 1001.0, dtype=torch.float64)
    out = sparsify(v, 0.75, torch.Generator().manual_seed(0))
    kept = out != 0
    torch.testing.assert_close(out[kept], v[kept] / 0.25)
    assert 200 < int(kept.sum()) < 300  # ~25 % kept


def test_the_sparse_delta_is_unbiased_for_the_truncated_delta() -> None:
    """Mean of 4,000 independent ImPart draws against the truncation to the kept components; the
    tolerance: every entry within 5 standard errors of the draws' own spread."""
    delta = hand_made_delta()
    draws = torch.stack([impart(delta, 0.4, 0.2, generator=torch.Generator().manual_seed(i)).delta() for i in range(4000)])
    rates = impart_drop_rates(torch.linalg.svdvals(delta), 0.4, 0.2)
    target = low_rank(delta, int((rates < 1).sum()))
    se = draws.std(0) / 4000 ** 0.5
    assert bool(((draws.mean(0) - target).abs() <= 5 * se + 1e-12).all())
    dare_draws = torch.stack([dare(delta, 0.6, torch.Generator().manual_seed(i)) for i in range(4000)])
    assert bool(((dare_draws.mean(0) - delta).abs() <= 5 * dare_draws.std(0) / 4000 ** 0.5 + 1e-12).all())


def test_ratio_one_gives_the_delta_back_and_masks_are_seeded() -> None:
    delta = hand_made_delta()
    factors = impart(delta, 0.0, 0.0)
    assert bool((factors.rates == 0).all())
    torch.testing.assert_close(factors.delta(), delta, rtol=0, atol=1e-12)
    a = impart(delta, 0.5, 0.2, generator=torch.Generator().manual_seed(mask_seed(0, "layers.0.q_proj")))
    b = impart(delta, 0.5, 0.2, generator=torch.Generator().manual_seed(mask_seed(0, "layers.0.q_proj")))
    c = impart(delta, 0.5, 0.2, generator=torch.Generator().manual_seed(mask_seed(0, "layers.0.k_proj")))
    assert torch.equal(a.delta(), b.delta()) and not torch.equal(a.delta(), c.delta())


def test_bitdelta_and_the_bytes_each_method_stores() -> None:
    delta = hand_made_delta()
    bits = bitdelta(delta)
    assert torch.equal(bits.abs().unique(), delta.abs().mean().reshape(1)) and torch.equal(torch.sign(bits), torch.sign(delta))
    assert bitdelta_bytes(6, 7) == 6 + 2 and dense_delta_bytes(6, 7) == 84
    assert sparse_bytes(1000, 10) == 20 + 20 and sparse_bytes(1000, 600) == 1200 + 125 and sparse_bytes(7, 7) == 14
    factors = impart(delta, 0.0, 0.0)  # a 6 × 7 delta has 6 components, all kept and dense at ratio 1
    assert impart_bytes(factors) == 6 * (12 + 14) > dense_delta_bytes(6, 7)
