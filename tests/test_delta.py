"""Delta compression: ImPart's drop rates and rescaling against the paper's formulas on a hand-made
delta, its sparse delta unbiased for the truncated one, DARE and BitDelta, ratio 1 exact, bytes."""

from __future__ import annotations

import pytest
import torch

from stagepipe.delta import (
    BitSchedule,
    bitdelta,
    bitdelta_bytes,
    dare,
    dare_rate_for_budget,
    dense_delta_bytes,
    impart,
    impart_bytes,
    impart_drop_rates,
    impart_for_budget,
    impart_qt_bytes_at,
    impart_qt_for_budget,
    kept_count,
    low_rank,
    mask_seed,
    masked_gptq,
    pack_sparse,
    quantize_values,
    sparse_bytes,
    sparsify,
    symmetric_scale,
    tensor_bytes,
    unpack_quantized_sparse,
    unpack_sparse,
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
    # a 1000-vector with 10 nonzeros: 16-bit indices (20) + values (20); with 600: bitmap (125) + values;
    # each vector of a mixed group adds its count and format (5 bytes); an all-dense group is its values
    assert sparse_bytes(1000, [10]) == 20 + 20 + 5 and sparse_bytes(1000, [600]) == 1200 + 125 + 5
    assert sparse_bytes(7, [7, 7]) == 28 and sparse_bytes(7, [7, 1]) == 14 + 5 + (1 + 2) + 5  # 1 nonzero of 7: a bitmap byte
    factors = impart(delta, 0.0, 0.0)  # a 6 × 7 delta has 6 components, all kept and dense at ratio 1
    assert impart_bytes(factors) == 6 * (12 + 14) > dense_delta_bytes(6, 7)


@pytest.mark.parametrize("length", [40, 70_000])
def test_sparse_vectors_round_trip_bit_for_bit_in_the_accounted_bytes(length: int) -> None:
    """Every format (dense, bitmap, 16- and 32-bit indices) decodes to the float16 values it was given,
    and the tensors hold exactly ``sparse_bytes``."""
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(4, length, generator=g, dtype=torch.float64).to(torch.float16).double()
    for i, keep in enumerate([1.0, 0.5, 0.01, 0.0]):  # dense, bitmap, indices, empty
        rows[i] = sparsify(rows[i], 1 - keep, g) if keep < 1 else rows[i]
    rows = rows.to(torch.float16).double()
    packed = pack_sparse(rows)
    assert torch.equal(unpack_sparse(packed, length), rows)
    assert tensor_bytes(packed) == sparse_bytes(length, [int((r != 0).sum()) for r in rows])
    assert packed["indices"].dtype == (torch.uint16 if length <= 65536 else torch.int32)
    assert packed["formats"].tolist() == [0, 1, 2, 2]


def test_budgets_are_met_and_spent() -> None:
    """ImPart's bisection and DARE's rate land within the byte budget, and close to it (on a 48 × 40
    delta ImPart moves in whole components, coarse steps: checked at ratio 4 only)."""
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(48, 40, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, 40, dtype=torch.float64))
    for ratio in (4, 8, 16):
        budget = dense_delta_bytes(48, 40) // ratio
        factors = impart_for_budget(delta, budget, 0.5, 1.0, torch.Generator().manual_seed(0))
        assert impart_bytes(factors) <= budget and (ratio != 4 or impart_bytes(factors) >= 0.8 * budget)
        rate = dare_rate_for_budget(48, 40, budget)
        assert sparse_bytes(40, [kept_count(40, rate)] * 48) <= budget
        assert ratio == 16 or sparse_bytes(40, [kept_count(40, rate)] * 48) >= 0.9 * budget
    assert dare_rate_for_budget(48, 40, dense_delta_bytes(48, 40)) == 0.0  # ratio 1: nothing dropped


def test_masks_keep_exact_counts_and_stay_unbiased() -> None:
    v = torch.ones(1000, dtype=torch.float64)
    draws = [sparsify(v, 0.9, torch.Generator().manual_seed(i)) for i in range(200)]
    assert all(int((d != 0).sum()) == 100 for d in draws)
    assert abs(float(torch.stack(draws).mean()) - 1.0) < 1e-12  # 100 survivors × 10 over 1000 entries: exactly 1
    rows = sparsify(torch.ones(5, 50, dtype=torch.float64), 0.5, torch.Generator().manual_seed(0))
    assert ((rows != 0).sum(1) == 25).all()


def test_masked_gptq_keeps_the_zeros_reduces_to_rtn_and_to_gptq() -> None:
    """With ``H = I`` nothing is fed back: each kept entry is rounded on its grid. With every entry kept and one
    grid per row it is GPTQ (``quantize.gptq`` with static per-channel scales; lazy blocks only reorder sums)."""
    from stagepipe.quantize import Grid, gptq

    g = torch.Generator().manual_seed(4)
    w = torch.randn(12, 40, generator=g, dtype=torch.float64)
    mask = (torch.rand(12, 40, generator=g) < 0.5).double()
    bits = torch.full((12, 40), 3)
    scale = torch.tensor([symmetric_scale(r[m > 0], 3) for r, m in zip(w, mask, strict=True)], dtype=torch.float64)
    codes, out = masked_gptq(w, mask, torch.eye(40, dtype=torch.float64), scale[:, None].expand(12, 40), bits, 0.0)
    assert bool((out[mask == 0] == 0).all())
    rounded = (quantize_values(w, scale[:, None].expand(12, 40), bits) - 4) * scale[:, None]
    torch.testing.assert_close(out, rounded * mask, rtol=0, atol=1e-12)
    x = torch.randn(40, 200, generator=g, dtype=torch.float64)
    h = x @ x.T
    full = torch.ones_like(w)
    scale = torch.tensor([symmetric_scale(r, 3) for r in w], dtype=torch.float64)
    codes, out = masked_gptq(w, full, h, scale[:, None].expand(12, 40), bits, 0.01)
    reference = gptq(w, h, Grid(3, None, symmetric=True), damp=0.01, static_scales=True)
    assert float((codes == reference.codes).double().mean()) >= 0.995
    masked_codes, masked_out = masked_gptq(w, mask, h, scale[:, None].expand(12, 40), bits, 0.01)
    assert bool((masked_out[mask == 0] == 0).all())
    error = lambda d: float(torch.trace(d @ h @ d.T))  # noqa: E731
    rtn_out = (quantize_values(w, scale[:, None].expand(12, 40), bits) - 4) * scale[:, None] * mask
    assert error(w * mask - masked_out) < error(w * mask - rtn_out)  # the feedback pays under H


def test_impart_qt_meets_its_budget_in_the_bytes_it_stores() -> None:
    g = torch.Generator().manual_seed(6)
    delta = torch.randn(48, 40, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, 40, dtype=torch.float64))
    x = torch.randn(40, 300, generator=g, dtype=torch.float64)
    schedule = BitSchedule((8, 3, 2), (2, 4))
    for ratio in (4, 16):
        budget = dense_delta_bytes(48, 40) // ratio
        found = impart_qt_for_budget(delta, x @ x.T, budget, 0.0, 1.0, schedule, 0.01, torch.Generator().manual_seed(0))
        s = torch.linalg.svd(delta, full_matrices=False)[1]
        assert tensor_bytes(found.tensors) == impart_qt_bytes_at(s, 48, 40, found.alpha, 0.0, 1.0, schedule) <= budget
        up = unpack_quantized_sparse({k[3:]: v for k, v in found.tensors.items() if k.startswith("up.")}, 48)
        down = unpack_quantized_sparse({k[5:]: v for k, v in found.tensors.items() if k.startswith("down.")}, 40)
        torch.testing.assert_close(up.T, found.up, rtol=0, atol=0)
        torch.testing.assert_close(down, found.down, rtol=0, atol=0)
        assert found.up.shape[1] > 0 and [schedule.of(i) for i in range(7)] == [8, 8, 3, 3, 3, 3, 2]
