"""Low-rank compensation of quantisation error: full rank restores W, the loss is the dropped
weighted energy of the error, EoRA's metric beats a plain SVD in its own loss, and alternation is
never worse than one round."""

from __future__ import annotations

import functools

import pytest
import torch

from stagepipe.compensate import compensate
from stagepipe.linalg import factor_metric, weighted_loss, weighted_svd
from stagepipe.quantize import Grid, gptq, rtn


def layer(m: int = 12, n: int = 24, tokens: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, n, generator=g, dtype=torch.float64) @ torch.randn(n, tokens, generator=g, dtype=torch.float64)
    return torch.randn(m, n, generator=g, dtype=torch.float64), x @ x.T / tokens


def test_full_rank_restores_w_and_the_loss_is_the_dropped_weighted_energy() -> None:
    w, gram = layer()
    right = factor_metric(gram, 1e-10)
    quantize = functools.partial(rtn, grid=Grid(2, 8))
    full = compensate(w, quantize, rank=12, right=right)
    torch.testing.assert_close(full.weight, w, rtol=0, atol=1e-10)
    for rank in (0, 3, 7):
        result = compensate(w, quantize, rank=rank, right=right)
        dropped = weighted_svd(w - result.quantized.weight, None, right).dropped_energy(rank)
        assert result.losses == [pytest.approx(dropped, rel=1e-9)]


def test_eora_beats_lorc_in_the_activation_weighted_loss() -> None:
    w, gram = layer()
    right = factor_metric(gram, 1e-10)
    quantize = functools.partial(gptq, gram=gram, grid=Grid(2, None))
    eora, lorc = compensate(w, quantize, 4, right=right), compensate(w, quantize, 4)
    assert weighted_loss(w - eora.weight, None, right) < weighted_loss(w - lorc.weight, None, right)


def test_alternating_rounds_keep_the_best_and_are_never_worse_than_one() -> None:
    w, gram = layer()
    right = factor_metric(gram, 1e-10)
    quantize = functools.partial(rtn, grid=Grid(2, 8))
    one, many = compensate(w, quantize, 3, right=right), compensate(w, quantize, 3, right=right, rounds=4)
    assert len(many.losses) == 4 and many.losses[0] == pytest.approx(one.losses[0], rel=1e-12)
    assert weighted_loss(w - many.weight, None, right) == pytest.approx(min(many.losses), rel=1e-9)
    assert min(many.losses) <= one.losses[0] and many.best_round == many.losses.index(min(many.losses))
    with pytest.raises(ValueError, match="at least one round"):
        compensate(w, quantize, 3, rounds=0)
