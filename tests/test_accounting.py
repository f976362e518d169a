"""Rank rounding and the single parameter-accounting function."""

from __future__ import annotations

import pytest

from stagepipe.accounting import break_even_rank, factored_params, rank_for_fraction, ratio_report


def test_reference_ranks_from_the_notes() -> None:
    # LLaMA-7B at 20 % removed (algorithms notes §1.4), align 1
    assert rank_for_fraction(4096, 4096, 0.8, 1) == 1638
    assert rank_for_fraction(11008, 4096, 0.8, 1) == 2388


def _scan(m: int, n: int, kept: float, align: int) -> int | None:
    """The rule by brute force: the largest multiple of ``align`` whose factors store at most
    ``kept·mn`` and strictly fewer than ``mn`` weights; at least ``align``; none if even that saves nothing."""
    useful = [r for r in range(align, min(m, n) + 1, align) if r * (m + n) < m * n]
    if not useful:
        return None
    fitting = [r for r in useful if r * (m + n) <= kept * m * n]
    return max(fitting) if fitting else align


@pytest.mark.parametrize("align", [1, 8, 32])
def test_rank_for_fraction_equals_a_brute_force_scan(align: int) -> None:
    for m, n in [(64, 32), (576, 576), (192, 576), (1536, 576), (40, 24)]:
        for kept in (0.05, 0.3, 0.6, 0.9, 0.999, 1.0):
            assert rank_for_fraction(m, n, kept, align) == _scan(m, n, kept, align), (m, n, kept, align)
    assert break_even_rank(576, 1536) == pytest.approx(576 * 1536 / 2112)


def test_matrix_without_saving_stays_dense() -> None:
    assert rank_for_fraction(8, 8, 0.9, 8) is None  # break-even 4 < align 8
    assert factored_params(8, 8, None) == 64


def test_ratio_report_three_accountings() -> None:
    shapes = {"a": (10, 10), "b": (10, 10), "c": (20, 10)}
    report = ratio_report(shapes, {"a": 2, "b": None}, model_params=1000, requested=0.5)
    assert report.kept_over_target_matrices == pytest.approx((40 + 100) / 200)
    assert report.kept_over_block_linears == pytest.approx((400 - 60) / 400)
    assert report.kept_over_model == pytest.approx((1000 - 60) / 1000)
    assert report.n_factored == 1 and report.n_dense_targets == 1
